"""Per-cell claims: two sweeps on one output folder share the work and never compute a cell twice.

Before a worker computes a cell it claims it: it creates `.<cell>.claim` beside the cell's folder
with O_CREAT|O_EXCL (atomic on a local or NFSv3+ filesystem), holding its owner id, host, pid and
start time, and touches the file every `HEARTBEAT_S` seconds while it works. Another worker that
finds the claim skips the cell and comes back to it later. A claim is stale, and is taken over,
when its heartbeat is older than `STALE_S`, or when its owner ran on this host and its process is
gone (a killed worker). Taking over renames the stale file away first, so of two workers racing
for it only one wins. Every event is appended to the sweep's `claims.log` (one JSON line each).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

HEARTBEAT_S = 10.0
STALE_S = 120.0
LOG = ".iclgd-claims.log"


def claim_path(cell_dir: Path) -> Path:
    return cell_dir.parent / f".{cell_dir.name}.claim"


class Claim:
    """A held claim on one cell; `release()` (or leaving the `with` block) gives it back."""

    def __init__(self, cell_dir: Path, owner: str, log: Path | None):
        self.cell_dir, self.owner, self.log = cell_dir, owner, log
        self.path = claim_path(cell_dir)
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self, event: str = "released") -> None:
        self._stop.set()
        if _read(self.path).get("owner") == self.owner:
            self.path.unlink(missing_ok=True)
        log_event(self.log, self.cell_dir, event, self.owner)

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def new_owner() -> str:
    """An id unique to this worker (several workers may share a process in tests)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def try_claim(cell_dir: Path, owner: str, log: Path | None = None) -> Claim | None:
    """Claim `cell_dir` for `owner`, taking over a stale claim; None if a live worker holds it."""
    path = claim_path(cell_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if attempt or not is_stale(path):
                return None
            try:  # only one of several racing workers renames the stale claim away
                os.rename(path, path.with_name(f"{path.name}.stale-{uuid.uuid4().hex[:8]}"))
            except FileNotFoundError:
                return None
            log_event(log, cell_dir, "took over a stale claim", owner)
            for old in path.parent.glob(f"{path.name}.stale-*"):
                old.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"owner": owner, "host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}, f)
        log_event(log, cell_dir, "claimed", owner)
        return Claim(cell_dir, owner, log)
    return None


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def is_stale(path: Path) -> bool:
    """A claim nobody keeps alive: no heartbeat for STALE_S, or its owner's process is gone."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return True
    if age > STALE_S:
        return True
    info = _read(path)
    if not info:  # being written right now (or garbage): judge by age alone
        return age > HEARTBEAT_S
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
        return not _alive(info["pid"])
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder(cell_dir: Path) -> str | None:
    """Who holds the claim on `cell_dir` (None if nobody)."""
    return _read(claim_path(cell_dir)).get("owner")


def log_event(log: Path | None, cell_dir: Path, event: str, owner: str) -> None:
    if log is None:
        return
    line = json.dumps({"time": round(time.time(), 3), "cell": str(cell_dir), "event": event, "owner": owner})
    with open(log, "a") as f:  # one short line per write: appends do not interleave
        f.write(line + "\n")


def read_log(log: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []
