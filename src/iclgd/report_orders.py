"""Order sensitivity in the report: one cell under several demonstration orders, compared.

One cell (model, protocol, control, task, seed, k) run under N orders of its demonstrations
(order 0 the original, o >= 1 seeded permutations: iclgd.data.demo_order) is an ``OrderSet``: the
report's order-0 cell (iclgd.report groups only order 0) with the cells of the permuted runs.
Nothing here touches a model: every number comes from ``report_cells.Cell`` values. Per setting
(ZSL, ICL, each process), from that setting's own outputs only:
- *flip rate (any)*: the share of eval examples whose predicted label is not the same under all N
  orders; *flip rate (pairwise)*: the share of (example, pair of orders) whose predictions differ,
  which does not grow with N. Equal for N = 2.
- *Δ log p*: per example, the largest change of a label's log-probability (renormalized over the
  labels, nats) between order 0 and order o, averaged over o >= 1; continuous, so it tells a
  process that is order-invariant up to rounding (full-batch GD) from one that is not.
- the spread of accuracy across orders.
Per table entry (accuracy and every metric of the main tables; F2T subsets left out, because the
subset itself changes with the order): the headline under each order, their mean, sample sd and
range (max − min). A metric that compares P with ICL (SimAOU, SimAM, SimAM_Δ, agreement, Rec2FTP)
moves with ICL's order too, so its spread is not P's alone; the per-setting columns are.
Intervals: a paired bootstrap over eval examples with the same resamples for every order (the
cell's ``report_cells.cell_seed``; the eval examples are the same, checked) of the flip rates,
Δ log p, and the sd and range; with several seeds, pooled rows give mean ± sd [95% t] across seeds.
ZSL never sees the demonstrations: its rows are a check (0 by construction), and a ZSL prediction
that changes is named in the notes.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from iclgd import stats
from iclgd.report_cells import LEVEL, N_BOOT, Cell, Key, cell_values, control_label
from iclgd.report_tables import _html, _md_table
from iclgd.runfolder import Run

if TYPE_CHECKING:
    from iclgd.report import Group

FLIP_ANY, FLIP_PAIRS, DLOGP = "flip rate, any (%)", "flip rate, pairwise (%)", "Δ log p (nats)"

ORDERS_LEGEND = (
    "One cell (task, seed, k, model) run under N demonstration orders: order 0 the original, orders >= 1 "
    "seeded permutations of the same demonstrations (iclgd.data.demo_order); ICL and every process of a "
    "run see the same order. Per setting, from its own outputs: flip rate (any) = share of eval examples "
    "whose predicted label is not the same under all N orders; flip rate (pairwise) = share of (example, "
    "pair of orders) with different predictions; Δ log p = per example the largest change of a label's "
    "log-probability (renormalized over the labels) between order 0 and order o, mean over o >= 1, in "
    "nats; accuracy's mean, sample sd and range (max − min) over the orders. Per table entry: its value "
    "under each order, their mean, sd and range; metrics that compare a process with ICL move with ICL's "
    f"order as well. Intervals: [{LEVEL:.0%} paired bootstrap over eval examples, {N_BOOT} resamples shared "
    "by every order; an sd or range is never negative and resampling inflates it, so its interval can lie "
    "above the estimate]; rows 'all (n)': mean ± sd [95% t interval] of the n per-seed values. ZSL does not see "
    "the demonstrations: its rows are a check and are 0 by construction. A process whose update does not "
    "depend on the order (gd[batch=full]: one step on the mean loss) has Δ log p at rounding level "
    "(< 1e-4 nats) and no flips."
)


SIG = -3  # as decimals: 3 significant digits (Δ log p spans rounding level, 1e-7, to whole nats)


def fmt_num(x: float, d: int) -> str:
    """x with d decimals (d < 0: -d significant digits); n/a where undefined."""
    if not math.isfinite(x):
        return "n/a"
    return f"{x:.{-d}g}" if d < 0 else f"{x:.{d}f}"


def entry_decimals(key: Key) -> int:
    """Decimals of an entry: percentages 1, the rest 3 (as the main tables)."""
    return 1 if key[0] == "accuracy" or "(%)" in key[1] else 3


def is_main_entry(key: Key) -> bool:
    """Table entries the sweeps lay out: the main tables' (no F2T subset: it moves with the order)."""
    return not key[0].startswith("f2t:") and not key[1].startswith("F2T")


