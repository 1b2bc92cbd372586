"""Sweeps: many cells (model, task, seed, protocol, settings), one atomic run folder each.

A cell is a `RunConfig`; its folder is `ROOT/<model>/<protocol>/<task>_s<seed>` (`cell_dir`).
`run_sweep` skips cells whose folder is finished (`DONE`) *and* was made with the same decisive
options, and runs the rest, locally (one model load for the whole sweep) or as one Ray task per
cell. Folders are written atomically (iclgd.runfolder), so a sweep that is killed and started
again resumes where it stopped: a finished cell is never redone or counted twice, an unfinished
one never looks finished. Ray is imported only on the Ray path, so it stays an optional extra.
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

from iclgd import runfolder
from iclgd.errors import IclgdError
from iclgd.experiment import RunConfig, run, split_settings
from iclgd.protocols import get_protocol
from iclgd.tasks import get_task

log = logging.getLogger(__name__)

# RunConfig fields that change a cell's numbers; the rest (progress, batch size, device, where the
# data lives) change only how it is computed, so a folder made with other values still counts.
DECISIVE = ("model", "task", "seed", "k", "settings", "protocol", "eval_cap", "separator", "record_at",
            "label_switch", "lr", "lr_source", "params", "dtype")

ModelFactory = str | Callable[[], object]  # "module:function" or a picklable zero-argument callable


class SweepError(IclgdError):
    """Some cells failed; the others finished and their folders are kept."""


def cell_dir(root: str | Path, cfg: RunConfig) -> Path:
    """The cell's folder: ROOT/<model stem>/<protocol>/<task stem>_s<seed>, stable across runs."""
    model = runfolder.safe_name(Path(cfg.model).stem if cfg.model.endswith(".gguf") else Path(cfg.model).name)
    task = runfolder.safe_name(Path(cfg.task).stem)
    return Path(root) / model / runfolder.safe_name(cfg.protocol) / f"{task}_s{cfg.seed}"


def plan_cells(
    tasks: Sequence[str],
    seeds: Sequence[int] | None = None,
    model: str = "smollm2-135m",
    protocol: str = "default",
    k: int = 32,
    settings: Sequence[str] | str = ("zsl", "icl"),
    eval_cap: int | None = None,
    data_dir: str | None = None,
    **run_options,
) -> list[RunConfig]:
    """One RunConfig per (task, seed), tasks in the order given.

    `seeds` None takes each task's reference seeds (`Task.seeds`); a protocol with
    `seeds == "first"` (dai2023) keeps only the first. Explicit seeds apply to every task.
    `run_options` are further RunConfig fields (device, dtype, batch_size, lr, ...).
    """
    proto = get_protocol(protocol)
    if isinstance(settings, str):
        settings = split_settings(settings)
    cells = []
    for name in tasks:
        task_seeds = list(seeds) if seeds is not None else list(get_task(name).seeds)
        if seeds is None and proto.seeds == "first":
            task_seeds = task_seeds[:1]
        if not task_seeds:
            raise IclgdError(f"task {name!r} has no reference seeds; pass seeds explicitly")
        cells += [RunConfig(model=model, task=name, seed=s, k=k, settings=tuple(settings), protocol=protocol,
                            eval_cap=eval_cap, data_dir=data_dir, **run_options) for s in task_seeds]
    return cells


def _decisive(cfg: RunConfig) -> dict:
    """The decisive options of a cell as its run folder records them (resolved defaults)."""
    proto, task = get_protocol(cfg.protocol), get_task(cfg.task)
    d = {f: getattr(cfg, f) for f in DECISIVE}
    d["settings"] = sorted(set(cfg.settings))
    d["eval_cap"] = cfg.eval_cap if cfg.eval_cap is not None else min(task.eval_cap, proto.eval_cap)
    d["separator"] = cfg.separator if cfg.separator is not None else proto.separator
    d["record_at"] = cfg.record_at or proto.record_at
    return d


def _mismatch(path: Path, cfg: RunConfig) -> list[str]:
    """Decisive options on which the finished folder at `path` differs from `cfg` (empty: reuse)."""
    try:
        stored = json.loads((path / "config.json").read_text())["run"]
    except (OSError, ValueError, KeyError):
        return ["config.json"]
    stored = {**stored, "settings": sorted(set(stored.get("settings", ())))}
    return [f for f, v in _decisive(cfg).items() if stored.get(f) != v]


def pending(cells: Sequence[RunConfig], root: str | Path) -> list[RunConfig]:
    """The cells that still need running: no finished folder, or one made with other options."""
    todo = []
    for cfg in cells:
        path = cell_dir(root, cfg)
        if not runfolder.is_done(path):
            todo.append(cfg)
        elif diff := _mismatch(path, cfg):
            # never mix: a folder made with other settings/k/eval_cap is replaced, not reused
            log.warning("%s was made with different %s; redoing it", path, ", ".join(diff))
            todo.append(cfg)
    return todo


