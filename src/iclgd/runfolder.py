"""Writing run folders (docs/DESIGN.md, "Run folder"): atomic, self-describing.

A cell is written into a temporary sibling folder and renamed into place only when complete,
with `DONE` written last inside it, so an interrupted run never leaves a folder that looks
finished, and a resumed sweep never counts a cell twice.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import uuid
from importlib import metadata
from pathlib import Path

DONE = "DONE"


def safe_name(setting: str) -> str:
    """Filesystem-safe form of a setting: every char outside [A-Za-z0-9._-] becomes "_"."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", setting)


def is_done(path: str | Path) -> bool:
    return (Path(path) / DONE).exists()


def provenance() -> dict:
    """Versions, git hash, host facts: what a reader needs to know how a result was made."""
    versions = {}
    for pkg in ("iclgd", "torch", "transformers", "datasets", "numpy", "gguf"):
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


def write(out: str | Path, cell) -> Path:
    """Write a CellResult (iclgd.experiment) to `out` atomically; returns the folder."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    (tmp / "records").mkdir(parents=True)
    try:
        _json(tmp / "config.json", cell.config)
        with open(tmp / "demos.jsonl", "w") as f:
            for d in cell.demos:
                f.write(json.dumps(d) + "\n")
        with open(tmp / "eval.jsonl", "w") as f:
            for i, rec_gold in zip(cell.eval_ids, next(iter(cell.records.values())).gold.tolist()):
                f.write(json.dumps({"id": i, "gold": rec_gold}) + "\n")
        _json(tmp / "results.json", cell.results)
        for setting, rec in cell.records.items():
            rec.save(tmp / "records" / f"{safe_name(setting)}.npz")
        (tmp / DONE).write_text("")
        if out.exists():  # an unfinished or older folder of the same cell: replace it whole
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
