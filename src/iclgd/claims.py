"""SPEC §7's claims: the papers' directional claims, measured on a report's runs, tested, judged.

A claim is a quantity whose sign or size the papers assert (``Spec``: ``a − b``, or ``a`` against
a bound). For every trained cell (task, seed) of a (model, protocol) group the quantity is
measured on all eval examples and tested with a paired bootstrap over those examples (one set of
resamples per task and seed, shared by every setting of the cell and by its untrained controls:
``report_cells``). The cells are then pooled into one effect, interval and p-value per claim
(``_pool``: tasks are the unit of replication), Holm-corrected over every directional claim of the
report, and judged holds / reversed / inconclusive by ``stats.evaluate_claims``. ``LEGEND`` states
every rule; it is printed above the claims table. Margins for "≈ 0", "small" and "high" are the
constants below, fixed before looking at any result.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from iclgd import stats
from iclgd.report_cells import LEVEL, N_BOOT, Cell, Key

if TYPE_CHECKING:
    from iclgd.report import Group

PUBLISHED_MODEL = "fairseq-dense 1.3B, Dai et al. 2023 / Deutch et al."
# SPEC §5: accuracy (%) ZSL / GD / ICL of the published 1.3B runs
PUBLISHED_ACCURACY = {"sst2": (70.5, 73.9, 92.7), "sst5": (39.3, 39.5, 45.0), "mr": (65.9, 73.0, 89.0),
                      "subj": (72.6, 77.8, 90.0), "agnews": (46.3, 65.3, 79.2), "cb": (37.5, 55.4, 57.1)}
RANDOM_MARGIN = 0.05  # "SimAOU random ≈ 0": |SimAOU| < 0.05, a tenth of the published SimAOU gap scale
ALPHA_MARGIN = 0.3  # "α(GD, LCGD) small": |α| < 0.3 (a cosine; below the published SimAM_Δ values)
REC2FTP_HIGH = 50.0  # "Rec2FTP high": above 50%, i.e. ICL recovers most of what P fixed
FAMILY_ALPHA = 0.05  # family-wise error rate of one report's directional claims (Holm)
PAPER_PROCESSES = ("gd", "lcgd")  # the papers' processes; only they enter claims
# Flags that leave a cell out of a claim. Trained model: every code but label_ties (a count of tied
# examples; the severe case, most examples tied, is uniform_labels, which excludes). Control: only
# training flags; one-class or uniform predictions are what an untrained model is expected to give.
NOT_EXCLUDING = ("label_ties",)
CONTROL_EXCLUDING = ("loss_not_falling", "vanishing_gradients", "zero_update")
HOLDS, REVERSED, INCONCLUSIVE = stats.HOLDS, stats.REVERSED, stats.INCONCLUSIVE


@dataclass(frozen=True)
class Spec:
    """One claim: the quantity a − b (b None: a − null) and what the claim says about it."""

    name: str  # unique within a group
    text: str  # the claim in words
    quantity: str  # what "measured" is, with its unit
    a: Key
    b: Key | None = None
    null: float = 0.0  # with b None: the bound a is compared with (the effect is a − null)
    direction: int = 1  # +1: effect > 0; 0: |effect| < margin (an equivalence claim)
    margin: float | None = None
    needs: tuple[str, ...] = ()  # settings the quantity is computed from
    except_tasks: tuple[str, ...] = ()
    control: str | None = None  # b is read from the paired control run of this kind
    published: str = "—"
    decimals: int = 3

    @property
    def bound(self) -> str:
        if self.direction == 0:
            return f"within ±{self.margin:g}"
        return f"> {self.null:g}"


@dataclass
class CellEffect:
    """The claim's quantity on one cell, with its paired bootstrap interval and p (unadjusted)."""

    task: str
    seed: int
    effect: float = math.nan  # a − b − null
    low: float = math.nan
    high: float = math.nan
    p: float = math.nan
    excluded: str = ""  # why the cell is left out ("" if it counts)

    @property
    def label(self) -> str:
        return f"{self.task} s{self.seed}"


@dataclass
class Result:
    """A claim of one group: its cells, the pooled test, and the verdict (``claim``)."""

    group: str
    spec: Spec
    cells: list[CellEffect] = field(default_factory=list)
    status: str = ""  # "": measured; else why not ("not measured (needs lcgd)")
    evidence: str = ""  # how the pooled effect was tested
    claim: stats.Claim | None = None

    @property
    def excluded(self) -> list[str]:
        return [f"{c.label} ({c.excluded})" for c in self.cells if c.excluded]


