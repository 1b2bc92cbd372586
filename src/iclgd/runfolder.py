"""The run folder (one cell): its layout, defined once, with the one writer and the one reader.

    RUN_DIR/
      config.json          schema, the resolved plan, task record, model identity, protocol, provenance
      demos.jsonl          the k demonstrations in order: id, fields, gold label, label used
      eval.jsonl           the eval examples in order: id, gold label
      results.json         per setting: accuracy, n, wall/train/eval seconds, peak memory, options,
                           learning rate and how it was chosen, flags (degenerate results), the
                           attention ranking's summary (iclgd.ranking_record)
      records/SETTING.npz  per setting arrays (docs/DESIGN.md lists the keys; ranking_* arrays:
                           iclgd.ranking_record)
      .iclgd               marker: kind "run", schema, the files iclgd wrote (iclgd.outputs)
      DONE                 written last; a folder without it is unfinished and is redone

The writer (`write`) builds the folder in a hidden staging sibling and moves it into place
(iclgd.outputs.move_into), so an interrupted write never leaves a folder that looks finished.
Readers (report, sweep resume, tests) go through `load_run` / `find_runs`, which check the schema
and name any folder they skip and why.
"""

from __future__ import annotations

import json
import platform
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

from iclgd import outputs
from iclgd.errors import DataError

DONE = "DONE"
CONFIG, RESULTS, DEMOS, EVAL, RECORDS = "config.json", "results.json", "demos.jsonl", "eval.jsonl", "records"
SCHEMA = outputs.SCHEMA
BASE_SETTINGS = ("zsl", "icl")


def safe_name(setting: str) -> str:
    """Filesystem-safe form of a setting label: every char outside [A-Za-z0-9._-] becomes "_"."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", setting)


def record_file(setting: str) -> str:
    return f"{RECORDS}/{safe_name(setting)}.npz"


def layout(settings) -> list[str]:
    """Every file a run folder with these settings holds (relative paths)."""
    return [CONFIG, DEMOS, EVAL, RESULTS, *(record_file(s) for s in settings), DONE]


def is_done(path: str | Path) -> bool:
    return (Path(path) / DONE).exists()


def provenance() -> dict:
    """Versions, git hash, host facts: what a reader needs to know how a result was made."""
    versions = {}
    for pkg in ("iclgd", "torch", "transformers", "datasets", "numpy", "scipy", "gguf"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    git = None
    try:
        here = Path(__file__).resolve().parent
        git = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    import torch

    return {"versions": versions, "git_hash": git, "python": sys.version.split()[0],
            "platform": platform.platform(), "torch_threads": torch.get_num_threads(),
            "command": " ".join(sys.argv)}


def _json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write(out: str | Path, cell, overwrite: bool = False) -> Path:
    """Write a CellResult (iclgd.experiment) as a run folder at `out`; returns the folder.

    Only files iclgd wrote are ever replaced (iclgd.outputs)."""
    out = Path(out)
    outputs.check_out(out, "run", overwrite, names=layout(cell.records))
    tmp = outputs.staging_dir(out)
    try:
        (tmp / RECORDS).mkdir()
        _json(tmp / CONFIG, {"schema": SCHEMA, **cell.config})
        with open(tmp / DEMOS, "w") as f:
            for d in cell.demos:
                f.write(json.dumps(d) + "\n")
        with open(tmp / EVAL, "w") as f:
            for i, gold in zip(cell.eval_ids, next(iter(cell.records.values())).gold.tolist()):
                f.write(json.dumps({"id": i, "gold": gold}) + "\n")
        _json(tmp / RESULTS, cell.results)
        for setting, rec in cell.records.items():
            rec.save(tmp / record_file(setting))
        files = layout(cell.records)
        outputs.write_marker(tmp, "run", files)
        (tmp / DONE).write_text("")
        return outputs.move_into(tmp, out, "run", last=DONE)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------- reading


class _LazyRecord(Mapping):
    """One records file as a read-only mapping of torch tensors, each array read on first use.

    Attention logits of a 1.3B model on 2000 examples are hundreds of MB per setting, so keys are
    read only when a metric asks for them and dropped with `Run.release()`."""

    def __init__(self, path: Path):
        self.path = path
        self._arrays: dict = {}
        self._keys = list(_open_npz(path, lambda z: z.files))

    def __getitem__(self, key: str):
        import torch

        if key not in self._arrays:
            if key not in self._keys:
                raise KeyError(f"{self.path} has no array {key!r}; it has {self._keys}")
            self._arrays[key] = torch.from_numpy(_open_npz(self.path, lambda z: z[key]))
        return self._arrays[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _open_npz(path: Path, read):
    try:
        with np.load(path) as z:
            return read(z)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as err:
        if isinstance(err, KeyError) and path.exists():
            raise
        raise DataError(f"records file {path} cannot be read ({type(err).__name__}: {err}); it is truncated or "
                        "corrupt: delete its run folder and run that cell again") from None


@dataclass
class Run:
    """One finished run folder: its config and results, and its records loaded lazily."""

    path: Path
    config: dict
    results: dict
    _records: dict[str, _LazyRecord] = field(default_factory=dict, repr=False)

    @property
    def schema(self) -> int:
        return int(self.config.get("schema", 1))

    @property
    def task(self) -> str:
        return _label(self.config.get("task", "?"))

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", -1))

    @property
    def k(self) -> int:
        return int(self.config.get("k", -1))

    @property
    def order(self) -> int:
        """The demonstration order (0: as selected; o >= 1: permutation o, iclgd.data.demo_order);
        folders made before orders existed are order 0."""
        return int(self.config.get("order") or 0)

    @property
    def model(self) -> str:
        return _label(self.config.get("model", "?"))

    @property
    def protocol(self) -> str:
        return _label(self.config.get("protocol", "?"))

    @property
    def control(self) -> str | None:
        """None for the trained model, else the untrained control it ran on (SPEC §7)."""
        return self.config.get("control")

    @property
    def provenance(self) -> dict:
        return self.config.get("provenance") or {}

    @property
    def decisive(self) -> dict | None:
        return self.config.get("decisive")

    @property
    def settings(self) -> list[str]:
        """Settings in the config's order, restricted to those with a records file."""
        names = list(self.config.get("settings") or self.results)
        return [s for s in names if self.record_path(s).exists()]

    def record_path(self, setting: str) -> Path:
        return self.path / record_file(setting)

    def records(self, setting: str) -> Mapping:
        """Arrays of the setting's records file as tensors, each read on first access."""
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

    def flags(self, setting: str) -> list[dict]:
        return list((self.results.get(setting) or {}).get("flags") or [])

    def eval_ids(self) -> list:
        """The eval examples' ids in record order (eval.jsonl): two runs whose records can be
        compared example by example (a trained model and its control) have the same list."""
        try:
            lines = (self.path / EVAL).read_text().splitlines()
            return [json.loads(line)["id"] for line in lines if line.strip()]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DataError(f"{self.path / EVAL} cannot be read ({type(err).__name__}: {err}); the run "
                            "folder is damaged: delete it and run that cell again") from None

    def release(self) -> None:
        """Forget loaded arrays (the next access reads the file again)."""
        self._records.clear()


