"""The `iclgd` command: a thin shell over the Python API (iclgd.plan, experiment, sweep, report, bench).

Every command resolves its flags into a plan (iclgd.plan) before anything loads, so a bad command
fails in seconds with exit code 2 and one message naming the problem and the fix; `--dry-run`
prints that plan and the work it asks for. Failures while computing end with one line and exit
code 1 (`--debug` shows the traceback); Ctrl-C ends with one line and exit code 130, finished
cells kept and resumable.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
import warnings
from pathlib import Path

from iclgd.errors import IclgdError

EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse with did-you-mean for misspelled options and exit code 2 with one message."""

    def error(self, message: str):
        if "unrecognized arguments" in message:
            words = message.split(":", 1)[1].split()
            known = _options(self)
            hints = []
            for w in words:
                close = difflib.get_close_matches(w.split("=")[0], known, n=1, cutoff=0.6)
                if close:
                    hints.append(f"{w!r}: did you mean {close[0]!r}?")
            if hints:
                message += " (" + "; ".join(hints) + ")"
        self.exit(2, f"iclgd: error: {message}\n  ({self.prog} --help lists the options)\n")


def _options(parser: argparse.ArgumentParser) -> list[str]:
    """Every option string of `parser` and of its subcommands (unknown arguments surface at the top)."""
    out = []
    for action in parser._actions:
        out += action.option_strings
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out += _options(sub)
    return sorted(set(out) - {"-h", "--help"})


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="alias, local folder, .gguf file or Hub id")
    p.add_argument("--revision", default=None, help="Hub model revision (branch, tag or commit) to pin")
    p.add_argument("--protocol", default="default", help="default or dai2023")
    p.add_argument("--eval-cap", type=int, default=None, help="evaluate at most N examples")
    p.add_argument("--data-dir", default=None, help="local data folder (else $ICLGD_DATA_DIR, ../shared/data)")
    p.add_argument("--data-source", default="auto", choices=["auto", "hub", "local"])
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda, cuda:N, or auto (device_map=\"auto\": a model too large for one GPU spreads over all)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--plugin", action="append", default=[],
                   help="a module name or .py file that registers extra processes (repeatable)")
    p.add_argument("--lr", type=float, default=None, help="one learning rate for every process")
    p.add_argument("--lr-source", default=None, choices=["search", "reference"],
                   help="per-process lr: held-out search, or the task's reference lr (default: the protocol's)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved plan and its work; load nothing")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an --out folder iclgd did not make (its files are never replaced or removed)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--no-ranking", action="store_true",
                   help="do not record the attention ranking (Kendall τ, top-k recall; SPEC §4): nothing is hooked")