def _f(x: float, d: int, sign: bool = False) -> str:
    return "n/a" if math.isnan(x) else f"{x:+.{d}f}" if sign else f"{x:.{d}f}"


def _published_accuracy() -> str:
    zsl, icl = (np.mean([v[i] for v in PUBLISHED_ACCURACY.values()]) for i in (0, 2))
    return f"{icl - zsl:+.2f} pp (ICL {icl:.2f} vs ZSL {zsl:.2f}, mean of six tasks)"


def specs(controls: list[str]) -> list[Spec]:
    """The claims of SPEC §7 for a group whose untrained controls are ``controls``."""
    gd, lcgd = PAPER_PROCESSES
    both = ("zsl", "icl", gd, lcgd)
    out = [
        Spec("icl>zsl", "ICL accuracy above ZSL", "ICL − ZSL accuracy (pp)", ("accuracy", "icl"),
             ("accuracy", "zsl"), needs=("zsl", "icl"), published=_published_accuracy(), decimals=1),
        Spec("lcgd>gd simaou", "LCGD's SimAOU above GD's on most tasks", "SimAOU (norm): LCGD − GD",
             ("simaou", f"{lcgd} (norm)"), ("simaou", f"{gd} (norm)"), needs=both,
             published="+0.092 (LCGD 0.279 vs GD 0.187, mean)"),
        Spec("gd>lcgd simam", "GD's SimAM above LCGD's", "SimAM: GD − LCGD", ("simam", gd), ("simam", lcgd),
             needs=both, published="+0.152 (GD 0.435 vs LCGD 0.283, mean)"),
        Spec("lcgd>gd simam_delta", "LCGD's SimAM_Δ above GD's, except AGNews", "SimAM_Δ: LCGD − GD",
             ("simam_delta", lcgd), ("simam_delta", gd), needs=both, except_tasks=("agnews",),
             published="+0.069 (LCGD 0.336 vs GD 0.267, mean)"),
        Spec("random≈0", "SimAOU of a random update ≈ 0", "SimAOU (norm), centred Gaussian update",
             ("simaou", "random gaussian (norm)"), direction=0, margin=RANDOM_MARGIN, needs=("zsl", "icl"),
             published="0.002 (uniform [0,1) update, reference)"),
        Spec("alpha small", "α(GD, LCGD) small", "α(GD, LCGD), attention logits", ("alpha", "attn logits"),
             direction=0, margin=ALPHA_MARGIN, needs=("zsl", gd, lcgd)),
    ]
    for p in PAPER_PROCESSES:
        out.append(Spec(f"rec2ftp {p} high", f"Rec2FTP({p.upper()}) high", f"Rec2FTP({p.upper()}) (%)",
                        ("rec2ftp", p), null=REC2FTP_HIGH, needs=("zsl", "icl", p), decimals=1))
    for p in PAPER_PROCESSES:  # Dai et al.'s fourth metric (SPEC §4), each against its chance level
        out.append(Spec(f"ranking {p} token>random", f"{p.upper()}'s attention ranking of the demonstration tokens "
                        "agrees with ICL's above random", f"Kendall τ, token level: {p.upper()} − random",
                        ("ranking_token", f"{p}: Kendall τ"), ("ranking_token", "random: Kendall τ"), needs=("icl", p)))
        out.append(Spec(f"ranking {p} example>shuffled", f"{p.upper()}'s attention ranking of the demonstrations "
                        "agrees with ICL's above the length-matched chance level", f"Kendall τ, example level: "
                        f"{p.upper()} − shuffled", ("ranking_example", f"{p}: Kendall τ"),
                        ("ranking_example", f"{p}: Kendall τ, shuffled"), needs=("icl", p)))
    for c in controls:
        for p in PAPER_PROCESSES:
            for key, metric in ((("simaou", f"{p} (norm)"), "SimAOU (norm)"), (("simaou", f"{p} (raw)"), "SimAOU (raw)"),
                                (("simam", p), "SimAM"), (("simam_delta", p), "SimAM_Δ")):
                out.append(Spec(f"trained>{c} {metric} {p}", f"{metric} of {p.upper()}: the trained model's above "
                                f"the {c} control's", f"{metric} of {p.upper()}: trained − {c}", key, key,
                                needs=("zsl", "icl", p), control=c))
    return out


# ---------------------------------------------------------------------------------------------
# measuring: per cell, then pooled
# ---------------------------------------------------------------------------------------------


def _const(x: float) -> stats.Stat:
    return lambda idx: np.full(np.shape(idx)[:-1], x)


