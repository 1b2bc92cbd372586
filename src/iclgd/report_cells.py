"""One run folder's numbers for the report: every table entry per eval example, with its interval.

``cell_values(run)`` reads the run's records once, computes every metric the run's settings allow
(iclgd.metrics, iclgd.agreement) as per-example values, keeps only what the report needs (per
entry: the per-example headline [batch], its weight, the per-layer curve [layer], the 95% paired
bootstrap interval) and releases the arrays, so a report never holds more than one run's records.

Entries are keyed (table, column): the table a value is shown in and its column there. Tables:
``accuracy``, ``rec2ftp``, ``simaou``, ``simam``, ``simam_delta``, ``alpha``, ``agreement``, and
``ranking_token`` and ``ranking_example`` (Dai et al.'s Kendall τ and top-k recall of attention to
the demonstrations, read from the records iclgd.ranking_record wrote: per process, and the random
baseline once per cell from ICL's records), and ``f2t:P`` per process P: P's metrics on its F2T subset (SPEC §4: the examples ZSL gets wrong while
ICL and P get right). On that subset accuracy is 100% for ICL and P and 0% for ZSL, and Rec2FTP
is 100%, by construction, so neither is shown; gradient norms are not per example. α's F2T
columns (in ``alpha``) use the examples that are F2T for both GD and LCGD.

Intervals (SPEC §7): the eval examples of a cell are resampled ``N_BOOT`` times with
``stats.bootstrap_indices``, seeded by ``cell_seed(task, seed)``: one set of resamples for every
entry of the cell, and the same for a control run of the same task and seed (same examples), so
differences between settings, or between a model and its control, are paired.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from iclgd import agreement, metrics, ranking_record, stats
from iclgd.metrics import PerExample
from iclgd.runfolder import BASE_SETTINGS, Run

REPORT_SEED = 20230512  # fixed once: every bootstrap of every report derives from it (cell_seed)
N_BOOT = 2000  # resamples per cell; the bootstrap p floor 2/(B+1) ≈ 0.001 allows Holm over 50 claims
LEVEL = 0.95
ALPHA_PAIR = ("gd", "lcgd")
TRAINED = "trained"  # the label of Run.control None in tables

Key = tuple[str, str]  # (table, column)


def cell_seed(task: str, seed: int) -> int:
    """The bootstrap seed of a cell: a stable hash of REPORT_SEED, task and seed (never Python's
    hash(), which changes between processes). The model, protocol and control are left out on
    purpose: a control run of the same task and seed evaluates the same examples, and must draw
    the same resamples to be paired with the trained model."""
    digest = hashlib.sha256(f"iclgd-report:{REPORT_SEED}:{task}:{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: a valid numpy seed


def control_label(control: str | None) -> str:
    return TRAINED if control is None else str(control)


@dataclass
class Value:
    """One table entry of one cell."""

    examples: np.ndarray  # [batch] float64: per-example headline (mean over layers)
    weight: np.ndarray | None  # [batch] 0/1: the examples that count (None: all)
    uses: tuple[str, ...]  # the settings it is computed from (their flags apply to it)
    curve: np.ndarray | None  # [layer] per-layer mean over the counted examples; None if scalar
    estimate: float = math.nan  # the headline: weighted mean of ``examples``
    low: float = math.nan  # paired bootstrap interval over eval examples (LEVEL)
    high: float = math.nan
    n_invalid: int = 0  # resamples without a counted example (dropped; a small subset's warning)

    @property
    def n(self) -> int:
        """Examples that count: all, or the subset's size (0: the value is NaN, shown as n/a)."""
        return len(self.examples) if self.weight is None else int((self.weight > 0).sum())

    def stat(self) -> stats.Stat:
        """The headline as a bootstrap statistic (batched; NaN on a resample with no example)."""
        return stats.mean_of(self.examples, self.weight)