def _label(value: object) -> str:
    """A short name for a config entry that may be a string or a record (task, model, protocol)."""
    if isinstance(value, Mapping):
        for key in ("name", "id", "alias", "hub_name", "path"):
            if key in value:
                return str(value[key])
        return json.dumps(value, sort_keys=True)
    return str(value)


def load_run(path: str | Path) -> Run:
    """Read a finished run folder's config.json and results.json (records stay on disk until
    used); DataError naming the file and the fix when something is missing or malformed."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path} is not a folder")
    docs = {}
    for name in (CONFIG, RESULTS):
        try:
            docs[name] = json.loads((path / name).read_text())
        except FileNotFoundError:
            raise DataError(f"{path} is not a run folder: {name} is missing") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path / name} is not valid JSON ({e}); the run folder is damaged: delete it and "
                            "run that cell again") from None
    run = Run(path=path, config=docs[CONFIG], results=docs[RESULTS])
    if run.schema > SCHEMA:
        raise DataError(f"{path} was written by a newer iclgd (run-folder schema {run.schema}, this iclgd reads "
                        f"<= {SCHEMA}); upgrade iclgd to read it")
    return run


def find_runs(root: str | Path) -> tuple[list[Run], list[tuple[Path, str]]]:
    """Finished run folders at or below `root`, sorted by (model, protocol, task, seed, path), and
    the folders skipped with the reason. Staging folders of interrupted writers are never runs."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root} does not exist")
    if (root / CONFIG).exists():
        dirs = [root]
    else:
        dirs = sorted(p.parent for p in root.rglob(CONFIG)
                      if not any(outputs.is_staging(q) for q in p.relative_to(root).parents if q.name))
    runs, skipped = [], []
    for d in dirs:
        if outputs.is_staging(d):
            continue
        if not (d / DONE).exists():
            skipped.append((d, "unfinished (no DONE file): run its cell again to finish it"))
            continue
        try:
            run = load_run(d)
            for s in run.settings:  # a truncated records file is named here, not deep in a metric
                run.records(s)
        except DataError as err:
            skipped.append((d, str(err)))
            continue
        runs.append(run)
    runs.sort(key=lambda r: (r.model, r.protocol, r.task, r.seed, r.k, r.order, str(r.path)))
    return runs, skipped