SETTINGS_HELP = ("comma list: zsl, icl, gd, lcgd, lingd, NAME[lr=..,params=qkvo,batch=full,clip=MODE:VALUE,exit=attn] "
                 "(grammar: iclgd.plan)")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="iclgd", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)

    r = sub.add_parser("run", help="one cell: ZSL, ICL and processes on one task and seed", allow_abbrev=False)
    _common(r)
    r.add_argument("--task", default="sst2", help="built-in task name or a task YAML file")
    r.add_argument("--seed", type=int, default=2)
    r.add_argument("--k", type=int, default=32, help="number of demonstrations")
    r.add_argument("--settings", default="zsl,icl", help=SETTINGS_HELP)
    r.add_argument("--separator", default=None, help=r"demonstration separator: '\n', '\n\n' or eos")
    r.add_argument("--record-at", default=None, choices=["last", "label"])
    r.add_argument("--icl-tokenization", default=None, choices=["piecewise", "natural"],
                   help="tokenize the ICL prefix piece by piece or as running text (default: the protocol's)")
    r.add_argument("--label-switch", action="store_true", help="demonstrations carry deranged labels")
    r.add_argument("--control", default=None, choices=["untrained", "untrained-partial"],
                   help="run on a re-initialized copy of the model (SPEC §7 controls) instead of the trained one")
    r.add_argument("--order", type=int, default=0,
                   help="demonstration order: 0 as selected, o >= 1 the seeded permutation o (iclgd.data.demo_order)")
    r.add_argument("--params", default="kv", help="trained parameter group: kv, qkvo, attn, all")
    r.add_argument("--no-cache-prefix", action="store_true", help="re-encode demonstrations per query")
    r.add_argument("--out", default=None, help="run folder (default runs/MODEL_TASK_sSEED)")

    rep = sub.add_parser("reproduce", help="the paper's comparison on the six tasks, with a report",
                         allow_abbrev=False)
    _common(rep)
    rep.add_argument("--tasks", default="sst2,sst5,mr,subj,agnews,cb")
    rep.add_argument("--seeds", default=None, help="comma list; default: each task's protocol seeds")
    rep.add_argument("--k", default="32",
                     help="number of demonstrations, or a comma list for a k sweep (k = 0 cells run zsl and icl only)")
    rep.add_argument("--orders", type=int, default=1,
                     help="run ICL and every process on N demonstration orders: the original and N-1 seeded "
                          "permutations (a k with fewer orderings gets all of them)")
    rep.add_argument("--settings", default="zsl,icl,gd,lcgd,lingd,lcgd[clip=match_gd]", help=SETTINGS_HELP)
    rep.add_argument("--controls", action="store_true",
                     help="also run every cell on the untrained and untrained-partial controls (SPEC §7)")
    rep.add_argument("--control-seeds", default=None, help="comma list: run the controls for these seeds only; 'first': each task's first seed")
    rep.add_argument("--backend", default="local", choices=["local", "ray"])
    rep.add_argument("--address", default=None, help="Ray cluster address (with --backend ray)")
    rep.add_argument("--cpus-per-cell", type=int, default=1,
                     help="Ray: CPUs each cell's task declares, and its torch threads (CPU results are "
                          "bit-identical only between runs with the same thread count)")
    rep.add_argument("--out", default="reports/reproduce")

    rp = sub.add_parser("report", help="rebuild tables, figures and HTML from run folders", allow_abbrev=False)
    rp.add_argument("run_dirs", nargs="+")
    rp.add_argument("--out", default=None, help="default: FIRST_RUN_DIR/report")
    rp.add_argument("--overwrite", action="store_true", help="write into an --out folder iclgd did not make")

    b = sub.add_parser("bench", help="measure speed and memory against the machine's peak", allow_abbrev=False)
    _common(b)
    b.add_argument("--task", default="sst2")
    b.add_argument("--seed", type=int, default=2)
    b.add_argument("--k", type=int, default=32)
    b.add_argument("--settings", default="zsl,icl,gd,lcgd,lingd", help=SETTINGS_HELP)
    b.add_argument("--out", default="runs/bench", help="bench folder (bench.json, bench.md)")
    b.add_argument("--repeat", type=int, default=1,
                   help="run the cell N times; report each setting's fastest run (every run is kept)")

    sub.add_parser("tasks", help="list the built-in tasks")
    sub.add_parser("models", help="list the embedded model aliases")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    _quiet_library_warnings()
    try:
        return _dispatch(args)
    except BrokenPipeError:  # the output went to a pipe that closed (| head): nothing left to say
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("\niclgd: interrupted; finished cells and run folders are kept (run the same command again to "
              "resume)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except IclgdError as err:
        if args.debug:
            raise
        print(f"iclgd: error: {err}", file=sys.stderr)
        return err.exit_code
    except Exception as err:  # noqa: BLE001 - a failure while computing: one line, traceback on --debug
        if args.debug:
            raise
        print(f"iclgd: error: {_failure(err)} (run again with --debug for the traceback)", file=sys.stderr)
        return 1


def _failure(err: BaseException) -> str:
    import torch

    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return ("out of memory; lower --batch-size or --eval-cap, use a smaller model, or --dtype bfloat16 on a "
                "GPU")
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:500]


def _quiet_library_warnings() -> None:
    """Warnings a user of the command line cannot act on (they come from inside torch)."""
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=DeprecationWarning)


def _dispatch(args) -> int:
    from iclgd.plugins import load_plugins

    load_plugins(getattr(args, "plugin", []))
    if getattr(args, "quiet", False):  # transformers' own "Loading weights" bar too (read at its import)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if args.command == "run":
        return _run(args)
    if args.command == "reproduce":
        return _reproduce(args)
    if args.command == "report":
        return _report(args)
    if args.command == "bench":
        return _bench(args)
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


def _run_config(args, **kw):
    from iclgd.plan import RunConfig

    return RunConfig(model=args.model, revision=args.revision, protocol=args.protocol, eval_cap=args.eval_cap,
                     lr=args.lr, lr_source=args.lr_source, batch_size=args.batch_size, data_dir=args.data_dir,
                     data_source=args.data_source, device=args.device, dtype=args.dtype,
                     progress=not args.quiet, ranking=not args.no_ranking, **kw)


