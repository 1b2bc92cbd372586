"""`iclgd bench`: one cell's speed and memory against this machine's own matmul peak.

What it measures, in one run: the float32 matmul FLOP/s of this machine (the peak), the
analytic FLOP floor of every setting of one cell from the model's size and the run's real token
counts, the measured wall time of each setting (`experiment.run`) over that floor, cached-prefix
ICL versus full re-encoding on the same eval examples, peak memory per setting, and the eval
passes' FLOP/s as a fraction of the peak.

FLOP model (a floor: useful work only, no padding, elementwise ops ignored). A forward pass over
T new tokens attending to P cached ones costs 2·T·(matmul params inside the blocks) + attention
4·H·d_head·keys per layer (scores and mix, keys = T·P + T(T+1)/2: causal, only unmasked pairs)
+ 2·d_model·vocab per position whose logits are computed. A backward (or a jvp's tangent pass)
costs one activation-gradient matmul per frozen weight (1x its forward), two per trained k/v
weight (input + weight gradient), 2x the attention (both operands carry gradients) and 1x the
unembedding: a finer count than the usual "backward = 2x forward" upper bound. LinGD's floor is
primal + tangent + backward per step, which is what the code runs.
The learning rate is fixed (the task's reference), so no lr search runs: each process trains once.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from iclgd import arch
from iclgd.errors import IclgdError
from iclgd.evaluate import EvalOptions, encode_prefix, evaluate
from iclgd.experiment import PeakMemory, RunConfig, _rss_mb, parse_setting, prepare, run
from iclgd.processes import PROCESSES
from iclgd.tasks import get_task

DEFAULT_EVAL_CAP = 64
TARGET_FLOOR_RATIO = 2.0  # full cell within 2x its FLOP floor
TARGET_CACHE_SPEEDUP = 10.0  # cached ICL >= 10x faster per example than re-encoding (k = 32)


# ---------------------------------------------------------------- FLOP counter


@dataclass(frozen=True)
class ModelDims:
    n_layers: int
    d_model: int
    n_heads: int  # query heads
    d_head: int
    vocab: int
    linear_params: int  # every >= 2-d parameter inside the decoder blocks (the matmul weights)
    kv_params: int  # trained k/v weight entries (masked entries only on fused qkv)

    @classmethod
    def of(cls, model) -> ModelDims:
        blocks = arch.decoder_layers(model)
        linear = sum(p.numel() for b in blocks for p in b.parameters() if p.dim() >= 2)
        named = dict(model.named_parameters())
        kv = sum(int(tp.mask.sum()) if tp.mask is not None else named[tp.name].numel()
                 for tp in arch.trainable_params(model, "kv") if named[tp.name].dim() >= 2)
        n_heads, _, d_head = arch.attn_shape(model)
        head = arch.unembed(model).weight  # [vocab, d_model]
        return cls(len(blocks), int(head.shape[1]), n_heads, d_head, int(head.shape[0]), linear, kv)


def attn_flops(d: ModelDims, t: int, p: int = 0, causal: bool = True) -> int:
    """Scores q·kᵀ plus mix p·v over all layers: 2·2·H·d_head FLOPs per (query, key) pair."""
    pairs = t * p + t * (t + 1) // 2 if causal else t * (p + t)
    return d.n_layers * 4 * d.n_heads * d.d_head * pairs


def forward_flops(d: ModelDims, t: int, p: int = 0, logits: int = 1, causal: bool = True) -> int:
    """One forward over t new tokens after p cached ones, with logits at `logits` positions."""
    return 2 * t * d.linear_params + attn_flops(d, t, p, causal) + 2 * logits * d.d_model * d.vocab


def backward_flops(d: ModelDims, t: int, p: int = 0, logits: int = 1, causal: bool = True) -> int:
    """Backward to the trained k/v (or a jvp tangent pass in their direction); module docstring."""
    return (2 * t * (d.linear_params + d.kv_params) + 2 * attn_flops(d, t, p, causal)
            + 2 * logits * d.d_model * d.vocab)


@dataclass(frozen=True)
class CellTokens:
    """The token counts one cell computes on (what `experiment.run` feeds the model)."""

    query_lens: tuple[int, ...]  # each eval sequence's own tokens (query + appended label, if any)
    bos: int  # tokens before a ZSL/process query (BOS, re-encoded with each query)
    icl_prefix: int  # BOS + n_icl demonstrations with separators (encoded once, cached)
    train_lens: tuple[int, ...]  # each training sequence: BOS + demonstration

    def to_dict(self) -> dict:
        return {"n_eval": len(self.query_lens), "eval_tokens": sum(self.query_lens), "bos": self.bos,
                "icl_prefix": self.icl_prefix, "k": len(self.train_lens), "train_tokens": sum(self.train_lens)}


def setting_flops(d: ModelDims, tok: CellTokens, name: str) -> dict[str, int]:
    """{"train": FLOPs, "eval": FLOPs} floor of one setting ("zsl", "icl" or a process name)."""
    zsl = sum(forward_flops(d, tok.bos + q) for q in tok.query_lens)
    if name == "zsl":
        return {"train": 0, "eval": zsl}
    if name == "icl":
        p = tok.icl_prefix
        return {"train": 0, "eval": forward_flops(d, p) + sum(forward_flops(d, q, p) for q in tok.query_lens)}
    unembed = 2 * d.d_model * d.vocab
    train = 0
    for s in tok.train_lens:
        if name == "gd":  # logits at every position, backward through every block
            train += forward_flops(d, s, logits=s) + backward_flops(d, s, logits=s)
        elif name == "lcgd":  # an exit (norm + unembedding) per layer; backward into that block only
            train += forward_flops(d, s) + d.n_layers * s * unembed + backward_flops(d, s, logits=0)
            train += d.n_layers * s * unembed
        elif name == "lingd":  # jvp (primal + tangent) + one backward
            train += forward_flops(d, s, logits=s) + 2 * backward_flops(d, s, logits=s)
        else:
            raise ValueError(f"no FLOP model for process {name!r}")
    if name == "lingd":  # the query is a jvp too
        return {"train": train, "eval": zsl + sum(backward_flops(d, tok.bos + q) for q in tok.query_lens)}
    return {"train": train, "eval": zsl}


# ---------------------------------------------------------------- measurements


def matmul_peak(n: int = 2048, reps: int = 5) -> dict:
    """Float32 FLOP/s of an n x n matmul on this machine, best and median of `reps` (after a warm-up)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        rates.append(2 * n**3 / (time.perf_counter() - t0))
    return {"best": max(rates), "median": statistics.median(rates), "n": n, "reps": reps}


