"""Figures for ``report.py``: PNGs from aggregated run values, and the HTML page embedding them.

No model and no run folders here: inputs are already aggregated.

Figures are built with ``matplotlib.figure.Figure`` and the Agg canvas directly rather than
pyplot, so drawing a report neither changes the caller's backend (a notebook's inline one) nor
leaks global figure state.

Inputs are ``report.TaskAgg`` objects: per task (and model: trained or a control),
``curves[(table, column)] = (mean [layer], sd [layer])`` across seeds, ``values[(table, column)]``
headline Stats with their t intervals, ``cells`` (each entry's bootstrap interval) and
``grad_norms[setting]`` [layer, step] averaged over seeds.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

if TYPE_CHECKING:
    from iclgd.report import TaskAgg

GD, LCGD = "gd", "lcgd"
PANEL_W, PANEL_H = 4.2, 3.0  # inches per panel


def _figure(
    n_panels: int, ncols: int = 3, width: float = PANEL_W, height: float = PANEL_H
) -> tuple[Figure, list]:
    ncols = max(1, min(ncols, n_panels))
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, list(axes[:n_panels])


def _save(fig: Figure, path: Path) -> Path:
    # no "Software" chunk (it names the matplotlib version) and no time stamp: a report rebuilt
    # from the same runs has the same bytes
    fig.savefig(path, format="png", dpi=110, metadata={"Software": None})
    return path


def _sd(sd: np.ndarray) -> np.ndarray:
    """Error bars: a single seed has NaN sd, drawn as no bar."""
    return np.nan_to_num(np.asarray(sd, dtype=float), nan=0.0)


def _grouped_bars(ax, series: list[tuple[str, np.ndarray, np.ndarray]]) -> None:
    """Bars per layer, one colour per series (label, mean [layer], sd [layer])."""
    width = 0.8 / len(series)
    for i, (label, mean, sd) in enumerate(series):
        x = np.arange(len(mean)) + (i - (len(series) - 1) / 2) * width
        ax.bar(x, mean, width, yerr=_sd(sd), capsize=1.5, label=label)
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
    ax.set_xlabel("layer")
    ax.legend(fontsize="small")


def layer_bars(
    tasks: list[TaskAgg], table: str, columns: tuple[str, str], ylabel: str, path: Path
) -> Path | None:
    """Per-layer GD-vs-LCGD bars, one panel per task with both; None if no task has both."""
    panels = [t for t in tasks if all((table, c) in t.curves for c in columns)]
    if not panels:
        return None
    fig, axes = _figure(len(panels))
    for ax, t in zip(axes, panels, strict=True):
        series = [(c.split(" ")[0].upper(), *t.curves[table, c]) for c in columns]
        _grouped_bars(ax, series)
        ax.set_title(f"{t.task} ({len(t.seeds)} seeds)")
        ax.set_ylabel(ylabel)
    return _save(fig, path)


def alpha_bars(tasks: list[TaskAgg], path: Path) -> Path | None:
    """α(GD, LCGD) per layer and task, attention-logit and attention-output (SimAOU) forms."""
    cols = [("attn logits", "logits"), ("attn out (norm)", "attn out, norm")]
    panels = [t for t in tasks if any(("alpha", c) in t.curves for c, _ in cols)]
    if not panels:
        return None
    fig, axes = _figure(len(panels))
    for ax, t in zip(axes, panels, strict=True):
        _grouped_bars(
            ax, [(lbl, *t.curves["alpha", c]) for c, lbl in cols if ("alpha", c) in t.curves]
        )
        ax.set_title(t.task)
        ax.set_ylabel("α(GD, LCGD)")
    return _save(fig, path)


def grad_heatmaps(tasks: list[TaskAgg], path: Path) -> Path | None:
    """Gradient-norm heatmaps (layer × demonstration step, log colour), rows tasks, cols processes.

    One shared colour scale: the paper's point is that LCGD's gradients are larger than GD's, which
    per-panel scales would hide. GD and LCGD come first; other processes follow.
    """
    procs = list(dict.fromkeys(s for t in tasks for s in t.grad_norms))
    procs = [p for p in (GD, LCGD) if p in procs] + [p for p in procs if p not in (GD, LCGD)]
    rows = [t for t in tasks if t.grad_norms]
    if not rows:
        return None
    positive = np.concatenate([g[g > 0].ravel() for t in rows for g in t.grad_norms.values()])
    if positive.size == 0:
        return None
    norm = LogNorm(vmin=float(positive.min()), vmax=float(positive.max()))
    fig = Figure(figsize=(3.6 * len(procs) + 1, 2.8 * len(rows)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), len(procs), squeeze=False)
    image = None
    for i, t in enumerate(rows):
        for j, p in enumerate(procs):
            ax = axes[i, j]
            if p not in t.grad_norms:
                ax.set_visible(False)
                continue
            g = t.grad_norms[p]  # [layer, step]
            # zero norms (a frozen layer) have no log: show them at the bottom of the scale
            image = ax.imshow(
                np.clip(g, norm.vmin, None),
                norm=norm,
                aspect="auto",
                origin="lower",
                cmap="viridis",
                interpolation="nearest",
            )
            ax.set_title(f"{t.task}: {p}", fontsize="medium")
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("demonstration step")
            ax.set_ylabel("layer")
    fig.colorbar(image, ax=axes, label="gradient ℓ2 norm (mean over seeds)")
    return _save(fig, path)


def accuracy_bars(tasks: list[TaskAgg], path: Path) -> Path | None:
    """Accuracy per setting, grouped by task, with sd across seeds."""
    settings = list(dict.fromkeys(c for t in tasks for (tb, c) in t.values if tb == "accuracy"))
    if not settings:
        return None
    fig = Figure(
        figsize=(max(5.0, 1.0 + 0.35 * len(tasks) * len(settings)), 3.6), layout="constrained"
    )
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / len(settings)
    x0 = np.arange(len(tasks))
    for i, s in enumerate(settings):
        stats = [t.values.get(("accuracy", s)) for t in tasks]
        mean = [st.mean if st else np.nan for st in stats]
        sd = [st.sd if st else np.nan for st in stats]
        ax.bar(
            x0 + (i - (len(settings) - 1) / 2) * width,
            mean,
            width,
            yerr=_sd(sd),
            capsize=2,
            label=s,
        )
    ax.set_xticks(x0, [t.task for t in tasks])
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    # above the axes: inside, it would cover the bars near 100%
    fig.legend(loc="outside upper center", fontsize="small", ncols=min(len(settings), 6))
    return _save(fig, path)


# Panels of the interval figure: (title, table, [(column, legend label)]).
INTERVAL_PANELS = (
    ("accuracy (%)", "accuracy", [("zsl", "ZSL"), ("icl", "ICL"), (GD, "GD"), (LCGD, "LCGD")]),
    ("SimAOU (norm)", "simaou", [(f"{GD} (norm)", "GD"), (f"{LCGD} (norm)", "LCGD"),
                                 ("random gaussian (norm)", "random")]),
    ("SimAM", "simam", [("before", "before"), (GD, "GD"), (LCGD, "LCGD")]),
    ("SimAM_Δ", "simam_delta", [(GD, "GD"), (LCGD, "LCGD")]),
)
HATCHES = ("", "//", "..", "xx")


def _interval(t: TaskAgg | None, key) -> tuple[float, float, float, bool]:
    """(value, low, high, bootstrap) of a task row: its t interval across seeds, or with one seed
    the cell's paired bootstrap interval over eval examples (bootstrap True)."""
    st = None if t is None else t.values.get(key)
    if st is None:
        return math.nan, math.nan, math.nan, False
    if len(t.cells) != 1:
        return st.mean, st.low, st.high, False
    v = t.cells[0].values[key]
    return v.estimate, v.low, v.high, True


