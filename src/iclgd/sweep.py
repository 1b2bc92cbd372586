"""Sweeps: many cells (model, task, seed, protocol, settings), one atomic run folder each.

A cell is a `CellPlan` (iclgd.plan); its folder is `ROOT/<model>/<protocol>/<task>_s<seed>`
(`cell_dir`), with `_k<k>` when the sweep has several k and `_o<o>` for a permuted order o >= 1.

k sweeps and orders (`plan_cells(k=[0, 4, 16], orders=N)`, iclgd.plan): one cell per (task,
seed, k, order); k = 0 cells run zsl and icl only; every order is a whole cell.

`run_sweep` skips cells whose folder is finished (`DONE`) *and* was made with the same
decisive choices, and runs the rest, locally (one model load for the whole sweep) or as one
Ray task per cell. Before computing a cell a worker claims it (iclgd.locks), so two sweeps on
one folder share the work and never compute a cell twice; a claim left by a dead worker is taken
over. Folders are written atomically (iclgd.runfolder), so a sweep that is killed and started
again resumes where it stopped. Ray is imported only on the Ray path, an optional extra.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from iclgd import locks, outputs, runfolder
from iclgd.errors import IclgdError, PromptError
from iclgd.experiment import run
from iclgd.plan import CellPlan, Plan, PlanError, cell_dir, plan_cells

__all__ = ["SweepError", "cell_dir", "is_finished", "mismatch", "pending", "plan_cells", "reproduce", "run_sweep"]

log = logging.getLogger(__name__)

ModelFactory = str | Callable[[], object]  # "module:function" or a picklable zero-argument callable
WAIT_S = 2.0  # how often a worker looks again at cells other workers hold


class SweepError(IclgdError):
    """Some cells failed; the others finished and their folders are kept."""

    exit_code = 1


def _decisive_json(cell: CellPlan) -> dict:
    return json.loads(json.dumps(cell.decisive(), default=str))


def mismatch(path: Path, cell: CellPlan) -> list[str]:
    """Decisive choices on which the finished folder at `path` differs from `cell` (empty: reuse)."""
    try:
        stored = runfolder.load_run(path).decisive
    except IclgdError:
        return ["config.json"]
    if stored is None:
        return ["run-folder schema (made by an older iclgd)"]
    want = _decisive_json(cell)
    # a folder with the attention ranking serves a request without it (the ranking adds records and
    # changes no other number); one without it (or made before it existed) does not serve one with it
    if stored.get("ranking") and not want.get("ranking"):
        want["ranking"] = True
    return [k for k in sorted(set(want) | set(stored)) if stored.get(k, False if k == "ranking" else None) != want.get(k)]


def is_finished(cell: CellPlan) -> bool:
    return runfolder.is_done(cell.out) and not mismatch(cell.out, cell)


def pending(cells: Sequence[CellPlan], root: str | Path | None = None) -> list[CellPlan]:
    """The cells that still need running: no finished folder, or one made with other choices."""
    todo = []
    for cell in _with_dirs(cells, root):
        if not runfolder.is_done(cell.out):
            todo.append(cell)
        elif diff := mismatch(cell.out, cell):
            # never mix: a folder made with other settings/k/eval cap is replaced, not reused
            log.warning("%s was made with different %s; redoing it", cell.out, ", ".join(diff))
            todo.append(cell)
    return todo


def _with_dirs(cells: Sequence[CellPlan], root) -> list[CellPlan]:
    if root is None:
        if any(c.out is None for c in cells):
            raise PlanError("cells without a folder: give the sweep a root")
        return list(cells)
    with_k = len({c.k for c in cells}) > 1
    return [c if c.out is not None else c.with_(out=cell_dir(root, c, with_k=with_k)) for c in cells]


def run_sweep(
    cells: Sequence[CellPlan],
    root: str | Path,
    backend: str = "local",
    address: str | None = None,
    progress: bool = True,
    *,
    loaded=None,
    model_factory: ModelFactory | None = None,
    cpus_per_cell: int = 1,
    gpus_per_cell: float | None = None,
    memory_gb: float | None = None,
    runtime_env: dict | None = None,
    plugins: Sequence[str] = (),
    owner: str | None = None,
) -> list[Path]:
    """Run every unfinished cell into its folder; return all cells' folders, in order.

    backend "local": cells run one after another in this process; the model is loaded once per
    (model, device, dtype) run of consecutive cells, or `loaded` (a LoadedModel) or
    `model_factory` is used for every cell. backend "ray": one Ray task per cell on the cluster at
    `address` (else a local instance); tasks declare `cpus_per_cell`, `gpus_per_cell` (default 1
    when the cell's device is CUDA) and `memory_gb`; each worker loads the model once
    (`model_factory` if given) and keeps it for its next cells; `runtime_env` and `plugins`
    (modules or .py files that register processes) reach the workers. With a remote cluster,
    `root` must be a filesystem all nodes share. Every cell is claimed before it is computed
    (`owner` names this worker in the claims; default a fresh id), so sweeps sharing `root`
    split the work. A failing cell does not stop the others; SweepError at the end names them.
    `progress` prints one line per finished cell. Ray results equal local ones (same seeds and
    code; CPU torch is deterministic for a fixed thread count).
    """
    root = Path(root)
    cells = _with_dirs(cells, root)
    dirs = [c.out for c in cells]
    dupes = sorted({str(d) for d in dirs if dirs.count(d) > 1})
    if dupes:
        raise PlanError(f"several cells share a folder (same model, protocol, task, seed, k, order): {dupes}")
    root.mkdir(parents=True, exist_ok=True)
    todo = pending(cells)
    if progress:
        print(f"sweep: {len(cells)} cells, {len(cells) - len(todo)} already done, {len(todo)} to run "
              f"({backend}) -> {root}", flush=True)
    owner = owner or locks.new_owner()
    if backend == "local":
        failures = _run_local(todo, root, loaded, model_factory, progress, owner)
    elif backend == "ray":
        failures = _run_ray(todo, root, address, progress, model_factory, cpus_per_cell, gpus_per_cell,
                            memory_gb, runtime_env, plugins, owner)
    else:
        raise PlanError(f"unknown backend {backend!r}; known: local, ray")
    if failures:
        names = ", ".join(f"{cell_label(c)}: {type(e).__name__}: {e}" for c, e in failures)
        raise SweepError(f"{len(failures)} of {len(todo)} cells failed ({names}); run again to retry them") \
            from failures[0][1]
    return dirs


def claimed_cells(todo: list[CellPlan], root: Path, owner: str, progress: bool):
    """Yield (cell, claim) for each cell of `todo` this worker gets to compute, in order; cells
    another live worker holds are revisited until they are finished or free. The caller releases
    each claim."""
    log_path = root / locks.LOG
    waiting_said = False
    left = list(todo)
    while left:
        progressed = False
        for cell in list(left):
            if runfolder.is_done(cell.out) and is_finished(cell):
                left.remove(cell)  # another worker finished it
                progressed = True
                continue
            claim = locks.try_claim(cell.out, owner, log_path)
            if claim is None:
                continue
            if runfolder.is_done(cell.out) and is_finished(cell):  # finished while we looked
                claim.release("released: already finished")
                left.remove(cell)
                continue
            left.remove(cell)
            progressed = True
            outputs.clean_staging(cell.out)  # an interrupted writer's leftovers; the claim is ours
            yield cell, claim
        if left and not progressed:
            if progress and not waiting_said:
                held = ", ".join(f"{cell_label(c)} ({locks.holder(c.out)})" for c in left)
                print(f"sweep: waiting for {len(left)} cell(s) other workers hold: {held}", flush=True)
                waiting_said = True
            time.sleep(WAIT_S)


def cell_label(cell: CellPlan) -> str:
    """A cell in a progress or error line: task, seed, k, order (if permuted), control."""
    order = f" o{cell.order}" if cell.order else ""
    control = f" ({cell.control})" if cell.control else ""
    return f"{cell.task.name} s{cell.seed} k{cell.k}{order}{control}"


def _summary(i: int, n: int, cell: CellPlan, accuracies: dict, seconds: float, path) -> str:
    acc = "  ".join(f"{s} {a:.3f}" for s, a in accuracies.items())
    return f"[{i}/{n}] {cell_label(cell)}  {acc}  ({seconds:.1f} s) -> {path}"


def _resolve_factory(factory: ModelFactory) -> Callable[[], object]:
    if callable(factory):
        return factory
    module, _, attr = factory.partition(":")
    if not attr:
        raise PlanError(f"model_factory {factory!r} must read 'module:function'")
    return getattr(importlib.import_module(module), attr)


def _model_key(cell: CellPlan, factory: ModelFactory | None) -> tuple:
    dev = (cell.compute.device, cell.compute.dtype)
    if factory is None:
        return ("load", cell.model.name, cell.model.revision, *dev)
    name = factory if isinstance(factory, str) else (
        f"{getattr(factory, '__module__', '')}.{getattr(factory, '__qualname__', repr(factory))}")
    return ("factory", name, *dev)


def _load(cell: CellPlan, factory: ModelFactory | None):
    if factory is not None:
        return _resolve_factory(factory)()
    from iclgd.models import load_model

    return load_model(cell.model.name, device=cell.compute.device, dtype=cell.compute.dtype,
                      revision=cell.model.revision, progress=cell.compute.progress)


def _run_local(todo, root, loaded, factory, progress, owner) -> list[tuple[CellPlan, Exception]]:
    key, model, failures, done = None, loaded, [], 0
    if loaded is not None:
        check_prompts(todo, loaded)
    for cell, claim in claimed_cells(todo, root, owner, progress):
        t0 = time.perf_counter()
        try:
            if loaded is None and _model_key(cell, factory) != key:
                model = None  # drop the previous model before loading the next: one in memory at a time
                key, model = _model_key(cell, factory), _load(cell, factory)
                check_prompts([c for c in todo if _model_key(c, factory) == key], model)
            result = run(cell, loaded=model)
        except (KeyboardInterrupt, SystemExit, PromptError):
            claim.release("interrupted")
            raise
        except Exception as err:  # reported at the end; the folder stays unfinished
            claim.release("failed")
            log.error("cell %s failed: %s", cell_label(cell), err)
            failures.append((cell, err))
            continue
        claim.release("computed")
        done += 1
        if progress:
            acc = {s: r["accuracy"] for s, r in result.results.items()}
            print(_summary(done, len(todo), cell, acc, time.perf_counter() - t0, result.path), flush=True)
    return failures


def check_prompts(cells: Sequence[CellPlan], loaded) -> None:
    """Check, before any cell computes, that every cell's prompts fit the loaded model (a prompt
    check needs the tokenizer, so it cannot run at plan time): one PromptError naming them all."""
    from iclgd.experiment import prepare

    bad = []
    for cell in cells:
        try:
            prepare(cell, loaded)
        except PromptError as err:
            bad.append(f"{cell_label(cell)}: {err}")
    if bad:
        raise PromptError(f"{len(bad)} of {len(cells)} cells cannot run on this model, so none was started: "
                          + " | ".join(bad))


# ---------------------------------------------------------------- Ray backend

_WORKER_MODELS: dict[tuple, object] = {}  # per Ray worker process: consecutive cells reuse the model


def _ray_cell(cell: CellPlan, factory: ModelFactory | None, plugins: Sequence[str], threads: int):
    """Body of one Ray task: run `cell` into its folder; returns (out, accuracy per setting, seconds)."""
    import torch

    from iclgd.plugins import load_plugins

    torch.set_num_threads(threads)  # the CPUs the task declared; recorded in the run folder
    load_plugins(plugins)  # processes registered by plugins must exist in the worker too
    key = _model_key(cell, factory)
    if key not in _WORKER_MODELS:
        _WORKER_MODELS.clear()  # a worker holds one model; a different one replaces it
        _WORKER_MODELS[key] = _load(cell, factory)
    t0 = time.perf_counter()
    result = run(cell, loaded=_WORKER_MODELS[key])
    return str(result.path), {s: r["accuracy"] for s, r in result.results.items()}, time.perf_counter() - t0


def _run_ray(todo, root, address, progress, factory, cpus, gpus, memory_gb, runtime_env, plugins, owner):
    if not todo:
        return []
    try:
        import ray  # the optional extra: only this path needs it
    except ImportError:
        raise PlanError("backend 'ray' needs Ray: pip install 'iclgd[ray]'") from None

    # a Ray instance the caller started (a notebook, a job script) is used as is and left running
    started = not ray.is_initialized()
    if started:
        if address is not None:
            ray.init(address=address, logging_level=logging.WARNING)
        else:  # a private local instance with enough CPUs that every cell can be scheduled
            ray.init(num_cpus=max(os.cpu_count() or 1, cpus), include_dashboard=False,
                     logging_level=logging.WARNING)
    refs: dict = {}
    try:
        remote = ray.remote(_ray_cell)
        for cell, claim in claimed_cells(todo, root, owner, progress):
            need_gpu = gpus if gpus is not None else (1 if cell.compute.device.startswith("cuda") else 0)
            opts = {"num_cpus": cpus, "num_gpus": need_gpu}
            if memory_gb:
                opts["memory"] = int(memory_gb * 2**30)
            if runtime_env:
                opts["runtime_env"] = runtime_env
            # no progress bars from workers: they would interleave in the driver's log
            quiet = cell.with_(compute=dataclasses.replace(cell.compute, progress=False))
            ref = remote.options(**opts).remote(quiet, factory, tuple(plugins), max(1, int(cpus)))
            refs[ref] = (cell, claim)
        failures, done = [], 0
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            cell, claim = refs.pop(ready[0])
            try:
                path, acc, seconds = ray.get(ready[0])
            except Exception as err:  # a task error; the other cells go on
                claim.release("failed")
                log.error("cell %s failed: %s", cell_label(cell), err)
                failures.append((cell, err))
                continue
            claim.release("computed")
            done += 1
            if progress:
                print(_summary(done, len(todo), cell, acc, seconds, path), flush=True)
        return failures
    finally:
        for _, claim in refs.values():
            claim.release("interrupted")
        if started:
            ray.shutdown()


# ---------------------------------------------------------------- reproduce


def reproduce(plan: Plan, *, progress: bool = True, sweep_options: dict | None = None) -> Path:
    """Sweep the plan's cells into OUT/runs and build the report in OUT/report; returns report.html.

    `progress` prints one summary line per cell; `sweep_options` go to `run_sweep` (loaded,
    model_factory, cpus_per_cell, address, ...)."""
    from iclgd.report import build_report  # matplotlib is slow to import; only when reporting

    out = Path(plan.out)
    outputs.check_out(out, "sweep", plan.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    if outputs.read_marker(out) is None:
        outputs.write_marker(out, "sweep", [locks.LOG], {"command": plan.command})
    try:
        run_sweep(plan.cells, out / "runs", plan.backend, progress=progress, plugins=plan.plugins,
                  **(sweep_options or {}))
    except SweepError:
        # the finished cells still make a (partial) report; the error then says what is missing
        if any(runfolder.is_done(c.out) for c in plan.cells):
            print(f"partial report: {build_report(out / 'runs', out / 'report')}")
        raise
    html = build_report(out / "runs", out / "report")
    print(f"report: {html}")
    return html