@contextlib.contextmanager
def eval_timer():
    """Time every registered process's `evaluate` calls: {name: [seconds per call, in call order]}.

    Wraps the class attributes for the block only; the originals are restored in `finally`.
    """
    times: dict[str, list[float]] = {}
    saved = []

    def wrap(cls):
        fn = cls.evaluate

        def timed(self, *a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(self, *a, **kw)
            finally:
                times.setdefault(cls.name, []).append(time.perf_counter() - t0)

        return timed

    try:
        for name in PROCESSES.names():
            cls = PROCESSES.get(name)
            saved.append((cls, cls.__dict__.get("evaluate")))
            cls.evaluate = wrap(cls)
        yield times
    finally:
        for cls, orig in reversed(saved):
            if orig is None:
                del cls.evaluate
            else:
                cls.evaluate = orig


def cache_comparison(loaded, prompts, gold, n_icl, opts: EvalOptions, pad_id: int, n: int = 32) -> dict:
    """Cached-prefix ICL versus full re-encoding on the same first `n` eval queries."""
    model, queries, gold = loaded.model, prompts.queries[:n], gold[:n]
    prefix = prompts.icl_prefix(n_icl)
    t0 = time.perf_counter()
    encode_prefix(model, prefix)
    t_prefix = time.perf_counter() - t0
    walls, recs = {}, {}
    for cached in (True, False):
        t0 = time.perf_counter()
        recs[cached] = evaluate(model, queries, gold, prompts.label_ids, prefix=prefix, pad_id=pad_id,
                                options=replace(opts, cache_prefix=cached), desc=f"icl cache={cached}")
        walls[cached] = time.perf_counter() - t0
    diff = (recs[True].label_logprobs - recs[False].label_logprobs).abs().max().item()
    return {
        "n": len(queries), "prefix_tokens": len(prefix),
        "cached_s_per_example": walls[True] / len(queries), "full_s_per_example": walls[False] / len(queries),
        "speedup": walls[False] / walls[True],
        # the prefix is encoded once per cell; over many queries only the marginal cost remains
        "speedup_marginal": walls[False] / max(walls[True] - t_prefix, 1e-9),
        "prefix_encode_s": t_prefix,
        "predictions_match": bool(torch.equal(recs[True].pred, recs[False].pred)),
        "max_abs_logprob_diff": diff,
    }


# ---------------------------------------------------------------- the bench


def bench(cfg: RunConfig, *, loaded=None, out: str | Path | None = None, matmul_n: int = 2048,
          matmul_reps: int = 5, cache_n: int = 32, repeat: int = 1) -> dict:
    """Run one cell under timers, compare its walls with the FLOP floor; write bench.json/.md to `out`.

    With `repeat` > 1 the cell runs that many times in this process; each setting is reported at
    its fastest wall over the repeats against its floor at the best peak probed around it in any
    repeat (`repeats` keeps every run's own figures).
    """
    from iclgd.models import load_model

    if repeat < 1:
        raise IclgdError(f"bench: repeat must be >= 1, got {repeat}")
    loaded = loaded or load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    if cfg.lr is None:
        cfg = replace(cfg, lr=get_task(cfg.task).lr or 1e-3)
    matmul_peak(matmul_n, 1)  # warm-up
    dims = ModelDims.of(loaded.model)
    prep = prepare(cfg, loaded)
    prompts, gold, n_icl, extra = prep.prompts, [e.label for e in prep.selection.eval], prep.n_icl, prep.extra
    tokens = CellTokens(query_lens=tuple(len(q) + extra for q in prompts.queries), bos=len(prompts.bos),
                        icl_prefix=len(prompts.icl_prefix(n_icl)),
                        train_lens=tuple(len(prompts.training_sequence(i)) for i in range(len(prompts.demos))))
    rss_before, load_before = _rss_mb(), _loadavg()
    runs = [_timed_cell(cfg, loaded, dims, tokens, matmul_n, matmul_reps) for _ in range(repeat)]
    rows = runs[0][0] if repeat == 1 else best_of([r[0] for r in runs])
    probes = [(i, setting, p) for i, (_, run_probes, _) in enumerate(runs) for setting, p in run_probes]
    cell = runs[0][2]

    opts = EvalOptions(batch_size=cfg.batch_size, record_at=cell.config["run"]["record_at"],
                       progress=cfg.progress)
    tok = loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    with PeakMemory() as mem:
        cache = cache_comparison(loaded, prompts, gold, n_icl, opts, pad, cache_n)
    cache["peak_mem_mb"] = mem.peak_mb

    settings = list(rows)
    wall = sum(rows[s]["wall_s"] for s in settings)
    floor = sum(rows[s]["floor_s"] for s in settings)
    run_peak = max(p["best"] for _, _, p in probes)
    total_flops = sum(rows[s]["gflop"] for s in settings) * 1e9
    # the eval passes' FLOPs at each setting's own peak, over their wall time
    eval_floor = sum(rows[s]["eval_gflop"] * 1e9 / rows[s]["matmul_flops"] for s in settings)
    eval_wall = sum(rows[s]["eval_s"] for s in settings)
    result = {
        "matmul_flops": run_peak,
        "floor_s": floor,
        "wall_s": wall,
        "floor_ratio": wall / floor,
        # the strictest reading: every setting against the best probe of the whole run
        "floor_ratio_at_run_peak": wall / (total_flops / run_peak),
        "icl_cache_speedup": cache["speedup"],
        "peak_mem_mb": {s: rows[s]["peak_mem_mb"] for s in settings},
        "eval_flops_fraction": eval_floor / eval_wall,
        "settings": {s: rows[s] for s in settings},
        "icl_cache": cache,
        "matmul": {"n": matmul_n, "reps": matmul_reps,
                   "probes": [{"repeat": i, "before": s, "best": p["best"], "median": p["median"]}
                              for i, s, p in probes]},
        "repeat": repeat,
        "repeats": [_run_summary(r[0]) for r in runs],
        "tokens": tokens.to_dict(),
        "model_dims": asdict(dims),
        "run": {"model": loaded.name, "task": cfg.task, "seed": cfg.seed, "k": cfg.k, "eval_cap": len(gold),
                "settings": settings, "protocol": cfg.protocol, "lr": cfg.lr, "batch_size": cfg.batch_size,
                "dtype": cfg.dtype, "device": cfg.device},
        "machine": {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                    "platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__, "rss_before_run_mb": rss_before,
                    "loadavg_1min_before_after": [load_before, _loadavg()],
                    # OpenMP's default active spin-wait collapses when the cores are oversubscribed
                    "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")}},
        "targets": {"floor_ratio_max": TARGET_FLOOR_RATIO, "cache_speedup_min": TARGET_CACHE_SPEEDUP},
        "note": ("FLOP floor: useful matmul work only (module docstring of iclgd.bench); lr fixed, no "
                 "search; peak memory is the process RSS (model included); timings are wall clock "
                 "and noisy when other jobs share the machine."),
    }
    table = markdown(result)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "bench.md").write_text(table)
    result["table"] = table
    return result


