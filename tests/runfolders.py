"""Run folders for report tests, written by the real writer (runfolder.write) from a real plan.

Records are random (a fixed generator per task, seed and control) unless a test passes the
arrays it needs; flags go into results.json as the experiment would put them.
"""

import numpy as np
import torch

from iclgd import runfolder
from iclgd.evaluate import Record
from iclgd.experiment import CellResult, RunConfig, cell_config
from iclgd.plan import resolve_cell

N, L, H, Q, D, C, STEPS = 6, 3, 2, 5, 8, 2, 4
BASE = ("zsl", "icl", "gd", "lcgd")


def run_dir(root, task, seed, control=None):
    return root / (f"{task}_s{seed}" if control is None else f"{task}_s{seed}_{control}")


def shared(task, seed, n=N):
    """What every setting and every control of one task and seed share: gold labels, q_len."""
    rng = np.random.default_rng(7 * seed + sum(map(ord, task)))
    return rng.integers(0, C, size=n), rng.integers(1, Q + 1, size=n)


def write_run(root, task, seed, settings=BASE, done=True, *, control=None, n=N, arrays=None, flags=None,
              eval_ids=None):
    """A run folder with random records (NaN-padded logits, grad norms) unless ``arrays`` gives a
    setting's arrays ({setting: {"pred": ..., "attn_out": ...}}); ``flags`` {setting: [codes]};
    ``control`` makes it an untrained-control run (RunConfig(control=...)) in its own folder."""
    rng = np.random.default_rng(1000 * seed + sum(map(ord, task)) + (0 if control is None else 17 * len(control)))
    plan = resolve_cell(RunConfig(model="tiny-gpt2", task=task, seed=seed, k=4, settings=settings, lr=0.1,
                                  control=control), out=run_dir(root, task, seed, control), check_data=False)
    gold, q_len = shared(task, seed, n)
    records, results = {}, {}
    for s in plan.settings:
        logits = rng.standard_normal((n, L, H, Q)).astype(np.float32)  # [batch, layer, head, q]
        given = (arrays or {}).get(s.label, {})
        a = {"label_logprobs": rng.standard_normal((n, C)).astype(np.float32), "pred": rng.integers(0, C, size=n),
             "attn_out": rng.standard_normal((n, L, D)).astype(np.float32), "attn_logits": logits, **given}
        a["attn_logits"] = np.array(a["attn_logits"], dtype=np.float32)
        for i, q in enumerate(q_len):
            a["attn_logits"][i, :, :, q:] = np.nan
        t = torch.from_numpy
        rec = Record(label_logprobs=t(np.asarray(a["label_logprobs"], dtype=np.float32)),
                     pred=t(np.asarray(a["pred"], dtype=np.int64)), gold=t(gold),
                     attn_out=t(np.asarray(a["attn_out"], dtype=np.float32)), attn_logits=t(a["attn_logits"]),
                     q_len=t(q_len))
        if s.process:
            rec.extras.update(grad_norms=t(rng.uniform(0.01, 10, (L, STEPS)).astype(np.float32)),
                              losses=t(rng.uniform(0, 3, STEPS).astype(np.float32)))
        records[s.label] = rec
        results[s.label] = {"accuracy": rec.accuracy, "n": n, "wall_s": 0.1, "peak_mem_mb": 1.0,
                            "process": s.name if s.process else None, "options": {},
                            "flags": [{"code": c, "message": f"test flag {c}"} for c in (flags or {}).get(s.label, [])]}
    ids = list(range(n)) if eval_ids is None else list(eval_ids)
    cell = CellResult(cell_config(plan, {"name": "tiny-gpt2"}), records, results, [], ids)
    path = runfolder.write(plan.out, cell)
    if not done:
        (path / "DONE").unlink()
    return path