def draw_intervals(tasks: list[TaskAgg], path: Path) -> Path | None:
    """Headline metrics per task with 95% intervals, the trained model beside its untrained
    controls (one hatch per model, one colour per setting); None if no panel has data.

    Error bars: black, the t interval across seeds; grey, a task with one seed, whose interval
    is the cell's paired bootstrap over eval examples (not comparable in kind: said in the title).
    """
    panels = [(title, table, [(c, lbl) for c, lbl in cols if any((table, c) in t.values for t in tasks)])
              for title, table, cols in INTERVAL_PANELS]
    panels = [p for p in panels if p[2]]
    if not panels:
        return None
    names = list(dict.fromkeys(t.task for t in tasks))
    controls = list(dict.fromkeys(t.control for t in tasks))
    by = {(t.task, t.control): t for t in tasks}
    n_bars = len(names) * len(controls) * max(len(cols) for *_, cols in panels)
    fig, axes = _figure(len(panels), ncols=2, width=max(PANEL_W, 1.0 + 0.12 * n_bars), height=PANEL_H + 0.3)
    for ax, (title, table, cols) in zip(axes, panels, strict=True):
        series = [(j, c, lbl, ctl) for j, (c, lbl) in enumerate(cols) for ctl in controls]
        width = 0.8 / len(series)
        for i, (j, col, lbl, ctl) in enumerate(series):
            vals = [_interval(by.get((n, ctl)), (table, col)) for n in names]
            x = np.arange(len(names)) + (i - (len(series) - 1) / 2) * width
            mean = np.array([v[0] for v in vals])
            ax.bar(x, mean, width, color=f"C{j}", edgecolor="black", linewidth=0.4,
                   hatch=HATCHES[controls.index(ctl) % len(HATCHES)], label=lbl if ctl == controls[0] else None)
            for boot, colour in ((False, "black"), (True, "grey")):
                sel = np.array([v[3] == boot for v in vals])
                err = np.abs([[v[0] - v[1] for v in vals], [v[2] - v[0] for v in vals]])
                if sel.any():
                    ax.errorbar(x[sel], mean[sel], yerr=np.nan_to_num(err[:, sel]), fmt="none", ecolor=colour,
                                elinewidth=0.8, capsize=1.5)
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set_xticks(np.arange(len(names)), names)
        ax.set_title(title)
        ax.legend(fontsize="x-small")
    if len(controls) > 1:  # which hatch is which model, once for the figure
        from matplotlib.patches import Patch

        handles = [Patch(facecolor="white", edgecolor="black", hatch=HATCHES[i % len(HATCHES)],
                         label="trained" if c is None else str(c)) for i, c in enumerate(controls)]
        fig.legend(handles=handles, loc="outside lower center", ncols=len(controls), fontsize="small")
    fig.suptitle("Headline per task with 95% intervals: black, t across seeds; grey, one seed: paired "
                 "bootstrap over eval examples", fontsize="medium")
    return _save(fig, path)


