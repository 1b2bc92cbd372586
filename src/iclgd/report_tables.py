"""The report's tables: Markdown, CSV (long form) and HTML, from aggregated groups (iclgd.report).

Two kinds per table name: the main table (rows task · model, and the average rows; entries mean ±
sd [95% t interval] across seeds or tasks) and the per-cell table (rows task, seed, model; entries
the cell's headline [95% paired bootstrap interval over eval examples]). ``LEGEND`` and
``CELLS_LEGEND`` say what every number is; they are printed above the tables.
"""

from __future__ import annotations

import csv
import html
import math
from pathlib import Path
from typing import TYPE_CHECKING

from iclgd.report_cells import ALPHA_PAIR, LEVEL, N_BOOT, Key, Value, control_label
from iclgd.runfolder import safe_name

if TYPE_CHECKING:
    from iclgd.report import Group, Stat

AVERAGE = "average"

# table name -> (title, decimals). Columns are discovered from the runs; "f2t:P" tables are added
# per process P (f2t_title).
TABLES = {
    "accuracy": ("Accuracy (%)", 1),
    "rec2ftp": ("Rec2FTP (%): of the examples P fixed over ZSL, the share ICL gets right", 1),
    "simaou": ("SimAOU (norm: each h unit-normalized first, as the reference; raw: not)", 3),
    "simam": ("SimAM: cos(m_ICL, m_X) per head; 'before' is X = ZSL", 3),
    "simam_delta": ("SimAM_Δ: cos(m_ICL − m_ZSL, m_P − m_ZSL)", 3),
    "alpha": (f"α({ALPHA_PAIR[0].upper()}, {ALPHA_PAIR[1].upper()}) on attention logits and on attention outputs "
              "(SimAOU form); F2T: on the examples ZSL gets wrong while ICL, GD and LCGD get right", 3),
    "agreement": ("Output agreement of ICL and P: same predicted label (%), KL(ICL ‖ P) and Jensen-Shannon "
                  "divergence (nats) of the label distributions renormalized over the labels", 3),
    "ranking_token": ("Attention ranking of the demonstration tokens, ICL vs P (Dai et al.): Kendall τ-b and "
                      "top-k recall (k = min(100, tokens)); random: random scores in place of P's", 3),
    "ranking_example": ("Attention ranking of the demonstrations (each one's summed attention), ICL vs P: Kendall "
                        "τ-b and top-k recall (k = min(5, k)); shuffled: P's token scores permuted (the "
                        "length-matched chance level); random: random scores in place of P's", 3),
}
F2T_PREFIX = "f2t:"

LEGEND = (
    "Each entry: mean ± sample sd [95% t interval] across seeds (task rows), or across the per-task "
    "means (average rows: their mean; sd and interval are the spread between tasks, not seed noise); "
    "— and no interval with a single value; n/a: undefined (an empty subset, or Rec2FTP where P fixed "
    "nothing). Rows '· untrained' and '· untrained-partial' are the untrained controls of SPEC §7 (same "
    "task, demonstrations, eval examples and settings; weights re-initialized: all of them, or attention "
    "and MLP only), aggregated apart and never pooled with the trained model; an average row over other "
    "tasks than the trained model's names them. † some contributing setting is flagged as degenerate "
    "(Flags). F2T tables: SPEC §4's F2T subset of P, the examples ZSL gets wrong while ICL and P get right "
    "(the reference's mode 'f2t'); every entry is computed on that subset only, baselines included; n is "
    "its size per seed in seed order (Σ: over every cell); accuracy (100/100/0) and Rec2FTP (100) are "
    "fixed by construction there and not shown. Random SimAOU baselines: a centred Gaussian update, and "
    "the reference's uniform [0,1) update. Agreement: KL and JS in nats, JS ≤ ln 2. Attention ranking "
    "(SPEC §4): ICL's pre-softmax scores from the recording position to every demonstration token (summed "
    "over heads) against P's q_test · q_train (queries before the rotary embedding, q_train from the step "
    "that trained on the token), both softmaxed over the demonstration tokens; mean over examples per "
    "layer, then layers (a layer whose attention window hides a demonstration is left out); the random "
    "baseline rests on ICL's scores alone, so it is one column per cell; at the example level read P "
    "against 'shuffled', which keeps the demonstrations' lengths, as well as against random."
)
CELLS_LEGEND = (
    f"One row per cell (task, seed, model). Each entry: the cell's headline (mean over eval examples, "
    f"then layers) [{LEVEL:.0%} percentile interval of a paired bootstrap over eval examples: {N_BOOT} "
    "resamples drawn once per task and seed from a fixed report seed, shared by every setting of the cell "
    "and by its untrained controls, so differences between them are paired]. ‡ some resamples held no "
    "example of the entry's subset (F2T, or the examples P fixed for Rec2FTP) and were dropped: the "
    "interval is conditional on the subset being non-empty. † flagged as degenerate."
)