def _flag_reason(cell: Cell, uses: tuple[str, ...], excluding, who: str = "") -> str:
    bad = [f"{who}{s}: {code}" for s in uses for code in cell.flags.get(s, []) if excluding(code)]
    return ", ".join(bad)


def _exclusion(spec: Spec, cell: Cell, other: Cell | None) -> str:
    """Why ``cell`` (and ``other``, where b is read) is left out of ``spec``; "" if it counts."""
    if cell.task in spec.except_tasks:
        return "excepted by the claim"
    missing = [s for s in spec.needs if s not in cell.run.settings]
    if missing:
        return f"no {', '.join(missing)}"
    if other is None:
        return f"no {spec.control} run"
    if spec.a not in cell.values or (spec.b is not None and spec.b not in other.values):
        where = "" if other is cell else f" or the {spec.control} run"
        return f"not computed on this cell{where} (its run holds no such value: a setting or a recording is missing, e.g. a run made with --no-ranking or by an older iclgd)"
    if other is not cell and (cell.n_examples != other.n_examples or cell.eval_ids != other.eval_ids):
        return f"eval examples differ from the {spec.control} run's"
    uses = tuple(dict.fromkeys(cell.values[spec.a].uses + (cell.values[spec.b].uses if spec.b else ())))
    reason = _flag_reason(cell, uses, lambda code: code not in NOT_EXCLUDING)
    if other is not cell:
        theirs = _flag_reason(other, other.values[spec.b].uses, lambda code: code in CONTROL_EXCLUDING,
                              f"{spec.control} ")
        reason = ", ".join(r for r in (reason, theirs) if r)
    return reason


def _measure(group: Group, spec_list: list[Spec]) -> dict[str, list[CellEffect]]:
    """Every spec's per-cell effects, one trained cell at a time (its resamples drawn once)."""
    controls = {(c.task, c.seed, c.control): c for c in group.cells if c.control is not None}
    out: dict[str, list[CellEffect]] = {s.name: [] for s in spec_list}
    for cell in (c for c in group.cells if c.control is None):
        idx = None
        for spec in spec_list:
            other = cell if spec.control is None else controls.get((cell.task, cell.seed, spec.control))
            ce = CellEffect(cell.task, cell.seed, excluded=_exclusion(spec, cell, other))
            out[spec.name].append(ce)
            if ce.excluded:
                continue
            idx = cell.indices() if idx is None else idx
            stat_b = other.values[spec.b].stat() if spec.b else _const(spec.null)
            t = stats.paired_difference_test(cell.values[spec.a].stat(), stat_b, cell.n_examples, n_boot=N_BOOT,
                                             level=LEVEL, batched=True, idx=idx)
            ce.effect, ce.low, ce.high, ce.p = float(t.effect), float(t.low), float(t.high), float(t.p)
            if not math.isfinite(ce.effect):
                ce.excluded = "undefined on this cell (e.g. Rec2FTP where P fixed no example)"
    return out


def _pool(spec: Spec, cells: list[CellEffect]) -> tuple[stats.Test | None, str]:
    """The claim's effect, interval and p from its cells, and how they were obtained.

    Tasks are the unit of replication: the claims are about a model across tasks, and the seeds
    of one task share its eval set. ≥ 2 tasks: a one-sample t test over the per-task effects (each
    the mean over the task's seeds); one task with ≥ 2 seeds: over the seeds; one cell: its paired
    bootstrap over eval examples (the verdict then speaks for that cell only).
    """
    kept = [c for c in cells if not c.excluded]
    if not kept:
        return None, ""
    by_task: dict[str, list[float]] = {}
    for c in kept:
        by_task.setdefault(c.task, []).append(c.effect)
    if len(by_task) >= 2:
        units = [float(np.mean(v)) for v in by_task.values()]
        how = f"t test over {len(units)} tasks (each the mean of its seeds)"
    elif len(kept) >= 2:
        units = [c.effect for c in kept]
        how = f"t test over {len(units)} seeds of {kept[0].task}"
    else:
        c = kept[0]
        test = stats.Test(c.effect, c.low, c.high, c.p, N_BOOT, "paired percentile bootstrap", LEVEL)
        return test, f"paired bootstrap over the eval examples of 1 cell ({c.label})"
    test = stats.one_sample_test(units, level=LEVEL)
    if spec.direction != 0:
        how += f"; on the claimed side in {sum(u * spec.direction > 0 for u in units)}/{len(units)}"
    return test, how


