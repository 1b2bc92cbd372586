"""Recording the attention ranking during a run (iclgd.ranking_record): both sides against a
direct computation, the identity case, the off switch, streaming, lockstep and LinGD, alignment.

"Direct": the ICL scores from a plain uncached forward of the whole ICL prompt with q and k
rebuilt by hand from the block inputs (q/k projections, rotary embedding, scaling), and the FT
scores from GD re-run step by step by hand (q before rotary from the block inputs at each step's
weights, then the SGD update), compared with what the run recorded to float32 tolerance.
"""

import json

import numpy as np
import pytest
import torch
from torch.func import functional_call

from iclgd import ranking, ranking_record
from iclgd.capture import has_capture_leftovers, math_mode
from iclgd.evaluate import EvalOptions, evaluate
from iclgd.experiment import RunConfig, prepare, run
from iclgd.plan import resolve_cell
from iclgd.processes import PROCESSES, ProcessConfig, TrainContext
from iclgd.processes.base import token_loss
from iclgd.prompts import Prompts, _natural_spans

from conftest import SHARED_DATA
from tiny import tiny_loaded

FAST = dict(task="sst2", seed=2, k=3, eval_cap=5, data_dir=str(SHARED_DATA), progress=False, lr=0.05)
ARRAYS = ("label_logprobs", "pred", "gold", "attn_out", "attn_logits", "q_len", "grad_norms", "losses")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: 2-layer steps, one thread


@pytest.fixture(scope="module")
def lm():
    return tiny_loaded("llama")


@pytest.fixture(scope="module")
def cell(lm):
    return run(RunConfig(settings=("zsl", "icl", "gd", "lcgd", "lingd"), **FAST), loaded=lm)


# ---------------------------------------------------------------- by hand (Llama: GQA, rotary)