@dataclass
class Cell:
    """Every table entry of one run folder (its records already released)."""

    run: Run
    values: dict[Key, Value] = field(default_factory=dict)
    counts: dict[Key, int] = field(default_factory=dict)  # subset sizes (F2T n columns)
    grad_norms: dict[str, np.ndarray] = field(default_factory=dict)  # setting -> [layer, step]
    flags: dict[str, list[str]] = field(default_factory=dict)  # setting -> flag codes
    n_examples: int = 0
    # per setting, for order sensitivity (report_sweeps): predictions [batch] and label
    # log-probabilities renormalized over the labels [batch, label] (iclgd.agreement)
    preds: dict[str, np.ndarray] = field(default_factory=dict)
    label_lp: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def task(self) -> str:
        return self.run.task

    @property
    def seed(self) -> int:
        return self.run.seed

    @property
    def control(self) -> str | None:
        return self.run.control

    @property
    def k(self) -> int:
        return self.run.k

    @property
    def order(self) -> int:
        return self.run.order

    def is_flagged(self, key: Key) -> bool:
        """Whether an entry rests on a setting with a degenerate-result flag (iclgd.flags)."""
        value = self.values.get(key)
        uses = value.uses if value is not None else ()
        return any(self.flags.get(s) for s in uses)

    @cached_property
    def eval_ids(self) -> list:
        """The eval examples' ids (a control pairs with the trained run only if they are equal)."""
        return self.run.eval_ids()

    def indices(self) -> np.ndarray:
        """The cell's bootstrap resamples [N_BOOT, batch] (drawn again on each call: 32 MB at
        2000 examples, too much to keep for every cell of a report)."""
        return stats.bootstrap_indices(self.n_examples, N_BOOT, cell_seed(self.task, self.seed))


def f2t_table(process: str) -> str:
    return f"f2t:{process}"


# Columns of the F2T table of P: (column, metric name, whether the metric takes P).
F2T_COLUMNS = (
    ("SimAOU (norm)", "simaou_norm", True),
    ("SimAOU (raw)", "simaou_raw", True),
    ("random gaussian (norm)", "simaou_random_gaussian", False),
    ("random uniform, ref. (norm)", "simaou_random_uniform", False),
    ("SimAM before", "simam_before", False),
    ("SimAM", "simam", True),
    ("SimAM_Δ", "simam_delta", True),
)
ALPHA_COLUMNS = (("attn logits", "alpha"), ("attn out (norm)", "alpha_aou"), ("attn out (raw)", "alpha_aou_raw"))
# Attention-ranking columns: (table, column suffix, metric in iclgd.ranking). A process P's
# columns are "P: <suffix>"; the random baseline rests on ICL alone: "random: <suffix>", once.
RANKING_COLUMNS = (
    ("ranking_token", "Kendall τ", "tau_token"),
    ("ranking_token", "top-k recall", "recall_token"),
    ("ranking_example", "Kendall τ", "tau_example"),
    ("ranking_example", "top-k recall", "recall_example"),
    ("ranking_example", "Kendall τ, shuffled", "tau_example_shuffled"),
    ("ranking_example", "top-k recall, shuffled", "recall_example_shuffled"),
)
RANKING_RANDOM = (
    ("ranking_token", "Kendall τ", "tau_token_random"),
    ("ranking_token", "top-k recall", "recall_token_random"),
    ("ranking_example", "Kendall τ", "tau_example_random"),
    ("ranking_example", "top-k recall", "recall_example_random"),
)


def cell_values(run: Run, *, intervals: bool = True) -> Cell:
    """Every entry this run's settings allow (settings absent from the run are simply absent),
    with its interval; the run's arrays are released before returning."""
    cell = Cell(run)
    settings = run.settings
    cell.flags = {s: [f["code"] for f in run.flags(s)] for s in settings}
    recs = {s: run.records(s) for s in settings}
    try:
        _fill(cell, recs, settings, [s for s in settings if run.is_process(s)])
    finally:
        run.release()
    if intervals and cell.values:
        idx = cell.indices()
        for v in cell.values.values():
            iv = stats.paired_bootstrap(v.stat(), cell.n_examples, n_boot=N_BOOT, level=LEVEL, batched=True,
                                        idx=idx)
            v.low, v.high, v.n_invalid = float(iv.low), float(iv.high), int(iv.n_invalid)
            if not math.isfinite(v.estimate):  # e.g. KL = +inf on one example: no honest interval
                v.low = v.high = math.nan
    return cell