def _group_results(group: Group, label: str) -> list[Result]:
    controls = [c for c in group.controls if c is not None]
    spec_list = specs(controls)
    effects = _measure(group, spec_list)
    present = set(s for c in group.cells if c.control is None for s in c.run.settings)
    results = []
    for spec in spec_list:
        r = Result(label, spec, effects[spec.name])
        missing = [s for s in spec.needs if s not in present]
        test, r.evidence = _pool(spec, r.cells)
        if missing:
            r.status = f"not measured (needs {', '.join(missing)})"
        elif test is None:
            r.status = "not measured (every cell excluded)" if r.cells else "not measured (no trained runs)"
        else:
            r.claim = stats.Claim(
                name=spec.name, description=spec.text, effect=float(test.effect), low=float(test.low),
                high=float(test.high), p=float(test.p) if spec.direction else math.nan, direction=spec.direction,
                published=spec.published, published_model=PUBLISHED_MODEL if spec.published != "—" else None,
                n_cells=sum(not c.excluded for c in r.cells), excluded=r.excluded, margin=spec.margin)
        results.append(r)
    if not controls:
        results.append(Result(label, Spec("trained>controls", "Each similarity metric of the trained model above "
                                          "the untrained controls'", "", ("simaou", "")),
                              status="not measured (needs untrained control runs, SPEC §7)"))
    return results


def evaluate(groups: list[Group], alpha: float = FAMILY_ALPHA) -> list[Result]:
    """Every claim of every group, with Holm over all directional claims of the report."""
    results = []
    for g in groups:
        results += _group_results(g, g.label(groups))
    measured = [r for r in results if r.claim is not None]
    for r, c in zip(measured, stats.evaluate_claims([r.claim for r in measured], alpha=alpha), strict=True):
        r.claim = c
    return results


# ---------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------

LEGEND = (
    "Each claim is a quantity whose sign or size the papers assert, measured on all eval examples (never "
    "the F2T subset) of the trained model's cells. Per cell (task, seed): a paired bootstrap over eval "
    f"examples ({N_BOOT} resamples shared by every setting of the cell and its controls; percentile "
    f"{LEVEL:.0%} interval; two-sided p = min(1, 2·min(1 + #{{d* ≤ 0}}, 1 + #{{d* ≥ 0}})/(B + 1))), in "
    "tables/claims_cells. Pooled, giving the measured value, its interval and p: tasks are the unit of "
    "replication (the seeds of one task share its eval set), so with ≥ 2 tasks a one-sample t test over the "
    "per-task effects (each the mean over the task's seeds), with one task and ≥ 2 seeds a t test over the "
    "seeds, with one cell that cell's bootstrap (the verdict then speaks for that cell only); 'on most "
    "tasks' is tested as the mean over tasks, and the evidence column counts the units (tasks or seeds) on "
    "the claimed side. p (Holm): "
    f"Holm-Bonferroni over every directional claim of this report (family-wise α = {FAMILY_ALPHA}). "
    f"Verdict: holds if the interval excludes 0 on the claimed side and p (Holm) < {FAMILY_ALPHA}; "
    "reversed if it excludes 0 on the other side and p (Holm) < α; else inconclusive. '≈ 0' and 'small' "
    f"are equivalence claims with margins fixed in advance (|SimAOU random| < {RANDOM_MARGIN}, |α(GD, "
    f"LCGD)| < {ALPHA_MARGIN}): holds if the {LEVEL:.0%} interval lies inside ±margin, reversed if it lies "
    f"entirely outside, else inconclusive (no p-value; not in the Holm family). 'Rec2FTP high': above "
    f"{REC2FTP_HIGH:g}%. Trained vs control: the control run of the same task, seed and settings, on the "
    "same eval examples (checked), resampled with the same indices. Excluded cells (named): a setting the "
    "claim uses carries a degenerate-result flag (any code but label_ties, which only counts tied "
    "examples; on an untrained control only training flags: loss_not_falling, vanishing_gradients, "
    "zero_update), the claim excepts the task, the quantity is undefined there, or a setting is missing. "
    "Only GD and LCGD, the papers' processes, enter claims. Published: SPEC §5's figures, from "
    f"{PUBLISHED_MODEL}: another model, so compare directions, not values."
)
HEAD = ["claim", "quantity", "measured [95% CI]", "claim needs", "p", "p (Holm)", "verdict", "evidence",
        "excluded cells", "published", "published by"]


