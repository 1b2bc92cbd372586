"""Lockstep candidates vs one by one: training and held-out scoring, A/B alternated in one process.

    python bench/lockstep.py --steps 8 --reps 3 --data-dir ../shared/data --out bench/lockstep.json

For each process, C learning-rate candidates (multiples of the task's reference rate) train on the
first `--steps` demonstrations of the cell (SST-2, seed 2, k 32: the bench's cell), once in
lockstep (`Process.train_many`) and once one after another (`Process.train` per rate),
alternating A/B `--reps` times so that the host's drift hits both alike; then the trained
candidates are scored on the `--held-out` search prompts, batched (`Process.score_many`) and one
`Process.evaluate` per candidate, alternated the same way. Prints and writes ms per training step
and per scoring pass, each rep's ratio and the median ratio, and the largest difference between
the two results (they must agree to float rounding).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from iclgd.evaluate import EvalOptions
from iclgd.experiment import RunConfig, prepare
from iclgd.lrsearch import held_out_prompts
from iclgd.models import load_model
from iclgd.plan import resolve_cell
from iclgd.processes import PROCESSES, ProcessConfig, TrainContext


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--processes", default="gd,lcgd,lingd")
    ap.add_argument("--mults", default="0.333333,1,3", help="candidate multiples of the reference rate")
    ap.add_argument("--steps", type=int, default=8, help="demonstrations trained on (a prefix of the k)")
    ap.add_argument("--held-out", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    loaded = load_model(args.model)
    plan = resolve_cell(RunConfig(model=args.model, task=args.task, seed=2, k=32, settings=("zsl",), eval_cap=64,
                                  data_dir=args.data_dir, progress=False))
    prep = prepare(plan, loaded)
    seqs = prep.train_seqs[: args.steps]
    held, _ = held_out_prompts(plan, loaded.tokenizer, args.held_out, prep.prompts.bos[0])
    lrs = [plan.task.lr * float(m) for m in args.mults.split(",")]
    out = {"model": args.model, "task": args.task, "lrs": lrs, "steps": len(seqs), "held_out": args.held_out,
           "threads": torch.get_num_threads(), "processes": {}}
    for name in args.processes.split(","):
        proc = PROCESSES.get(name)()
        ctx = TrainContext(loaded.model, seqs, ProcessConfig(name=name, lr=lrs[0]), progress=False)
        rows = {"lockstep_s": [], "sequential_s": [], "batched_score_s": [], "loop_score_s": []}
        for _ in range(args.reps):
            t0 = time.perf_counter()
            many = proc.train_many(ctx, lrs)
            rows["lockstep_s"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            one = [proc.train(TrainContext(loaded.model, seqs, ctx.config.with_(lr=lr), progress=False)) for lr in lrs]
            rows["sequential_s"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            batched = proc.score_many(ctx, many, held.queries, held.label_ids, prefix=held.bos, pad_id=prep.pad_id)
            rows["batched_score_s"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            opts = EvalOptions(progress=False)
            loop = torch.stack([proc.evaluate(ctx, r, held.queries, [0] * len(held.queries), held.label_ids,
                                              prefix=held.bos, options=opts, pad_id=prep.pad_id).label_logprobs
                                for r in many])
            rows["loop_score_s"].append(time.perf_counter() - t0)
        diff = max((m.delta[n] - o.delta[n]).abs().max().item() / o.delta[n].abs().max().item()
                   for m, o in zip(many, one) for n in o.delta)
        train_ratio = [b / a for a, b in zip(rows["lockstep_s"], rows["sequential_s"])]
        score_ratio = [b / a for a, b in zip(rows["batched_score_s"], rows["loop_score_s"])]
        out["processes"][name] = {
            **rows, "lockstep_speedup": train_ratio, "lockstep_speedup_median": statistics.median(train_ratio),
            "score_speedup": score_ratio, "score_speedup_median": statistics.median(score_ratio),
            "lockstep_ms_per_step": [1e3 * t / len(seqs) for t in rows["lockstep_s"]],
            "sequential_ms_per_step": [1e3 * t / len(seqs) for t in rows["sequential_s"]],
            "max_rel_update_diff": diff, "max_abs_score_diff": (batched - loop).abs().max().item()}
        r = out["processes"][name]
        print(f"{name}: {len(lrs)} candidates x {len(seqs)} steps: lockstep "
              f"{', '.join(f'{x:.0f}' for x in r['lockstep_ms_per_step'])} ms/step vs one by one "
              f"{', '.join(f'{x:.0f}' for x in r['sequential_ms_per_step'])} -> speedup "
              f"{', '.join(f'{x:.2f}' for x in train_ratio)} (median {r['lockstep_speedup_median']:.2f}); "
              f"scoring {args.held_out} held-out: batched {', '.join(f'{x:.2f}' for x in rows['batched_score_s'])} s "
              f"vs loop {', '.join(f'{x:.2f}' for x in rows['loop_score_s'])} s (median ratio "
              f"{r['score_speedup_median']:.2f}); max rel update diff {diff:.1e}, max |Δ log p| "
              f"{r['max_abs_score_diff']:.1e}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