def _fill(cell: Cell, recs: dict, settings: list[str], procs: list[str]) -> None:
    seed = cell.run.seed

    def add(table: str, column: str, pe: PerExample, uses, scale: float = 1.0) -> None:
        values = pe.values.double() * scale
        curve = metrics.per_layer(values, pe.weight).numpy() if values.ndim > 1 else None
        ex = PerExample(values, pe.weight)
        weight = None if pe.weight is None else pe.weight.double().numpy()
        cell.values[table, column] = Value(ex.example_headline().numpy(), weight, tuple(uses), curve,
                                           estimate=ex.headline())
        cell.n_examples = len(values)

    for s in settings:
        add("accuracy", s, metrics.examples("accuracy", recs, s), (s,), scale=100.0)
        cell.preds[s] = recs[s]["pred"].numpy()
        cell.label_lp[s] = agreement.renormalize(recs[s]["label_logprobs"]).numpy()
    for p in procs:
        if "grad_norms" in recs[p]:
            cell.grad_norms[p] = recs[p]["grad_norms"].double().numpy()  # [layer, step]
    if not all(b in recs for b in BASE_SETTINGS):
        return  # every comparison below is relative to ZSL and ICL
    base = ("zsl", "icl")

    memo: dict = {}

    def metric(name: str, process=None) -> PerExample:
        # each metric once per cell: the F2T tables restrict the values the full tables computed
        if (name, process) not in memo:
            memo[name, process] = metrics.examples(name, recs, process, seed=seed)
        return memo[name, process]

    for p in procs:
        add("rec2ftp", p, metric("rec2ftp", p), (*base, p))
        add("simaou", f"{p} (norm)", metric("simaou_norm", p), (*base, p))
        add("simaou", f"{p} (raw)", metric("simaou_raw", p), (*base, p))
    for kind, label in (("gaussian", "random gaussian"), ("uniform", "random uniform, ref.")):
        add("simaou", f"{label} (norm)", metric(f"simaou_random_{kind}"), base)
        add("simaou", f"{label} (raw)", metric(f"simaou_random_{kind}_raw"), base)
    add("simam", "before", metric("simam_before"), base)
    for p in procs:
        add("simam", p, metric("simam", p), (*base, p))
        add("simam_delta", p, metric("simam_delta", p), (*base, p))
    pair = ALPHA_PAIR if all(p in recs for p in ALPHA_PAIR) else None
    if pair:
        f2t = metrics.f2t(recs, pair)
        cell.counts["alpha", "F2T n"] = int(f2t.sum())
        for column, name in ALPHA_COLUMNS:
            add("alpha", column, metric(name, pair), ("zsl", *pair))
        for column, name in ALPHA_COLUMNS:  # F2T: examples ICL, GD and LCGD all fix
            add("alpha", f"F2T: {column}", metric(name, pair).restrict(f2t), (*base, *pair))
    for p in procs:
        agree = agreement.output_agreement(recs["icl"]["label_logprobs"], recs[p]["label_logprobs"])
        add("agreement", f"{p}: same label (%)", PerExample(agree.agree), ("icl", p), scale=100.0)
        add("agreement", f"{p}: KL(ICL ‖ P)", PerExample(agree.kl), ("icl", p))
        add("agreement", f"{p}: JS", PerExample(agree.js), ("icl", p))
    _fill_ranking(cell, recs, procs)
    for p in procs:
        table, f2t = f2t_table(p), metrics.f2t(recs, p)
        cell.counts[table, "n"] = int(f2t.sum())
        for column, name, own in F2T_COLUMNS:
            add(table, column, metric(name, p if own else None).restrict(f2t), (*base, p))


def _fill_ranking(cell: Cell, recs: dict, procs: list[str]) -> None:
    """The attention-ranking entries, where the run recorded them (iclgd.ranking_record). Values are
    [batch, layer] with NaN where undefined (a layer whose window hides a demonstration); an
    example's value is its mean over its defined layers, and examples without one carry weight 0.
    Without NaN this is SPEC §4's mean over examples per layer, then over layers."""

    def add(table: str, column: str, arr, uses) -> None:
        v = np.asarray(arr, dtype=np.float64)  # [batch, layer]
        finite = np.isfinite(v)
        count = finite.sum(1)
        has = count > 0
        examples = np.where(has, np.where(finite, v, 0.0).sum(1) / np.maximum(count, 1), np.nan)  # [batch]
        weight = None if has.all() else has.astype(np.float64)
        with np.errstate(invalid="ignore"):
            curve = np.where(finite, v, 0.0).sum(0) / finite.sum(0)  # [layer]; NaN where no example
        estimate = float(examples[has].mean()) if has.any() else math.nan
        cell.values[table, column] = Value(examples, weight, tuple(uses), curve, estimate=estimate)

    names = [ranking_record.record_name(m) for *_, m in RANKING_RANDOM]
    if "icl" in recs and all(n in recs["icl"] for n in names):
        for table, suffix, metric in RANKING_RANDOM:
            add(table, f"random: {suffix}", recs["icl"][ranking_record.record_name(metric)], ("icl",))
    for p in procs:
        if not all(ranking_record.record_name(m) in recs[p] for *_, m in RANKING_COLUMNS):
            continue
        for table, suffix, metric in RANKING_COLUMNS:
            add(table, f"{p}: {suffix}", recs[p][ranking_record.record_name(metric)], ("icl", p))
