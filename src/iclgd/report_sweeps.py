"""k sweeps in the report, and the sections k sweeps and orders add to it (figures:
report_sweep_figures; order sensitivity: report_orders).

Inputs are the report's groups (iclgd.report: one per (model, protocol, k), order-0 runs only).
Nothing here touches a model or re-reads records. The groups of one (model, protocol) that differ
only in k are laid out over k: for each task (and model: trained or a control) and each table
entry, the value at every k with its 95% interval: the t interval across seeds (mean ± sd [t], as
in the main tables), or, where a task has one seed at that k, the cell's paired bootstrap interval
over eval examples (marked ᵇ: not comparable in kind). k = 0 cells run ZSL and ICL only, so process
entries start at the first k > 0. ``write`` puts the k sweep, the order sensitivity and the place
of the attention-ranking table into a report.
"""

from __future__ import annotations

import csv
import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from iclgd.report_cells import LEVEL, Key, control_label
from iclgd.report_orders import (
    ORDERS_LEGEND,
    entry_decimals,
    fmt_num,
    is_main_entry,
    order_sets,
    orders_html,
    orders_markdown,
    write_orders_csv,
)
from iclgd.report_tables import TABLES, _html, _md_table, title
from iclgd.runfolder import Run

if TYPE_CHECKING:
    from iclgd.report import Group, TaskAgg

BOOT = "ᵇ"  # marks a one-seed entry whose interval is the cell's bootstrap over eval examples

KSWEEP_LEGEND = (
    "Every table entry as a function of k (the number of demonstrations), per task and model. Each entry: "
    "mean ± sample sd [95% t interval] across seeds, as in the main tables; where a task has one seed at "
    f"that k, the cell's estimate [{LEVEL:.0%} paired bootstrap interval over eval examples]{BOOT}. "
    "'seeds per k' gives n. k = 0 cells run ZSL and ICL only (no demonstrations to train on; ICL with "
    "k = 0 is ZSL), so process columns are empty there. F2T subsets per k are in the main tables of each k."
)
# Where Dai et al.'s ranking tables are (or why they are absent): a report says so rather than
# leave the reader to wonder.
RANKING_NOTE = (
    "Dai et al.'s fourth metric (SPEC §4: Kendall τ and top-k recall between ICL's attention to the "
    "demonstration tokens and the finetuning side's, iclgd.ranking_record) is in the tables 'Attention ranking "
    "of the demonstration tokens' (token level) and '... of the demonstrations' (example level) above, each "
    "process beside the random baseline (and, at the example level, the shuffled one), with their per-cell "
    "bootstrap intervals below; files tables/ranking_token.* and tables/ranking_example.*."
)
RANKING_ABSENT = (
    "Dai et al.'s fourth metric (SPEC §4: Kendall τ and top-k recall between ICL's attention to the "
    "demonstration tokens and the finetuning side's) is not in these runs: they ran with --no-ranking, have "
    "no icl setting or no process, were made before iclgd recorded it, or the metric is undefined for their "
    "cells (results.json, 'ranking', says why)."
)


# ---------------------------------------------------------------------------------------------
# k sweep
# ---------------------------------------------------------------------------------------------


@dataclass
class Point:
    """One entry at one k: value and 95% interval, of which kind ("t" or "bootstrap"), seeds."""

    value: float
    low: float
    high: float
    kind: str
    n: int
    sd: float = math.nan  # across seeds ("t" only)
    flagged: bool = False


@dataclass
class KSeries:
    """One task on one model (trained or a control) of one (model, protocol), over k."""

    model: str
    protocol: str
    control: str | None
    task: str
    by_k: dict[int, TaskAgg]  # sorted by k

    @property
    def ks(self) -> list[int]:
        return list(self.by_k)

    def keys(self, table: str | None = None) -> list[Key]:
        keys = dict.fromkeys(k for t in self.by_k.values() for k in t.values if is_main_entry(k))
        return [k for k in keys if table is None or k[0] == table]