def run_sweep(
    cells: Sequence[RunConfig],
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
) -> list[Path]:
    """Run every unfinished cell into `cell_dir(root, cell)`; return all cells' folders, in order.

    backend "local": cells run one after another in this process; the model is loaded once per
    (model, device, dtype) run of consecutive cells, or `loaded` (a LoadedModel) or
    `model_factory` is used for every cell. backend "ray": one Ray task per cell on the cluster at
    `address` (else a local instance); tasks declare `cpus_per_cell`, `gpus_per_cell` (default 1
    when the cell's device is CUDA) and `memory_gb`; each worker loads the model once
    (`model_factory` if given) and keeps it for its next cells; `runtime_env` and `plugins`
    (modules that register processes) reach the workers. With a remote cluster, `root` must be a
    filesystem all nodes share. A failing cell does not stop the others; SweepError at the end
    names the failures. `progress` prints one line per finished cell. Ray results equal local
    ones (same seeds and code; CPU torch is deterministic for a fixed thread count).
    """
    cells = list(cells)
    dirs = [cell_dir(root, c) for c in cells]
    dupes = sorted({str(d) for d in dirs if dirs.count(d) > 1})
    if dupes:
        raise IclgdError(f"several cells share a folder (same model, protocol, task, seed): {dupes}")
    todo = pending(cells, root)
    if progress:
        print(f"sweep: {len(cells)} cells, {len(cells) - len(todo)} already done, {len(todo)} to run "
              f"({backend}) -> {root}", flush=True)
    if backend == "local":
        failures = _run_local(todo, root, loaded, model_factory, progress)
    elif backend == "ray":
        failures = _run_ray(todo, root, address, progress, model_factory, cpus_per_cell, gpus_per_cell,
                            memory_gb, runtime_env, plugins)
    else:
        raise IclgdError(f"unknown backend {backend!r}; known: local, ray")
    if failures:
        names = ", ".join(f"{c.task} s{c.seed}: {type(e).__name__}: {e}" for c, e in failures)
        raise SweepError(f"{len(failures)} of {len(todo)} cells failed ({names}); run again to retry them") \
            from failures[0][1]
    return dirs


def _summary(i: int, n: int, cfg: RunConfig, accuracies: dict, seconds: float, path) -> str:
    acc = "  ".join(f"{s} {a:.3f}" for s, a in accuracies.items())
    return f"[{i}/{n}] {Path(cfg.task).stem} s{cfg.seed}  {acc}  ({seconds:.1f} s) -> {path}"


def _resolve_factory(factory: ModelFactory) -> Callable[[], object]:
    if callable(factory):
        return factory
    module, _, attr = factory.partition(":")
    if not attr:
        raise IclgdError(f"model_factory {factory!r} must read 'module:function'")
    return getattr(importlib.import_module(module), attr)


def _model_key(cfg: RunConfig, factory: ModelFactory | None) -> tuple:
    if factory is None:
        return ("load", cfg.model, cfg.device, cfg.dtype)
    name = factory if isinstance(factory, str) else (
        f"{getattr(factory, '__module__', '')}.{getattr(factory, '__qualname__', repr(factory))}")
    return ("factory", name, cfg.device, cfg.dtype)


def _load(cfg: RunConfig, factory: ModelFactory | None):
    if factory is not None:
        return _resolve_factory(factory)()
    from iclgd.models import load_model

    return load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)


def _run_local(todo, root, loaded, factory, progress) -> list[tuple[RunConfig, Exception]]:
    key, model, failures = None, loaded, []
    for i, cfg in enumerate(todo, 1):
        if loaded is None and _model_key(cfg, factory) != key:
            model = None  # drop the previous model before loading the next: one in memory at a time
            key, model = _model_key(cfg, factory), _load(cfg, factory)
        t0 = time.perf_counter()
        try:
            cell = run(cfg, loaded=model, out=cell_dir(root, cfg))
        except Exception as err:  # reported at the end; the folder stays unfinished
            log.error("cell %s s%d failed: %s", cfg.task, cfg.seed, err)
            failures.append((cfg, err))
            continue
        if progress:
            acc = {s: r["accuracy"] for s, r in cell.results.items()}
            print(_summary(i, len(todo), cfg, acc, time.perf_counter() - t0, cell.path), flush=True)
    return failures


# ---------------------------------------------------------------- Ray backend

_WORKER_MODELS: dict[tuple, object] = {}  # per Ray worker process: consecutive cells reuse the model


def _ray_cell(cfg: RunConfig, out: str, factory: ModelFactory | None, plugins: Sequence[str], threads: int):
    """Body of one Ray task: run `cfg` into `out`; returns (out, accuracy per setting, seconds)."""
    import torch

    torch.set_num_threads(threads)  # the CPUs the task declared; recorded in the run folder
    for mod in plugins:  # processes registered by plugins must exist in the worker too
        importlib.import_module(mod)
    key = _model_key(cfg, factory)
    if key not in _WORKER_MODELS:
        _WORKER_MODELS.clear()  # a worker holds one model; a different one replaces it
        _WORKER_MODELS[key] = _load(cfg, factory)
    t0 = time.perf_counter()
    cell = run(cfg, loaded=_WORKER_MODELS[key], out=out)
    return str(cell.path), {s: r["accuracy"] for s, r in cell.results.items()}, time.perf_counter() - t0


