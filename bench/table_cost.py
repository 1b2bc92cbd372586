"""What the full table costs: the FLOP floor of `iclgd reproduce` over the six tasks, per device.

    python bench/table_cost.py --data-dir ../shared/data [--eval-cap N] [--protocol dai2023] [--out FILE]

For each task and seed of the reproduction (the default protocol: every process's learning-rate
search with its grid of candidates in lockstep and its held-out scoring; the settings of
`iclgd reproduce`), the cell's FLOP floor from the real token counts (SmolLM2-135M's tokenizer,
`iclgd.flops`), summed; then that floor in seconds at a device's dense peak. The models: SmolLM2-135M,
Gemma-3-270m and the papers' fairseq-dense 1.3B (their dimensions below; token counts taken from
SmolLM2's tokenizer for all three, an estimate for the other two). No model is loaded: dimensions
come from configs on the meta device.
A floor, not a forecast: a 135M model's per-step kernels are far too small to run near a GPU's
peak (launch overhead dominates), which `scripts/gpu_check.sh` measures.
"""

from __future__ import annotations

import argparse
import json

import torch
import transformers as tf

from iclgd.experiment import prepare
from iclgd.flops import CellTokens, ModelDims, setting_flops
from iclgd.lrsearch import held_out_prompts
from iclgd.plan import plan_cells

SETTINGS = "zsl,icl,gd,lcgd,lingd,lcgd[clip=match_gd]"
MODELS = {
    "smollm2-135m": tf.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True),
    # Gemma-3-270m (the other embedded model): 18 layers, d_model 640, 4 query heads on 1 kv head of 256,
    # and a 262k-row head, which LCGD's per-layer exits multiply by
    "gemma3-270m": tf.Gemma3TextConfig(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                                       num_attention_heads=4, num_key_value_heads=1, head_dim=256),
    # KoboldAI/fairseq-dense-1.3B (XGLM layout): 24 layers, d_model 2048, 32 heads, ffn 8192
    "fairseq-dense-1.3b": tf.XGLMConfig(vocab_size=50261, d_model=2048, num_layers=24, attention_heads=32,
                                        ffn_dim=8192, max_position_embeddings=2048),
}
PEAKS = {  # dense TFLOP/s (vendor figures, no sparsity)
    "H200 float32 (CUDA cores)": 67e12,
    "H200 TF32 tensor cores": 495e12,
    "H200 bfloat16 tensor cores": 989e12,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--eval-cap", type=int, default=None, help="default: each task's (the full table)")
    ap.add_argument("--protocol", default="default", help="default, or dai2023 (the papers' setting: no search, "
                    "the first seed of each task)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from iclgd.errors import IclgdError
    from iclgd.models import load_model
    from iclgd.protocols import get_protocol

    try:
        get_protocol(args.protocol)  # before the model loads
    except IclgdError as err:
        ap.error(str(err))

    tok_model = load_model("smollm2-135m")  # its tokenizer and prompt checks; the weights are not used
    cells = plan_cells(["sst2", "sst5", "mr", "subj", "agnews", "cb"], None, settings=SETTINGS, protocol=args.protocol,
                       eval_cap=args.eval_cap, data_dir=args.data_dir, progress=False)
    dims = {}
    for name, config in MODELS.items():
        with torch.device("meta"):
            dims[name] = ModelDims.of(tf.AutoModelForCausalLM.from_config(config))
    totals = {name: 0 for name in MODELS}
    per_task: dict[str, dict] = {}
    for cell in cells:
        prep = prepare(cell, tok_model)
        p = prep.prompts
        tokens = CellTokens(tuple(len(q) for q in p.queries), len(p.bos), len(p.icl_prefix(prep.n_icl)),
                            tuple(len(p.training_sequence(i)) for i in range(len(p.demos))))
        for name, d in dims.items():
            flops = 0
            for s in cell.settings:
                if s.process and s.lr.source == "search":
                    held, _ = held_out_prompts(cell, tok_model.tokenizer, s.lr.search_n, p.bos[0])
                    held_tok = CellTokens(tuple(len(q) for q in held.queries), len(held.bos), 0, ())
                    fl = setting_flops(d, tokens, s.name, len(s.lr.grid), held_tok)
                else:
                    fl = setting_flops(d, tokens, s.name)
                flops += fl["train"] + fl["eval"] + fl["search"]
            totals[name] += flops
            row = per_task.setdefault(cell.task.name, {}).setdefault(name, {"cells": 0, "pflop": 0.0})
            row["cells"] += 1
            row["pflop"] += flops / 1e15
    out = {"protocol": args.protocol, "settings": SETTINGS, "cells": len(cells), "eval_cap": args.eval_cap or "each task's",
           "total_pflop": {n: t / 1e15 for n, t in totals.items()}, "per_task": per_task,
           "floor_minutes": {n: {dev: t / peak / 60 for dev, peak in PEAKS.items()} for n, t in totals.items()},
           "note": "grid candidates only (each extension past an edge adds one candidate's training and scoring)"}
    print(json.dumps(out, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
