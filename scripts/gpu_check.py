"""The GPU check behind scripts/gpu_check.sh: self-contained, no network, one summary file.

On a CUDA machine (`--size full`, the default there) it builds SmolLM2-135M's architecture from
its config (embedded below) with random weights: a random model runs the same kernels on the same
shapes as the trained one, so it times the same, and nothing needs downloading. It then

1. checks CPU/GPU agreement in float32 on a tiny cell (k 4, 8 eval examples, every process at a
   fixed rate): label log-probabilities, attention outputs and logits, predictions, gradient norms;
2. runs `iclgd bench` (its Python function, `iclgd.bench.bench`, with a GPU-sized matmul probe) in
   float32 and bfloat16: the reference-rate cell and the default protocol's cell (search included);
3. runs a small `iclgd reproduce` (the CLI, in this process) in float32 and bfloat16;

and writes OUT/summary.json and OUT/summary.md. Without CUDA (`--size ci`, the default there) the
same steps run on the CPU with a 2-layer model and a handful of examples, in seconds: the path
the test suite runs (tests/test_gpu_check.py); the agreement step then compares CPU with CPU.

Data: the offline task copies if a folder holds `glue-sst2/` (`--data-dir`, $ICLGD_DATA_DIR or
../shared/data), else a synthetic SST-2 in the same layout (seeded random sentences over a small
vocabulary; fine for timing and agreement, not for accuracy). The tokenizer is a byte-level BPE
trained on the data in a second (SmolLM2's own needs its GGUF package); prompts then have
realistic lengths, and ids stay below the model's vocabulary of 49152.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
import traceback
from pathlib import Path

import torch

# SmolLM2-135M (HuggingFaceTB/SmolLM2-135M's config.json, as the converted GGUF gives it)
SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, hidden_act="silu", max_position_embeddings=8192, rms_norm_eps=1e-5,
    rope_theta=100000.0, tie_word_embeddings=True, attention_bias=False, mlp_bias=False, initializer_range=0.02,
)
# The CI size: the same family, two small layers
TINY = dict(SMOLLM2_135M, vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)
ALL = "zsl,icl,gd,lcgd,lingd"
SIZES = {  # model, tokenizer vocabulary, bench (k, eval cap), reproduce eval cap, synthetic rows, settings
    "full": dict(config=SMOLLM2_135M, vocab=8192, k=32, eval_cap=872, repro_cap=64, rows=(6920, 872), matmul_n=8192,
                 agree=ALL, bench={"float32": ALL, "bfloat16": ALL},
                 reproduce={"float32": ALL + ",lcgd[clip=match_gd]", "bfloat16": ALL + ",lcgd[clip=match_gd]"}),
    # seconds on a CPU: every process once in float32, the bfloat16 path with GD only
    "ci": dict(config=TINY, vocab=1024, k=2, eval_cap=4, repro_cap=4, rows=(120, 24), matmul_n=128,
               agree="zsl,gd", bench={"float32": ALL, "bfloat16": "zsl,gd"},
               reproduce={"float32": "zsl,icl,gd", "bfloat16": "zsl,gd"}),
}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2's vocabulary
AGREE_ATOL = {"label_logprobs": 2e-3, "attn_out": 2e-3, "attn_logits": 2e-3}  # float32, CPU vs GPU


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gpu_check")
    ap.add_argument("--size", choices=["auto", "full", "ci"], default="auto",
                    help="auto: full on a CUDA machine, ci on a CPU one")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--synthetic-data", action="store_true", help="use the synthetic SST-2 even if real data is found")
    ap.add_argument("--eval-cap", type=int, default=None, help="the bench's eval cap (default: by size)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    size = SIZES[("full" if cuda else "ci") if args.size == "auto" else args.size]
    device = "cuda" if cuda else "cpu"
    if size is SIZES["ci"]:
        # one thread: a 2-layer model's ops are too small for a second thread to pay for its
        # wake-ups, which on a shared CI machine cost milliseconds each
        torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    summary: dict = {"device": device, "size": "full" if size is SIZES["full"] else "ci", "steps": {},
                     "machine": _machine(cuda), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    t_all = time.perf_counter()

    data_dir = (None if args.synthetic_data else _data_dir(args.data_dir)) or _synthetic_data(work / "data", *size["rows"])
    summary["data"] = {"dir": str(data_dir), "synthetic": data_dir == work / "data"}
    model_dir = _build_model(work / "model", size, data_dir)
    eval_cap = args.eval_cap or size["eval_cap"]

    def step(name, fn):
        t0 = time.perf_counter()
        try:
            summary["steps"][name] = {"ok": True, **fn()}
        except Exception as err:  # one failing step must not lose the others' results
            summary["steps"][name] = {"ok": False, "error": f"{type(err).__name__}: {err}",
                                      "traceback": traceback.format_exc(limit=8)}
        summary["steps"][name]["step_s"] = time.perf_counter() - t0
        print(f"gpu_check: {name}: {'ok' if summary['steps'][name]['ok'] else 'FAILED'} "
              f"({summary['steps'][name]['step_s']:.1f} s)", flush=True)
        _write(out, summary)

    step("agreement_float32", lambda: _agreement(model_dir, data_dir, device, size))
    for dtype in ("float32", "bfloat16"):
        step(f"bench_{dtype}", lambda dtype=dtype: _bench(model_dir, data_dir, device, dtype, size, eval_cap,
                                                           out / f"bench_{dtype}"))
    for dtype in ("float32", "bfloat16"):
        step(f"reproduce_{dtype}", lambda dtype=dtype: _reproduce(model_dir, data_dir, device, dtype, size,
                                                                   out / f"reproduce_{dtype}"))
    summary["wall_s"] = time.perf_counter() - t_all
    summary["ok"] = all(s["ok"] for s in summary["steps"].values())
    _write(out, summary)
    print(f"gpu_check: {'all steps ok' if summary['ok'] else 'FAILED'} in {summary['wall_s']:.0f} s; "
          f"summary: {out / 'summary.json'}")
    return 0 if summary["ok"] else 1


# ---------------------------------------------------------------- set-up


def _machine(cuda: bool) -> dict:
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(0) if cuda else None, "cpu_threads": torch.get_num_threads(),
            "platform": platform.platform()}


def _data_dir(given: str | None) -> Path | None:
    for d in (given, os.environ.get("ICLGD_DATA_DIR"), Path.cwd().parent / "shared" / "data"):
        if d and (Path(d) / "glue-sst2").is_dir():
            return Path(d)
    return None


def _synthetic_data(root: Path, n_train: int, n_eval: int) -> Path:
    """An SST-2-shaped folder (glue-sst2/{train,validation}.jsonl): seeded random sentences of
    8-30 words; the label is whether more 'good' than 'bad' words occur (learnable, not natural)."""
    rng = random.Random(0)
    good, bad = ["good", "great", "fine", "warm", "funny", "moving"], ["bad", "dull", "flat", "weak", "tired", "cold"]
    filler = ("the film a story of its with and but this that one characters plot is was too very "
              "never quite more than an into at by for from on as director performance scenes").split()
    folder = root / "glue-sst2"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("validation", n_eval)):
        with open(folder / f"{split}.jsonl", "w") as f:
            for i in range(n):
                words = [rng.choice(filler + good + bad) for _ in range(rng.randint(8, 30))]
                label = int(sum(w in good for w in words) >= sum(w in bad for w in words))
                f.write(json.dumps({"sentence": " ".join(words), "label": label, "idx": i}) + "\n")
    return root


def _build_model(folder: Path, size: dict, data_dir: Path) -> Path:
    """A random-weight model folder (config, safetensors, tokenizer) iclgd loads like any other."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from iclgd.tasks import get_task

    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    task = get_task("sst2")
    lines = [task.template] * 50 + [" ".join(f" {w}" for w in task.label_words)] * 400  # whole label tokens
    with open(data_dir / "glue-sst2" / "train.jsonl") as f:
        lines += [json.loads(row)["sentence"] for _, row in zip(range(4000), f)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainer=trainers.BpeTrainer(
        vocab_size=size["vocab"], special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    # as SmolLM2's converted tokenizer: BOS <|im_start|> (1), EOS = pad <|im_end|> (2), no BOS added
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                      pad_token="<|im_end|>", model_max_length=size["config"]["max_position_embeddings"])
    config = tf.LlamaConfig(**size["config"], bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config)  # random weights from the config's initializer
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def _write(out: Path, summary: dict) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (out / "summary.md").write_text(_markdown(summary))


# ---------------------------------------------------------------- the steps


def _cell(model_dir: Path, data_dir: Path, **kw):
    from iclgd.plan import RunConfig

    return RunConfig(model=str(model_dir), task="sst2", seed=2, data_dir=str(data_dir), data_source="local",
                     progress=False, **kw)


def _agreement(model_dir: Path, data_dir: Path, device: str, size: dict) -> dict:
    """The same tiny cell in float32 on the CPU and on `device`: every record's largest difference."""
    from iclgd.experiment import run
    from iclgd.models import load_model

    settings = tuple(size["agree"].split(","))
    cells = {}
    for dev in ("cpu", device):
        loaded = load_model(str(model_dir), device=dev, dtype="float32")
        cells[dev] = run(_cell(model_dir, data_dir, k=4, eval_cap=8, settings=settings, lr=1e-3, device=dev),
                         loaded=loaded)
    a, b = cells["cpu"], cells[device]
    out, ok = {"compared": f"cpu vs {device}", "settings": {}}, True
    for s in settings:
        ra, rb = a.records[s], b.records[s]
        diffs = {k: float((getattr(ra, k) - getattr(rb, k)).nan_to_num().abs().max()) for k in AGREE_ATOL}
        same = bool(torch.equal(ra.pred, rb.pred))
        if "grad_norms" in ra.extras:
            ga, gb = ra.extras["grad_norms"], rb.extras["grad_norms"]
            diffs["grad_norms_rel"] = float(((ga - gb).abs() / ga.abs().clamp_min(1e-12)).max())
        passed = same and all(diffs[k] <= tol for k, tol in AGREE_ATOL.items()) and diffs.get("grad_norms_rel", 0) < 1e-3
        ok &= passed
        out["settings"][s] = {"max_abs_diff": diffs, "predictions_equal": same, "pass": passed}
    out["tolerance"] = {**AGREE_ATOL, "grad_norms_rel": 1e-3}
    if not ok:
        raise AssertionError(f"CPU and {device} disagree beyond tolerance: {json.dumps(out['settings'])}")
    return out


def _bench(model_dir: Path, data_dir: Path, device: str, dtype: str, size: dict, eval_cap: int, out: Path) -> dict:
    from iclgd.bench import bench

    cfg = _cell(model_dir, data_dir, k=size["k"], eval_cap=eval_cap, settings=size["bench"][dtype], device=device,
                dtype=dtype)
    r = bench(cfg, out=out, matmul_n=size["matmul_n"], matmul_reps=5, cache_n=min(32, eval_cap), overwrite=True)
    keys = ("floor_ratio", "floor_s", "wall_s", "matmul_flops", "icl_cache_speedup", "search_overhead",
            "default_floor_ratio", "search_mem_ratio")
    rows = {s: {k: x.get(k) for k in ("wall_s", "floor_s", "floor_ratio", "train_s", "eval_s", "peak_mem_mb",
                                      "gpu_peak_mem_mb", "accuracy")} for s, x in r["settings"].items()}
    default = {s: {k: x.get(k) for k in ("wall_s", "floor_ratio", "candidates", "lr", "gpu_peak_mem_mb")}
               for s, x in r.get("default", {}).get("settings", {}).items()}
    return {**{k: r.get(k) for k in keys}, "default_wall_s": r.get("default", {}).get("wall_s"),
            "settings": rows, "default_settings": default, "folder": str(out)}


def _reproduce(model_dir: Path, data_dir: Path, device: str, dtype: str, size: dict, out: Path) -> dict:
    from iclgd.cli import main as iclgd

    t0 = time.perf_counter()
    argv = ["reproduce", "--model", str(model_dir), "--tasks", "sst2", "--seeds", "2", "--k", str(size["k"]),
            "--eval-cap", str(size["repro_cap"]), "--settings", size["reproduce"][dtype], "--device", device, "--dtype", dtype, "--data-dir", str(data_dir),
            "--data-source", "local", "--out", str(out), "--quiet", "--overwrite"]
    code = iclgd(argv)
    if code != 0:
        raise RuntimeError(f"iclgd {' '.join(argv)} exited {code}")
    results = {}
    for path in sorted((out / "runs").rglob("results.json")):
        res = json.loads(path.read_text())
        results[str(path.parent.relative_to(out / "runs"))] = {s: {"accuracy": x.get("accuracy"), "wall_s": x.get("wall_s"), "lr": x.get("lr")}
                                     for s, x in res.items()}
    return {"command": "iclgd " + " ".join(argv), "cells": results, "cli_wall_s": time.perf_counter() - t0,
            "report": str(out / "report")}


# ---------------------------------------------------------------- the summary


def _markdown(s: dict) -> str:
    m = s["machine"]
    lines = [f"# iclgd GPU check ({s['size']} size on {s['device']}: {m.get('gpu') or platform.processor() or 'CPU'}, "
             f"torch {m['torch']}, CUDA {m['cuda']})", ""]
    if "wall_s" in s:
        lines.append(f"{'all steps ok' if s.get('ok') else 'FAILED'} in {s['wall_s']:.0f} s; data: "
                     f"{'synthetic SST-2' if s['data']['synthetic'] else s['data']['dir']}")
    lines += ["", "| step | ok | wall s | figures |", "|---|---|---:|---|"]
    for name, st in s["steps"].items():
        if not st["ok"]:
            fig = st["error"][:200]
        elif name.startswith("bench"):
            fig = (f"floor_ratio {st['floor_ratio']:.2f}, search_overhead {st.get('search_overhead') or 0:.2f}, "
                   f"default_floor_ratio {st.get('default_floor_ratio') or 0:.2f}, cache {st['icl_cache_speedup']:.1f}x, "
                   f"cells {st['wall_s']:.1f} s / {st.get('default_wall_s') or 0:.1f} s")
        elif name.startswith("agreement"):
            worst = max(v for x in st["settings"].values() for k, v in x["max_abs_diff"].items() if k != "grad_norms_rel")
            fig = f"{st['compared']}: max |Δ| {worst:.1e}, predictions equal in every setting"
        else:
            fig = f"{len(st['cells'])} cell(s), CLI {st['cli_wall_s']:.1f} s"
        lines.append(f"| {name} | {'yes' if st['ok'] else 'NO'} | {st.get('step_s', 0):.1f} | {fig} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
