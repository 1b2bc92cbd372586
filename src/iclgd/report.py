"""Tables (Markdown, CSV), figures (PNG), claims and one HTML page, rebuilt from run folders alone.

Nothing here touches a model: every number comes from ``config.json``, ``results.json`` and
``records/<setting>.npz`` of finished run folders (docs/DESIGN.md, "Run folder"). The pieces:
``report_cells`` (one run's entries per eval example, with bootstrap intervals), this module
(aggregation over seeds and tasks, provenance, ``build_report``), ``report_tables`` (Markdown,
CSV, HTML tables), ``claims`` (SPEC §7's claims, tests and verdicts), ``report_figures``.

Aggregation rule (SPEC §4, "Across seeds"; SPEC §7): per cell (model, protocol, control, task,
seed) a headline value is the mean over examples, then layers; per task we report the mean, the
sample sd and a 95% t interval across seeds; the "average" row is the mean of the per-task means,
its sd and interval those of the per-task means (the spread between tasks, not seed noise). Runs
with different models or protocols are never pooled (each (model, protocol) pair is a group),
and within a group the trained model and each untrained control (``Run.control``) are aggregated
apart and shown side by side.

A report rebuilds byte-identically: the bootstrap is seeded per cell (``report_cells.cell_seed``),
orders come from the sorted runs (never from a set), and the PNGs carry no timestamp.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from iclgd import metrics, outputs, stats
from iclgd.errors import DataError
from iclgd.report_cells import Cell, Key, cell_values, control_label
from iclgd.runfolder import Run, find_runs, safe_name

CONTROL_ORDER = (None, "untrained", "untrained-partial")


@dataclass
class Stat:
    """An aggregate across seeds (task rows) or across per-task means (average rows)."""

    mean: float
    sd: float
    low: float  # 95% t interval (stats.seed_summary); NaN when n < 2
    high: float
    n: int  # seeds (task rows) or tasks (average rows) that contributed a defined value
    flagged: bool = False  # some contributing cell's setting is flagged as degenerate


def _stat(values: list[float]) -> Stat:
    s = stats.seed_summary(values)
    return Stat(float(s.mean), float(s.sd), float(s.low), float(s.high), int(s.n))


@dataclass
class TaskAgg:
    """One task of one (model, protocol) group on one model (trained or a control), over seeds."""

    task: str
    control: str | None
    cells: list[Cell]  # sorted by seed
    values: dict[Key, Stat] = field(default_factory=dict)  # headline mean ± sd across seeds
    curves: dict[Key, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # mean, sd [layer]
    counts: dict[Key, list[int]] = field(default_factory=dict)  # subset sizes, one per seed
    grad_norms: dict[str, np.ndarray] = field(default_factory=dict)  # setting -> mean [layer, step]

    @property
    def seeds(self) -> list[int]:
        return [c.seed for c in self.cells]

    @property
    def label(self) -> str:
        return self.task if self.control is None else f"{self.task} · {self.control}"


def _aggregate_task(task: str, control: str | None, cells: list[Cell]) -> TaskAgg:
    agg = TaskAgg(task, control, sorted(cells, key=lambda c: c.seed))
    cells = agg.cells
    for k in dict.fromkeys(k for c in cells for k in c.values):
        have = [c for c in cells if k in c.values]
        agg.values[k] = _stat([c.values[k].estimate for c in have])
        agg.values[k].flagged = any(c.is_flagged(k) for c in have)
        layer_curves = [c.values[k].curve for c in have if c.values[k].curve is not None]
        if layer_curves:
            mean, sd = metrics.mean_sd(layer_curves)
            agg.curves[k] = (np.asarray(mean), np.asarray(sd))
    for k in dict.fromkeys(k for c in cells for k in c.counts):
        agg.counts[k] = [c.counts[k] for c in cells if k in c.counts]
    for s in dict.fromkeys(s for c in cells for s in c.grad_norms):
        arrays = [c.grad_norms[s] for c in cells if s in c.grad_norms]
        if len({a.shape for a in arrays}) > 1:
            warnings.warn(f"{agg.label}/{s}: grad_norms shapes differ across seeds; showing the first",
                          stacklevel=2)
            arrays = arrays[:1]
        agg.grad_norms[s] = np.mean(arrays, axis=0)
    return agg


@dataclass
class Average:
    """The average row of one model (trained or a control) of a group: over its tasks."""

    control: str | None
    tasks: list[str]
    values: dict[Key, Stat]
    counts: dict[Key, int]  # subset sizes summed over every cell


def _average(control: str | None, tasks: list[TaskAgg]) -> Average:
    """Mean of per-task means; sd and t interval across those means (module docstring)."""
    keys = dict.fromkeys(k for t in tasks for k in t.values)
    values = {k: _stat([t.values[k].mean for t in tasks if k in t.values]) for k in keys}
    for k, stat in values.items():
        stat.flagged = any(t.values[k].flagged for t in tasks if k in t.values)
    counts = {k: sum(sum(t.counts[k]) for t in tasks if k in t.counts)
              for k in dict.fromkeys(k for t in tasks for k in t.counts)}
    return Average(control, [t.task for t in tasks], values, counts)


@dataclass
class Group:
    """All tasks run with one model under one protocol: the trained model and its controls."""

    model: str
    protocol: str
    tasks: list[TaskAgg]  # task by task; within a task, trained first, then the controls
    averages: list[Average]  # trained first

    @property
    def cells(self) -> list[Cell]:
        return [c for t in self.tasks for c in t.cells]

    @property
    def runs(self) -> list[Run]:
        return [c.run for c in self.cells]

    def of(self, control: str | None) -> list[TaskAgg]:
        return [t for t in self.tasks if t.control == control]

    @property
    def controls(self) -> list[str | None]:
        return list(dict.fromkeys(t.control for t in self.tasks))


def _control_rank(control: str | None) -> tuple[int, str]:
    known = control in CONTROL_ORDER
    return (CONTROL_ORDER.index(control) if known else len(CONTROL_ORDER), control or "")


def build_groups(runs: list[Run], *, intervals: bool = True) -> list[Group]:
    """Cells of every run (read and released one run at a time), grouped and aggregated."""
    by_group: dict[tuple[str, str], dict[tuple[str, str | None], list[Cell]]] = {}
    for run in runs:
        cells = by_group.setdefault((run.model, run.protocol), {}).setdefault((run.task, run.control), [])
        kept = [c.run.path for c in cells if c.seed == run.seed]
        if kept:  # pooling both would count one seed twice in the sd
            warnings.warn(
                f"duplicate run of {run.task} seed {run.seed} ({run.model}, {run.protocol}, "
                f"{control_label(run.control)}): keeping {kept[0]}, ignoring {run.path}",
                stacklevel=2,
            )
            continue
        cells.append(cell_values(run, intervals=intervals))
    groups = []
    for (model, protocol), by_task in by_group.items():
        task_order = list(dict.fromkeys(task for task, _ in by_task))
        keys = sorted(by_task, key=lambda tc: (task_order.index(tc[0]), _control_rank(tc[1])))
        aggs = [_aggregate_task(task, control, by_task[task, control]) for task, control in keys]
        controls = sorted(dict.fromkeys(a.control for a in aggs), key=_control_rank)
        averages = [_average(c, [a for a in aggs if a.control == c]) for c in controls]
        groups.append(Group(model, protocol, aggs, averages))
    return groups


# ---------------------------------------------------------------------------------------------
# provenance and notes
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
            lines.append(f"  - {t.label}: seeds {', '.join(map(str, t.seeds))}")
        settings = dict.fromkeys(s for r in g.runs for s in r.settings)
        lines.append(f"  - settings: {', '.join(settings)}")
        lines.append(f"  - weights: {', '.join(control_label(c) for c in g.controls)}")
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
        for c in g.cells:
            r = c.run
            who = "" if r.control is None else f" ({r.control})"
            for s in r.settings:
                for f in r.flags(s):
                    lines.append(f"- {g.model} · {r.task} s{r.seed}{who} · **{s}**: {f['code']}: {f['message']}")
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
    runs.sort(key=lambda r: (r.model, r.protocol, r.task, _control_rank(r.control), r.seed, str(r.path)))
    return runs, skipped


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------


def _write_tables(groups: list[Group], results, tables_dir: Path) -> dict[str, list[str]]:
    """Write every table (Markdown and CSV, per task and per cell) and the claims tables into
    tables_dir; return their Markdown and HTML for the summary and the page."""
    from iclgd import claims, report_tables

    parts: dict[str, list[str]] = {"md": [], "html": [], "cells_md": [], "cells_html": [], "claims_md": []}
    claims_md, claims_cells_md = claims.markdown(results), claims.cells_markdown(results)
    (tables_dir / "claims.md").write_text(claims_md)
    claims.write_csv(results, tables_dir / "claims.csv")
    (tables_dir / "claims_cells.md").write_text(claims_cells_md)
    claims.write_cells_csv(results, tables_dir / "claims_cells.csv")
    parts["claims_md"].append(claims_md)
    parts["cells_md"].append(claims_cells_md)
    parts["cells_html"].append(claims.cells_html(results))
    for name in report_tables.table_names(groups):
        stem = report_tables.file_stem(name)
        md, cells_md = report_tables.markdown(name, groups), report_tables.cells_markdown(name, groups)
        (tables_dir / f"{stem}.md").write_text(md)
        report_tables.write_csv(name, groups, tables_dir / f"{stem}.csv")
        (tables_dir / f"{stem}_cells.md").write_text(cells_md)
        report_tables.write_cells_csv(name, groups, tables_dir / f"{stem}_cells.csv")
        parts["md"].append(md)
        parts["html"].append(report_tables.html_table(name, groups))
        parts["cells_md"].append(cells_md)
        parts["cells_html"].append(report_tables.cells_html(name, groups))
    return parts


def build_report(run_dirs: str | Path | Sequence[str | Path | Run], out_dir: str | Path,
                 overwrite: bool = False, *, figures: bool = True) -> Path:
    """Write tables, figures, claims, ``summary.md`` and ``report.html`` for the runs into out_dir.

    ``run_dirs``: a root searched with ``runfolder.find_runs``, or a list of run folders / roots /
    Runs. Folders that are not finished run folders are skipped and named in the report (and on
    stderr). Layout of out_dir: ``summary.md`` (provenance, flags, claims and every table),
    ``tables/<name>.md`` and ``.csv`` (``<name>_cells`` per cell with bootstrap intervals,
    ``claims`` and ``claims_cells``), ``figures/*.png``, ``report.html`` (self-contained). iclgd
    only replaces files it wrote there (iclgd.outputs). ``figures=False`` skips the PNGs (most of
    the time of a small report). Returns the path of ``report.html``.
    """
    import shutil
    import sys

    from iclgd import claims, report_figures, report_tables  # matplotlib is slow to import

    out = Path(out_dir)
    outputs.check_out(out, "report", overwrite, names=["summary.md", "report.html"])
    runs, skipped = _collect_runs(run_dirs)
    for path, reason in skipped:
        print(f"report: skipped {path}: {reason}", file=sys.stderr)
    groups = build_groups(runs)
    results = claims.evaluate(groups)
    tmp = outputs.staging_dir(out)
    try:
        tables_dir, fig_dir = tmp / "tables", tmp / "figures"
        tables_dir.mkdir()
        fig_dir.mkdir()
        parts = _write_tables(groups, results, tables_dir)
        pngs: list[Path | None] = []
        for g in groups if figures else []:
            base = "" if len(groups) == 1 else f"_{safe_name(g.model)}_{safe_name(g.protocol)}"
            for control in g.controls:
                suffix = base if control is None else f"{base}_{safe_name(control)}"
                pngs += report_figures.draw_all(g.of(control), fig_dir, suffix)
            pngs.append(report_figures.draw_intervals(g.tasks, fig_dir / f"headline_intervals{base}.png"))
        provenance = _provenance(groups)
        notes = _flag_lines(groups)
        notes = (["## Flags (degenerate results; their table entries carry †)", "", *notes, ""] if notes else [])
        if skipped:
            notes += ["## Skipped folders", "", *(f"- {p}: {why}" for p, why in skipped), ""]
        summary = ["# iclgd report", "", f"Built from {len(runs)} run folder(s).", "", *provenance, "",
                   *notes, "## Claims (SPEC §7)", "", claims.LEGEND, "", *parts["claims_md"],
                   "## Tables", "", report_tables.LEGEND, "", *parts["md"],
                   "## Per cell: paired bootstrap 95% intervals over eval examples", "",
                   report_tables.CELLS_LEGEND, "", *parts["cells_md"]]
        (tmp / "summary.md").write_text("\n".join(summary))
        (tmp / "report.html").write_text(report_figures.html_page(
            provenance, report_tables.LEGEND, "".join(parts["html"]), [p for p in pngs if p is not None], notes,
            claims_html=claims.html(results), claims_legend=claims.LEGEND,
            cells_html="".join(parts["cells_html"]), cells_legend=report_tables.CELLS_LEGEND))
        outputs.write_marker(tmp, "report", sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()))
        outputs.move_into(tmp, out, "report")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "report.html"