def f2t_title(process: str) -> str:
    return (f"F2T subset of {process}: the examples ZSL gets wrong while ICL and {process} get right; n = "
            "its size")


def title(name: str) -> str:
    return f2t_title(name[len(F2T_PREFIX):]) if name.startswith(F2T_PREFIX) else TABLES[name][0]


def decimals(name: str, column: str = "") -> int:
    """Decimals of a table's entries: percentages get 1 wherever they are."""
    if "(%)" in column:
        return 1
    return 3 if name.startswith(F2T_PREFIX) else TABLES[name][1]


def file_stem(name: str) -> str:
    return safe_name(name.replace(":", "_"))


def table_names(groups: list[Group]) -> list[str]:
    """Tables with data, in a fixed order: the static ones, then F2T tables in setting order."""
    present = dict.fromkeys(tb for g in groups for c in g.cells for (tb, _) in [*c.values, *c.counts])
    return [n for n in TABLES if n in present] + [n for n in present if n.startswith(F2T_PREFIX)]


def _columns(name: str, groups: list[Group]) -> tuple[list[str], set[str]]:
    """Columns of a table (first-seen order) and which of them are counts (subset sizes)."""
    values = dict.fromkeys(col for g in groups for c in g.cells for (tb, col) in c.values if tb == name)
    counts = dict.fromkeys(col for g in groups for c in g.cells for (tb, col) in c.counts if tb == name)
    cols = list(values)
    # a subset size goes just before the first column of its subset ("F2T: ..."), else first
    at = next((i for i, col in enumerate(cols) if col.startswith("F2T")), 0)
    return cols[:at] + list(counts) + cols[at:], set(counts)


def _prefix(g: Group, groups: list[Group]) -> str:
    label = g.label(groups)
    return f"{label} · " if label else ""


def _rows(name: str, groups: list[Group]) -> tuple[list[str], set[str], list[tuple]]:
    """(columns, count columns, rows). A row is (group, control label, task, row label, entries):
    task is the task name, or "average" (with the tasks it covers when they differ from the
    trained model's); entries map a column to a Stat, a list of per-seed counts (task rows), a
    total count (average rows), or None."""
    columns, counts = _columns(name, groups)

    def entries(values: dict, subset_sizes: dict) -> dict:
        return {col: subset_sizes.get((name, col)) if col in counts else values.get((name, col))
                for col in columns}

    rows = []
    for g in groups:
        pre = _prefix(g, groups)
        for t in g.tasks:
            rows.append((g, control_label(t.control), t.task, pre + t.label, entries(t.values, t.counts)))
        trained_tasks = g.averages[0].tasks
        for a in g.averages:
            task = AVERAGE if a.tasks == trained_tasks else f"{AVERAGE} ({', '.join(a.tasks)})"
            label = task if a.control is None else f"{task} · {a.control}"
            rows.append((g, control_label(a.control), task, pre + label, entries(a.values, a.counts)))
    return columns, counts, rows


def _num(x: float, d: int) -> str:
    return f"{x:.{d}f}"


def fmt_stat(stat: Stat | None, d: int) -> str:
    if stat is None:
        return ""
    if math.isnan(stat.mean):
        return "n/a"
    out = _num(stat.mean, d)
    out += " ± —" if math.isnan(stat.sd) else f" ± {_num(stat.sd, d)}"
    if not (math.isnan(stat.low) or math.isnan(stat.high)):
        out += f" [{_num(stat.low, d)}, {_num(stat.high, d)}]"
    return out + (" †" if stat.flagged else "")


def _fmt_entry(entry, d: int) -> str:
    if entry is None:
        return ""
    if isinstance(entry, list):
        return ", ".join(map(str, entry))
    if isinstance(entry, int):
        return f"Σ {entry}"
    return fmt_stat(entry, d)


def _md_table(head: list[str], body: list[list[str]], numeric_from: int) -> str:
    align = ["---"] * numeric_from + ["---:"] * (len(head) - numeric_from)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines) + "\n"


def markdown(name: str, groups: list[Group]) -> str:
    columns, _, rows = _rows(name, groups)
    body = [[label] + [_fmt_entry(e[c], decimals(name, c)) for c in columns] for *_, label, e in rows]
    return f"### {title(name)}\n\n" + _md_table(["task", *columns], body, 1)


