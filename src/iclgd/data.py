"""Loading task splits and choosing the seeded demonstrations and eval examples.

Sources, in the order ``source="auto"`` tries them:

1. the Hugging Face Hub (``datasets.load_dataset(hf_path, hf_name, split=...)``), only when a
   quick check says it is reachable (offline flags, then a ~2 s HTTP probe, cached per
   process), so an offline machine never waits minutes on retries;
2. a local copy: ``<data_dir>/<task.local_dir>/<split>.jsonl`` (or ``.csv``), the layout of
   ``shared/data``. ``data_dir`` is the argument, else ``$ICLGD_DATA_DIR``, else
   ``../shared/data`` beside the current directory (CI clones the repo next to ``shared``).
   A path-like ``local_dir`` or a ``data_dir`` that is itself a ``.jsonl``/``.csv`` file (or a
   pattern with ``{split}``) is read directly; see ``iclgd.tasks``.

Selection follows SPEC §5: the eval set is the eval split shuffled with seed 1 and capped;
the demonstrations are the first k of the demo split shuffled with the run seed. Shuffles
are exactly ``datasets.Dataset.shuffle(seed=s)``, whose permutation is
``np.random.default_rng(s).permutation(n)`` (datasets/arrow_dataset.py, ``shuffle``), so a
selection made from the local copy picks the same row ids as one made from the Hub.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import os
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from iclgd.errors import DataError
from iclgd.tasks import Task, get_task, is_path_like

log = logging.getLogger(__name__)

SOURCES = ("auto", "hub", "local")
_SUFFIXES = (".jsonl", ".csv")
_PROBE_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Example:
    """One row of a split: its row index there, the template's fields, and its label id."""

    id: int
    fields: dict[str, str]
    label: int


@dataclass(frozen=True)
class Selection:
    """The k demonstrations (in order) and the eval examples (in order) of one run."""

    demos: tuple[Example, ...]
    eval: tuple[Example, ...]


