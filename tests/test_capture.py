"""Capture and evaluation against references: the model's own attention, manual recomputation,
full re-encoding, and ZSL itself."""

import pytest
import torch
from torch.func import jvp

from iclgd import arch
from iclgd import attention as attention_mod
from iclgd.attention import (
    _prefix_attention_flash,
    _prefix_attention_scores,
    math_attention,
    prefix_attention,
)
from iclgd.capture import Plan, capture, has_capture_leftovers, use_iclgd_attention
from iclgd.errors import IclgdError
from iclgd.evaluate import EvalOptions, evaluate, pad_right, run_captured

from tiny import FAMILIES, tiny_model

SEQS = [[5, 9, 13, 7, 22, 31, 6, 44, 19, 3, 8, 27], [8, 3, 40], [17, 4, 4, 9, 50]]  # ragged; longer than the tiny Gemma window (8)
LABELS = [11, 12]


def _plan(seqs, own_start=0):
    own_len = torch.tensor([len(s) - own_start for s in seqs])
    return Plan(own_start=torch.full((len(seqs),), own_start), own_len=own_len,
                pred_pos=own_start + own_len - 1, full_rows=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_softmax_of_captured_rows_equals_model_attention(family):
    """softmax over all keys of the captured score row == the model's output_attentions row."""
    model = tiny_model(family)
    use_iclgd_attention(model)
    ids, mask = pad_right(SEQS, 0)
    plan = _plan(SEQS)
    with torch.no_grad(), capture(model, plan) as cap:
        model(ids, attention_mask=mask, logits_to_keep=1)
    ref = tiny_model(family)
    ref.set_attn_implementation("eager")
    with torch.no_grad():
        attn = ref(ids, attention_mask=mask, output_attentions=True).attentions  # layer x [b, h, q, k]
    b = torch.arange(len(SEQS))
    for layer, probs in enumerate(attn):
        want = probs[b, :, plan.record_pos]  # [batch, head, k_pos]
        got = torch.softmax(cap.full_rows[layer], dim=-1)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        # The recorded own-token logits are the same scores, NaN past each query's length.
        own = cap.attn_logits[layer]
        for i, s in enumerate(SEQS):
            row = cap.full_rows[layer][i, :, : len(s)]  # keys a sliding window hides are NaN
            torch.testing.assert_close(own[i, :, : len(s)], row.masked_fill(row.isinf(), float("nan")), equal_nan=True)
            assert torch.isnan(own[i, :, len(s):]).all()
    assert not has_capture_leftovers(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_leaves_the_models_outputs_unchanged(family):
    """Captured attention outputs and logits == an uncaptured eager forward of the same model
    (read by plain hooks): capturing does not change what the model computes, including where
    the capture runs its own attention forward (XGLM)."""
    model = tiny_model(family)
    ids, mask = pad_right(SEQS, 2)
    plan = _plan(SEQS)
    b = torch.arange(len(SEQS))
    outs, handles = {}, []
    for layer, mod in enumerate(arch.attention_modules(model)):
        handles.append(mod.register_forward_hook(lambda m, a, o, layer=layer: outs.__setitem__(layer, o[0])))
    try:
        with torch.no_grad():
            logits = model(ids, attention_mask=mask).logits[b, plan.pred_pos]  # [batch, vocab]
    finally:
        for h in handles:
            h.remove()
    use_iclgd_attention(model)
    with torch.no_grad(), capture(model, plan) as cap:
        model(ids, attention_mask=mask, logits_to_keep=1)
    for layer in range(2):
        torch.testing.assert_close(cap.attn_out[layer], outs[layer][b, plan.record_pos], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cap.logits, logits, atol=1e-4, rtol=1e-4)
    assert not has_capture_leftovers(model)


def test_xglm_capture_refuses_a_model_without_eager_masks():
    """XGLM's inline attention adds the mask it is given and nothing else: under sdpa's mask
    function a batch without padding gets no mask and the model is silently bidirectional."""
    model = tiny_model("xglm")
    ids = torch.tensor([SEQS[0]])
    with torch.no_grad():
        causal = model(ids).logits
        model.config._attn_implementation = "sdpa"  # what set_attn_implementation refuses to do
        assert not torch.allclose(model(ids).logits[0, 0], causal[0, 0])  # the hazard is real
        with pytest.raises(IclgdError, match="eager"), capture(model, _plan([SEQS[0]])):
            model(ids)
    assert not has_capture_leftovers(model)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "opt", "xglm"])