# ---------------------------------------------------------------------------------------------
# order sensitivity
# ---------------------------------------------------------------------------------------------


@dataclass
class Boot:
    """An estimate with its paired bootstrap interval over eval examples."""

    value: float
    low: float = math.nan
    high: float = math.nan


@dataclass
class Spread:
    """One table entry across the orders of a cell: each order's value, mean, sd and range."""

    values: list[float]
    sd: Boot
    range: Boot
    flagged: bool = False

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))


@dataclass
class OrderSet:
    """One cell (model, protocol, control, task, seed, k) under several demonstration orders."""

    cells: list[Cell]  # by order, order 0 first
    settings: list[str]  # present under every order
    per_setting: dict[str, dict[str, Boot]] = field(default_factory=dict)  # setting -> FLIP_ANY, ...
    spread: dict[Key, Spread] = field(default_factory=dict)

    @property
    def run(self) -> Run:
        return self.cells[0].run

    @property
    def orders(self) -> list[int]:
        return [c.order for c in self.cells]

    def flagged(self, setting: str) -> bool:
        """Whether `setting` carries a degenerate-result flag (iclgd.flags) under any of the orders:
        its flips and spread rest on that run, so its rows carry †."""
        return any(c.flags.get(setting) for c in self.cells)

    @property
    def unit(self) -> tuple:
        """What pools over seeds: (model, protocol, control, task, k)."""
        r = self.run
        return r.model, r.protocol, r.control, r.task, r.k


def _boot(x: np.ndarray, idx: np.ndarray, scale: float = 1.0) -> Boot:
    iv = stats.paired_bootstrap(stats.mean_of(x * scale), len(x), n_boot=N_BOOT, level=LEVEL, batched=True, idx=idx)
    return Boot(float(iv.estimate), float(iv.low), float(iv.high))


def _per_setting(cells: list[Cell], s: str, idx: np.ndarray) -> dict[str, Boot]:
    preds = np.stack([c.preds[s] for c in cells])  # [order, batch]
    lp = np.stack([c.label_lp[s] for c in cells])  # [order, batch, label]
    any_flip = (preds != preds[0]).any(axis=0).astype(np.float64)  # [batch]
    pairs = list(combinations(range(len(cells)), 2))
    pairwise = np.mean([preds[i] != preds[j] for i, j in pairs], axis=0)  # [batch]
    dlogp = np.abs(lp[1:] - lp[0]).max(axis=-1).mean(axis=0)  # [batch]: max over labels, mean over o >= 1
    return {FLIP_ANY: _boot(any_flip, idx, 100.0), FLIP_PAIRS: _boot(pairwise, idx, 100.0), DLOGP: _boot(dlogp, idx)}


def _spread(cells: list[Cell], key: Key, idx: np.ndarray) -> Spread:
    per_order = [stats.mean_of(c.values[key].examples, c.values[key].weight) for c in cells]

    def stat(rows):  # rows [r, batch] -> [r, 2]: (sd, range) across the orders of each resample
        v = np.stack([m(rows) for m in per_order])  # [order, r]
        return np.stack([v.std(axis=0, ddof=1), v.max(axis=0) - v.min(axis=0)], axis=-1)

    iv = stats.paired_bootstrap(stat, cells[0].n_examples, n_boot=N_BOOT, level=LEVEL, batched=True, idx=idx)
    est, low, high = (np.asarray(x, dtype=float) for x in (iv.estimate, iv.low, iv.high))
    return Spread([float(c.values[key].estimate) for c in cells], Boot(float(est[0]), float(low[0]), float(high[0])),
                  Boot(float(est[1]), float(low[1]), float(high[1])), any(c.is_flagged(key) for c in cells))