# ---------------------------------------------------------------------------- hub


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """Whether the Hugging Face Hub answers quickly; decided once per process.

    Offline flags win; otherwise a HEAD request to the Hub endpoint must succeed within
    ~2 s. It runs in a daemon thread joined with a timeout because DNS resolution ignores
    socket timeouts.
    Call ``hub_reachable.cache_clear()`` to re-check.
    """
    if any(_truthy(os.environ.get(v)) for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return False
    except ImportError:  # pragma: no cover - datasets depends on huggingface_hub
        return False
    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    ok: list[bool] = []

    def probe() -> None:
        # An HTTP answer, not just a TCP connect: sandboxes and proxies accept any
        # connection and answer 403/404 themselves, which must count as unreachable.
        request = urllib.request.Request(endpoint, method="HEAD")
        try:
            with urllib.request.urlopen(request, timeout=_PROBE_TIMEOUT_S) as response:
                ok.append(response.status < 400)
        except (OSError, ValueError):  # URLError/HTTPError are OSErrors
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(_PROBE_TIMEOUT_S + 0.5)
    return bool(ok)


def _hub_rows(task: Task, split: str) -> tuple[list[dict], str]:
    import datasets  # heavy import, only when the Hub is used

    ds = datasets.load_dataset(task.hf_path, task.hf_name, split=split)
    return ds.to_list(), f"hub:{task.hf_path}{'/' + task.hf_name if task.hf_name else ''}"


# -------------------------------------------------------------------------- local


def _default_roots() -> list[Path]:
    """Where the local copy is looked for when no data_dir is given, in order."""
    env = os.environ.get("ICLGD_DATA_DIR")
    if env:
        return [Path(env).expanduser()]
    # Beside the clone (CI), then beside the source tree for an editable install run elsewhere.
    here = Path(__file__).resolve()
    candidates = [Path.cwd().parent / "shared" / "data"]
    if len(here.parents) > 3:
        candidates.append(here.parents[3] / "shared" / "data")
    return list(dict.fromkeys(c.resolve() for c in candidates))


def _split_in_folder(folder: Path, split: str) -> Path:
    for suffix in _SUFFIXES:
        if (folder / f"{split}{suffix}").is_file():
            return folder / f"{split}{suffix}"
    present = sorted({p.stem for p in folder.iterdir() if p.suffix in _SUFFIXES})
    raise DataError(
        f"split {split!r} not found in {folder} (looked for {split}.jsonl and {split}.csv); "
        f"splits present: {', '.join(present) or 'none'}. Set demo_split/eval_split in the "
        "task to one of them."
    )


def _direct(path: str, split: str) -> Path:
    """A path given directly: a file (used for every split), a {split} pattern, a folder."""
    p = Path(path.replace("{split}", split)).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        return _split_in_folder(p, split)
    raise DataError(f"data file or folder {p} does not exist (split {split!r})")


def local_split_path(task: Task, split: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The file the local source reads for ``split``; DataError says what was tried."""
    if data_dir is not None:
        d = str(data_dir)
        if "{split}" in d or d.endswith(_SUFFIXES):
            return _direct(d, split)
    if is_path_like(task.local_dir):
        return _direct(task.local_dir, split)
    roots = [Path(data_dir).expanduser()] if data_dir is not None else _default_roots()
    tried = [r / task.local_dir for r in roots]
    for folder in tried:
        if folder.is_dir():
            return _split_in_folder(folder, split)
    raise DataError(
        f"no local data for task {task.name!r}: tried {', '.join(str(t) for t in tried)}. "
        f"Point --data-dir (or the ICLGD_DATA_DIR environment variable) at the folder that "
        f"holds {task.local_dir}/<split>.jsonl, or set local_dir in the task file."
    )


@functools.lru_cache(maxsize=32)
def _read_file(path: str, mtime_ns: int) -> tuple[tuple[dict, int], ...]:
    """Rows of a JSONL or CSV file with their 1-based line numbers (cached by mtime)."""
    del mtime_ns  # part of the cache key only: an edited file is read again
    rows: list[tuple[dict, int]] = []
    with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: a byte-order mark is not part of the header
        if path.endswith(".csv"):
            reader = csv.DictReader(f)
            if not reader.fieldnames:
                raise DataError(f"{path}: CSV file has no header row")
            for row in reader:
                if None in row or None in row.values():
                    raise DataError(
                        f"{path}, line {reader.line_num}: expected {len(reader.fieldnames)} "
                        "columns as in the header; quote fields that contain commas"
                    )
                rows.append((row, reader.line_num))
        else:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    text = line.rstrip("\n")
                    shown = text if len(text) <= 160 else text[:157] + "..."
                    raise DataError(f"{path}, line {n}, column {e.pos + 1}: malformed JSON ({e.msg}); the line "
                                    f"reads: {shown}") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}, line {n}: expected a JSON object per line")
                rows.append((row, n))
    return tuple(rows)


# ------------------------------------------------------------------------ loading


def _to_examples(task: Task, rows: Sequence[tuple[dict, int | None]], where: str) -> list[Example]:
    """Check columns and labels, keep the template's fields; errors name file and line."""
    if not rows:
        raise DataError(f"{where}: the split is empty; choose a split with examples")
    need = (*task.fields, task.label_column)
    words = {w: i for i, w in enumerate(task.label_words)}
    out = []
    for i, (row, line) in enumerate(rows):
        at = f"{where}, line {line}" if line is not None else f"{where}, row {i}"
        missing = [c for c in need if c not in row]
        if missing:
            raise DataError(
                f"{at}: column(s) {', '.join(map(repr, missing))} needed by task {task.name!r} "
                f"are missing; columns present: {', '.join(map(str, row))}. Fix the template "
                "or label_column in the task, or the data."
            )
        raw = row[task.label_column]
        try:
            label = words[raw] if isinstance(raw, str) and raw in words else int(raw)
        except (TypeError, ValueError):
            raise DataError(f"{at}: label {raw!r} is not an integer or a label word") from None
        if not 0 <= label < task.n_classes:
            raise DataError(
                f"{at}: label {label} is out of range for the {task.n_classes} label words "
                f"{list(task.label_words)} (a hidden test label is -1 on the Hub)"
            )
        fields = {f: "" if row[f] is None else str(row[f]) for f in task.fields}
        out.append(Example(id=i, fields=fields, label=label))
    return out


def load_split(
    task: Task | str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    source: str = "auto",
) -> list[Example]:
    """All examples of one split, ids = row indices (stable across loads).

    ``source``: "auto" (Hub when reachable, else local; local straight away when
    ``data_dir`` is given or the task's ``local_dir`` is a path), "hub" or "local".
    Raises DataError naming the problem and its fix.
    """
    task = get_task(task)
    if source not in SOURCES:
        raise DataError(f"unknown data source {source!r}; use one of {', '.join(SOURCES)}")
    # An explicit data_dir or a task pointing at its own files means "read these": auto
    # then goes straight to them rather than to the Hub.
    explicit_local = data_dir is not None or is_path_like(task.local_dir)
    use_hub = source == "hub" or (
        source == "auto" and task.hf_path and not explicit_local and hub_reachable()
    )
    if source == "hub" and not task.hf_path:
        raise DataError(f"task {task.name!r} has no hf_path; use source='local'")
    if source == "auto" and not use_hub and task.hf_path and not explicit_local:
        log.info("Hugging Face Hub not reachable; task %s reads its local copy", task.name)
    if use_hub:
        t0 = time.perf_counter()
        try:
            rows, where = _hub_rows(task, split)
        except Exception as e:  # any Hub failure (network, missing split) falls back in auto
            if source == "hub":
                raise DataError(f"loading {task.hf_path} split {split!r} from the Hub: {e}") from e
            log.warning("Hub load of %s failed (%s); using the local copy", task.hf_path, e)
        else:
            examples = _to_examples(task, [(r, None) for r in rows], f"{where} split {split}")
            log.info(
                "task %s split %s: %d rows from %s in %.1fs",
                task.name,
                split,
                len(examples),
                where,
                time.perf_counter() - t0,
            )
            return examples
    path = local_split_path(task, split, data_dir)
    rows = _read_file(str(path), path.stat().st_mtime_ns)
    examples = _to_examples(task, rows, str(path))
    log.info("task %s split %s: %d rows from local %s", task.name, split, len(examples), path)
    return examples


def shuffle_order(n: int, seed: int) -> np.ndarray:
    """The row order of ``Dataset.shuffle(seed=seed)`` on n rows."""
    return np.random.default_rng(seed).permutation(n)


def _demos(task: Task, seed: int, k: int, pool: list[Example]) -> list[Example]:
    if k < 0 or k > len(pool):
        raise DataError(
            f"k={k} demonstrations asked of task {task.name!r}, but split "
            f"{task.demo_split!r} has {len(pool)} rows; choose 0 <= k <= {len(pool)}"
        )
    return [pool[i] for i in shuffle_order(len(pool), seed)[:k]]


def select_examples(
    task: Task | str,
    seed: int,
    k: int,
    data_dir: str | os.PathLike | None = None,
    eval_cap: int | None = None,
    eval_seed: int = 1,
    source: str = "auto",
) -> Selection:
    """The run's k demonstrations and its eval examples (SPEC §5).

    demos: first k of the demo split shuffled with ``seed``. eval: the eval split shuffled
    with ``eval_seed``, without the demonstrations when both splits are the same, capped at
    ``eval_cap`` (default ``task.eval_cap``). An empty eval set raises DataError.
    """
    task = get_task(task)
    demo_pool = load_split(task, task.demo_split, data_dir, source)
    demos = _demos(task, seed, k, demo_pool)
    same = task.eval_split == task.demo_split
    eval_pool = demo_pool if same else load_split(task, task.eval_split, data_dir, source)
    exclude = {d.id for d in demos} if same else set()
    cap = task.eval_cap if eval_cap is None else eval_cap
    order = shuffle_order(len(eval_pool), eval_seed)
    evals = [eval_pool[i] for i in order if eval_pool[i].id not in exclude][: max(cap, 0)]
    if not evals:
        raise DataError(
            f"task {task.name!r}: the eval set is empty (split {task.eval_split!r}, "
            f"{len(eval_pool)} rows, cap {cap}, {len(exclude)} used as demonstrations)"
        )
    return Selection(demos=tuple(demos), eval=tuple(evals))


def held_out(
    task: Task | str,
    seed: int,
    k: int,
    n: int,
    data_dir: str | os.PathLike | None = None,
    source: str = "auto",
    *,
    eval_cap: int | None = None,
    eval_seed: int = 1,
) -> tuple[Example, ...]:
    """n demo-split examples for learning-rate search, disjoint from demos and eval.

    They are the next n after the first k in the seed's shuffle (SPEC §6.4: tune on the
    train split, never on the eval set). When demo and eval split are the same, rows of the
    run's eval set (given ``eval_cap``/``eval_seed``) are skipped. Too few rows -> DataError.
    """
    task = get_task(task)
    pool = load_split(task, task.demo_split, data_dir, source)
    _demos(task, seed, k, pool)  # validates k
    exclude: set[int] = set()
    if task.eval_split == task.demo_split:
        sel = select_examples(task, seed, k, data_dir, eval_cap, eval_seed, source)
        exclude = {e.id for e in sel.eval}
    rest = [pool[i] for i in shuffle_order(len(pool), seed)[k:] if pool[i].id not in exclude]
    if n < 1 or len(rest) < n:
        raise DataError(
            f"task {task.name!r}: {n} held-out examples asked, but split {task.demo_split!r} "
            f"has {len(rest)} rows besides the {k} demonstrations and the eval set"
        )
    return tuple(rest[:n])


def switch_labels(labels: Sequence[int], n_classes: int) -> list[int]:
    """Label switching (SPEC §1): label -> (label + 1) % n_classes, a derangement.

    For two classes it is a flip; no label keeps its value. Labels must lie in range.
    """
    if n_classes < 2:
        raise ValueError(f"label switching needs at least two classes, got {n_classes}")
    out = []
    for y in labels:
        if not 0 <= int(y) < n_classes:
            raise ValueError(f"label {y} is out of range for {n_classes} classes")
        out.append((int(y) + 1) % n_classes)
    return out