def write_csv(name: str, groups: list[Group], path: Path) -> None:
    """Long form: one line per (model, protocol, control, task, column); task "average" for
    average rows. Counts (subset sizes): mean is the total, per_seed the counts in seed order."""
    columns, counts, rows = _rows(name, groups)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "protocol", "k", "control", "task", "column", "mean", "sd", "low", "high", "n",
                    "per_seed", "flagged"])
        for g, control, task, _, entries in rows:
            for col in columns:
                e = entries[col]
                head = [g.model, g.protocol, g.k, control, task, col]
                if e is None:
                    continue
                if col in counts:
                    total, per = (sum(e), ";".join(map(str, e))) if isinstance(e, list) else (e, "")
                    w.writerow([*head, total, "", "", "", "", per, ""])
                else:
                    w.writerow([*head, repr(e.mean), repr(e.sd), repr(e.low), repr(e.high), e.n, "",
                                int(e.flagged)])


def html_table(name: str, groups: list[Group]) -> str:
    columns, _, rows = _rows(name, groups)
    return _html(title(name), ["task", *columns], [[label] + [_fmt_entry(e[c], decimals(name, c)) for c in columns]
                                                    for *_, label, e in rows])


def _html(caption: str, head: list[str], body: list[list[str]]) -> str:
    e = html.escape
    th = "".join(f"<th>{e(h)}</th>" for h in head)
    trs = "".join("<tr><td>" + e(r[0]) + "</td>" + "".join(f"<td class='num'>{e(x)}</td>" for x in r[1:])
                  + "</tr>" for r in body)
    return f"<h3>{e(caption)}</h3>\n<table><tr>{th}</tr>{trs}</table>\n"


# ---------------------------------------------------------------------------------------------
# per-cell tables: the bootstrap intervals over eval examples
# ---------------------------------------------------------------------------------------------


def fmt_value(v: Value | None, d: int, flagged: bool = False) -> str:
    if v is None:
        return ""
    if math.isnan(v.estimate):
        return "n/a"
    out = _num(v.estimate, d)
    if not (math.isnan(v.low) or math.isnan(v.high)):
        out += f" [{_num(v.low, d)}, {_num(v.high, d)}]"
    return out + (" ‡" if v.n_invalid else "") + (" †" if flagged else "")


def _cell_rows(name: str, groups: list[Group]):
    """(group, task aggregate, cell) for every cell of every group, in table order."""
    for g in groups:
        for t in g.tasks:
            for c in t.cells:
                yield g, t, c


def _cells_body(name: str, groups: list[Group]) -> tuple[list[str], list[list[str]]]:
    columns, counts = _columns(name, groups)
    body = []
    for g, t, c in _cell_rows(name, groups):
        row = [f"{_prefix(g, groups)}{t.task}", str(c.seed), control_label(c.control)]
        for col in columns:
            key: Key = (name, col)
            row.append(str(c.counts[key]) if col in counts and key in c.counts
                       else fmt_value(c.values.get(key), decimals(name, col), c.is_flagged(key)))
        body.append(row)
    return ["task", "seed", "model", *columns], body


def cells_markdown(name: str, groups: list[Group]) -> str:
    head, body = _cells_body(name, groups)
    return f"### {title(name)}: per cell\n\n" + _md_table(head, body, 3)


def cells_html(name: str, groups: list[Group]) -> str:
    head, body = _cells_body(name, groups)
    return _html(f"{title(name)}: per cell", ["cell", *head[3:]], [[" ".join(r[:3]), *r[3:]] for r in body])


def write_cells_csv(name: str, groups: list[Group], path: Path) -> None:
    """Long form: one line per (model, protocol, control, task, seed, column) with the cell's
    estimate, bootstrap interval, examples that count, dropped resamples and whether flagged."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "protocol", "k", "control", "task", "seed", "column", "estimate", "low", "high",
                    "n_examples", "n_boot", "n_invalid", "flagged"])
        columns, counts = _columns(name, groups)
        for g, t, c in _cell_rows(name, groups):
            for col in columns:
                key = (name, col)
                head = [g.model, g.protocol, g.k, control_label(c.control), t.task, c.seed, col]
                if col in counts and key in c.counts:
                    w.writerow([*head, c.counts[key], "", "", "", "", "", ""])
                elif key in c.values:
                    v = c.values[key]
                    w.writerow([*head, repr(v.estimate), repr(v.low), repr(v.high), v.n, N_BOOT, v.n_invalid,
                                int(c.is_flagged(key))])
