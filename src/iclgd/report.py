"""Tables (Markdown, CSV), figures (PNG) and one HTML page, rebuilt from run folders alone.

Nothing here touches a model: every number comes from ``config.json``, ``results.json`` and
``records/<setting>.npz`` of finished run folders (docs/DESIGN.md, "Run folder"). Figures, and
the HTML page that embeds them, live in ``report_figures.py``.

Aggregation rule (SPEC §4, "Across seeds"): per cell (model, protocol, task, seed) a headline
value is the mean over examples, then layers; per task we report the mean and sample sd across
seeds; the "average" row is the mean of the per-task means, and its sd is the sample sd across
those per-task means (the spread between tasks, not seed noise). Runs with different models or
protocols are never pooled: each (model, protocol) pair gets its own rows.
"""

from __future__ import annotations

import csv
import html
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from iclgd import metrics, outputs
from iclgd.errors import DataError
from iclgd.runfolder import BASE_SETTINGS, Run, find_runs, safe_name

AVERAGE = "average"


# ---------------------------------------------------------------------------------------------
# per-cell values and aggregation
# ---------------------------------------------------------------------------------------------

# table name -> (title, decimals). Columns are discovered from the runs.
TABLES = {
    "accuracy": ("Accuracy (%)", 1),
    "rec2ftp": ("Rec2FTP (%): of the examples P fixed over ZSL, the share ICL gets right", 1),
    "simaou": ("SimAOU (norm: each h unit-normalized first, as the reference; raw: not)", 3),
    "simam": ("SimAM: cos(m_ICL, m_X) per head; 'before' is X = ZSL", 3),
    "simam_delta": ("SimAM_Δ: cos(m_ICL − m_ZSL, m_P − m_ZSL)", 3),
    "alpha": ("α(GD, LCGD) on attention logits and on attention outputs (SimAOU form)", 3),
}
ALPHA_PAIR = ("gd", "lcgd")
LEGEND = (
    "Per task: mean ± sample sd across seeds (— for a single seed; Rec2FTP leaves out seeds where "
    "P fixed nothing). Average: mean of the per-task means ± sd across tasks. Random SimAOU "
    "baselines: a centred Gaussian update, and the reference's uniform [0,1) update."
)
Key = tuple[str, str]  # (table, column)


@dataclass
class Cell:
    """Values of one run: scalars (accuracy, Rec2FTP) and per-layer curves [layer]."""

    run: Run
    scalars: dict[Key, float] = field(default_factory=dict)
    curves: dict[Key, np.ndarray] = field(default_factory=dict)  # [layer]
    grad_norms: dict[str, np.ndarray] = field(default_factory=dict)  # setting -> [layer, step]
    flagged: set[str] = field(default_factory=set)  # settings with a degenerate-result flag

    def is_flagged(self, key: Key) -> bool:
        """Whether a value of this cell rests on a flagged setting (iclgd.flags)."""
        return bool(self.flagged & _depends(key, self.run.settings))


def _depends(key: Key, settings: list[str]) -> set[str]:
    """The settings a table entry is computed from."""
    table, column = key
    if table == "accuracy":
        return {column}
    first = column.split(" ")[0]
    own = {first} if first in settings else set()
    return {"zsl", "icl", *own, *(ALPHA_PAIR if table == "alpha" else ())}


def _cell_values(run: Run) -> Cell:
    """Every metric this run's settings allow (settings absent from the run are simply absent)."""
    cell = Cell(run)
    settings = run.settings
    cell.flagged = {s for s in settings if run.flags(s)}
    recs = {s: run.records(s) for s in settings}
    procs = [s for s in settings if run.is_process(s)]
    for s in settings:
        cell.scalars["accuracy", s] = 100.0 * metrics.compute("accuracy", recs, s)
    for p in procs:
        if "grad_norms" in recs[p]:
            cell.grad_norms[p] = recs[p]["grad_norms"].double().numpy()  # [layer, step]
    if not all(b in recs for b in BASE_SETTINGS):
        return cell  # every comparison below is relative to ZSL and ICL

    def curve(table: str, column: str, name: str, process) -> None:
        value = metrics.compute(name, recs, process, seed=run.seed)
        cell.curves[table, column] = torch.as_tensor(value).double().numpy()

    for p in procs:
        cell.scalars["rec2ftp", p] = metrics.compute("rec2ftp", recs, p)
        curve("simaou", f"{p} (norm)", "simaou_norm", p)
        curve("simaou", f"{p} (raw)", "simaou_raw", p)
    for kind, label in (("gaussian", "random gaussian"), ("uniform", "random uniform, ref.")):
        curve("simaou", f"{label} (norm)", f"simaou_random_{kind}", None)
        curve("simaou", f"{label} (raw)", f"simaou_random_{kind}_raw", None)
    curve("simam", "before", "simam_before", None)
    for p in procs:
        curve("simam", p, "simam", p)
        curve("simam_delta", p, "simam_delta", p)
    if all(p in recs for p in ALPHA_PAIR):
        curve("alpha", "attn logits", "alpha", ALPHA_PAIR)
        curve("alpha", "attn out (norm)", "alpha_aou", ALPHA_PAIR)
        curve("alpha", "attn out (raw)", "alpha_aou_raw", ALPHA_PAIR)
    return cell


