"""The `iclgd` command: a thin shell over the Python API (iclgd.experiment, sweep, report, bench)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from iclgd.errors import IclgdError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="alias, local folder, .gguf file or Hub id")
    p.add_argument("--protocol", default="default", help="default or dai2023")
    p.add_argument("--eval-cap", type=int, default=None, help="evaluate at most N examples")
    p.add_argument("--data-dir", default=None, help="local data folder (else $ICLGD_DATA_DIR, ../shared/data)")
    p.add_argument("--data-source", default="auto", choices=["auto", "hub", "local"])
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda, cuda:N, or auto (device_map=\"auto\": a model too large for one GPU spreads over all)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--plugin", action="append", default=[],
                   help="import a module that registers extra processes (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="iclgd", description=__doc__)
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="one cell: ZSL, ICL and processes on one task and seed")
    _common(r)
    r.add_argument("--task", default="sst2", help="built-in task name or a task YAML file")
    r.add_argument("--seed", type=int, default=2)
    r.add_argument("--k", type=int, default=32, help="number of demonstrations")
    r.add_argument("--settings", default="zsl,icl",
                   help="comma list: zsl, icl, gd, lcgd, lingd, NAME[lr=..,clip=MODE:VALUE,exit=attn,params=qkvo]")
    r.add_argument("--separator", default=None, help=r"demonstration separator: '\n', '\n\n' or eos")
    r.add_argument("--record-at", default=None, choices=["last", "label"])
    r.add_argument("--label-switch", action="store_true", help="demonstrations carry deranged labels")
    r.add_argument("--lr", type=float, default=None, help="one learning rate for every process")
    r.add_argument("--lr-source", default=None, choices=["search", "reference"],
                   help="per-process lr: held-out search, or the task's reference lr (default: protocol's)")
    r.add_argument("--params", default="kv", help="trained parameter group: kv, qkvo, attn, all")
    r.add_argument("--no-cache-prefix", action="store_true", help="re-encode demonstrations per query")
    r.add_argument("--out", default=None, help="run folder (default runs/MODEL_TASK_sSEED)")

    rep = sub.add_parser("reproduce", help="the paper's comparison on the six tasks, with a report")
    _common(rep)
    rep.add_argument("--tasks", default="sst2,sst5,mr,subj,agnews,cb")
    rep.add_argument("--seeds", default=None, help="comma list; default: each task's protocol seeds")
    rep.add_argument("--k", type=int, default=32)
    rep.add_argument("--settings", default="zsl,icl,gd,lcgd,lingd,lcgd[clip=match_gd]")
    rep.add_argument("--lr-source", default=None, choices=["search", "reference"],
                     help="per-process lr: held-out search, or the task's reference lr (default: protocol's)")
    rep.add_argument("--backend", default="local", choices=["local", "ray"])
    rep.add_argument("--address", default=None, help="Ray cluster address (with --backend ray)")
    rep.add_argument("--cpus-per-cell", type=int, default=1,
                     help="Ray: CPUs each cell's task declares, and its torch threads (CPU results are "
                          "bit-identical only between runs with the same thread count)")
    rep.add_argument("--out", default="reports/reproduce")

    rp = sub.add_parser("report", help="rebuild tables, figures and HTML from run folders")
    rp.add_argument("run_dirs", nargs="+")
    rp.add_argument("--out", default=None, help="default: RUN_DIR/report")

    b = sub.add_parser("bench", help="measure speed and memory against the machine's peak")
    _common(b)
    b.add_argument("--task", default="sst2")
    b.add_argument("--seed", type=int, default=2)
    b.add_argument("--k", type=int, default=32)
    b.add_argument("--settings", default="zsl,icl,gd,lcgd,lingd")
    b.add_argument("--out", default="bench")
    b.add_argument("--repeat", type=int, default=1,
                   help="run the cell N times; report each setting's fastest run (every run is kept)")

    sub.add_parser("tasks", help="list the built-in tasks")
    sub.add_parser("models", help="list the embedded model aliases")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        for mod in getattr(args, "plugin", []):
            importlib.import_module(mod)
        return _dispatch(args)
    except IclgdError as err:
        print(f"iclgd: error: {err}", file=sys.stderr)
        return 2


def _dispatch(args) -> int:
    if args.command == "run":
        from iclgd.experiment import RunConfig, run

        cfg = RunConfig(model=args.model, task=args.task, seed=args.seed, k=args.k, settings=args.settings,
                        protocol=args.protocol, eval_cap=args.eval_cap, separator=_unescape(args.separator),
                        record_at=args.record_at, label_switch=args.label_switch, lr=args.lr,
                        lr_source=args.lr_source, params=args.params,
                        batch_size=args.batch_size, cache_prefix=not args.no_cache_prefix, data_dir=args.data_dir,
                        data_source=args.data_source, device=args.device, dtype=args.dtype,
                        progress=not args.quiet)
        cfg = RunConfig.from_dict({**cfg.__dict__})
        task_stem = Path(args.task).stem
        out = args.out or f"runs/{Path(args.model).stem}_{task_stem}_s{args.seed}"
        cell = run(cfg, out=out)
        _print_results(cell.results)
        print(f"run folder: {cell.path}")
        return 0
    if args.command == "reproduce":
        from iclgd.sweep import reproduce_from_args

        return reproduce_from_args(args)
    if args.command == "report":
        from iclgd.report import build_report

        out = args.out or str(Path(args.run_dirs[0]) / "report")
        print(f"report: {build_report(args.run_dirs, out)}")
        return 0
    if args.command == "bench":
        from iclgd.bench import bench_from_args

        return bench_from_args(args)
    if args.command == "tasks":
        from iclgd.tasks import get_task, task_names

        for name in task_names():
            t = get_task(name)
            print(f"{name:8s} {t.hf_path}/{t.hf_name or ''}  labels={list(t.label_words)}  lr={t.lr}")
        return 0
    if args.command == "models":
        from iclgd.models import MODEL_ALIASES

        print("\n".join(MODEL_ALIASES.names()))
        return 0
    raise AssertionError(args.command)


def _unescape(sep: str | None) -> str | None:
    return None if sep is None else sep.encode().decode("unicode_escape")


def _print_results(results: dict) -> None:
    print(f"{'setting':28s} {'accuracy':>9s} {'n':>6s} {'wall_s':>8s} {'peak_MB':>8s}")
    for s, r in results.items():
        print(f"{s:28s} {r['accuracy']:9.4f} {r['n']:6d} {r['wall_s']:8.1f} {r['peak_mem_mb']:8.0f}")
    sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())