def _row(r: Result, with_group: bool) -> list[str]:
    s, c = r.spec, r.claim
    name = f"{r.group} · {s.text}" if with_group and r.group else s.text
    if c is None:
        return [name, s.quantity, "", s.bound if s.quantity else "", "", "", r.status, "",
                "; ".join(r.excluded), s.published, PUBLISHED_MODEL if s.published != "—" else "—"]
    off = 0.0 if s.b else s.null  # show a against its bound, not a − bound
    measured = f"{_f(c.effect + off, s.decimals, s.b is not None)} [{_f(c.low + off, s.decimals)}, " \
               f"{_f(c.high + off, s.decimals)}]"
    p = "—" if s.direction == 0 else _p(c.p)
    p_holm = "—" if s.direction == 0 else _p(c.p_holm)
    return [name, s.quantity, measured, s.bound, p, p_holm, c.verdict, f"{r.evidence} ({c.n_cells} cells)",
            "; ".join(c.excluded), s.published, c.published_model or "—"]


def _p(p: float) -> str:
    return "n/a" if math.isnan(p) else f"{p:.3g}" if p >= 1e-3 else f"{p:.1e}"


def markdown(results: list[Result]) -> str:
    multi = len({r.group for r in results}) > 1
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    lines += ["| " + " | ".join(_row(r, multi)) + " |" for r in results]
    return "\n".join(lines) + "\n"


def html(results: list[Result]) -> str:
    multi = len({r.group for r in results}) > 1
    th = "".join(f"<th>{escape(h)}</th>" for h in HEAD)
    trs = "".join("<tr>" + "".join(f"<td>{escape(x)}</td>" for x in _row(r, multi)) + "</tr>" for r in results)
    return f"<table><tr>{th}</tr>{trs}</table>\n"


def write_csv(results: list[Result], path: Path) -> None:
    """One line per claim: the pooled effect (a − b, or a − bound), interval, p, Holm, verdict;
    NaN fields and a status for claims that were not measured."""
    nan = repr(math.nan)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["group", "name", "claim", "quantity", "bound", "effect", "low", "high", "p", "p_holm",
                    "verdict", "status", "evidence", "n_cells", "excluded", "published", "published_model"])
        for r in results:
            s, c = r.spec, r.claim
            nums = [nan] * 5 if c is None else [repr(x) for x in (c.effect, c.low, c.high, c.p, c.p_holm)]
            w.writerow([r.group, s.name, s.text, s.quantity, s.bound if s.quantity else "", *nums,
                        "" if c is None else c.verdict, r.status, r.evidence, 0 if c is None else c.n_cells,
                        "; ".join(r.excluded), s.published, PUBLISHED_MODEL if s.published != "—" else ""])


def _cell_rows(results: list[Result]):
    for r in results:
        for c in r.cells:
            yield r, r.spec, c


CELLS_HEAD = ["claim", "task", "seed", "measured [95% CI]", "p (unadjusted)", "excluded"]
CELLS_TITLE = "Claims per cell (paired bootstrap over eval examples)"


def _cells_body(results: list[Result]) -> list[list[str]]:
    """Per cell: the claim's quantity with its paired bootstrap interval and unadjusted p."""
    body = []
    for r, s, c in _cell_rows(results):
        off = 0.0 if s.b else s.null
        measured = "" if c.excluded else (f"{_f(c.effect + off, s.decimals)} [{_f(c.low + off, s.decimals)}, "
                                          f"{_f(c.high + off, s.decimals)}]")
        p = "" if c.excluded or s.direction == 0 else _p(c.p)
        body.append([" · ".join(x for x in (r.group, s.text) if x), c.task, str(c.seed), measured, p, c.excluded])
    return body


def cells_markdown(results: list[Result]) -> str:
    lines = ["| " + " | ".join(CELLS_HEAD) + " |", "|" + "---|" * len(CELLS_HEAD)]
    lines += ["| " + " | ".join(row) + " |" for row in _cells_body(results)]
    return f"### {CELLS_TITLE}\n\n" + "\n".join(lines) + "\n"


def cells_html(results: list[Result]) -> str:
    th = "".join(f"<th>{escape(h)}</th>" for h in CELLS_HEAD)
    trs = "".join("<tr>" + "".join(f"<td>{escape(x)}</td>" for x in row) + "</tr>" for row in _cells_body(results))
    return f"<h3>{escape(CELLS_TITLE)}</h3>\n<table><tr>{th}</tr>{trs}</table>\n"


def write_cells_csv(results: list[Result], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["group", "name", "task", "seed", "effect", "low", "high", "p", "excluded"])
        for r, s, c in _cell_rows(results):
            w.writerow([r.group, s.name, c.task, c.seed, repr(c.effect), repr(c.low), repr(c.high), repr(c.p),
                        c.excluded])
