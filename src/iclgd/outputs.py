"""Output folders: iclgd writes only where it may, and deletes only what it made.

Every folder iclgd writes (a run folder, a sweep's root, a report, a bench) gets a small marker
file, `.iclgd`, naming its kind and listing the files iclgd wrote there. Rules, checked before any
compute (`check_out`) and again when writing:
- a path that is a file, or that cannot be created or written, is refused;
- a new or empty folder is used;
- a folder whose marker has the same kind is ours: iclgd replaces the files it listed there and
  leaves every other file alone;
- any other non-empty folder is refused, unless `overwrite`; even then iclgd only adds its own
  files and refuses if one of them would replace a file it did not write.
Run folders written by iclgd before markers existed (config.json and DONE, no marker) count as ours.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

from iclgd.errors import OutputError

MARKER = ".iclgd"
KINDS = ("run", "sweep", "report", "bench")
SCHEMA = 2  # bump when the layout of a run folder changes (runfolder.py)


def read_marker(path: Path) -> dict | None:
    """The marker of an iclgd folder ({"kind", "schema", "files"}), or None for a foreign one."""
    path = Path(path)
    try:
        marker = json.loads((path / MARKER).read_text())
        if isinstance(marker, dict) and marker.get("kind") in KINDS:
            return marker
    except (OSError, ValueError):
        pass
    if (path / "config.json").is_file() and (path / "DONE").is_file():  # a run folder of schema 1
        return {"kind": "run", "schema": 1, "files": _legacy_run_files(path)}
    return None


def _legacy_run_files(path: Path) -> list[str]:
    files = ["config.json", "demos.jsonl", "eval.jsonl", "results.json", "DONE"]
    return files + [f"records/{p.name}" for p in sorted((path / "records").glob("*.npz"))]


def check_out(path: str | Path, kind: str, overwrite: bool = False, names: Iterable[str] = ()) -> Path:
    """Check that iclgd may write a folder of `kind` at `path` (OutputError otherwise).

    `names` are files iclgd is about to write there (relative paths): with `overwrite` in a
    foreign folder, none of them may replace a file that is already there."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputError(f"output path {path} is a file; give the path of a folder (new, empty, or made by "
                          "iclgd)")
    anc = path
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise OutputError(f"cannot create {path}: {anc} is a file")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {path}: {anc} is not writable by this user; choose another --out")
    if not path.is_dir():
        return path
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return path
    marker = read_marker(path)
    if marker is not None:
        if marker["kind"] != kind:
            raise OutputError(f"{path} holds an iclgd {marker['kind']} folder, not a {kind}; choose another --out")
        return path
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    if not overwrite:
        raise OutputError(
            f"output folder {path} already holds {len(entries)} entries that iclgd did not write ({shown}); "
            "iclgd never deletes them. Choose a new or empty folder, or pass --overwrite to add iclgd's files "
            "beside them (nothing of yours is replaced or removed)")
    clash = sorted(n for n in names if (path / n).exists())
    if clash:
        raise OutputError(f"--overwrite: {path} already has {', '.join(clash)}, which iclgd did not write; "
                          "move them away or choose another --out")
    return path


def write_marker(path: Path, kind: str, files: Iterable[str], extra: dict | None = None) -> None:
    """Write the marker last-but-one (before a run folder's DONE): atomically, via a temp file."""
    body = {"kind": kind, "schema": SCHEMA, "files": sorted(set(files)), **(extra or {})}
    tmp = path / f".iclgd.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(body, indent=1) + "\n")
    os.replace(tmp, path / MARKER)


def own_files(path: Path) -> set[str]:
    marker = read_marker(path)
    return set(marker.get("files", [])) if marker else set()


def remove_stale(path: Path, old: set[str], new: set[str]) -> None:
    """Delete files iclgd listed before and does not write again (never anything else)."""
    for rel in sorted(old - new):
        target = path / rel
        if target.is_file() and target.resolve().is_relative_to(path.resolve()):
            target.unlink()
            parent = target.parent
            while parent != path and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent


def move_into(staging: Path, out: Path, kind: str, last: str | None = None) -> Path:
    """Put the files of a complete `staging` folder at `out` (checked with `check_out` before).

    A new or empty `out` is replaced by the staging folder in one rename (atomic). Otherwise the
    files of our previous write that the new one lacks are removed, `last` (a run folder's DONE)
    is removed first and moved in last, so a half-replaced folder never looks finished, and files
    iclgd did not write stay where they are."""
    new = {str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file()} - {MARKER}
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        if out.exists():
            out.rmdir()
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, out)
        return out
    old = own_files(out)
    if last is not None:
        (out / last).unlink(missing_ok=True)
    remove_stale(out, old, new)
    for rel in sorted(new - {last} if last else new):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / rel, out / rel)
    os.replace(staging / MARKER, out / MARKER)
    if last is not None:
        os.replace(staging / last, out / last)
    shutil.rmtree(staging, ignore_errors=True)
    return out


def staging_dir(out: Path) -> Path:
    """A fresh hidden sibling folder to write into before `move_into` (same filesystem)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def is_staging(path: Path) -> bool:
    """A writer's temporary folder (an interrupted one is left behind; readers skip it)."""
    return path.name.startswith(".") and ".tmp-" in path.name


def clean_staging(out: Path) -> None:
    """Remove staging folders an interrupted writer of `out` left (call while holding its claim:
    nobody else is writing it)."""
    if not out.parent.is_dir():
        return
    for p in out.parent.glob(f".{glob.escape(out.name)}.tmp-*"):
        if p.is_dir() and re.fullmatch(rf"\.{re.escape(out.name)}\.tmp-[0-9a-f]{{8}}", p.name):
            shutil.rmtree(p, ignore_errors=True)

