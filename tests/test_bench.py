"""The bench's FLOP counter against a hand count, its floor's monotonicity, and a tiny end-to-end bench."""

import json
import math

import pytest
import torch
import transformers as tf

from iclgd import processes
from iclgd.bench import bench, best_of, markdown
from iclgd.errors import IclgdError
from iclgd.experiment import RunConfig
from iclgd.flops import (
    CellTokens,
    ModelDims,
    attn_flops,
    backward_flops,
    forward_flops,
    setting_flops,
)

from conftest import SHARED_DATA
from tiny import tiny_loaded

D, H, KV, DH, M, V = 48, 4, 2, 12, 80, 300
REQUIRED = ("matmul_flops", "floor_s", "wall_s", "floor_ratio", "icl_cache_speedup", "peak_mem_mb",
            "eval_flops_fraction")


@pytest.fixture(scope="module")
def one_layer():
    cfg = tf.LlamaConfig(hidden_size=D, intermediate_size=M, num_hidden_layers=1, num_attention_heads=H,
                         num_key_value_heads=KV, head_dim=DH, vocab_size=V, tie_word_embeddings=True)
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


def test_model_dims_match_a_hand_count(one_layer):
    dims = ModelDims.of(one_layer)
    q, k, v, o = D * H * DH, D * KV * DH, D * KV * DH, H * DH * D
    mlp = 3 * D * M  # gate, up, down
    assert dims.linear_params == q + k + v + o + mlp
    assert dims.kv_params == k + v
    assert (dims.n_layers, dims.d_model, dims.n_heads, dims.d_head, dims.vocab) == (1, D, H, DH, V)


def test_forward_flops_match_a_hand_count(one_layer):
    dims = ModelDims.of(one_layer)
    params = D * H * DH * 2 + 2 * D * KV * DH + 3 * D * M
    t, p = 5, 3
    full = 2 * t * params + 2 * 2 * t * (p + t) * H * DH + 2 * D * V
    assert forward_flops(dims, t, p, logits=1, causal=False) == full
    # causal: token i of the chunk sees the p cached keys and i + 1 of its own
    pairs = sum(p + i + 1 for i in range(t))
    assert attn_flops(dims, t, p) == 4 * pairs * H * DH
    assert forward_flops(dims, t, p, logits=t) == 2 * t * params + 4 * pairs * H * DH + 2 * t * D * V
    # backward: 1x every weight's activation gradient, +1x the k/v weight gradients, 2x attention
    kv = 2 * D * KV * DH
    assert backward_flops(dims, t, logits=t) == 2 * t * (params + kv) + 2 * attn_flops(dims, t) + 2 * t * D * V


def test_flops_agree_with_torchs_counter(one_layer):
    """Forward: exactly torch's count of the model's matmuls (eager attention computes all t·t
    pairs, so the non-causal count). Backward to k/v: torch skips gradients nothing needs, so
    our count is an upper bound of its count and no more than the forward-based 2x rule."""
    from torch.utils.flop_counter import FlopCounterMode

    model = tf.AutoModelForCausalLM.from_config(one_layer.config, attn_implementation="eager").eval()
    dims, t = ModelDims.of(model), 7
    ids = torch.randint(0, V, (1, t))
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(ids, use_cache=False, logits_to_keep=1)
    assert fc.get_total_flops() == forward_flops(dims, t, causal=False)

    model.requires_grad_(False)
    for proj in (model.model.layers[0].self_attn.k_proj, model.model.layers[0].self_attn.v_proj):
        proj.weight.requires_grad_(True)
    logits = model(ids, use_cache=False).logits
    with FlopCounterMode(display=False) as fc:
        logits.sum().backward()
    ours = backward_flops(dims, t, logits=t, causal=False)
    assert 0 < fc.get_total_flops() <= ours <= 2 * forward_flops(dims, t, logits=t, causal=False)


def _tokens(n_eval: int, k: int) -> CellTokens:
    queries = tuple(10 + i % 7 for i in range(n_eval))
    trains = tuple(14 + i % 5 for i in range(k))
    return CellTokens(query_lens=queries, bos=1, icl_prefix=1 + sum(t - 1 + 1 for t in trains), train_lens=trains)


@pytest.mark.parametrize("name", ["zsl", "icl", "gd", "lcgd", "lingd"])
def test_floor_is_monotonic_in_n_and_k(one_layer, name):
    dims = ModelDims.of(one_layer)

    def total(n, k):
        f = setting_flops(dims, _tokens(n, k), name)
        return f["train"] + f["eval"]

    assert total(8, 4) < total(16, 4) < total(32, 4)
    if name in ("zsl",):
        assert total(8, 4) == total(8, 8)  # ZSL never sees the demonstrations
    else:
        assert total(8, 4) < total(8, 8) < total(8, 16)