@dataclass
class Stat:
    mean: float
    sd: float
    n: int  # seeds (task rows) or tasks (average rows) that contributed
    flagged: bool = False  # some contributing cell's setting is flagged as degenerate


@dataclass
class TaskAgg:
    """One task of one (model, protocol) group, aggregated over seeds."""

    task: str
    seeds: list[int]
    values: dict[Key, Stat]  # headline mean ± sd across seeds
    curves: dict[Key, tuple[np.ndarray, np.ndarray]]  # per-layer mean, sd across seeds [layer]
    grad_norms: dict[str, np.ndarray]  # setting -> mean over seeds [layer, step]


def _stat(values: list[float]) -> Stat:
    mean, sd = metrics.mean_sd(values)
    return Stat(mean, sd, sum(not math.isnan(v) for v in values))


def _aggregate_task(task: str, cells: list[Cell]) -> TaskAgg:
    keys = dict.fromkeys(k for c in cells for k in [*c.scalars, *c.curves])
    values, curves = {}, {}
    for k in keys:
        per_seed = [
            c.scalars[k] if k in c.scalars else float(c.curves[k].mean())
            for c in cells
            if k in c.scalars or k in c.curves
        ]
        values[k] = _stat(per_seed)
        values[k].flagged = any(c.is_flagged(k) for c in cells if k in c.scalars or k in c.curves)
        layer_curves = [c.curves[k] for c in cells if k in c.curves]
        if layer_curves:
            mean, sd = metrics.mean_sd(layer_curves)
            curves[k] = (np.asarray(mean), np.asarray(sd))
    grads = {}
    for s in dict.fromkeys(s for c in cells for s in c.grad_norms):
        arrays = [c.grad_norms[s] for c in cells if s in c.grad_norms]
        if len({a.shape for a in arrays}) > 1:
            warnings.warn(
                f"{task}/{s}: grad_norms shapes differ across seeds; showing the first",
                stacklevel=2,
            )
            arrays = arrays[:1]
        grads[s] = np.mean(arrays, axis=0)
    return TaskAgg(task, sorted(c.run.seed for c in cells), values, curves, grads)


def _average(tasks: list[TaskAgg]) -> dict[Key, Stat]:
    """Mean of per-task means; sd across those means (module docstring)."""
    keys = dict.fromkeys(k for t in tasks for k in t.values)
    out = {k: _stat([t.values[k].mean for t in tasks if k in t.values]) for k in keys}
    for k, stat in out.items():
        stat.flagged = any(t.values[k].flagged for t in tasks if k in t.values)
    return out


@dataclass
class Group:
    """All tasks run with one model under one protocol."""

    model: str
    protocol: str
    runs: list[Run]
    tasks: list[TaskAgg]
    average: dict[Key, Stat]


def _groups(runs: list[Run]) -> list[Group]:
    by_group: dict[tuple[str, str], dict[str, list[Cell]]] = {}
    for run in runs:
        cells = by_group.setdefault((run.model, run.protocol), {}).setdefault(run.task, [])
        kept = [c.run.path for c in cells if c.run.seed == run.seed]
        if kept:  # pooling both would count one seed twice in the sd
            warnings.warn(
                f"duplicate run of {run.task} seed {run.seed} ({run.model}, "
                f"{run.protocol}): keeping {kept[0]}, ignoring {run.path}",
                stacklevel=2,
            )
            continue
        cells.append(_cell_values(run))
        run.release()
    groups = []
    for (model, protocol), tasks in by_group.items():
        aggs = [_aggregate_task(t, cells) for t, cells in tasks.items()]
        group_runs = [c.run for cells in tasks.values() for c in cells]
        groups.append(Group(model, protocol, group_runs, aggs, _average(aggs)))
    return groups