def _llama_qk(model, params, ids: list[int]):
    """Per layer: q after rotary [head, pos, d_head], k after rotary [kv_head, pos, d_head] and q
    before rotary [pos, head * d_head], rebuilt from the block inputs of an uncached forward."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    x = torch.tensor([ids])
    inputs = []  # each block's input [1, pos, d_model] (not output_hidden_states: its hooks stay on the model)
    handles = [b.register_forward_pre_hook(lambda _m, a, k: inputs.append(a[0] if a else k["hidden_states"]),
                                           with_kwargs=True) for b in model.model.layers]
    try:
        functional_call(model, params or {}, (x,), {"use_cache": False}, strict=False)
    finally:
        for h in handles:
            h.remove()
    named = {**dict(model.named_parameters()), **(params or {})}
    pos = torch.arange(len(ids))[None]
    cos, sin = model.model.rotary_emb(inputs[0], pos)
    rows = []
    for i, block in enumerate(model.model.layers):
        attn, pre = block.self_attn, f"model.layers.{i}.self_attn."
        h = functional_call(block.input_layernorm, {}, (inputs[i],))  # [1, pos, d_model]
        q = h @ named[pre + "q_proj.weight"].T  # [1, pos, head * d_head]
        k = h @ named[pre + "k_proj.weight"].T
        qh = q.view(1, len(ids), -1, attn.head_dim).transpose(1, 2)
        kh = k.view(1, len(ids), -1, attn.head_dim).transpose(1, 2)
        qr, kr = apply_rotary_pos_emb(qh, kh, cos, sin)
        rows.append((qr[0], kr[0], q[0], attn.scaling))
    return rows


def _icl_by_hand(model, prompts, demo_pos, query) -> torch.Tensor:
    """ICL's scores [layer, demo_tok]: Σ_heads q·k·scaling, the whole prompt re-encoded."""
    ids = prompts.icl_prefix() + list(query)
    out = []
    for qr, kr, _, s in _llama_qk(model, None, ids):
        k = kr.repeat_interleave(qr.shape[0] // kr.shape[0], dim=0)  # [head, pos, d_head]
        out.append(torch.einsum("hd,htd->ht", qr[:, -1] * s, k[:, list(demo_pos)]).sum(0))
    return torch.stack(out)


def _gd_by_hand(model, seqs, lr):
    """GD step by step: q_train [layer, demo_tok, head * d_head] (start tokens dropped), params."""
    from iclgd.arch import trainable_params

    theta = {tp.name: dict(model.named_parameters())[tp.name].detach().clone() for tp in trainable_params(model, "kv")}
    qs = []
    for seq in seqs:
        qs.append(torch.stack([q[1:] for _, _, q, _ in _llama_qk(model, theta, list(seq))]).detach())
        p = {n: t.clone().requires_grad_(True) for n, t in theta.items()}
        ids = torch.tensor(seq)
        logits = functional_call(model, p, (ids[None],), {"use_cache": False}, strict=False).logits[0]
        grads = torch.autograd.grad(token_loss(logits, ids), list(p.values()))
        theta = {n: t - lr * g for (n, t), g in zip(theta.items(), grads)}
    return torch.cat(qs, dim=1), theta


def test_both_sides_equal_a_direct_computation(lm):
    cfg = RunConfig(settings=("zsl", "icl", "gd"), **FAST)
    cell = run(cfg, loaded=lm)
    prep = prepare(resolve_cell(cfg), lm)
    lay = ranking_record.layout(prep.prompts, prep.n_icl)
    assert not lay.undefined and len(lay.demo_pos) == sum(len(d) for d in prep.prompts.demos)
    model = lm.model
    with math_mode(model):
        icl = torch.stack([_icl_by_hand(model, prep.prompts, lay.demo_pos, q) for q in prep.prompts.queries])
        q_train, theta = _gd_by_hand(model, prep.train_seqs, FAST["lr"])
        q_test = torch.stack([torch.stack([q[-1] for _, _, q, _ in _llama_qk(model, theta, list(prep.prompts.bos) + list(q))])
                              for q in prep.prompts.queries])  # [example, layer, head * d_head]
    scaling = torch.tensor([r[3] for r in _llama_qk(model, None, [0, 1])])
    ft = torch.einsum("bld,ltd->blt", q_test, q_train) * scaling[None, :, None] ** 2

    # the recorded inputs: ICL's scores as its eval recorded them, and the whole record
    rec = evaluate(model, prep.prompts.queries, prep.gold, prep.prompts.label_ids, prefix=prep.prompts.icl_prefix(),
                   options=EvalOptions(progress=False, demo_pos=lay.demo_pos), pad_id=prep.pad_id)
    side = ranking_record.take_icl_side(rec, model)
    torch.testing.assert_close(side.scores(slice(None)), icl, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(side.scaling, scaling)
    assert side.seen.all()
    ctx = TrainContext(model, prep.train_seqs, ProcessConfig("gd", FAST["lr"]), progress=False, record_queries=True)
    torch.testing.assert_close(PROCESSES.get("gd")().train(ctx).queries, q_train, atol=1e-5, rtol=1e-4)

    want = ranking.ranking(icl, ft, lay.spans, seed=ranking_record.rank_seed(FAST["seed"]))
    for m, v in want.arrays().items():
        setting = "icl" if m.endswith("_random") else "gd"
        got = cell.records[setting].extras[ranking_record.record_name(m)]
        np.testing.assert_allclose(got.numpy(), v.numpy(), atol=1e-6, err_msg=m)
    entry = cell.results["gd"]["ranking"]
    assert entry["defined"] and entry["demo_tok"] == len(lay.demo_pos) and entry["demonstrations"] == 3
    assert entry["headline"]["tau_token"] == pytest.approx(want.headline("tau_token"), abs=1e-6)
    assert cell.results["icl"]["ranking"]["headline"]["tau_token_random"] == pytest.approx(
        want.headline("tau_token_random"), abs=1e-6)


def test_cached_and_uncached_icl_sides_agree(lm, cell):
    prep = prepare(resolve_cell(RunConfig(settings=("zsl", "icl"), **FAST)), lm)
    lay = ranking_record.layout(prep.prompts, prep.n_icl)
    sides = []
    for cache in (True, False):
        rec = evaluate(lm.model, prep.prompts.queries, prep.gold, prep.prompts.label_ids,
                       prefix=prep.prompts.icl_prefix(), pad_id=prep.pad_id,
                       options=EvalOptions(progress=False, cache_prefix=cache, batch_size=2, demo_pos=lay.demo_pos))
        sides.append(ranking_record.take_icl_side(rec, lm.model))
    torch.testing.assert_close(sides[0].scores(slice(None)), sides[1].scores(slice(None)), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- identity, off switch, streaming


def test_identical_sides_give_tau_and_recall_one():
    """FT's scores built equal to ICL's (one head, FT's queries = ICL's q and keys over the scaling)."""
    g = torch.Generator().manual_seed(0)
    n, n_layers, d = 4, 2, 8
    lay = ranking_record.Layout(tuple(range(1, 16)), ranking.spans_from_lengths([5, 3, 7]))
    scaling = torch.tensor([0.5, 0.25])
    q = torch.randn(n, n_layers, 1, d, generator=g)
    keys = torch.randn(n_layers, 1, 15, d, generator=g)
    side = ranking_record.IclSide(q, keys, torch.ones(n, n_layers, dtype=torch.bool), scaling)
    query = q[:, :, 0] / scaling[None, :, None]  # [example, layer, d]
    q_train = keys[:, 0] / scaling[:, None, None]  # [layer, demo_tok, d]
    torch.testing.assert_close(ranking_record.ft_scores(query, q_train, scaling), side.scores(slice(None)))
    res = ranking_record.rank(side, lay, 0, query=query, q_train=q_train, chunk=3)
    for m in ranking.METRICS:
        np.testing.assert_allclose(res.get(m).numpy(), 1.0, err_msg=m)


def test_off_switch_hooks_nothing_and_changes_nothing_else(lm, cell, tmp_path):
    off = run(RunConfig(settings=("zsl", "icl", "gd", "lcgd", "lingd"), ranking=False, **FAST), loaded=lm,
              out=tmp_path / "off")
    assert not has_capture_leftovers(lm.model)
    for s, rec in off.records.items():
        assert "ranking" not in off.results[s]
        assert not [k for k in rec.arrays() if k.startswith(ranking_record.PREFIX)]
        on = cell.records[s].arrays()
        for k, v in rec.arrays().items():
            np.testing.assert_array_equal(v, on[k], err_msg=f"{s} {k}")
        assert sorted(k for k in on if not k.startswith(ranking_record.PREFIX)) == sorted(rec.arrays())
        assert off.results[s]["accuracy"] == cell.results[s]["accuracy"]
    from iclgd.plan import Plan

    described = [Plan("run", (resolve_cell(RunConfig(settings=("zsl", "icl", "gd"), ranking=r, **FAST)),)).describe()
                 for r in (True, False)]
    assert "· ranking on ·" in described[0] and "· ranking off ·" in described[1]
    config = json.loads((tmp_path / "off" / "config.json").read_text())
    assert config["decisive"]["ranking"] is False and cell.config["decisive"]["ranking"] is True
    with np.load(tmp_path / "off" / "records" / "gd.npz") as z:
        assert not [k for k in z.files if k.startswith(ranking_record.PREFIX)]


def test_every_process_and_icl_store_their_part(cell):
    for s in ("gd", "lcgd", "lingd"):
        names = {k for k in cell.records[s].extras if k.startswith(ranking_record.PREFIX)}
        assert names == {ranking_record.record_name(m) for m in ranking.METRICS + ranking.SHUFFLED}
        assert all(cell.records[s].extras[n].shape == (5, 2) for n in names)
        assert "query" not in cell.records[s].extras  # q_test is not stored
    names = {k for k in cell.records["icl"].extras if k.startswith(ranking_record.PREFIX)}
    assert names == {ranking_record.record_name(m) for m in ranking.RANDOM}
    assert not set(ranking_record.ICL_KEYS) & set(cell.records["icl"].extras)
    assert "ranking" not in cell.results["zsl"]


def test_results_do_not_depend_on_the_eval_batch_size(lm, cell):
    """Batch size 2 instead of 16: the model's forward rounds differently in another batch
    composition, which can swap one pair of near-tied scores (τ moves by ~1e-4, a recall by one
    item); nothing else may differ. Streaming itself is exact (next test)."""
    other = run(RunConfig(settings=("zsl", "icl", "gd", "lcgd", "lingd"), batch_size=2, **FAST), loaded=lm)
    for s in ("icl", "gd", "lcgd", "lingd"):
        k_tok = cell.results[s]["ranking"]["k_token"]
        for k, v in cell.records[s].extras.items():
            if k.startswith(ranking_record.PREFIX):
                atol = 1.01 / k_tok if "recall_token" in k else 1e-3
                np.testing.assert_allclose(other.records[s].extras[k].numpy(), v.numpy(), atol=atol, err_msg=f"{s} {k}")


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_icl_scores_sum_each_head_against_its_kv_group(softcap):
    """IclSide.scores = Σ_heads softcap(q_h · k_kv(h)), head h reading kv head h // group (as
    transformers' repeat_kv), computed here with the keys expanded to every head."""
    g = torch.Generator().manual_seed(0)
    q, keys = torch.randn(5, 3, 6, 4, generator=g), torch.randn(3, 2, 7, 4, generator=g)  # 6 heads, 2 kv heads
    side = ranking_record.IclSide(q, keys, torch.ones(5, 3, dtype=torch.bool), torch.ones(3), softcap)
    s = torch.einsum("blhd,lhtd->blht", q, keys.repeat_interleave(3, dim=1))
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    torch.testing.assert_close(side.scores(slice(1, 4)), s.sum(2)[1:4])


def test_streaming_chunks_give_the_same_arrays():
    g = torch.Generator().manual_seed(1)
    side = ranking_record.IclSide(torch.randn(7, 2, 2, 4, generator=g), torch.randn(2, 1, 9, 4, generator=g),
                                  torch.ones(7, 2, dtype=torch.bool), torch.tensor([0.5, 0.5]))
    lay = ranking_record.Layout(tuple(range(9)), ranking.spans_from_lengths([4, 5]))
    query, q_train = torch.randn(7, 2, 8, generator=g), torch.randn(2, 9, 8, generator=g)
    whole = ranking_record.rank(side, lay, 3, query=query, q_train=q_train, chunk=7)
    for chunk in (1, 3):
        part = ranking_record.rank(side, lay, 3, query=query, q_train=q_train, chunk=chunk)
        for m, v in whole.arrays().items():
            np.testing.assert_array_equal(part.get(m).numpy(), v.numpy(), err_msg=m)


# ---------------------------------------------------------------- lockstep, the search, LinGD


@pytest.mark.parametrize("name", ["gd", "lcgd", "lingd"])
def test_each_lockstep_candidate_records_its_own_q_train(lm, name):
    prep = prepare(resolve_cell(RunConfig(settings=("zsl", "icl", name), **FAST)), lm)
    proc = PROCESSES.get(name)()
    ctx = TrainContext(lm.model, prep.train_seqs, ProcessConfig(name, 0.05), progress=False, record_queries=True)
    lrs = [0.02, 0.05, 0.2]
    many = proc.train_many(ctx, lrs)
    for lr, got in zip(lrs, many):
        one = proc.train(TrainContext(lm.model, prep.train_seqs, ProcessConfig(name, lr), progress=False,
                                      record_queries=True))
        assert got.queries.shape == one.queries.shape == (2, sum(len(s) - 1 for s in prep.train_seqs), 32)
        torch.testing.assert_close(got.queries, one.queries, atol=1e-5, rtol=1e-4)
    # a later step's queries see the earlier steps' updates; the first sequence's do not
    n0 = len(prep.train_seqs[0]) - 1
    torch.testing.assert_close(many[0].queries[:, :n0], many[2].queries[:, :n0])
    assert not torch.allclose(many[0].queries[1, n0:], many[2].queries[1, n0:])
    plain = proc.train(TrainContext(lm.model, prep.train_seqs, ProcessConfig(name, 0.05), progress=False))
    assert plain.queries is None


def test_the_search_keeps_the_winners_q_train(lm):
    from iclgd.lrsearch import choose_lr
    from iclgd.protocols import Protocol

    proto = Protocol(name="t", lr_grid=(1 / 3, 1.0, 3.0), lr_search_n=8, lr_extend=0)
    plan = resolve_cell(RunConfig(settings=("zsl", "icl", "gd"), protocol=proto, **{**FAST, "lr": None}))
    prep = prepare(plan, lm)
    choice = choose_lr(plan.setting("gd"), prep, lm, record_queries=True)
    one = PROCESSES.get("gd")().train(TrainContext(lm.model, prep.train_seqs, ProcessConfig("gd", choice.lr),
                                                   progress=False, record_queries=True))
    torch.testing.assert_close(choice.trained.queries, one.queries, atol=1e-5, rtol=1e-4)


def test_lingd_q_train_is_the_linearized_models_query(lm):
    """Sequence 2's q_train = q(θ0) + J_q(θ0)·Δ1, Δ1 the update of step 1 (torch.func.jvp by hand)."""
    prep = prepare(resolve_cell(RunConfig(settings=("zsl", "icl", "lingd"), **FAST)), lm)
    model, seqs, lr = lm.model, prep.train_seqs[:2], 0.5
    lingd = PROCESSES.get("lingd")()
    two = lingd.train(TrainContext(model, seqs, ProcessConfig("lingd", lr), progress=False, record_queries=True))
    step1 = lingd.train(TrainContext(model, seqs[:1], ProcessConfig("lingd", lr), progress=False))
    theta0 = {n: dict(model.named_parameters())[n].detach() for n in step1.delta}

    def q_of(p):
        return torch.stack([q[1:] for _, _, q, _ in _llama_qk(model, p, list(seqs[1]))])

    with math_mode(model):
        primal, tangent = torch.func.jvp(q_of, (theta0,), (step1.delta,))
    n0 = len(seqs[0]) - 1
    torch.testing.assert_close(two.queries[:, n0:], primal + tangent, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(two.queries[:, n0:], primal, atol=1e-4)  # the tangent counts


# ---------------------------------------------------------------- alignment, undefined cells, families


def test_natural_and_piecewise_spans_hold_the_training_tokens(lm):
    for tok in ("natural", "piecewise"):
        prep = prepare(resolve_cell(RunConfig(settings=("zsl", "icl"), icl_tokenization=tok, **FAST)), lm)
        prefix = prep.prompts.icl_prefix()
        assert [tuple(prefix[a:b]) for a, b in prep.prompts.demo_spans] == list(prep.prompts.demos)
        assert [tuple(s[1:]) for s in prep.train_seqs] == list(prep.prompts.demos)


class _MergingTokenizer:
    """Splits on characters, but merges a demonstration's last character with the separator."""

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        ids, offsets, i = [], [], 0
        while i < len(text):
            j = i + 2 if text[i:i + 2] == "e\n" else i + 1
            ids.append(ord(text[i]) if j == i + 1 else 1000)
            offsets.append((i, j))
            i = j
        return {"input_ids": ids, "offset_mapping": offsets}

    def convert_ids_to_tokens(self, i):
        return "e\\n" if i == 1000 else chr(i)


def test_a_merged_boundary_makes_the_spans_undefined_with_a_reason():
    tok = _MergingTokenizer()
    texts, sep = ["ab", "cd"], "\n"
    demos = [tuple(map(ord, t)) for t in texts]
    spans, note = _natural_spans(tok, 1, texts, demos, sep, (0, *tok("ab\ncd\n")["input_ids"]), "")
    assert spans == ((1, 3), (4, 6)) and note == ""
    texts = ["ae", "cd"]
    demos = [tuple(map(ord, t)) for t in texts]
    spans, note = _natural_spans(tok, 1, texts, demos, sep, (0, *tok("ae\ncd\n")["input_ids"]), "")
    assert spans is None and "demonstration 0" in note and "cross it" in note


class _TrailingTokenizer:
    """Splits on characters, except a "\n\n" that ends the text is one token (SmolLM2's BPE: a
    final "\n\n" is one token alone, two before a word)."""

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        ids, offsets, i = [], [], 0
        while i < len(text):
            j = i + 2 if text[i:] == "\n\n" else i + 1
            ids.append(2000 if j == i + 2 else ord(text[i]))
            offsets.append((i, j))
            i = j
        return {"input_ids": ids, "offset_mapping": offsets}


def test_spans_are_read_off_the_text_the_prefix_came_from():
    """The natural prefix is read off prefix text + a query, where the last separator is two
    tokens; the prefix text alone ends in one. The spans must come from the former (they were
    undefined on every SmolLM2 cell when read off the latter)."""
    tok = _TrailingTokenizer()
    texts, sep = ["ab", "cd"], "\n\n"
    demos = [tuple(map(ord, t)) for t in texts]
    prefix = (0, *tok("ab\n\ncd\n\nq")["input_ids"][:-1])
    assert tok("ab\n\ncd\n\n")["input_ids"][-1] == 2000 and prefix[-1] == ord("\n")
    spans, note = _natural_spans(tok, 1, texts, demos, sep, prefix, "q")
    assert spans == ((1, 3), (5, 7)) and note == ""


def test_an_undefined_layout_is_reported_not_computed(lm):
    prep = prepare(resolve_cell(RunConfig(settings=("zsl", "icl"), **FAST)), lm)
    broken = Prompts(**{**prep.prompts.__dict__, "demo_spans": None, "spans_note": "merged (test)"})
    rank = ranking_record.CellRanking(broken, prep.n_icl, 2, 4)
    assert rank.eval_options("icl") == {} and rank.eval_options("process") == {}
    assert rank.after_icl(None, lm.model) == {"defined": False, "reason": "merged (test)"}
    short = ranking_record.layout(prep.prompts, prep.n_icl - 1)
    assert "ICL saw 2 of the 3" in short.undefined


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "gemma3", "gpt_neo", "xglm"])
def test_every_family_records_and_sliding_layers_are_left_out(family):
    lm = tiny_loaded(family)
    cell = run(RunConfig(settings=("zsl", "icl", "gd"), **{**FAST, "eval_cap": 3}), loaded=lm)
    entry = cell.results["gd"]["ranking"]
    assert entry["defined"]
    tau = cell.records["gd"].extras["ranking_tau_token"]  # [example, layer]
    local = {"gemma3": 0, "gpt_neo": 1}.get(family)  # a layer whose window (8) is shorter than the prompt
    if local is not None:
        assert entry["layers_without_values"] == [local] and torch.isnan(tau[:, local]).all()
        assert torch.isfinite(tau[:, 1 - local]).all()
    else:
        assert "layers_without_values" not in entry and torch.isfinite(tau).all()
    assert not has_capture_leftovers(lm.model)


# ---------------------------------------------------------------- into the report


def test_reproduce_reports_the_ranking_beside_its_baselines(tmp_path, monkeypatch):
    """The issue's command on the tiny model (k 2 and 4: its context is 512 tokens): 2 seeds, 2
    orders, GD and LCGD at the reference rate; the summary shows Kendall τ and top-k recall at both levels beside random
    (and shuffled), with intervals, per cell, over k, and in the claims."""
    from iclgd import cli, sweep

    monkeypatch.setattr(sweep, "_load", lambda cfg, factory: tiny_loaded("llama"))
    argv = ["reproduce", "--model", "tiny-llama", "--tasks", "sst2", "--seeds", "2,3", "--k", "2,4", "--orders", "2",
            "--eval-cap", "8", "--settings", "zsl,icl,gd,lcgd", "--lr-source", "reference",
            "--data-dir", str(SHARED_DATA), "--out", str(tmp_path), "--quiet"]
    assert cli.main(argv) == 0
    summary = (tmp_path / "report" / "summary.md").read_text()
    for part in ("### Attention ranking of the demonstration tokens", "### Attention ranking of the demonstrations",
                 "| gd: Kendall τ | gd: top-k recall |", "lcgd: Kendall τ, shuffled", "random: Kendall τ",
                 "random: top-k recall", "Attention ranking of the demonstration tokens, ICL vs P (Dai et al.)",
                 "in the tables 'Attention ranking", "Kendall τ, token level: GD − random",
                 "Kendall τ, example level: LCGD − shuffled"):
        assert part in summary, part
    tables = tmp_path / "report" / "tables"
    assert {"ranking_token.md", "ranking_example.csv", "ksweep_ranking_token.md"} <= {p.name for p in tables.iterdir()}
    import csv

    with (tables / "ranking_token.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["task"] == "sst2" and r["control"] == "trained"]
    cols = {r["column"] for r in rows}
    assert {"gd: Kendall τ", "gd: top-k recall", "lcgd: Kendall τ", "random: Kendall τ"} <= cols
    for r in rows:  # two seeds: a t interval around each mean
        assert int(r["n"]) == 2 and float(r["low"]) <= float(r["mean"]) <= float(r["high"]), r
    # each cell's entry equals the mean of the records it was built from
    run_dir = tmp_path / "runs" / "tiny-llama" / "default" / "sst2_s2_k2"
    with np.load(run_dir / "records" / "gd.npz") as z:
        tau = z["ranking_tau_token"]
    with (tables / "ranking_token_cells.csv").open() as f:
        cell_row = next(r for r in csv.DictReader(f) if (r["seed"], r["k"], r["column"], r["control"])
                        == ("2", "2", "gd: Kendall τ", "trained"))
    assert float(cell_row["estimate"]) == pytest.approx(float(tau.mean()), abs=1e-6)
    assert float(cell_row["low"]) <= float(cell_row["estimate"]) <= float(cell_row["high"])


def test_ranking_cost_bench_runs_on_a_tiny_model(tmp_path):
    """bench/ranking_cost.py end to end on a tiny model saved as a folder (the lead runs it on SmolLM2)."""
    import importlib.util
    from pathlib import Path

    from tiny import tiny_model
    from tiny_tokenizer import tiny_tokenizer

    folder = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    path = Path(__file__).parents[1] / "bench" / "ranking_cost.py"
    spec = importlib.util.spec_from_file_location("ranking_cost", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "cost.json"
    assert bench.main(["--model", str(folder), "--k", "2", "--eval-cap", "4", "--data-dir", str(SHARED_DATA),
                       "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["ranking"] for r in result["runs"]] == [True, False]
    assert result["compare_best"]["wall_ratio"] > 0 and set(result["runs"][0]["settings"]) == set(bench.SETTINGS.split(","))