def order_sets(groups: list[Group], runs: list[Run]) -> tuple[list[OrderSet], list[str]]:
    """The order sets of a report: the groups' order-0 cells with the permuted-order ``runs``
    (read one at a time); returns them and notes naming what could not be compared and why."""
    by_cell: dict[tuple, list[Cell]] = {}
    for g in groups:
        for c in g.cells:
            by_cell.setdefault(_cell_key(c.run), []).append(c)
    notes = []
    for run in runs:
        key = _cell_key(run)
        if key not in by_cell:
            notes.append(f"{run.path}: order {run.order} without the original order's run (order 0): not compared")
            continue
        by_cell[key].append(cell_values(run, intervals=False))
    sets = []
    for cells in by_cell.values():
        if len(cells) < 2:
            continue
        cells = sorted(cells, key=lambda c: c.order)
        label = f"{cells[0].task} s{cells[0].seed} k{cells[0].k}"
        if len({c.order for c in cells}) < len(cells):
            notes.append(f"{label}: an order appears twice ({', '.join(str(c.run.path) for c in cells)}): not compared")
            continue
        if any(_choices(c.run) != _choices(cells[0].run) for c in cells):
            notes.append(f"{label}: the orders' runs were made with other choices (settings, lr, eval cap, ...) "
                         f"besides the order: not compared")
            continue
        if any(c.eval_ids != cells[0].eval_ids for c in cells):
            notes.append(f"{label}: the orders' eval examples differ: not compared")
            continue
        settings = [s for s in cells[0].run.settings if all(s in c.preds for c in cells)]
        os_ = OrderSet(cells, settings)
        idx = cells[0].indices()  # the cell's resamples: the same for every order (same eval examples)
        for s in settings:
            os_.per_setting[s] = _per_setting(cells, s, idx)
        for key in cells[0].values:
            if is_main_entry(key) and all(key in c.values for c in cells):
                os_.spread[key] = _spread(cells, key, idx)
        if os_.per_setting.get("zsl", {}).get(FLIP_ANY, Boot(0.0)).value > 0:
            notes.append(f"{label}: ZSL predictions changed with the demonstration order, which ZSL never sees: "
                         "the runs differ in something else (code, data, machine)")
        sets.append(os_)
    return sets, notes


def _cell_key(run: Run) -> tuple:
    return run.model, run.protocol, run.control, run.task, run.seed, run.k


def _choices(run: Run) -> dict:
    """The run's decisive choices (iclgd.plan.CellPlan.decisive) but its order: equal within a set."""
    return {k: v for k, v in (run.decisive or {}).items() if k != "order"}


def _set_label(s: OrderSet) -> list[str]:
    r = s.run
    return [r.task, str(r.k), str(r.seed), control_label(r.control)]


def _fmt_boot(b: Boot, d: int) -> str:
    out = fmt_num(b.value, d)
    if math.isfinite(b.low) and math.isfinite(b.high):
        out += f" [{fmt_num(b.low, d)}, {fmt_num(b.high, d)}]"
    return out


def _fmt_seeds(values: list[float], d: int) -> str:
    s = stats.seed_summary(values)
    out = fmt_num(float(s.mean), d) + (" ± —" if not np.isfinite(s.sd) else f" ± {fmt_num(float(s.sd), d)}")
    if np.isfinite(s.low):
        out += f" [{fmt_num(float(s.low), d)}, {fmt_num(float(s.high), d)}]"
    return out


def _pools(sets: list[OrderSet]) -> list[list[OrderSet]]:
    """Order sets of one (model, protocol, control, task, k) across seeds, where there are >= 2."""
    by: dict[tuple, list[OrderSet]] = {}
    for s in sets:
        by.setdefault(s.unit, []).append(s)
    return [v for v in by.values() if len(v) >= 2]


FLIPS_HEAD = ["task", "k", "seed", "model", "setting", "orders", FLIP_ANY, FLIP_PAIRS, DLOGP,
              "accuracy: mean over orders (%)", "accuracy: sd", "accuracy: range"]
SPREAD_HEAD = ["task", "k", "seed", "model", "entry", "orders", "value per order", "mean", "sd across orders",
               "range across orders"]