def point(agg: TaskAgg, key: Key) -> Point | None:
    """The entry ``key`` of a task row: its t interval across seeds, or with one seed defining it,
    that cell's bootstrap interval over eval examples (None where the entry is absent)."""
    st = agg.values.get(key)
    if st is None:
        return None
    if st.n >= 2:
        return Point(st.mean, st.low, st.high, "t", st.n, st.sd, st.flagged)
    have = [c for c in agg.cells if key in c.values and math.isfinite(c.values[key].estimate)]
    if not have:
        return Point(math.nan, math.nan, math.nan, "", 0, flagged=st.flagged)
    v = have[0].values[key]
    return Point(v.estimate, v.low, v.high, "bootstrap", 1, flagged=st.flagged)


def k_series(groups: list[Group]) -> list[KSeries]:
    """Every (model, protocol, control, task) that the groups show at two k or more."""
    by_pair: dict[tuple[str, str], list[Group]] = {}
    for g in groups:
        by_pair.setdefault((g.model, g.protocol), []).append(g)
    out = []
    for (model, protocol), gs in by_pair.items():
        if len({g.k for g in gs}) < 2:
            continue
        for task, control in dict.fromkeys((t.task, t.control) for g in gs for t in g.tasks):
            by_k = {g.k: t for g in sorted(gs, key=lambda g: g.k) for t in g.tasks
                    if (t.task, t.control) == (task, control)}
            if len(by_k) >= 2:
                out.append(KSeries(model, protocol, control, task, by_k))
    return out


def _series_label(s: KSeries, series: list[KSeries]) -> str:
    pre = f"{s.model} · {s.protocol} · " if len({(x.model, x.protocol) for x in series}) > 1 else ""
    return pre + s.task + ("" if s.control is None else f" · {s.control}")


def _fmt_point(p: Point | None, d: int) -> str:
    if p is None:
        return ""
    if not math.isfinite(p.value):
        return "n/a"
    out = fmt_num(p.value, d)
    if p.kind == "t":
        out += f" ± {fmt_num(p.sd, d)}"
    if math.isfinite(p.low) and math.isfinite(p.high):
        out += f" [{fmt_num(p.low, d)}, {fmt_num(p.high, d)}]"
    return out + (BOOT if p.kind == "bootstrap" else "") + (" †" if p.flagged else "")


def ksweep_tables(series: list[KSeries]) -> list[str]:
    """Table names (the main tables' order) that the series have entries in."""
    present = dict.fromkeys(k[0] for s in series for k in s.keys())
    return [t for t in TABLES if t in present] + [t for t in present if t not in TABLES]


def _ksweep_body(table: str, series: list[KSeries]) -> tuple[list[str], list[list[str]]]:
    ks = sorted({k for s in series for k in s.ks})
    head = ["task", "entry", *(f"k={k}" for k in ks), "seeds per k"]
    body = []
    for s in series:
        for key in s.keys(table):
            pts = {k: point(t, key) for k, t in s.by_k.items()}
            d = entry_decimals(key)
            seeds = ", ".join(f"{k}: {len(t.cells)}" for k, t in s.by_k.items())
            body.append([_series_label(s, series), key[1], *(_fmt_point(pts.get(k), d) for k in ks), seeds])
    return head, body


def ksweep_markdown(table: str, series: list[KSeries]) -> str:
    head, body = _ksweep_body(table, series)
    return f"### k sweep: {title(table)}\n\n" + _md_table(head, body, 2)


def ksweep_html(table: str, series: list[KSeries]) -> str:
    head, body = _ksweep_body(table, series)
    return _html(f"k sweep: {title(table)}", head, body)


