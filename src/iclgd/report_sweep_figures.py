"""Figures of k sweeps and order sensitivity (PNGs; the numbers come from iclgd.report_sweeps).

Built like ``report_figures``: a ``matplotlib.figure.Figure`` on the Agg canvas (no pyplot state),
saved without a timestamp so a rebuilt report has the same bytes. Every figure says in its title
what it shows and its n (seeds, orders, eval examples), and draws its 95% intervals: black, the t
interval across seeds; grey, where one seed defines a value, that cell's paired bootstrap interval
over eval examples (another kind of interval, as in the report's headline figure).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from iclgd import stats
from iclgd.report_figures import _figure, _save
from iclgd.report_orders import DLOGP, FLIP_ANY, OrderSet
from iclgd.report_sweeps import KSeries, Point, point

PERCENT, COSINE, JS = (-3.0, 103.0), (-1.05, 1.05), (-0.02, math.log(2) + 0.02)  # what each can take
# Panels of the k-sweep figure: (title, table, which columns (None: all), the y range a value can
# take: a t interval of two seeds can reach far beyond it, and is cut there; the tables give it whole).
KSWEEP_PANELS = (
    ("accuracy (%)", "accuracy", None, PERCENT),
    ("SimAOU (norm)", "simaou", lambda c: c.endswith("(norm)") and not c.startswith("random uniform"), COSINE),
    ("SimAM", "simam", None, COSINE),
    ("SimAM_Δ", "simam_delta", None, COSINE),
    ("Rec2FTP (%)", "rec2ftp", None, PERCENT),
    ("α(GD, LCGD)", "alpha", lambda c: not c.startswith("F2T"), COSINE),
    ("ICL and P predict the same label (%)", "agreement", lambda c: c.endswith("same label (%)"), PERCENT),
    ("JS(ICL, P) (nats)", "agreement", lambda c: c.endswith(": JS"), JS),
)


def _errorbars(ax, x, pts: list[Point | None], colour: str) -> None:
    for boot, ecolor in ((False, "black"), (True, "grey")):
        sel = [i for i, p in enumerate(pts) if p is not None and math.isfinite(p.value)
               and (p.kind == "bootstrap") == boot and math.isfinite(p.low)]
        if sel:
            v = np.array([pts[i].value for i in sel])
            err = np.abs([[pts[i].value - pts[i].low for i in sel], [pts[i].high - pts[i].value for i in sel]])
            ax.errorbar(np.asarray(x, dtype=float)[sel], v, yerr=err, fmt="none", ecolor=ecolor, elinewidth=0.8,
                        capsize=2)


def ksweep_figure(s: KSeries, path: Path) -> Path | None:
    """Every headline entry of one task against k, one panel per metric, one line per column."""
    panels = []
    for title, table, keep, ylim in KSWEEP_PANELS:
        cols = [k[1] for k in s.keys(table) if (keep is None or keep(k[1]))
                and any(p is not None and math.isfinite(p.value) for p in (point(t, k) for t in s.by_k.values()))]
        if cols:  # a metric undefined at every k (Rec2FTP where P fixed nothing) has no panel
            panels.append((title, table, cols, ylim))
    if not panels:
        return None
    fig, axes = _figure(len(panels), ncols=4, width=3.6, height=2.9)
    ks = s.ks
    for ax, (title, table, cols, ylim) in zip(axes, panels, strict=True):
        for j, col in enumerate(cols):
            pts = [point(s.by_k[k], (table, col)) for k in ks]
            y = [p.value if p is not None else math.nan for p in pts]
            ax.plot(ks, y, marker="o", markersize=3, color=f"C{j % 10}", label=col)
            _errorbars(ax, ks, pts, f"C{j % 10}")
        ax.set_ylim(*ylim)
        ax.set_xticks(ks)
        ax.set_xlabel("k (demonstrations)")
        ax.set_title(title, fontsize="medium")
        ax.legend(fontsize="xx-small")
    seeds = ", ".join(f"k={k}: {len(t.cells)}" for k, t in s.by_k.items())
    n = max(c.n_examples for t in s.by_k.values() for c in t.cells)
    who = "" if s.control is None else f" ({s.control} control)"
    fig.suptitle(f"{s.task}{who}: headline metrics against k, 95% intervals (black: t across seeds; grey: one "
                 f"seed, paired bootstrap over eval examples). Seeds per k {seeds}; eval n {n}", fontsize="medium")
    return _save(fig, path)


def _unit_label(sets: list[OrderSet]) -> str:
    r = sets[0].run
    return f"{r.task} k{r.k}" + ("" if r.control is None else f" {r.control}")


def _units(sets: list[OrderSet]) -> list[list[OrderSet]]:
    by: dict[tuple, list[OrderSet]] = {}
    for s in sets:
        by.setdefault(s.unit, []).append(s)
    return list(by.values())


def _pooled(values: list[float], boots: list) -> Point:
    """A value over seeds: the t interval with >= 2 seeds, else the one cell's bootstrap."""
    if len(values) >= 2:
        st = stats.seed_summary(values)
        return Point(float(st.mean), float(st.low), float(st.high), "t", len(values), float(st.sd))
    b = boots[0]
    return Point(b.value, b.low, b.high, "bootstrap", 1)


