"""Choose the default ICL tokenization by measurement, never on an eval set (issue 12, item 2).

For each embedded model, task, seed and tokenization ("piecewise", "natural"; iclgd.prompts):
ICL accuracy on a held-out slice of the task's *train* split (the demonstrations excluded), with
the same k demonstrations and the same queries for both tokenizations, so the comparison is
paired per example. Where a model's two tokenizations give identical token ids (checked here on
every prompt), its natural run is not repeated: the records would be the same bit for bit.

Decision rule, fixed before measuring: natural tokenization is what a model reads in running
text, so it is the default unless its held-out ICL accuracy is lower than piecewise with the
pooled 95% interval of the difference excluding 0.

    python bench/tokenization.py --data-dir ../shared/data --n 150 --out bench/tokenization.json
"""

import argparse
import dataclasses
import json
import time

import numpy as np

from iclgd import stats
from iclgd.experiment import RunConfig, prepare, run
from iclgd.models import load_model
from iclgd.plan import resolve_cell
from iclgd.tasks import get_task, task_names


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--tasks", default=",".join(task_names()))
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--n", type=int, default=150)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default="tokenization.json")
    args = ap.parse_args()
    rows = _load(args.out)
    done = {(r["model"], r["task"], r["seed"], r["tokenization"]) for r in rows}
    for model in args.models.split(","):
        loaded = load_model(model, progress=False)
        for name in args.tasks.split(","):
            # held-out: the train split is the eval pool; select_examples drops the demonstrations
            task = dataclasses.replace(get_task(name), eval_split=get_task(name).demo_split)
            for seed in map(int, args.seeds.split(",")):
                cfgs = {t: RunConfig(model=model, task=task, seed=seed, k=args.k, settings=("zsl", "icl"),
                                     eval_cap=args.n, icl_tokenization=t, data_dir=args.data_dir, progress=False)
                        for t in ("piecewise", "natural")}
                same = (prepare(resolve_cell(cfgs["piecewise"]), loaded).prompts.icl_prefix()
                        == prepare(resolve_cell(cfgs["natural"]), loaded).prompts.icl_prefix())
                for tok, cfg in cfgs.items():
                    if (model, name, seed, tok) in done:
                        continue
                    if tok == "natural" and same:
                        base = next(r for r in rows if (r["model"], r["task"], r["seed"], r["tokenization"])
                                    == (model, name, seed, "piecewise"))
                        row = {**base, "tokenization": "natural", "identical_tokens": True, "wall_s": 0.0}
                    else:
                        t0 = time.perf_counter()
                        cell = run(cfg, loaded=loaded)
                        rec = cell.records
                        row = {"model": model, "task": name, "seed": seed, "tokenization": tok, "n": args.n,
                               "k": args.k, "identical_tokens": same,
                               "prefix_tokens": len(prepare(resolve_cell(cfg), loaded).prompts.icl_prefix()),
                               "zsl_correct": (rec["zsl"].pred == rec["zsl"].gold).int().tolist(),
                               "icl_correct": (rec["icl"].pred == rec["icl"].gold).int().tolist(),
                               "wall_s": time.perf_counter() - t0}
                    rows.append(row)
                    _save(args.out, rows)
                    print(f"{model} {name} s{seed} {tok}: ICL {np.mean(row['icl_correct']):.3f} "
                          f"ZSL {np.mean(row['zsl_correct']):.3f} (identical tokens: {same})", flush=True)
    print(summary(rows))


def summary(rows: list[dict]) -> str:
    """Per model: the paired difference natural − piecewise in held-out ICL accuracy, per task
    (mean over seeds) and pooled over every (task, seed) cell with a 95% t interval."""
    out = []
    by = {(r["model"], r["task"], r["seed"], r["tokenization"]): r for r in rows}
    for model in dict.fromkeys(r["model"] for r in rows):
        diffs, lines = [], []
        for task in dict.fromkeys(r["task"] for r in rows if r["model"] == model):
            cell = []
            for seed in sorted({r["seed"] for r in rows if r["model"] == model and r["task"] == task}):
                a, b = by.get((model, task, seed, "natural")), by.get((model, task, seed, "piecewise"))
                if a and b:
                    d = np.mean(a["icl_correct"]) - np.mean(b["icl_correct"])
                    cell.append(d)
                    diffs.append(d)
            if cell:
                acc = {t: np.mean([np.mean(by[(model, task, s, t)]["icl_correct"]) for s in
                                   {r["seed"] for r in rows if r["model"] == model and r["task"] == task}])
                       for t in ("piecewise", "natural")}
                lines.append(f"  {task:7s} piecewise {acc['piecewise']:.3f}  natural {acc['natural']:.3f}  "
                             f"diff {np.mean(cell):+.3f} over {len(cell)} seeds")
        s = stats.seed_summary(diffs)
        out.append(f"{model}: natural − piecewise held-out ICL accuracy {s.mean:+.4f} "
                   f"[95% t interval {s.low:+.4f}, {s.high:+.4f}] over {s.n} cells")
        out += lines
    return "\n".join(out)


def _load(path: str) -> list[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return []


def _save(path: str, rows: list[dict]) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(rows, f)
    import os

    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