def _flips_body(sets: list[OrderSet]) -> list[list[str]]:
    body = []
    for s in sets:
        for st in s.settings:
            ps, acc = s.per_setting[st], s.spread.get(("accuracy", st))
            body.append([*_set_label(s), st + (" †" if s.flagged(st) else ""), str(len(s.orders)),
                         _fmt_boot(ps[FLIP_ANY], 1),
                         _fmt_boot(ps[FLIP_PAIRS], 1), _fmt_boot(ps[DLOGP], SIG),
                         "" if acc is None else fmt_num(acc.mean, 1), "" if acc is None else _fmt_boot(acc.sd, 1),
                         "" if acc is None else _fmt_boot(acc.range, 1)])
    for pool in _pools(sets):
        first = pool[0]
        for st in first.settings:
            have = [s for s in pool if st in s.per_setting]
            accs = [s.spread[("accuracy", st)] for s in have if ("accuracy", st) in s.spread]
            body.append([first.run.task, str(first.run.k), f"all ({len(have)})", control_label(first.run.control),
                         st + (" †" if any(s.flagged(st) for s in have) else ""), str(len(first.orders)),
                         *(_fmt_seeds([s.per_setting[st][m].value for s in have], d)
                           for m, d in ((FLIP_ANY, 1), (FLIP_PAIRS, 1), (DLOGP, SIG))),
                         _fmt_seeds([a.mean for a in accs], 1), _fmt_seeds([a.sd.value for a in accs], 1),
                         _fmt_seeds([a.range.value for a in accs], 1)])
    return body


def _spread_body(sets: list[OrderSet]) -> list[list[str]]:
    body = []
    for s in sets:
        for key, sp in s.spread.items():
            d = entry_decimals(key)
            body.append([*_set_label(s), f"{key[0]}: {key[1]}", str(len(s.orders)),
                         ", ".join(fmt_num(v, d) for v in sp.values), fmt_num(sp.mean, d),
                         _fmt_boot(sp.sd, d) + (" †" if sp.flagged else ""), _fmt_boot(sp.range, d)])
    for pool in _pools(sets):
        first = pool[0]
        for key in first.spread:
            have = [s.spread[key] for s in pool if key in s.spread]
            d = entry_decimals(key)
            body.append([first.run.task, str(first.run.k), f"all ({len(have)})", control_label(first.run.control),
                         f"{key[0]}: {key[1]}", str(len(first.orders)), "", _fmt_seeds([h.mean for h in have], d),
                         _fmt_seeds([h.sd.value for h in have], d), _fmt_seeds([h.range.value for h in have], d)])
    return body


FLIPS_TITLE = "Order sensitivity per setting: prediction flips, label log-probability change, accuracy spread"
SPREAD_TITLE = "Order sensitivity of every table entry: its value under each order, sd and range"


def orders_markdown(sets: list[OrderSet]) -> tuple[str, str]:
    """(flips table, spread table) in Markdown."""
    return (f"### {FLIPS_TITLE}\n\n" + _md_table(FLIPS_HEAD, _flips_body(sets), 6),
            f"### {SPREAD_TITLE}\n\n" + _md_table(SPREAD_HEAD, _spread_body(sets), 6))


def orders_html(sets: list[OrderSet]) -> str:
    return (_html(FLIPS_TITLE, FLIPS_HEAD, _flips_body(sets))
            + _html(SPREAD_TITLE, SPREAD_HEAD, _spread_body(sets)))


def write_orders_csv(sets: list[OrderSet], flips_path: Path, spread_path: Path) -> None:
    """Long form, per order set: per setting (flips, Δ log p, accuracy spread) and per table entry."""
    with flips_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "protocol", "control", "task", "seed", "k", "orders", "setting", "quantity", "value",
                    "low", "high", "flagged"])
        for s in sets:
            r = s.run
            head = [r.model, r.protocol, control_label(r.control), r.task, r.seed, r.k, len(s.orders)]
            for st in s.settings:
                for name, b in s.per_setting[st].items():
                    w.writerow([*head, st, name, repr(b.value), repr(b.low), repr(b.high), int(s.flagged(st))])
    with spread_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "protocol", "control", "task", "seed", "k", "orders", "table", "column",
                    "per_order", "mean", "sd", "sd_low", "sd_high", "range", "range_low", "range_high", "flagged"])
        for s in sets:
            r = s.run
            for key, sp in s.spread.items():
                w.writerow([r.model, r.protocol, control_label(r.control), r.task, r.seed, r.k, len(s.orders), *key,
                            ";".join(repr(v) for v in sp.values), repr(sp.mean), repr(sp.sd.value), repr(sp.sd.low),
                            repr(sp.sd.high), repr(sp.range.value), repr(sp.range.low), repr(sp.range.high),
                            int(sp.flagged)])
