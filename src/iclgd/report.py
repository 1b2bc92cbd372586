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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from iclgd import metrics
from iclgd.errors import DataError
from iclgd.runfolder import DONE, safe_name

BASE_SETTINGS = ("zsl", "icl")
AVERAGE = "average"


def _label(value: object) -> str:
    """A short name for a config entry that may be a string or a record (task, model, protocol)."""
    if isinstance(value, Mapping):
        for key in ("name", "id", "alias", "hub_name", "path"):
            if key in value:
                return str(value[key])
        return json.dumps(value, sort_keys=True)
    return str(value)


# ---------------------------------------------------------------------------------------------
# run folders
# ---------------------------------------------------------------------------------------------


class _LazyRecord(Mapping):
    """One ``records/<setting>.npz`` as a read-only mapping of torch tensors, loaded per key.

    Attention logits of a 1.3B model on 2000 examples are hundreds of MB per setting, so keys are
    read only when a metric asks for them and dropped with ``Run.release()``.
    """

    def __init__(self, path: Path):
        self.path = path
        self._arrays: dict[str, torch.Tensor] = {}
        with np.load(path) as z:
            self._keys = list(z.files)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._arrays:
            if key not in self._keys:
                raise KeyError(f"{self.path} has no array {key!r}; it has {self._keys}")
            with np.load(self.path) as z:
                self._arrays[key] = torch.from_numpy(z[key])
        return self._arrays[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


@dataclass
class Run:
    """One finished run folder: its config and results, and its records loaded lazily."""

    path: Path
    config: dict
    results: dict
    _records: dict[str, _LazyRecord] = field(default_factory=dict, repr=False)

    @property
    def task(self) -> str:
        return _label(self.config.get("task", "?"))

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", -1))

    @property
    def model(self) -> str:
        return _label(self.config.get("model", "?"))

    @property
    def protocol(self) -> str:
        return _label(self.config.get("protocol", "?"))

    @property
    def settings(self) -> list[str]:
        """Settings in the config's order, restricted to those with a records file."""
        names = list(self.config.get("settings") or self.results)
        return [s for s in names if self.record_path(s).exists()]

    def record_path(self, setting: str) -> Path:
        return self.path / "records" / f"{safe_name(setting)}.npz"

    def records(self, setting: str) -> Mapping[str, torch.Tensor]:
        """Arrays of ``records/<safe_name(setting)>.npz`` as tensors, each read on first access."""
        if setting not in self._records:
            p = self.record_path(setting)
            if not p.exists():
                raise DataError(f"{self.path}: no records for setting {setting!r} (expected {p})")
            self._records[setting] = _LazyRecord(p)
        return self._records[setting]

    def is_process(self, setting: str) -> bool:
        """True for optimization processes: results.json's "process" is set (not null)."""
        entry = self.results.get(setting) or {}
        if "process" in entry:
            return entry["process"] is not None
        return setting not in BASE_SETTINGS

    def release(self) -> None:
        """Forget loaded arrays (the next access reads the file again)."""
        self._records.clear()


def load_run(path: str | Path) -> Run:
    """Read one run folder's config.json and results.json (records stay on disk until used)."""
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
        results = json.loads((path / "results.json").read_text())
    except FileNotFoundError as e:
        raise DataError(f"{path} is not a run folder: {e.filename} is missing") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON ({e})") from None
    return Run(path=path, config=config, results=results)


def find_runs(root: str | Path) -> list[Run]:
    """Finished run folders at or below ``root``, sorted by (model, protocol, task, seed, path).

    A folder is a run folder if it holds ``config.json``; one without ``DONE`` is unfinished and
    is skipped with a warning.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root} does not exist")
    dirs = (
        [root]
        if (root / "config.json").exists()
        else sorted(p.parent for p in root.rglob("config.json"))
    )
    runs = []
    for d in dirs:
        if not (d / DONE).exists():
            warnings.warn(f"skipping unfinished run folder {d} (no DONE file)", stacklevel=2)
            continue
        runs.append(load_run(d))
    return sorted(runs, key=lambda r: (r.model, r.protocol, r.task, r.seed, str(r.path)))


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


def _cell_values(run: Run) -> Cell:
    """Every metric this run's settings allow (settings absent from the run are simply absent)."""
    cell = Cell(run)
    settings = run.settings
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
    return {k: _stat([t.values[k].mean for t in tasks if k in t.values]) for k in keys}


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
    return f"{stat.mean:.{decimals}f} ± {sd}"


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
    """Markdown bullet lines: which model, protocol, tasks and seeds, k and eval n made this."""
    lines = []
    for g in groups:
        cfgs = [r.config for r in g.runs]
        ks = sorted({str(c.get("k", "?")) for c in cfgs})
        ns = sorted(
            {
                str(e.get("n"))
                for r in g.runs
                for e in r.results.values()
                if isinstance(e, Mapping) and e.get("n") is not None
            }
        )
        lines.append(
            f"- **model** {g.model} · **protocol** {g.protocol} · **k** {', '.join(ks)}"
            f" · **eval n** {', '.join(ns) or '?'}"
        )
        for t in g.tasks:
            lines.append(f"  - {t.task}: seeds {', '.join(map(str, t.seeds))}")
        settings = dict.fromkeys(s for r in g.runs for s in r.settings)
        lines.append(f"  - settings: {', '.join(settings)}")
        for key in ("git_hash", "git", "versions"):
            vals = {json.dumps(c[key], sort_keys=True) for c in cfgs if key in c}
            if vals:
                lines.append(f"  - {key}: {'; '.join(sorted(vals))}")
    return lines


def _collect_runs(run_dirs) -> list[Run]:
    items = [run_dirs] if isinstance(run_dirs, (str, Path, Run)) else list(run_dirs)
    runs: list[Run] = []
    for item in items:
        runs += [item] if isinstance(item, Run) else find_runs(item)
    if not runs:
        raise DataError(f"no finished run folders (with a DONE file) under {run_dirs}")
    return runs


def build_report(run_dirs: str | Path | Sequence[str | Path | Run], out_dir: str | Path) -> Path:
    """Write tables, figures, ``summary.md`` and ``report.html`` for the given runs into out_dir.

    ``run_dirs``: a root searched with ``find_runs``, or a list of run folders / roots / Runs.
    Layout of out_dir: ``summary.md`` (provenance and every table), ``tables/<name>.md`` and
    ``tables/<name>.csv``, ``figures/*.png``, ``report.html`` (self-contained). Tables and
    figures show whatever settings the runs have; GD-vs-LCGD figures and the α table need both.
    Returns the path of ``report.html``.
    """
    from iclgd import report_figures  # matplotlib is slow to import; only here

    runs = _collect_runs(run_dirs)
    groups = _groups(runs)
    out = Path(out_dir)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(parents=True, exist_ok=True)

    md_parts, html_parts = [], []
    for name in TABLES:
        md = _markdown(name, groups)
        if not md:
            continue
        (out / "tables" / f"{name}.md").write_text(md)
        _write_csv(name, groups, out / "tables" / f"{name}.csv")
        md_parts.append(md)
        html_parts.append(_html_table(name, groups))

    figures: list[Path] = []
    for g in groups:
        suffix = "" if len(groups) == 1 else f"_{safe_name(g.model)}_{safe_name(g.protocol)}"
        figures += report_figures.draw_all(g.tasks, out / "figures", suffix)

    provenance = _provenance(groups)
    summary = ["# iclgd report", "", f"Built from {len(runs)} run folder(s).", "", *provenance]
    summary += ["", LEGEND, "", *md_parts]
    (out / "summary.md").write_text("\n".join(summary))
    page = out / "report.html"
    page.write_text(report_figures.html_page(provenance, LEGEND, "".join(html_parts), figures))
    return page