def test_attention_output_equals_manual_recomputation(family):
    """attn_out at the recording position == o_proj(softmax(scores) @ V), V from the v projection."""
    model = tiny_model(family)
    use_iclgd_attention(model)
    spec = arch.arch_spec(model)
    n_heads, n_kv, d_head = arch.attn_shape(model)
    values, handles = {}, []
    for layer, mod in enumerate(arch.attention_modules(model)):
        v_mod = mod.get_submodule(spec.v)
        handles.append(v_mod.register_forward_hook(lambda m, a, o, layer=layer: values.__setitem__(layer, o)))
    ids, mask = pad_right(SEQS, 0)
    plan = _plan(SEQS)
    with torch.no_grad(), capture(model, plan) as cap:
        model(ids, attention_mask=mask, logits_to_keep=1)
    for h in handles:
        h.remove()
    b = torch.arange(len(SEQS))
    for layer, mod in enumerate(arch.attention_modules(model)):
        v = values[layer].view(len(SEQS), ids.shape[1], n_kv, d_head).transpose(1, 2)  # [b, kv, k, d]
        v = v.repeat_interleave(n_heads // n_kv, dim=1)
        probs = torch.softmax(cap.full_rows[layer], -1)  # [b, h, k]
        mixed = torch.einsum("bhk,bhkd->bhd", probs, v).reshape(len(SEQS), n_heads * d_head)
        want = mod.get_submodule(spec.o)(mixed)
        torch.testing.assert_close(cap.attn_out[layer], want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cap.attn_out[0][b * 0], cap.attn_out[0][b * 0])  # shape sanity


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_prefix_equals_full_reencoding(family):
    model = tiny_model(family)
    prefix = [0, 21, 22, 23, 1, 24, 25, 26, 27, 1]
    queries = [[5, 9, 13, 7], [8, 3], [17, 4, 4, 9, 50]]
    kw = dict(prefix=prefix, options=EvalOptions(batch_size=2, progress=False))
    fast = evaluate(model, queries, [0, 1, 0], LABELS, **kw)
    slow = evaluate(model, queries, [0, 1, 0], LABELS, prefix=prefix,
                    options=EvalOptions(batch_size=2, cache_prefix=False, progress=False))
    for key in ("label_logprobs", "attn_out", "attn_logits"):
        torch.testing.assert_close(getattr(fast, key), getattr(slow, key), atol=1e-5, rtol=1e-4, equal_nan=True)
    assert torch.equal(fast.pred, slow.pred)
    assert not has_capture_leftovers(model)


# (mask kind, a sliding window hides part of the prefix, softcap, kernel). The fused kernel runs
# only where every query sees the whole prefix, without softcapping; a window comes with a mask.
PREFIX_CASES = [(m, w, c, k) for m in ("none", "bool", "additive") for w in (False, True) for c in (None, 5.0)
                for k in ("dispatch", "scores", "flash")
                if not (m == "none" and w) and not (k == "flash" and (w or c is not None))]


@pytest.mark.parametrize(("mask_kind", "window", "softcap", "kernel"), PREFIX_CASES)
def test_prefix_attention_equals_math_attention_on_the_repeated_prefix(mask_kind, window, softcap, kernel):
    """The shared-prefix kernels == explicit attention over [prefix repeated per example | own keys]."""
    torch.manual_seed(0)
    b, h, kv, q, p, d = 3, 6, 2, 4, 9, 8
    query, key, value = torch.randn(b, h, q, d), torch.randn(b, kv, q, d), torch.randn(b, kv, q, d)
    pk, pv = torch.randn(1, kv, p, d), torch.randn(1, kv, p, d)
    full_k, full_v = torch.cat([pk.expand(b, -1, -1, -1), key], 2), torch.cat([pv.expand(b, -1, -1, -1), value], 2)
    if mask_kind == "none":
        mask = None
    else:
        mask = torch.ones(q, p + q, dtype=torch.bool).tril(p)[None, None].repeat(b, 1, 1, 1)
        if window:
            mask[0, :, :, :3] = False  # a sliding window hides early prefix keys from example 0
        mask[1, :, :, -1] = False  # example 1's last token is padding
        mask[2, :, :, p : p + 2] = False  # example 2's first two query rows see no key of their own
        if mask_kind == "additive":
            mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    want = math_attention(query, full_k, full_v, mask, 0.3, softcap)
    own = None if mask is None else mask[..., p:]
    if kernel == "dispatch":
        got = prefix_attention(query, key, value, (pk, pv), mask, 0.3, softcap)
    elif kernel == "scores":
        got = _prefix_attention_scores(query, key, value, (pk, pv), mask, 0.3, softcap, prefix_open=not window)
    else:
        got = _prefix_attention_flash(query, key, value, (pk, pv), own, 0.3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_prefix_attention_takes_the_fused_path_only_where_it_applies(monkeypatch):
    """Dispatch: fused flash for an open prefix without softcap; explicit scores otherwise."""
    calls = []
    monkeypatch.setattr(attention_mod, "_prefix_attention_flash", lambda *a: calls.append("flash") or a[0].transpose(1, 2))
    monkeypatch.setattr(attention_mod, "_prefix_attention_scores", lambda *a: calls.append("scores") or a[0].transpose(1, 2))
    b, q, p = 2, 3, 5
    x, pk = torch.randn(b, 4, q, 8), torch.randn(1, 2, p, 8)
    kv = torch.randn(b, 2, q, 8)
    open_mask = torch.ones(b, 1, q, p + q, dtype=torch.bool)
    cut = open_mask.clone()
    cut[0, ..., 0] = False
    for mask, softcap in [(None, None), (open_mask, None), (cut, None), (open_mask, 5.0)]:
        prefix_attention(x, kv, kv, (pk, pk), mask, 0.3, softcap)
    assert calls == ["flash", "flash", "scores", "scores"]


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_cached_prefix_with_single_token_queries_and_a_long_prefix(family):
    """Batches without padding (transformers may pass no mask) and a prefix past Gemma's window."""
    model = tiny_model(family)
    prefix = [0, *range(21, 41), 1]
    queries = [[5], [8], [17], [6]]
    kw = dict(prefix=prefix, options=EvalOptions(batch_size=2, progress=False))
    fast = evaluate(model, queries, [0, 1, 0, 1], LABELS, **kw)
    slow = evaluate(model, queries, [0, 1, 0, 1], LABELS, prefix=prefix,
                    options=EvalOptions(batch_size=2, cache_prefix=False, progress=False))
    for key in ("label_logprobs", "attn_out", "attn_logits"):
        torch.testing.assert_close(getattr(fast, key), getattr(slow, key), atol=1e-5, rtol=1e-4, equal_nan=True)
    assert not has_capture_leftovers(model)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_icl_with_no_demonstrations_is_exactly_zsl(family):
    model = tiny_model(family)
    queries = [[5, 9, 13, 7], [8, 3], [17, 4, 4, 9, 50]]
    zsl = evaluate(model, queries, [0, 1, 0], LABELS, prefix=[0], options=EvalOptions(progress=False))
    icl0 = evaluate(model, queries, [0, 1, 0], LABELS, prefix=[0], options=EvalOptions(progress=False))
    icl = evaluate(model, queries, [0, 1, 0], LABELS, prefix=[0, 21, 22, 1], options=EvalOptions(progress=False))
    for key in ("label_logprobs", "attn_out", "attn_logits"):
        assert torch.equal(getattr(zsl, key).nan_to_num(), getattr(icl0, key).nan_to_num())
    assert not torch.allclose(zsl.attn_out, icl.attn_out)  # demonstrations do change the record
    assert zsl.attn_logits.shape == icl.attn_logits.shape  # same query tokens, same length


def test_batching_and_order_do_not_change_results():
    model = tiny_model("llama")
    queries = [[5, 9, 13, 7], [8, 3], [17, 4, 4, 9, 50], [6, 6]]
    one = evaluate(model, queries, [0, 1, 0, 1], LABELS, options=EvalOptions(batch_size=1, progress=False))
    four = evaluate(model, queries, [0, 1, 0, 1], LABELS, options=EvalOptions(batch_size=4, progress=False))
    torch.testing.assert_close(one.attn_logits, four.attn_logits, equal_nan=True, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(one.label_logprobs, four.label_logprobs, atol=1e-5, rtol=1e-4)


def test_record_at_label_appends_one_token_and_predicts_before_it():
    model = tiny_model("llama")
    queries = [[5, 9, 13, 7], [8, 3]]
    last = evaluate(model, queries, [0, 1], LABELS, options=EvalOptions(progress=False))
    lab = evaluate(model, queries, [0, 1], LABELS, options=EvalOptions(record_at="label", progress=False))
    torch.testing.assert_close(last.label_logprobs, lab.label_logprobs, atol=1e-5, rtol=1e-4)
    assert lab.q_len.tolist() == [5, 3]
    assert not torch.allclose(last.attn_out, lab.attn_out)


def test_math_attention_equals_sdpa_and_supports_jvp():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=False,
        attn_mask=torch.ones(5, 7, dtype=torch.bool).tril(2))
    got = math_attention(q, k, v, None, 8**-0.5)
    torch.testing.assert_close(got, ref.transpose(1, 2), atol=1e-5, rtol=1e-4)
    _, tangent = jvp(lambda kk: math_attention(q, kk, v, None, 8**-0.5), (k,), (torch.randn_like(k),))
    assert torch.isfinite(tangent).all()


def test_linearized_eval_at_zero_delta_is_the_model_and_first_order_close():
    model = tiny_model("llama")
    queries = [[5, 9, 13, 7], [8, 3]]
    theta0 = {n: p.detach() for n, p in model.named_parameters() if "k_proj" in n or "v_proj" in n}
    zero = {n: torch.zeros_like(p) for n, p in theta0.items()}
    base = evaluate(model, queries, [0, 1], LABELS, options=EvalOptions(progress=False))
    lin0 = evaluate(model, queries, [0, 1], LABELS, linearize=(theta0, zero), options=EvalOptions(progress=False))
    for key in ("label_logprobs", "attn_out", "attn_logits"):
        torch.testing.assert_close(getattr(base, key), getattr(lin0, key), atol=1e-5, rtol=1e-4, equal_nan=True)
    torch.manual_seed(1)
    direction = {n: torch.randn_like(p) for n, p in theta0.items()}
    errs = []
    for eps in (1e-2, 5e-3):
        delta = {n: eps * d for n, d in direction.items()}
        real = evaluate(model, queries, [0, 1], LABELS, params={n: theta0[n] + delta[n] for n in theta0},
                        options=EvalOptions(progress=False))
        lin = evaluate(model, queries, [0, 1], LABELS, linearize=(theta0, delta), options=EvalOptions(progress=False))
        errs.append((real.attn_out - lin.attn_out).abs().max().item())
    # Taylor remainder is O(eps^2): halving eps divides the error by about 4.
    assert errs[1] < errs[0] / 3


def test_capture_removes_everything_even_on_error():
    model = tiny_model("gpt_neo")
    use_iclgd_attention(model)
    ids, mask = pad_right(SEQS, 0)
    with pytest.raises(RuntimeError, match="boom"):
        with capture(model, _plan(SEQS)):
            model(ids, attention_mask=mask)
            raise RuntimeError("boom")
    assert not has_capture_leftovers(model)
    out = run_captured(model, None, ids, mask, _plan(SEQS))
    assert out["attn_logits"].shape[:3] == (3, 2, arch.attn_shape(model)[0])


@pytest.mark.parametrize("tokenization", ["piecewise", "natural"])
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_cached_icl_equals_full_reencoding_on_every_task(family, tokenization):
    """Real prompts of the six tasks (ragged queries: padding longer than Gemma's 8-token window),
    both ICL tokenizations: the cached prefix gives the records of full re-encoding."""
    from iclgd.data import select_examples
    from iclgd.prompts import build_prompts
    from iclgd.tasks import get_task, task_names

    from conftest import SHARED_DATA
    from tiny_tokenizer import tiny_tokenizer

    model, tok = tiny_model(family), tiny_tokenizer()
    for name in task_names():
        task = get_task(name)
        sel = select_examples(task, 2, 3, SHARED_DATA, eval_cap=6)
        p = build_prompts(tok, task, sel, separator="\n\n", tokenization=tokenization)
        gold = [e.label for e in sel.eval]
        recs = [evaluate(model, p.queries, gold, p.label_ids, prefix=p.icl_prefix(), pad_id=2,
                         options=EvalOptions(batch_size=6, cache_prefix=cached, progress=False))
                for cached in (True, False)]
        for key in ("label_logprobs", "attn_out", "attn_logits"):
            got, want = getattr(recs[0], key), getattr(recs[1], key)
            assert torch.isfinite(got.nan_to_num(0)).all(), (name, key)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, equal_nan=True, msg=f"{name} {key}")


def test_a_row_that_sees_no_key_gives_zeros_like_sdpa():
    """A padded query past a sliding window attends to nothing: SDPA's zeros, not NaN."""
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool).tril()
    mask[0, 0, 3] = False  # the last row sees nothing
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    got = math_attention(q, k, v, mask, 8**-0.5)
    torch.testing.assert_close(got, want)
    assert (got[0, 3] == 0).all()