def _timed_cell(cfg: RunConfig, loaded, dims: ModelDims, tokens: CellTokens, matmul_n: int,
                matmul_reps: int) -> tuple[dict, list, object]:
    """One timed run of the cell: (rows per setting, matmul probes, the run's CellResult)."""
    # The peak is probed before every setting and after the last: on a shared host it drifts by
    # tens of percent within minutes, so each setting's floor uses the better of its two probes.
    probes: list[tuple[str, dict]] = []

    def probe(setting: str) -> None:
        probes.append((setting, matmul_peak(matmul_n, matmul_reps)))

    with eval_timer() as eval_times:
        cell = run(cfg, loaded=loaded, before_setting=probe)
    probe("end")
    q_len = sorted(int(x) for x in next(iter(cell.records.values())).q_len)
    if q_len != sorted(tokens.query_lens):  # the floor must count what the run computed
        raise IclgdError("bench: the token counts differ from the run's records (prompt code changed?)")

    rows = {}
    for i, (setting, res) in enumerate(cell.results.items()):
        name, _ = parse_setting(setting)
        fl = setting_flops(dims, tokens, name)
        wall = res["wall_s"]
        # results are in run order, and with a fixed lr each process evaluates exactly once
        eval_s = wall if name in ("zsl", "icl") else eval_times[name].pop(0)
        peak = max(probes[i][1]["best"], probes[i + 1][1]["best"])  # the probes around this setting
        floor = (fl["train"] + fl["eval"]) / peak
        rows[setting] = {"wall_s": wall, "floor_s": floor, "floor_ratio": wall / floor, "matmul_flops": peak,
                         "gflop": (fl["train"] + fl["eval"]) / 1e9, "eval_gflop": fl["eval"] / 1e9,
                         "train_s": wall - eval_s, "eval_s": eval_s, "peak_mem_mb": res["peak_mem_mb"],
                         "accuracy": res["accuracy"]}
    return rows, probes, cell