def draw_all(tasks: list[TaskAgg], fig_dir: Path, suffix: str = "") -> list[Path]:
    """Every figure the data allows for one (model, protocol) group; returns the PNGs written."""
    out = [
        accuracy_bars(tasks, fig_dir / f"accuracy{suffix}.png"),
        layer_bars(
            tasks,
            "simaou",
            (f"{GD} (norm)", f"{LCGD} (norm)"),
            "SimAOU (norm)",
            fig_dir / f"simaou_layers{suffix}.png",
        ),
        layer_bars(
            tasks, "simam_delta", (GD, LCGD), "SimAM_Δ", fig_dir / f"simam_delta_layers{suffix}.png"
        ),
        alpha_bars(tasks, fig_dir / f"alpha{suffix}.png"),
        grad_heatmaps(tasks, fig_dir / f"grad_norms{suffix}.png"),
    ]
    return [p for p in out if p is not None]


def html_page(provenance_md: list[str], legend: str, tables_html: str, figures: list[Path],
              notes_md: list[str] = (), *, claims_html: str = "", claims_legend: str = "",
              cells_html: str = "", cells_legend: str = "") -> str:
    """One self-contained HTML page: provenance first, then notes (flags, skipped folders), the
    claims, the tables, the PNGs as base64, and the per-cell tables last."""
    e = html.escape
    notes = "".join(f"<h2>{e(line[3:])}</h2>" if line.startswith("## ") else f"<li>{e(line.lstrip('- ').replace('**', ''))}</li>"
                    for line in notes_md if line.strip())
    prov = "".join(
        f"<li style='margin-left:{len(line) - len(line.lstrip())}em'>"
        f"{e(line.strip().lstrip('- ').replace('**', ''))}</li>"
        for line in provenance_md
    )
    imgs = "".join(
        f"<figure><img alt='{e(p.stem)}' src='data:image/png;base64,"
        f"{base64.b64encode(p.read_bytes()).decode('ascii')}'/>"
        f"<figcaption>{e(p.stem)}</figcaption></figure>\n"
        for p in figures
    )
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:2em auto}"
        "table{border-collapse:collapse;margin-bottom:1.5em}"
        "td,th{border:1px solid #ccc;padding:3px 8px}td.num{text-align:right}"
        "img{max-width:100%}ul{list-style:none;padding-left:0}"
    )
    claims = f"<h2>Claims (SPEC §7)</h2>\n<p>{e(claims_legend)}</p>\n{claims_html}" if claims_html else ""
    cells = (f"<h2>Per cell: paired bootstrap 95% intervals over eval examples</h2>\n<p>{e(cells_legend)}</p>\n"
             f"{cells_html}") if cells_html else ""
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>iclgd report</title>"
        f"<style>{style}</style></head><body>\n<h1>iclgd report</h1>\n"
        f"<h2>Provenance</h2><ul>{prov}</ul>\n{notes}\n{claims}"
        f"<h2>Tables</h2>\n<p>{e(legend)}</p>\n{tables_html}"
        f"<h2>Figures</h2>\n{imgs}{cells}</body></html>\n"
    )