def _bars(ax, units: list[list[OrderSet]], settings: list[str], get) -> None:
    """Bars per unit (x) and setting (colour); get(order_set, setting) -> a Boot or None."""
    width = 0.8 / max(1, len(settings))
    for i, st in enumerate(settings):
        x = np.arange(len(units)) + (i - (len(settings) - 1) / 2) * width
        pts: list[Point | None] = []
        for u in units:
            boots = [b for b in (get(s, st) for s in u) if b is not None]
            pts.append(_pooled([b.value for b in boots], boots) if boots else None)
        ax.bar(x, [p.value if p else math.nan for p in pts], width, color=f"C{i % 10}", label=st)
        _errorbars(ax, x, pts, f"C{i % 10}")
    ax.set_xticks(np.arange(len(units)), [_unit_label(u) for u in units], fontsize="small")
    ax.axhline(0.0, color="black", linewidth=0.6)


def _n_text(sets: list[OrderSet]) -> str:
    orders = sorted({len(s.orders) for s in sets})
    seeds = sorted({len(u) for u in _units(sets)})
    n = max(s.cells[0].n_examples for s in sets)
    return f"orders per cell {', '.join(map(str, orders))}; seeds per bar {', '.join(map(str, seeds))}; eval n {n}"


def order_flips_figure(sets: list[OrderSet], path: Path) -> Path | None:
    """Per setting: the share of examples whose prediction changes with the order, and Δ log p."""
    if not sets:
        return None
    units = _units(sets)
    settings = list(dict.fromkeys(st for s in sets for st in s.settings))
    fig, axes = _figure(2, ncols=2, width=max(4.5, 1.2 + 0.5 * len(units) * len(settings)), height=3.4)
    for ax, (name, label) in zip(axes, ((FLIP_ANY, "flip rate, any order (%)"), (DLOGP, "Δ log p (nats)")),
                                 strict=True):
        _bars(ax, units, settings, lambda s, st, name=name: s.per_setting.get(st, {}).get(name))
        ax.set_ylabel(label)
        ax.legend(fontsize="x-small")
    axes[0].set_ylim(*PERCENT)
    axes[1].set_yscale("symlog", linthresh=1e-6)  # order-invariant processes sit at rounding level
    axes[1].set_ylim(bottom=0.0)  # Δ log p >= 0; a two-seed t interval below 0 is cut
    fig.suptitle(f"Order sensitivity per setting, 95% intervals (black: t across seeds; grey: bootstrap over "
                 f"eval examples). {_n_text(sets)}", fontsize="medium")
    return _save(fig, path)


# Panels of the spread figure: (title, table, column of setting P).
SPREAD_PANELS = (
    ("accuracy: sd across orders (pp)", "accuracy", "{}"),
    ("SimAOU (norm): sd across orders", "simaou", "{} (norm)"),
    ("SimAM: sd across orders", "simam", "{}"),
    ("SimAM_Δ: sd across orders", "simam_delta", "{}"),
    ("same label as ICL: sd across orders (pp)", "agreement", "{}: same label (%)"),
)


def order_spread_figure(sets: list[OrderSet], path: Path) -> Path | None:
    """The sd across orders of the headline entries, per setting and cell."""
    units = _units(sets)
    settings = list(dict.fromkeys(st for s in sets for st in s.settings))
    panels = [(t, table, col) for t, table, col in SPREAD_PANELS
              if any((table, col.format(st)) in s.spread for s in sets for st in settings)]
    if not panels:
        return None
    fig, axes = _figure(len(panels), ncols=3, width=max(3.8, 1.0 + 0.4 * len(units) * len(settings)), height=3.2)
    for ax, (title, table, col) in zip(axes, panels, strict=True):
        shown = [st for st in settings if any((table, col.format(st)) in s.spread for s in sets)]

        def get(s, st, table=table, col=col):
            sp = s.spread.get((table, col.format(st)))
            return None if sp is None else sp.sd

        _bars(ax, units, shown, get)
        ax.set_ylim(bottom=0.0)  # a spread is >= 0; a two-seed t interval below 0 is cut
        ax.set_title(title, fontsize="medium")
        ax.legend(fontsize="x-small")
    fig.suptitle(f"Spread of headline entries across demonstration orders (metrics against ICL move with ICL's "
                 f"order too), 95% intervals. {_n_text(sets)}", fontsize="medium")
    return _save(fig, path)


def order_accuracy_figure(sets: list[OrderSet], path: Path) -> Path | None:
    """Each order's accuracy per setting, one panel per cell (task, k, model), seeds side by side."""
    units = _units(sets)
    if not units:
        return None
    fig, axes = _figure(len(units), ncols=3, width=4.2, height=3.2)
    for ax, u in zip(axes, units, strict=True):
        settings = list(dict.fromkeys(st for s in u for st in s.settings))
        for j, s in enumerate(u):  # seeds side by side within a setting
            for i, st in enumerate(settings):
                sp = s.spread.get(("accuracy", st))
                if sp is None:
                    continue
                x = i + (j - (len(u) - 1) / 2) * 0.8 / len(u)
                ax.plot([x] * len(sp.values), sp.values, color=f"C{i % 10}", marker="o", markersize=3, linewidth=0.8)
                ax.plot([x], sp.values[:1], color="black", marker="_", markersize=9)  # order 0
        ax.set_xticks(range(len(settings)), settings, fontsize="x-small", rotation=30)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{_unit_label(u)}: {len(u)} seed(s) × {len(u[0].orders)} orders", fontsize="medium")
    fig.suptitle("Accuracy under each demonstration order (dots, one column per seed; black tick: order 0). "
                 f"Eval n {max(s.cells[0].n_examples for s in sets)}", fontsize="medium")
    return _save(fig, path)