def test_lingd_floor_exceeds_gd_and_lcgd_pays_for_exits(one_layer):
    dims = ModelDims.of(one_layer)
    tok = _tokens(8, 4)
    gd, lin, lc = (setting_flops(dims, tok, n) for n in ("gd", "lingd", "lcgd"))
    assert lin["train"] > gd["train"] and lin["eval"] > gd["eval"]
    assert lc["eval"] == gd["eval"]


def test_search_floor_of_one_candidate_is_the_plain_floor_and_lingd_shares_its_primal(one_layer):
    dims, tok = ModelDims.of(one_layer), _tokens(5, 3)
    for name in ("gd", "lcgd", "lingd"):
        proc = processes.PROCESSES.get(name)()
        assert proc.train_flops_many(dims, 20, 1) == proc.train_flops(dims, 20)
        assert proc.eval_flops_many(dims, tok, 1) == proc.eval_flops(dims, tok)
        if name != "lingd":
            assert proc.train_flops_many(dims, 20, 3) == 3 * proc.train_flops(dims, 20)
    lin = processes.PROCESSES.get("lingd")()
    primal = forward_flops(dims, 20, logits=20)
    assert lin.train_flops_many(dims, 20, 3) == primal + 3 * (lin.train_flops(dims, 20) - primal)
    searched = setting_flops(dims, tok, "gd", 3, held_out=tok)
    plain = setting_flops(dims, tok, "gd")
    assert searched["train"] == 3 * plain["train"] and searched["eval"] == plain["eval"]
    assert searched["search"] == 3 * plain["eval"] and plain["search"] == 0


def test_a_process_without_a_flop_model_says_so(one_layer):
    class NoFloor(processes.Process):
        name = "nofloor"

    with pytest.raises(NotImplementedError, match="no FLOP model"):
        NoFloor().train_flops(ModelDims.of(one_layer), 8)