def write_ksweep_csv(series: list[KSeries], path: Path) -> None:
    """Long form: one line per (model, protocol, control, task, table, column, k)."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "protocol", "control", "task", "table", "column", "k", "value", "sd", "low", "high",
                    "interval", "n_seeds", "flagged"])
        for s in series:
            for key in s.keys():
                for k, t in s.by_k.items():
                    p = point(t, key)
                    if p is not None:
                        w.writerow([s.model, s.protocol, control_label(s.control), s.task, *key, k, repr(p.value),
                                    repr(p.sd), repr(p.low), repr(p.high), p.kind, p.n, int(p.flagged)])


# ---------------------------------------------------------------------------------------------
# into the report
# ---------------------------------------------------------------------------------------------


@dataclass
class Parts:
    """What ``write`` adds to a report: summary Markdown, HTML, the PNGs written, notes."""

    md: list[str] = field(default_factory=list)
    html: str = ""
    pngs: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def write(groups: list[Group], permuted: list[Run], tables_dir: Path, fig_dir: Path, *, figures: bool = True) -> Parts:
    """Write the k-sweep and order tables (and figures) of a report; ``permuted``: its runs of
    orders >= 1. Returns the summary sections (k sweep, order sensitivity, attention ranking)."""
    from iclgd.runfolder import safe_name

    parts = Parts()
    series = k_series(groups)
    sets, parts.notes = order_sets(groups, permuted)
    if series:
        parts.md += ["## k sweep", "", KSWEEP_LEGEND, ""]
        parts.html += f"<h2>k sweep</h2>\n<p>{html.escape(KSWEEP_LEGEND)}</p>\n"
        for table in ksweep_tables(series):
            md = ksweep_markdown(table, series)
            (tables_dir / f"ksweep_{safe_name(table)}.md").write_text(md)
            parts.md.append(md)
            parts.html += ksweep_html(table, series)
        write_ksweep_csv(series, tables_dir / "ksweep.csv")
    if sets:
        flips, spread = orders_markdown(sets)
        (tables_dir / "order_flips.md").write_text(flips)
        (tables_dir / "order_spread.md").write_text(spread)
        write_orders_csv(sets, tables_dir / "order_flips.csv", tables_dir / "order_spread.csv")
        parts.md += ["## Order sensitivity", "", ORDERS_LEGEND, "", flips, spread]
        parts.html += f"<h2>Order sensitivity</h2>\n<p>{html.escape(ORDERS_LEGEND)}</p>\n{orders_html(sets)}"
    if parts.notes:
        parts.md += ["Not compared:", "", *(f"- {n}" for n in parts.notes), ""]
        parts.html += "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in parts.notes) + "</ul>\n"
    recorded = any(t == "ranking_token" for g in groups for c in g.cells for t, _ in c.values)
    note = RANKING_NOTE if recorded else RANKING_ABSENT
    parts.md += ["## Attention ranking to the demonstrations (Kendall τ, top-k recall)", "", note, ""]
    parts.html += f"<h2>Attention ranking to the demonstrations</h2>\n<p>{html.escape(note)}</p>\n"
    if figures:
        from iclgd import report_sweep_figures as figs

        pairs = list(dict.fromkeys((g.model, g.protocol) for g in groups))
        for model, protocol in pairs:
            base = f"_{safe_name(model)}_{safe_name(protocol)}" if len(pairs) > 1 else ""
            for s in (s for s in series if (s.model, s.protocol) == (model, protocol)):
                who = "" if s.control is None else f"_{safe_name(s.control)}"
                parts.pngs.append(figs.ksweep_figure(s, fig_dir / f"ksweep_{safe_name(s.task)}{who}{base}.png"))
            mine = [s for s in sets if s.unit[:2] == (model, protocol)]
            if mine:
                parts.pngs += [figs.order_flips_figure(mine, fig_dir / f"order_flips{base}.png"),
                               figs.order_spread_figure(mine, fig_dir / f"order_spread{base}.png"),
                               figs.order_accuracy_figure(mine, fig_dir / f"order_accuracy{base}.png")]
        parts.pngs = [p for p in parts.pngs if p is not None]
    return parts
