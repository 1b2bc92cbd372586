"""Choose the default demonstration separator by measurement, never on an eval set.

For each embedded model, separator ("\\n", "\\n\\n", EOS) and seed, ICL and ZSL accuracy on a
held-out slice of SST-2's *train* split (demonstrations excluded). Usage:
    python bench/separators.py --models smollm2-135m,gemma3-270m --n 100 --out bench/separators.json
"""

import argparse
import dataclasses
import json

from iclgd.experiment import RunConfig, run
from iclgd.models import load_model
from iclgd.tasks import get_task


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--seeds", default="2,3,4")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default="separators.json")
    args = ap.parse_args()
    # Held-out: the train split as eval pool; select_examples drops the demonstrations from it.
    task = dataclasses.replace(get_task(args.task), eval_split=get_task(args.task).demo_split)
    rows = []
    for model in args.models.split(","):
        loaded = load_model(model)
        for seed in map(int, args.seeds.split(",")):
            for sep in ("\n", "\n\n", "eos"):
                cfg = RunConfig(model=model, task=task, seed=seed, k=args.k, settings=("zsl", "icl"),
                                eval_cap=args.n, separator=sep, data_dir=args.data_dir, progress=False)
                cell = run(cfg, loaded=loaded)
                row = {"model": model, "seed": seed, "separator": sep, "n": args.n,
                       "zsl": cell.accuracy("zsl"), "icl": cell.accuracy("icl")}
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = {}
    for r in rows:
        summary.setdefault((r["model"], r["separator"]), []).append(r["icl"] - r["zsl"])
    print("\nmean ICL - ZSL accuracy over seeds (held-out train slice):")
    for (model, sep), gains in summary.items():
        print(f"  {model:14s} {sep!r:8s} {sum(gains) / len(gains):+.3f}  {[f'{g:+.3f}' for g in gains]}")
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