def test_bench_end_to_end_on_a_tiny_model(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")  # recorded, and named in the table
    cfg = RunConfig(task="sst2", seed=2, k=2, eval_cap=4, data_dir=str(SHARED_DATA), progress=False,
                    settings=("zsl", "icl", "gd", "lcgd", "lingd"))
    result = bench(cfg, loaded=tiny_loaded("llama"), out=tmp_path, matmul_n=256, matmul_reps=2, cache_n=4)
    data = json.loads((tmp_path / "bench.json").read_text())
    assert (tmp_path / "bench.md").read_text().startswith("# iclgd bench")
    for key in REQUIRED:
        assert key in data
    assert set(data["peak_mem_mb"]) == {"zsl", "icl", "gd", "lcgd", "lingd"}
    numbers = [data[k] for k in REQUIRED if k != "peak_mem_mb"] + list(data["peak_mem_mb"].values())
    assert all(math.isfinite(x) and x > 0 for x in numbers)
    assert data["icl_cache"]["predictions_match"]
    for s, row in data["settings"].items():  # train/eval split read from the run's own timing
        assert row["train_s"] + row["eval_s"] == pytest.approx(row["wall_s"])
        assert (row["train_s"] > 0) == (s not in ("zsl", "icl"))
    assert data["tokens"]["n_eval"] == 4 and data["tokens"]["k"] == 2
    assert result["floor_s"] == pytest.approx(sum(s["floor_s"] for s in data["settings"].values()))
    probes = [p["best"] for p in data["matmul"]["probes"]]
    assert [p["before"] for p in data["matmul"]["probes"]] == [*data["settings"], "end"]
    for i, row in enumerate(data["settings"].values()):  # each setting against the probes around it
        assert row["matmul_flops"] == max(probes[i], probes[i + 1])
        assert row["floor_s"] == pytest.approx(row["gflop"] * 1e9 / row["matmul_flops"])
    assert data["matmul_flops"] == max(probes)
    assert data["floor_ratio_at_run_peak"] >= data["floor_ratio"] * (1 - 1e-12)
    assert "warning: OMP_WAIT_POLICY=PASSIVE" in result["table"]
    data["machine"]["env"]["OMP_WAIT_POLICY"] = None
    assert "warning" not in markdown(data)

    # the default protocol's cell: its search against the reference-rate cell, in the same run
    d = data["default"]
    assert data["search_overhead"] == pytest.approx(d["wall_s"] / data["wall_s"])
    assert data["default_floor_ratio"] == pytest.approx(d["wall_s"] / d["floor_s"])
    assert set(d["search_memory"]) == {"gd", "lcgd", "lingd"} and data["search_mem_ratio"] > 0
    assert "search_overhead" in result["table"] and "default_floor_ratio" in result["table"]
    dims, tok = ModelDims(**data["model_dims"]), data["tokens"]
    for s in ("gd", "lcgd", "lingd"):
        row, ref = d["settings"][s], data["settings"][s]
        n = row["candidates"]
        assert n == len(row["search"]["scores"]) >= 3 and row["search"]["held_out"] == 32
        # the floor holds every candidate's training and held-out scoring: more than one training
        assert row["gflop"] > ref["gflop"] and row["search_gflop"] > 0
        one_train, train = ref["gflop"] - ref["eval_gflop"], row["gflop"] - row["search_gflop"] - row["eval_gflop"]
        if s == "lingd":  # the candidates share the primal: less than n trainings, more than one
            assert one_train < train < n * one_train
        else:
            assert train == pytest.approx(n * one_train)
    for s in ("zsl", "icl"):  # not searched: the same work as in the reference-rate cell
        assert d["settings"][s]["gflop"] == pytest.approx(data["settings"][s]["gflop"])
    assert dims.n_layers == 2 and tok["k"] == 2


def test_best_of_takes_each_settings_fastest_wall_against_the_best_peak():
    row = dict(gflop=10.0, eval_gflop=8.0, accuracy=0.5)
    runs = [{"zsl": {**row, "wall_s": 4.0, "matmul_flops": 5e9, "train_s": 0.0, "eval_s": 4.0, "peak_mem_mb": 100},
             "gd": {**row, "wall_s": 6.0, "matmul_flops": 4e9, "train_s": 1.0, "eval_s": 5.0, "peak_mem_mb": 300}},
            {"zsl": {**row, "wall_s": 5.0, "matmul_flops": 8e9, "train_s": 0.0, "eval_s": 5.0, "peak_mem_mb": 200},
             "gd": {**row, "wall_s": 3.0, "matmul_flops": 2e9, "train_s": 0.5, "eval_s": 2.5, "peak_mem_mb": 250}}]
    best = best_of(runs)
    assert best["zsl"]["wall_s"] == 4.0 and best["zsl"]["matmul_flops"] == 8e9  # fastest wall, strictest floor
    assert best["zsl"]["floor_ratio"] == pytest.approx(4.0 / (10e9 / 8e9))
    assert best["gd"]["wall_s"] == 3.0 and best["gd"]["train_s"] == 0.5 and best["gd"]["matmul_flops"] == 4e9
    assert best["zsl"]["peak_mem_mb"] == 100 and best["gd"]["peak_mem_mb"] == 300  # the first run's memory


def test_bench_repeats_report_every_run_and_the_best(tmp_path):
    cfg = RunConfig(task="sst2", seed=2, k=2, eval_cap=4, data_dir=str(SHARED_DATA), progress=False,
                    settings=("zsl", "gd"))
    result = bench(cfg, loaded=tiny_loaded("llama"), out=tmp_path, matmul_n=128, matmul_reps=1, cache_n=2, repeat=2)
    assert result["repeat"] == 2 and len(result["repeats"]) == 2
    assert [p["repeat"] for p in result["matmul"]["probes"]] == [0, 0, 0, 1, 1, 1]
    for s, row in result["settings"].items():
        assert row["wall_s"] == min(r["settings"][s]["wall_s"] for r in result["repeats"])
        assert row["floor_s"] <= min(r["settings"][s]["floor_s"] for r in result["repeats"]) + 1e-12
    assert "best of 2 repeats" in (tmp_path / "bench.md").read_text()
    with pytest.raises(IclgdError, match="repeat"):
        bench(cfg, loaded=tiny_loaded("llama"), repeat=0)


def test_bench_without_a_search_runs_the_reference_rate_cell_only(tmp_path):
    cfg = RunConfig(task="sst2", seed=2, k=2, eval_cap=2, data_dir=str(SHARED_DATA), progress=False,
                    settings=("zsl", "gd"), lr_source="reference")
    result = bench(cfg, loaded=tiny_loaded("llama"), out=tmp_path, matmul_n=64, matmul_reps=1, cache_n=2)
    assert "search_overhead" not in result and "default" not in result
    assert "default protocol" not in result["table"] and result["floor_ratio"] > 0