# ---------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------


def _fmt(stat: Stat | None, decimals: int) -> str:
    if stat is None:
        return ""
    if math.isnan(stat.mean):
        return "n/a"
    sd = "—" if math.isnan(stat.sd) else f"{stat.sd:.{decimals}f}"
    return f"{stat.mean:.{decimals}f} ± {sd}" + (" †" if stat.flagged else "")


def _table_rows(name: str, groups: list[Group]) -> tuple[list[str], list[tuple[str, dict]]]:
    """Columns of table ``name`` and its rows (label, column -> Stat); no rows if no data."""
    columns = list(
        dict.fromkeys(c for g in groups for t in g.tasks for (tb, c) in t.values if tb == name)
    )
    rows = []
    for g in groups:
        prefix = f"{g.model} · {g.protocol} · " if len(groups) > 1 else ""
        for t in g.tasks:
            rows.append((prefix + t.task, {c: t.values.get((name, c)) for c in columns}))
        rows.append((prefix + AVERAGE, {c: g.average.get((name, c)) for c in columns}))
    return columns, rows if columns else []


def _markdown(name: str, groups: list[Group]) -> str:
    title, dec = TABLES[name]
    columns, rows = _table_rows(name, groups)
    if not rows:
        return ""
    out = [
        f"### {title}",
        "",
        "| task | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    out += [
        "| " + " | ".join([label] + [_fmt(r[c], dec) for c in columns]) + " |" for label, r in rows
    ]
    return "\n".join(out) + "\n"