def _run(args) -> int:
    from iclgd.plan import Plan, resolve_cell

    cfg = _run_config(args, task=args.task, seed=args.seed, k=args.k, settings=args.settings,
                      separator=_unescape(args.separator), record_at=args.record_at,
                      icl_tokenization=args.icl_tokenization,
                      label_switch=args.label_switch, params=args.params, cache_prefix=not args.no_cache_prefix,
                      control=args.control, order=args.order)
    order = f"_o{args.order}" if args.order else ""
    out = args.out or f"runs/{Path(args.model).stem}_{Path(args.task).stem}_s{args.seed}{order}"
    cell = resolve_cell(cfg, out=out, overwrite=args.overwrite)
    if args.dry_run:
        print(Plan("run", (cell,), cell.out, args.overwrite, plugins=tuple(args.plugin)).describe())
        return 0
    from iclgd.experiment import run

    result = run(cell)
    _print_results(result.results)
    print(f"run folder: {result.path}")
    return 0


def _reproduce(args) -> int:
    from iclgd import outputs
    from iclgd.plan import Plan, PlanError, plan_cells

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    seeds = _ints("--seeds", args.seeds)
    ks = _ints("--k", args.k)
    if args.orders < 1:
        raise PlanError(f"--orders must be >= 1 (1: the original order only), got {args.orders}")
    if (args.control_seeds or "").strip() == "first":
        control_seeds = "first"
    else:
        try:
            control_seeds = _ints("--control-seeds", args.control_seeds)
        except PlanError as err:
            raise PlanError(f"{err}, or 'first' (each task's first seed)") from None
    if control_seeds is not None and not args.controls:
        raise PlanError("--control-seeds needs --controls")
    if args.cpus_per_cell < 1:
        raise PlanError(f"--cpus-per-cell must be >= 1, got {args.cpus_per_cell}")
    if args.address and args.backend != "ray":
        raise PlanError("--address is for --backend ray")
    out = Path(args.out)
    outputs.check_out(out, "sweep", args.overwrite)
    cells = plan_cells(tasks, seeds, model=args.model, protocol=args.protocol, k=ks, orders=args.orders,
                       settings=args.settings,
                       eval_cap=args.eval_cap, data_dir=args.data_dir, root=out / "runs", revision=args.revision,
                       lr=args.lr, lr_source=args.lr_source, batch_size=args.batch_size, data_source=args.data_source,
                       device=args.device, dtype=args.dtype, progress=not args.quiet, ranking=not args.no_ranking,
                       controls=("untrained", "untrained-partial") if args.controls else (), control_seeds=control_seeds)
    plan = Plan("reproduce", tuple(cells), out, args.overwrite, args.backend, tuple(args.plugin))
    if args.dry_run:
        print(plan.describe())
        return 0
    from iclgd.sweep import reproduce

    options = {"cpus_per_cell": args.cpus_per_cell}
    if args.address:
        options["address"] = args.address
    reproduce(plan, sweep_options=options)
    return 0


def _ints(flag: str, text: str | None) -> list[int] | None:
    from iclgd.plan import PlanError

    if text is None:
        return None
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise PlanError(f"{flag} must be a comma list of integers, got {text!r}") from None
    if not values:
        raise PlanError(f"{flag} is empty; give a comma list of integers")
    return values


def _report(args) -> int:
    from iclgd.report import build_report

    out = args.out or str(Path(args.run_dirs[0]) / "report")
    print(f"report: {build_report(args.run_dirs, out, overwrite=args.overwrite)}")
    return 0


def _bench(args) -> int:
    from iclgd.bench import DEFAULT_EVAL_CAP, bench
    from iclgd.plan import Plan, PlanError, resolve_cell

    if args.repeat < 1:
        raise PlanError(f"--repeat must be >= 1, got {args.repeat}")
    cap = args.eval_cap if args.eval_cap is not None else DEFAULT_EVAL_CAP
    cfg = _run_config(args, task=args.task, seed=args.seed, k=args.k, settings=args.settings)
    cfg = cfg.__class__(**{**cfg.__dict__, "eval_cap": cap})
    cell = resolve_cell(cfg)
    from iclgd import outputs

    outputs.check_out(Path(args.out), "bench", args.overwrite)
    if args.dry_run:
        print(Plan("bench", (cell,), Path(args.out), args.overwrite).describe())
        return 0
    if args.eval_cap is None:
        print(f"iclgd bench: eval cap {cap} (pass --eval-cap N to change it)")
    result = bench(cell, out=args.out, repeat=args.repeat, overwrite=args.overwrite)
    print(result["table"])
    print(f"bench: {Path(args.out) / 'bench.json'}")
    return 0


def _print_results(results: dict) -> None:
    from iclgd.flags import describe

    print(f"{'setting':28s} {'accuracy':>9s} {'n':>6s} {'wall_s':>8s} {'peak_MB':>8s}  flags")
    for s, r in results.items():
        print(f"{s:28s} {r['accuracy']:9.4f} {r['n']:6d} {r['wall_s']:8.1f} {r['peak_mem_mb']:8.0f}  "
              f"{describe(r.get('flags') or []) or '-'}")
    sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())
