"""What recording the attention ranking costs: one cell with it and without it, wall time and memory.

    python bench/ranking_cost.py --eval-cap 872 --data-dir ../shared/data --out bench/ranking_cost.json

The cell: SST-2, seed 2, k 32, settings zsl,icl,gd,lcgd,lingd, every process at the task's
reference learning rate (--lr-source reference), the default protocol. It runs twice, ranking on
(the default) and off (--no-ranking), each in a fresh Python process (`--one on|off`) so that
each one's peak resident memory is its own; the order alternates with --reps. Prints and writes,
per variant: the cell's wall time (the sum of its settings' wall_s), each setting's wall and peak
memory (experiment.PeakMemory, sampled every 5 ms), the process's lifetime peak RSS
(ru_maxrss), and the ratios on/off. What grows with the eval set under ranking (iclgd.ranking_
record): ICL's recording-position queries [N, layer, head, d_head] held for the cell and a
process's q_test during its eval; the random baseline once per cell, the comparison once per
process, streamed per eval batch.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = "zsl,icl,gd,lcgd,lingd"


def one(args, ranking: bool, loaded=None) -> dict:
    """Run the cell once in this process (ranking on or off); its walls and memory."""
    from iclgd.experiment import run
    from iclgd.plan import RunConfig

    cfg = RunConfig(model=args.model, task="sst2", seed=2, k=args.k, settings=SETTINGS, eval_cap=args.eval_cap,
                    lr_source="reference", data_dir=args.data_dir, progress=False, ranking=ranking,
                    batch_size=args.batch_size)
    t0 = time.perf_counter()
    cell = run(cfg, loaded=loaded)
    total = time.perf_counter() - t0
    rows = {s: {"wall_s": r["wall_s"], "eval_s": r["eval_s"], "peak_mem_mb": r["peak_mem_mb"],
                "accuracy": r["accuracy"]} for s, r in cell.results.items()}
    return {"ranking": ranking, "cell_wall_s": sum(r["wall_s"] for r in rows.values()),
            "total_s": total, "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_mem_mb": max(r["peak_mem_mb"] for r in rows.values()), "settings": rows,
            "n_eval": len(cell.eval_ids)}


def compare(on: dict, off: dict) -> dict:
    """Ratios on/off of the cell's wall and peak memory, and per setting."""
    return {"wall_ratio": on["cell_wall_s"] / off["cell_wall_s"],
            "peak_mem_ratio": on["peak_mem_mb"] / off["peak_mem_mb"],
            "max_rss_ratio": on["max_rss_mb"] / off["max_rss_mb"],
            "wall_added_s": on["cell_wall_s"] - off["cell_wall_s"],
            "peak_mem_added_mb": on["peak_mem_mb"] - off["peak_mem_mb"],
            "settings": {s: {"wall_ratio": on["settings"][s]["wall_s"] / off["settings"][s]["wall_s"],
                             "peak_mem_added_mb": on["settings"][s]["peak_mem_mb"] - off["settings"][s]["peak_mem_mb"]}
                         for s in on["settings"]}}


def table(runs: list[dict]) -> str:
    lines = ["| variant | cell wall s | peak MB | max RSS MB | " + " | ".join(f"{s} s" for s in runs[0]["settings"]) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(runs[0]["settings"])]
    for r in runs:
        walls = " | ".join(f"{v['wall_s']:.1f}" for v in r["settings"].values())
        lines.append(f"| ranking {'on' if r['ranking'] else 'off'} | {r['cell_wall_s']:.1f} | {r['peak_mem_mb']:.0f} | "
                     f"{r['max_rss_mb']:.0f} | {walls} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--eval-cap", type=int, required=True, help="eval examples (872: all of SST-2's)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--reps", type=int, default=1, help="on/off pairs, alternating which runs first")
    ap.add_argument("--out", default="bench/ranking_cost.json")
    ap.add_argument("--one", choices=["on", "off"], help=argparse.SUPPRESS)  # a child: one run, JSON on stdout
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args, args.one == "on")))
        return 0
    runs = []
    for rep in range(args.reps):
        for variant in (("on", "off") if rep % 2 == 0 else ("off", "on")):
            cmd = [sys.executable, __file__, "--one", variant, "--eval-cap", str(args.eval_cap), "--model", args.model,
                   "--k", str(args.k), "--batch-size", str(args.batch_size)]
            if args.data_dir:
                cmd += ["--data-dir", args.data_dir]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
            print(f"ranking {variant}: cell {runs[-1]['cell_wall_s']:.1f} s, peak {runs[-1]['peak_mem_mb']:.0f} MB",
                  flush=True)
    best = {v: min((r for r in runs if r["ranking"] == (v == "on")), key=lambda r: r["cell_wall_s"]) for v in ("on", "off")}
    result = {"cell": {"model": args.model, "task": "sst2", "seed": 2, "k": args.k, "settings": SETTINGS,
                       "eval_cap": args.eval_cap, "lr_source": "reference"},
              "compare_best": compare(best["on"], best["off"]), "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table(runs))
    c = result["compare_best"]
    print(f"ranking on/off: wall x{c['wall_ratio']:.3f} (+{c['wall_added_s']:.1f} s), peak memory "
          f"x{c['peak_mem_ratio']:.3f} (+{c['peak_mem_added_mb']:.0f} MB); {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