def _write_csv(name: str, groups: list[Group], path: Path) -> None:
    """Long form: one line per (model, protocol, task, column); task "average" for averages."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "protocol", "task", "column", "mean", "sd", "n"])
        for g in groups:
            rows = [(t.task, t.values) for t in g.tasks] + [(AVERAGE, g.average)]
            for task, values in rows:
                for (tb, col), s in values.items():
                    if tb == name:
                        w.writerow([g.model, g.protocol, task, col, repr(s.mean), repr(s.sd), s.n])


def _html_table(name: str, groups: list[Group]) -> str:
    title, dec = TABLES[name]
    columns, rows = _table_rows(name, groups)
    if not rows:
        return ""
    e = html.escape
    head = "".join(f"<th>{e(c)}</th>" for c in ["task", *columns])
    cells = [
        "".join(f"<td class='num'>{e(_fmt(r[c], dec))}</td>" for c in columns) for _, r in rows
    ]
    body = "".join(
        f"<tr><td>{e(label)}</td>{c}</tr>" for (label, _), c in zip(rows, cells, strict=True)
    )
    return f"<h3>{e(title)}</h3>\n<table><tr>{head}</tr>{body}</table>\n"


# ---------------------------------------------------------------------------------------------
# provenance and the page (drawn by report_figures.html_page)
# ---------------------------------------------------------------------------------------------


def _provenance(groups: list[Group]) -> list[str]:
    """Markdown bullet lines: how each group's runs were made (the run folders' provenance)."""
    lines = []
    for g in groups:
        cfgs = [r.config for r in g.runs]
        ks = sorted({str(c.get("k", "?")) for c in cfgs})
        ns = sorted({str(e.get("n")) for r in g.runs for e in r.results.values()
                     if isinstance(e, Mapping) and e.get("n") is not None})
        lines.append(f"- **model** {g.model} · **protocol** {g.protocol} · **k** {', '.join(ks)}"
                     f" · **eval n** {', '.join(ns) or '?'}")
        for t in g.tasks:
            lines.append(f"  - {t.task}: seeds {', '.join(map(str, t.seeds))}")
        settings = dict.fromkeys(s for r in g.runs for s in r.settings)
        lines.append(f"  - settings: {', '.join(settings)}")
        models = {json.dumps({k: (c.get("model") or {}).get(k) for k in ("source", "revision", "commit", "gguf_sha256",
                                                                        "dtype", "device")}, sort_keys=True)
                  for c in cfgs if isinstance(c.get("model"), Mapping)}
        for m in sorted(models):
            lines.append(f"  - model identity: {m}")
        prov = [r.provenance for r in g.runs]
        for key, label in (("versions", "versions"), ("git_hash", "iclgd git commit"), ("torch_threads", "torch threads"),
                           ("platform", "platform"), ("command", "command")):
            vals = sorted({json.dumps(p[key], sort_keys=True) if not isinstance(p[key], str) else p[key]
                           for p in prov if p.get(key) is not None})
            if vals:
                lines.append(f"  - {label}: {'; '.join(vals)}")
    return lines


def _flag_lines(groups: list[Group]) -> list[str]:
    """Markdown lines naming every flagged (degenerate) setting of every run (iclgd.flags)."""
    lines = []
    for g in groups:
        for r in g.runs:
            for s in r.settings:
                for f in r.flags(s):
                    lines.append(f"- {g.model} · {r.task} s{r.seed} · **{s}**: {f['code']}: {f['message']}")
    return lines


def _collect_runs(run_dirs) -> tuple[list[Run], list[tuple[Path, str]]]:
    items = [run_dirs] if isinstance(run_dirs, (str, Path, Run)) else list(run_dirs)
    runs: list[Run] = []
    skipped: list[tuple[Path, str]] = []
    for item in items:
        if isinstance(item, Run):
            runs.append(item)
            continue
        found, skip = find_runs(item)
        runs += found
        skipped += skip
    if not runs:
        why = "".join(f"; {p}: {reason}" for p, reason in skipped[:5])
        raise DataError(f"no finished run folders (with a DONE file) under {run_dirs}{why}")
    return runs, skipped


def build_report(run_dirs: str | Path | Sequence[str | Path | Run], out_dir: str | Path,
                 overwrite: bool = False) -> Path:
    """Write tables, figures, ``summary.md`` and ``report.html`` for the given runs into out_dir.

    ``run_dirs``: a root searched with ``runfolder.find_runs``, or a list of run folders / roots /
    Runs. Folders that are not finished run folders are skipped and named in the report (and on
    stderr). Layout of out_dir: ``summary.md`` (provenance, flags and every table),
    ``tables/<name>.md`` and ``tables/<name>.csv``, ``figures/*.png``, ``report.html``
    (self-contained). iclgd only replaces files it wrote there (iclgd.outputs). Returns the path of
    ``report.html``.
    """
    import sys

    from iclgd import report_figures  # matplotlib is slow to import; only here

    out = Path(out_dir)
    outputs.check_out(out, "report", overwrite, names=["summary.md", "report.html"])
    runs, skipped = _collect_runs(run_dirs)
    for path, reason in skipped:
        print(f"report: skipped {path}: {reason}", file=sys.stderr)
    groups = _groups(runs)
    tmp = outputs.staging_dir(out)
    try:
        (tmp / "tables").mkdir()
        (tmp / "figures").mkdir()
        md_parts, html_parts = [], []
        for name in TABLES:
            md = _markdown(name, groups)
            if not md:
                continue
            (tmp / "tables" / f"{name}.md").write_text(md)
            _write_csv(name, groups, tmp / "tables" / f"{name}.csv")
            md_parts.append(md)
            html_parts.append(_html_table(name, groups))
        figures: list[Path] = []
        for g in groups:
            suffix = "" if len(groups) == 1 else f"_{safe_name(g.model)}_{safe_name(g.protocol)}"
            figures += report_figures.draw_all(g.tasks, tmp / "figures", suffix)
        provenance = _provenance(groups)
        notes = _flag_lines(groups)
        notes = (["## Flags (degenerate results; their table entries carry †)", "", *notes, ""] if notes else [])
        if skipped:
            notes += ["## Skipped folders", "", *(f"- {p}: {why}" for p, why in skipped), ""]
        summary = ["# iclgd report", "", f"Built from {len(runs)} run folder(s).", "", *provenance]
        summary += ["", LEGEND, "", *notes, *md_parts]
        (tmp / "summary.md").write_text("\n".join(summary))
        (tmp / "report.html").write_text(
            report_figures.html_page(provenance, LEGEND, "".join(html_parts), figures,
                                     notes))
        outputs.write_marker(tmp, "report", [str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()])
        outputs.move_into(tmp, out, "report")
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "report.html"
