"""`iclgd bench`: one cell's speed and memory against this machine's own matmul peak.

What it measures, in one run: the float32 matmul FLOP/s of this machine (the peak), the
analytic FLOP floor of every setting of one cell from the model's size and the run's real token
counts, the measured wall time of each setting (`experiment.run`) over that floor, cached-prefix
ICL versus full re-encoding on the same eval examples, peak memory per setting, and the eval
passes' FLOP/s as a fraction of the peak.

Two cells run on the same model, task, seed and eval examples: the reference-rate cell (every
process at the task's reference learning rate, trained once: `floor_ratio` and the figures above)
and, where the plan searches a process's learning rate (the default protocol), the cell as
planned, search included: `search_overhead` is its wall over the reference-rate cell's, and
`default_floor_ratio` its wall over the floor of the work a search must do at least once (every
candidate's training at its lockstep floor, every candidate's held-out scoring, the winner's eval;
`flops.setting_flops`). Each repeat runs the reference-rate cell, then the default cell.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from iclgd import outputs
from iclgd.errors import IclgdError
from iclgd.evaluate import EvalOptions, encode_prefix, evaluate
from iclgd.experiment import PeakMemory, _rss_mb, prepare, run
from iclgd.flops import CellTokens, ModelDims, setting_flops
from iclgd.plan import CellPlan, LrRule, RunConfig, resolve_cell

DEFAULT_EVAL_CAP = 64
TARGET_FLOOR_RATIO = 1.6  # the reference-rate cell within 1.6x its FLOP floor (issue 14; 2x before it)
TARGET_DEFAULT_FLOOR_RATIO = 2.0  # the default-protocol cell within 2x the floor of its work (issue 14)
TARGET_CACHE_SPEEDUP = 19.0  # cached ICL >= 19x faster per example than re-encoding, k 32 (issue 14; 10x before)
TARGET_SEARCH_OVERHEAD = 1.3  # default-protocol cell <= 1.3x the reference-rate cell (issue 14, at 872 eval)
TARGET_SEARCH_MEM = 2.0  # a searched setting's memory above the start <= 2x the one-candidate setting's


# ---------------------------------------------------------------- measurements


def matmul_peak(n: int = 2048, reps: int = 5, device="cpu", dtype=torch.float32) -> dict:
    """FLOP/s of an n x n matmul on `device` in `dtype` (the model's), best and median of `reps`
    (after a warm-up); on a GPU each product is timed to its completion."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    sync()
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        rates.append(2 * n**3 / (time.perf_counter() - t0))
    return {"best": max(rates), "median": statistics.median(rates), "n": n, "reps": reps}


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


def reference_rate(cell: CellPlan) -> CellPlan:
    """The cell with every searched learning rate replaced by its reference rate (no search)."""
    fixed = tuple(replace(s, lr=LrRule("reference", s.lr.lr)) if s.process and s.lr.source == "search" else s
                  for s in cell.settings)
    return cell.with_(settings=fixed)


def bench(cfg: RunConfig | CellPlan, *, loaded=None, out: str | Path | None = None, matmul_n: int = 2048,
          matmul_reps: int = 5, cache_n: int = 32, repeat: int = 1, overwrite: bool = False) -> dict:
    """Run one cell under timers, compare its walls with the FLOP floor; write bench.json/.md to `out`.

    With `repeat` > 1 the cell runs that many times in this process; each setting is reported at
    its fastest wall over the repeats against its floor at the best peak probed around it in any
    repeat (`repeats` keeps every run's own figures).
    """
    from iclgd.models import load_model

    if repeat < 1:
        raise IclgdError(f"bench: repeat must be >= 1, got {repeat}")
    if out is not None:
        outputs.check_out(Path(out), "bench", overwrite)
    planned = resolve_cell(cfg)
    cfg = reference_rate(planned)
    searched = [s for s in planned.settings if s.process and s.lr.source == "search"]
    loaded = loaded or load_model(cfg.model.name, device=cfg.compute.device, dtype=cfg.compute.dtype,
                                  revision=cfg.model.revision)
    first = next(loaded.model.parameters())
    probe_on = {"device": first.device, "dtype": first.dtype}
    matmul_peak(matmul_n, 1, **probe_on)  # warm-up
    dims = ModelDims.of(loaded.model)
    prep = prepare(cfg, loaded)
    prompts, gold, n_icl, extra = prep.prompts, prep.gold, prep.n_icl, prep.extra
    tokens = CellTokens(query_lens=tuple(len(q) + extra for q in prompts.queries), bos=len(prompts.bos),
                        icl_prefix=len(prompts.icl_prefix(n_icl)),
                        train_lens=tuple(len(prompts.training_sequence(i)) for i in range(len(prompts.demos))))
    held = {s.label: _held_out_tokens(planned, loaded, s.lr.search_n, prompts.bos[0]) for s in searched}
    trim_memory()
    rss_before, load_before = _rss_mb(), _loadavg()
    gpu_before = torch.cuda.memory_allocated() / 2**20 if first.device.type == "cuda" else None
    runs, default_runs = [], []
    for _ in range(repeat):  # alternated, so that the host's drift hits both cells alike
        runs.append(_timed_cell(cfg, loaded, dims, tokens, matmul_n, matmul_reps, probe_on=probe_on))
        if searched:
            default_runs.append(_timed_cell(planned, loaded, dims, tokens, matmul_n, matmul_reps, held, probe_on))
    rows = runs[0][0] if repeat == 1 else best_of([r[0] for r in runs])
    probes = [(i, setting, p) for i, (_, run_probes, _) in enumerate(runs) for setting, p in run_probes]

    opts = EvalOptions(batch_size=cfg.compute.batch_size, record_at=cfg.record_at, progress=cfg.compute.progress)
    with PeakMemory() as mem:
        cache = cache_comparison(loaded, prompts, gold, n_icl, opts, prep.pad_id, cache_n)
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
        "run": {"model": loaded.name, "task": cfg.task.name, "seed": cfg.seed, "k": cfg.k, "eval_cap": len(gold),
                "settings": settings, "protocol": cfg.protocol.name,
                "lr": {s.label: s.lr.lr for s in cfg.settings if s.process}, "batch_size": cfg.compute.batch_size,
                "dtype": cfg.compute.dtype, "device": cfg.compute.device, "ranking": cfg.records_ranking},
        "machine": {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                    "platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__, "rss_before_run_mb": rss_before, "gpu_allocated_before_run_mb": gpu_before,
                    "gpu": torch.cuda.get_device_name(first.device) if gpu_before is not None else None,
                    "loadavg_1min_before_after": [load_before, _loadavg()],
                    # OpenMP's default active spin-wait collapses when the cores are oversubscribed
                    "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")}},
        "targets": {"floor_ratio_max": TARGET_FLOOR_RATIO, "cache_speedup_min": TARGET_CACHE_SPEEDUP,
                    "search_overhead_max": TARGET_SEARCH_OVERHEAD,
                    "default_floor_ratio_max": TARGET_DEFAULT_FLOOR_RATIO,
                    "search_mem_ratio_max": TARGET_SEARCH_MEM},
        "note": ("FLOP floor: useful matmul work only (module docstring of iclgd.bench); floor_ratio is the "
                 "reference-rate cell (each process trained once), default_* the cell with its learning-rate "
                 "search; peak memory is the process RSS (model included; freed heap returned to the system "
                 "before each setting); timings are wall clock and noisy when other jobs share the machine."),
    }
    if searched:
        result.update(_default_cell(default_runs, searched, rows, rss_before, gpu_before))
    table = markdown(result)
    if out is not None:
        out = Path(out)
        tmp = outputs.staging_dir(out)
        (tmp / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
        (tmp / "bench.md").write_text(table)
        outputs.write_marker(tmp, "bench", ["bench.json", "bench.md"])
        outputs.move_into(tmp, out, "bench")
    result["table"] = table
    return result


def _held_out_tokens(plan: CellPlan, loaded, n: int, start: int) -> CellTokens:
    """The token counts of a search's held-out prompts (scored as ZSL scores its queries)."""
    from iclgd.lrsearch import held_out_prompts

    held, _ = held_out_prompts(plan, loaded.tokenizer, n, start)
    return CellTokens(query_lens=tuple(len(q) for q in held.queries), bos=len(held.bos), icl_prefix=0, train_lens=())


def trim_memory() -> None:
    """Return freed heap memory to the system (glibc's malloc_trim), so that each setting's peak
    resident memory is its own rather than what earlier settings left cached in the heap."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: peaks may include earlier settings' freed memory
        pass


def _timed_cell(cfg: CellPlan, loaded, dims: ModelDims, tokens: CellTokens, matmul_n: int,
                matmul_reps: int, held: dict[str, CellTokens] | None = None,
                probe_on: dict | None = None) -> tuple[dict, list, object]:
    """One timed run of the cell: (rows per setting, matmul probes, the run's CellResult). `held`
    gives each searched setting's held-out token counts (its floor then includes the search);
    `probe_on` the device and dtype of the matmul probes (the model's)."""
    # The peak is probed before every setting and after the last: on a shared host it drifts by
    # tens of percent within minutes, so each setting's floor uses the better of its two probes.
    probes: list[tuple[str, dict]] = []
    probe_on = probe_on or {}
    cuda = torch.device(probe_on.get("device", "cpu")).type == "cuda"
    gpu_peaks: list[float] = []  # the GPU's peak allocated memory (MB) of each setting

    def probe(setting: str) -> None:
        if cuda:  # read before this probe's own allocations: the previous setting's peak
            if probes:
                gpu_peaks.append(torch.cuda.max_memory_allocated() / 2**20)
            torch.cuda.reset_peak_memory_stats()
        trim_memory()
        probes.append((setting, matmul_peak(matmul_n, matmul_reps, **probe_on)))

    cell = run(cfg, loaded=loaded, before_setting=probe)
    probe("end")
    q_len = sorted(int(x) for x in next(iter(cell.records.values())).q_len)
    if q_len != sorted(tokens.query_lens):  # the floor must count what the run computed
        raise IclgdError("bench: the token counts differ from the run's records (prompt code changed?)")

    rows = {}
    held = held or {}
    for i, (setting, res) in enumerate(cell.results.items()):
        n = searched_candidates(res) if setting in held else 1
        fl = setting_flops(dims, tokens, cfg.setting(setting).name, n, held.get(setting))
        wall, eval_s = res["wall_s"], res["eval_s"]
        peak = max(probes[i][1]["best"], probes[i + 1][1]["best"])  # the probes around this setting
        total = fl["train"] + fl["eval"] + fl["search"]
        floor = total / peak
        rows[setting] = {"wall_s": wall, "floor_s": floor, "floor_ratio": wall / floor, "matmul_flops": peak,
                         "gflop": total / 1e9, "eval_gflop": fl["eval"] / 1e9,
                         "train_s": wall - eval_s, "eval_s": eval_s, "peak_mem_mb": res["peak_mem_mb"],
                         "accuracy": res["accuracy"]}
        if gpu_peaks:
            rows[setting]["gpu_peak_mem_mb"] = gpu_peaks[i]
        if setting in held:
            opts = res["options"]
            rows[setting].update(
                search_gflop=fl["search"] / 1e9, candidates=n, lr=res["lr"],
                search={"scores": opts.get("lr_search"), "accuracy": opts.get("lr_search_accuracy"),
                        "reason": opts.get("lr_search_reason"), "extensions": opts.get("lr_search_extensions"),
                        "held_out": opts.get("lr_search_n")})
    return rows, probes, cell


def searched_candidates(res: dict) -> int:
    """Candidates a search trained in full and scored: those with a held-out accuracy (a
    candidate stopped by a non-finite value has none; counting none of its work keeps the floor
    a floor)."""
    return sum(1 for a in res["options"].get("lr_search_accuracy", {}).values() if math.isfinite(a))


def _default_cell(runs: list, searched: list, ref_rows: dict, rss_before: float, gpu_before: float | None) -> dict:
    """bench.json's figures for the cell with its learning-rate search, against the reference-rate
    cell's rows (each setting's fastest run with --repeat, as for the reference-rate cell)."""
    rows = runs[0][0] if len(runs) == 1 else best_of([r[0] for r in runs])
    wall = sum(r["wall_s"] for r in rows.values())
    floor = sum(r["floor_s"] for r in rows.values())
    ref_wall = sum(r["wall_s"] for r in ref_rows.values())
    memory = {}
    for s in searched:
        mine, ref = rows[s.label]["peak_mem_mb"], ref_rows[s.label]["peak_mem_mb"]
        memory[s.label] = {"search_peak_mb": mine, "reference_peak_mb": ref, "ratio": mine / ref,
                           # what each setting added to the resident level before the cells ran
                           "ratio_above_start": (mine - rss_before) / max(ref - rss_before, 1.0)}
        if "gpu_peak_mem_mb" in rows[s.label]:  # on a GPU, its allocated memory is the one that counts
            mine, ref = rows[s.label]["gpu_peak_mem_mb"], ref_rows[s.label]["gpu_peak_mem_mb"]
            memory[s.label].update(gpu_search_peak_mb=mine, gpu_reference_peak_mb=ref,
                                   gpu_ratio_above_start=(mine - gpu_before) / max(ref - gpu_before, 1.0))
    key = "gpu_ratio_above_start" if gpu_before is not None else "ratio_above_start"
    return {
        "search_overhead": wall / ref_wall,
        "default_floor_ratio": wall / floor,
        "search_mem_ratio": max(m[key] for m in memory.values()),
        "default": {"wall_s": wall, "floor_s": floor, "floor_ratio": wall / floor, "settings": rows,
                    "search_memory": memory, "repeats": [_run_summary(r[0]) for r in runs],
                    "matmul_probes": [{"repeat": i, "before": st, "best": p["best"], "median": p["median"]}
                                      for i, (_, probes, _) in enumerate(runs) for st, p in probes],
                    "protocol": searched[0].lr.describe()},
    }


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
        f"attention ranking {'on' if run_.get('ranking') else 'off'} (not in the FLOP floor), "
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
    if "default" in r:
        lines += _default_markdown(r)
    lines += [f"- warning: {w}" for w in environment_warnings(r["machine"])]
    return "\n".join(lines) + "\n"


def _default_markdown(r: dict) -> list[str]:
    d, ref = r["default"], r["settings"]
    lines = ["", f"## The default protocol's cell (learning-rate search: {d['protocol']})", "",
             "| setting | candidates | lr | why | GFLOP | floor s | wall s | wall/floor | reference-rate wall s | "
             "peak MB | reference-rate peak MB |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s, x in d["settings"].items():
        search = x.get("search")
        head = f"| {s} | {x['candidates']} | {x['lr']:.3g} | {search['reason']} | " if search else f"| {s} | | | | "
        lines.append(head + f"{x['gflop']:.4g} | {x['floor_s']:.3g} | {x['wall_s']:.1f} | {x['floor_ratio']:.2f} | "
                            f"{ref[s]['wall_s']:.1f} | {x['peak_mem_mb']:.0f} | {ref[s]['peak_mem_mb']:.0f} |")
    lines.append(f"| **cell** | | | | {sum(x['gflop'] for x in d['settings'].values()):.4g} | {d['floor_s']:.1f} | "
                 f"{d['wall_s']:.1f} | **{d['floor_ratio']:.2f}** | {r['wall_s']:.1f} | | |")
    ok = "meets" if r["search_overhead"] <= TARGET_SEARCH_OVERHEAD else "misses"
    ok_f = "meets" if r["default_floor_ratio"] <= TARGET_DEFAULT_FLOOR_RATIO else "misses"
    ok_m = "meets" if r["search_mem_ratio"] <= TARGET_SEARCH_MEM else "misses"
    mem = ", ".join(f"{s} {m['ratio_above_start']:.2f}" for s, m in d["search_memory"].items())
    lines += [
        "",
        f"- search_overhead (default cell wall / reference-rate cell wall): {r['search_overhead']:.2f} ({ok} the "
        f"<= {TARGET_SEARCH_OVERHEAD:g}x target, set for 872 eval examples)",
        f"- default_floor_ratio (default cell wall / the floor of its work, search included): "
        f"{r['default_floor_ratio']:.2f} ({ok_f} the <= {TARGET_DEFAULT_FLOOR_RATIO:g}x target)",
        f"- memory of a searched setting above the level before the cells, over its one-candidate run's: {mem} "
        f"({ok_m} the <= {TARGET_SEARCH_MEM:g}x target)",
    ]
    for s, x in d["settings"].items():
        if x.get("search"):
            scores = ", ".join(f"{lr} {v:.4f}" for lr, v in (x["search"]["scores"] or {}).items())
            lines.append(f"- {s}: held-out log-prob per lr ({x['search']['held_out']} examples): {scores}")
    return lines


def environment_warnings(machine: dict) -> list[str]:
    """What in the recorded environment makes the timings unrepresentative."""
    out = []
    if (machine.get("env", {}).get("OMP_WAIT_POLICY") or "").upper() == "PASSIVE":
        out.append("OMP_WAIT_POLICY=PASSIVE: OpenMP threads sleep between the many small parallel regions "
                   "of a forward pass (on the project's 2-core CPU it made ZSL's eval 1.2x, LinGD's eval 1.5x and "
                   "GD's training steps 1.7x slower); unset it unless other jobs share the cores")
    return out