def best_of(runs: list[dict]) -> dict:
    """Per setting, the fastest wall of several runs' rows against its floor at the best peak
    probed around it in any run; its train/eval split from that fastest run. Memory comes from the
    first run: later runs start from the resident memory the earlier ones left."""
    out = {}
    for s in runs[0]:
        fastest = min(runs, key=lambda r: r[s]["wall_s"])[s]
        peak = max(r[s]["matmul_flops"] for r in runs)
        floor = fastest["gflop"] * 1e9 / peak
        out[s] = {**fastest, "matmul_flops": peak, "floor_s": floor, "floor_ratio": fastest["wall_s"] / floor,
                  "peak_mem_mb": runs[0][s]["peak_mem_mb"]}
    return out


def _run_summary(rows: dict) -> dict:
    wall, floor = sum(r["wall_s"] for r in rows.values()), sum(r["floor_s"] for r in rows.values())
    return {"wall_s": wall, "floor_s": floor, "floor_ratio": wall / floor,
            "settings": {s: {k: r[k] for k in ("wall_s", "floor_s", "floor_ratio", "train_s", "eval_s")}
                         for s, r in rows.items()}}


def _loadavg() -> float | None:
    """The 1-minute load average: other jobs on the machine make every timing here noisy."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def markdown(r: dict) -> str:
    """The short human table of a bench result."""
    run_, c, load = r["run"], r["icl_cache"], r["machine"]["loadavg_1min_before_after"]
    probes = ", ".join(f"{p['best'] / 1e9:.0f}" for p in r["matmul"]["probes"])
    lines = [
        f"# iclgd bench: {run_['model']} {run_['task']} k={run_['k']} eval_cap={run_['eval_cap']} "
        f"(seed {run_['seed']}, {r['machine']['torch_threads']} threads, {run_['dtype']}, "
        f"1-min load avg before/after {'/'.join(f'{x:.1f}' for x in load if x is not None)})",
        "",
        f"matmul peak (float32 {r['matmul']['n']}^2, best of {r['matmul']['reps']}, probed before each setting "
        f"and at the end): {probes} GFLOP/s; "
        f"each setting's floor uses the better probe around it",
        "",
        "| setting | GFLOP | peak GFLOP/s | floor s | wall s | wall/floor | train s | eval s | peak MB | acc |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s, x in r["settings"].items():
        lines.append(f"| {s} | {x['gflop']:.4g} | {x['matmul_flops'] / 1e9:.0f} | {x['floor_s']:.3g} | "
                     f"{x['wall_s']:.1f} | {x['floor_ratio']:.2f} | {x['train_s']:.1f} | {x['eval_s']:.1f} | "
                     f"{x['peak_mem_mb']:.0f} | {x['accuracy']:.3f} |")
    lines.append(f"| **cell** | {sum(x['gflop'] for x in r['settings'].values()):.4g} | | "
                 f"{r['floor_s']:.1f} | {r['wall_s']:.1f} | **{r['floor_ratio']:.2f}** | | | "
                 f"{max(r['peak_mem_mb'].values()):.0f} | |")
    ok = "meets" if r["floor_ratio"] <= TARGET_FLOOR_RATIO else "misses"
    ok_c = "meets" if r["icl_cache_speedup"] >= TARGET_CACHE_SPEEDUP else "misses"
    if r.get("repeat", 1) > 1:
        each = ", ".join(f"{x['floor_ratio']:.2f}" for x in r["repeats"])
        lines += ["", f"best of {r['repeat']} repeats: each setting's fastest wall against the best probe around "
                      f"it in any repeat; the repeats' own cell ratios: {each} "
                      f"(median {statistics.median(x['floor_ratio'] for x in r['repeats']):.2f})"]
    lines += [
        "",
        f"- cell wall / FLOP floor: {r['floor_ratio']:.2f} ({ok} the <= {TARGET_FLOOR_RATIO:g}x target); "
        f"{r['floor_ratio_at_run_peak']:.2f} with every setting held to the run's best probe "
        f"({r['matmul_flops'] / 1e9:.0f} GFLOP/s)",
        f"- cached ICL vs re-encoding, {c['n']} examples, prefix {c['prefix_tokens']} tokens: "
        f"{c['cached_s_per_example'] * 1e3:.0f} vs {c['full_s_per_example'] * 1e3:.0f} ms/example = "
        f"{r['icl_cache_speedup']:.1f}x ({ok_c} the >= {TARGET_CACHE_SPEEDUP:g}x target; "
        f"{c['speedup_marginal']:.1f}x without the one-off prefix encoding); predictions match: "
        f"{c['predictions_match']} (max |Δ log p| {c['max_abs_logprob_diff']:.1e})",
        f"- eval passes: {r['eval_flops_fraction'] * 100:.1f}% of the matmul peak",
        f"- note: {r['note']}",
    ]
    lines += [f"- warning: {w}" for w in environment_warnings(r["machine"])]
    return "\n".join(lines) + "\n"


def environment_warnings(machine: dict) -> list[str]:
    """What in the recorded environment makes the timings unrepresentative."""
    out = []
    if (machine.get("env", {}).get("OMP_WAIT_POLICY") or "").upper() == "PASSIVE":
        out.append("OMP_WAIT_POLICY=PASSIVE: OpenMP threads sleep between the many small parallel regions "
                   "of a forward pass (on the project's 2-core CPU it made ZSL's eval 1.2x, LinGD's eval 1.5x and "
                   "GD's training steps 1.7x slower); unset it unless other jobs share the cores")
    return out


def bench_from_args(args) -> int:
    """The `iclgd bench` subcommand: a RunConfig from the CLI namespace, then `bench`."""
    cap = args.eval_cap if args.eval_cap is not None else DEFAULT_EVAL_CAP
    cfg = RunConfig.from_dict({
        "model": args.model, "task": args.task, "seed": args.seed, "k": args.k, "settings": args.settings,
        "protocol": args.protocol, "eval_cap": cap, "batch_size": args.batch_size, "data_dir": args.data_dir,
        "data_source": args.data_source, "device": args.device, "dtype": args.dtype,
        "progress": not args.quiet,
    })
    if args.eval_cap is None:
        print(f"iclgd bench: eval cap {cap} (pass --eval-cap N to change it)")
    result = bench(cfg, out=args.out, repeat=args.repeat)
    print(result["table"])
    print(f"bench: {Path(args.out) / 'bench.json'}")
    return 0