def _run_ray(todo, root, address, progress, factory, cpus, gpus, memory_gb, runtime_env, plugins):
    if not todo:
        return []
    try:
        import ray  # the optional extra: only this path needs it
    except ImportError:
        raise IclgdError("backend 'ray' needs Ray: pip install 'iclgd[ray]'") from None

    # a Ray instance the caller started (a notebook, a job script) is used as is and left running
    started = not ray.is_initialized()
    if started:
        if address is not None:
            ray.init(address=address, logging_level=logging.WARNING)
        else:  # a private local instance with enough CPUs that every cell can be scheduled
            ray.init(num_cpus=max(os.cpu_count() or 1, cpus), include_dashboard=False,
                     logging_level=logging.WARNING)
    try:
        remote = ray.remote(_ray_cell)
        refs = {}
        for cfg in todo:
            need_gpu = gpus if gpus is not None else (1 if cfg.device.startswith("cuda") else 0)
            opts = {"num_cpus": cpus, "num_gpus": need_gpu}
            if memory_gb:
                opts["memory"] = int(memory_gb * 2**30)
            if runtime_env:
                opts["runtime_env"] = runtime_env
            # no progress bars from workers: they would interleave in the driver's log
            cell = dataclasses.replace(cfg, progress=False)
            refs[remote.options(**opts).remote(cell, str(cell_dir(root, cfg)), factory, tuple(plugins),
                                                    max(1, int(cpus)))] = cfg
        failures, done = [], 0
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            cfg = refs.pop(ready[0])
            try:
                path, acc, seconds = ray.get(ready[0])
            except Exception as err:  # a task error; the other cells go on
                log.error("cell %s s%d failed: %s", cfg.task, cfg.seed, err)
                failures.append((cfg, err))
                continue
            done += 1
            if progress:
                print(_summary(done, len(todo), cfg, acc, seconds, path), flush=True)
        return failures
    finally:
        if started:
            ray.shutdown()


# ---------------------------------------------------------------- reproduce


def reproduce(
    tasks: Sequence[str] = ("sst2", "sst5", "mr", "subj", "agnews", "cb"),
    seeds: Sequence[int] | None = None,
    model: str = "smollm2-135m",
    protocol: str = "default",
    k: int = 32,
    settings: Sequence[str] | str = ("zsl", "icl", "gd", "lcgd", "lingd", "lcgd[clip=match_gd]"),
    eval_cap: int | None = None,
    data_dir: str | None = None,
    out: str | Path = "reports/reproduce",
    backend: str = "local",
    address: str | None = None,
    progress: bool = True,
    bars: bool = True,
    sweep_options: dict | None = None,
    **run_options,
) -> Path:
    """Plan the cells, sweep them into OUT/runs, build the report in OUT/report; returns report.html.

    `progress` prints one summary line per cell, `bars` the per-setting progress bars;
    `run_options` are further RunConfig fields (device, dtype, batch_size, data_source, ...);
    `sweep_options` go to `run_sweep` (loaded, model_factory, cpus_per_cell, ...).
    """
    from iclgd.report import build_report  # matplotlib is slow to import; only when reporting

    out = Path(out)
    cells = plan_cells(tasks, seeds, model, protocol, k, settings, eval_cap, data_dir, progress=bars,
                       **run_options)
    try:
        run_sweep(cells, out / "runs", backend, address, progress, **(sweep_options or {}))
    except SweepError:
        # the finished cells still make a (partial) report; the error then says what is missing
        if any(runfolder.is_done(cell_dir(out / "runs", c)) for c in cells):
            print(f"partial report: {build_report(out / 'runs', out / 'report')}")
        raise
    html = build_report(out / "runs", out / "report")
    print(f"report: {html}")
    return html


def reproduce_from_args(args) -> int:
    """`iclgd reproduce`: adapt cli.py's argparse namespace to `reproduce`; returns the exit code."""
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()] if args.seeds else None
    except ValueError:
        raise IclgdError(f"--seeds must be a comma list of integers, got {args.seeds!r}") from None
    reproduce(tasks, seeds, model=args.model, protocol=args.protocol, k=args.k,
              settings=split_settings(args.settings), eval_cap=args.eval_cap, data_dir=args.data_dir,
              out=args.out, backend=args.backend, address=args.address,
              sweep_options={"plugins": tuple(getattr(args, "plugin", ())),
                             "cpus_per_cell": getattr(args, "cpus_per_cell", 1)},
              bars=not args.quiet,  # --quiet drops the bars; the one line per cell stays
              data_source=args.data_source, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
              lr_source=args.lr_source)
    return 0
