"""iclgd.arch against the tiny models: paths resolve, groups select the right parameters, the
fused-qkv masks select exactly the key/value outputs, and attention outputs add back to the
residual stream. Module names appear here on purpose: this is the test of the name table."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers as tf
from torch import nn

from iclgd import arch
from iclgd.errors import IclgdError, UnknownNameError

from tiny import D_MODEL, FAMILIES, N_HEADS, N_KV_HEADS, tiny_model

# per family, independently of arch.SPECS: the block-relative names of the k/v parameters
KV_NAMES = {
    "gpt2": {"attn.c_attn.weight", "attn.c_attn.bias"},
    "gpt_neo": {"attn.attention.k_proj.weight", "attn.attention.v_proj.weight"},
    "gpt_neox": {"attention.query_key_value.weight", "attention.query_key_value.bias"},
    "opt": {f"self_attn.{p}_proj.{w}" for p in "kv" for w in ("weight", "bias")},
    "llama": {"self_attn.k_proj.weight", "self_attn.v_proj.weight"},
    "qwen2": {f"self_attn.{p}_proj.{w}" for p in "kv" for w in ("weight", "bias")},
    "gemma3": {"self_attn.k_proj.weight", "self_attn.v_proj.weight"},
    "xglm": {f"self_attn.{p}_proj.{w}" for p in "kv" for w in ("weight", "bias")},
}
# per family, the block submodule whose INPUT is the residual stream after the attention
# sublayer (None: GPT-NeoX's parallel residual has no such point; see the test)
MID_RESIDUAL = {
    "gpt2": "ln_2",
    "gpt_neo": "ln_2",
    "opt": "final_layer_norm",
    "gpt_neox": None,
    "llama": "post_attention_layernorm",
    "qwen2": "post_attention_layernorm",
    "gemma3": "pre_feedforward_layernorm",
    "xglm": "final_layer_norm",  # XGLM's pre-MLP norm; the stack's final norm is model.layer_norm
}
SEQ = 12  # longer than the local/sliding windows (8) of GPT-Neo and Gemma-3


def _ids(batch: int = 2, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(3, 512, (batch, seq), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return request.param, tiny_model(request.param)


def test_spec_resolves(family_model):
    family, model = family_model
    assert model.config.model_type in arch.arch_spec(model).model_types
    assert len(arch.decoder_layers(model)) == 2
    assert len(arch.attention_modules(model)) == 2
    assert isinstance(arch.final_norm(model), nn.Module)
    assert arch.unembed(model).weight.shape == (512, D_MODEL)
    n_kv = N_KV_HEADS if family in ("llama", "qwen2", "gemma3") else N_HEADS
    assert arch.attn_shape(model) == (N_HEADS, n_kv, D_MODEL // N_HEADS)
    norms = arch.post_attn_norms(model)
    assert len(norms) == 2 and all((n is not None) == (family == "gemma3") for n in norms)


def test_attention_output_shape(family_model):
    _, model = family_model
    seen = []
    handles = [
        m.register_forward_hook(lambda mod, args, out: seen.append(out[0].shape))
        for m in arch.attention_modules(model)
    ]
    try:
        with torch.no_grad():
            model(_ids())
    finally:
        for h in handles:
            h.remove()
    assert seen == [torch.Size([2, SEQ, D_MODEL])] * 2  # [batch, pos, d_model] per layer


def test_kv_group_selects_key_value_params(family_model):
    family, model = family_model
    spec = arch.arch_spec(model)
    got = arch.trainable_params(model, "kv")
    want = {f"{spec.layers}.{i}.{n}" for i in range(2) for n in KV_NAMES[family]}
    assert {p.name for p in got} == want and len(got) == len(want)
    assert sorted({p.layer for p in got}) == [0, 1]
    assert all((p.mask is not None) == spec.fused_qkv for p in got)


def _split_qkv(family: str, fused: nn.Module, x: torch.Tensor):
    """q, k, v from a fused projection, written from the modeling code, not from arch.py."""
    out = fused(x)  # [batch, pos, 3 * d_model]
    if family == "gpt2":  # GPT2Attention.forward: c_attn(h).split(split_size, dim=2)
        return out.split(D_MODEL, dim=2)
    # GPTNeoXAttention.forward: view(*input_shape, -1, 3 * head_size), chunk(3, dim=-1)
    d_head = D_MODEL // N_HEADS
    return out.view(*x.shape[:-1], -1, 3 * d_head).chunk(3, dim=-1)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_fused_mask_selects_exactly_keys_and_values(family):
    """Perturbing masked-out entries leaves k and v unchanged (q moves); perturbing masked-in
    entries moves k and v and leaves q unchanged."""
    model = tiny_model(family)
    params = dict(model.named_parameters())
    fused = arch.attention_modules(model)[0].get_submodule(arch.arch_spec(model).k)
    x = torch.randn(2, 5, D_MODEL, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        q0, k0, v0 = (t.clone() for t in _split_qkv(family, fused, x))
        for inside in (False, True):
            saved = {}
            for tp in arch.trainable_params(model, "kv"):
                if tp.layer != 0:
                    continue
                p = params[tp.name]
                saved[tp.name] = p.clone()
                sel = tp.mask if inside else 1.0 - tp.mask
                assert 0 < sel.sum() < p.numel()
                p.add_(torch.randn_like(p) * sel)
            q1, k1, v1 = _split_qkv(family, fused, x)
            assert torch.equal(q1, q0) == inside
            assert torch.equal(k1, k0) != inside and torch.equal(v1, v0) != inside
            for name, value in saved.items():
                params[name].copy_(value)


def test_all_group_covers_every_parameter_once(family_model):
    _, model = family_model
    got = arch.trainable_params(model, "all")
    names = [n for n, _ in model.named_parameters()]
    assert [p.name for p in got] == names and len(set(names)) == len(names)
    assert all(p.mask is None for p in got)
    spec = arch.arch_spec(model)
    for p in got:
        in_block = p.name.startswith(spec.layers + ".")
        assert (p.layer >= 0) == in_block
        if in_block:
            assert p.name.startswith(f"{spec.layers}.{p.layer}.")
    assert arch.layer_of_param(model) == {p.name: p.layer for p in got}


def test_nested_groups(family_model):
    _, model = family_model
    groups = {g: {p.name for p in arch.trainable_params(model, g)} for g in arch.PARAM_GROUPS}
    assert groups["kv"] <= groups["qkvo"] <= groups["attn"] <= groups["all"]
    assert groups["qkvo"] - groups["kv"]  # q and o add parameters
    for p in arch.trainable_params(model, "qkvo"):
        assert p.mask is None  # a fused projection is trained whole when q is in the group


def test_unknown_group_suggests():
    with pytest.raises(UnknownNameError, match="did you mean 'kv'"):
        arch.trainable_params(tiny_model("llama"), "kvv")


def test_unsupported_model_type_names_supported_families():
    fake = nn.Module()
    fake.config = SimpleNamespace(model_type="t5")
    with pytest.raises(IclgdError, match="'t5' is not supported.*gpt2.*llama"):
        arch.decoder_layers(fake)


def test_bad_path_names_path_and_family(monkeypatch):
    model = tiny_model("llama")
    broken = arch.ArchSpec(**{**arch.SPECS["llama"].__dict__, "layers": "model.blocks"})
    monkeypatch.setitem(arch.SPECS, "llama", broken)
    with pytest.raises(IclgdError, match="'model.blocks'.*'llama'"):
        arch.decoder_layers(model)


def test_attention_output_adds_back_to_residual(family_model):
    """block input + post_attn_norm(attention output[0]) == residual after the attention
    sublayer, read as the input of the next module in the block. GPT-NeoX (parallel
    residual) has no such point: there, block output - MLP output == input + attention."""
    family, model = family_model
    layers, attns = arch.decoder_layers(model), arch.attention_modules(model)
    norms = arch.post_attn_norms(model)
    rec: dict[tuple[str, int], torch.Tensor] = {}
    handles = []

    def keep(key, from_output):
        def hook(mod, args, kwargs_or_out, out=None):
            if from_output:
                val = kwargs_or_out if out is None else out
                val = val[0] if isinstance(val, tuple) else val
            else:
                val = args[0] if args else kwargs_or_out["hidden_states"]
            rec[key] = val.detach()

        return hook

    for i, (block, attn) in enumerate(zip(layers, attns)):
        handles.append(block.register_forward_pre_hook(keep(("in", i), False), with_kwargs=True))
        handles.append(attn.register_forward_hook(keep(("attn", i), True)))
        if MID_RESIDUAL[family] is None:
            handles.append(block.register_forward_hook(keep(("out", i), True)))
            handles.append(block.mlp.register_forward_hook(keep(("mlp", i), True)))
        else:
            mid = block.get_submodule(MID_RESIDUAL[family])
            handles.append(mid.register_forward_pre_hook(keep(("mid", i), False), with_kwargs=True))
    try:
        with torch.no_grad():
            model(_ids())
    finally:
        for h in handles:
            h.remove()
    for i in range(2):
        attn_out = rec["attn", i]  # [batch, pos, d_model]
        if norms[i] is not None:
            with torch.no_grad():
                attn_out = norms[i](attn_out)
        if MID_RESIDUAL[family] is None:
            torch.testing.assert_close(rec["out", i] - rec["mlp", i], rec["in", i] + attn_out)
        else:
            want = rec["in", i] + attn_out
            # OPT flattens to [batch * pos, d_model] before its MLP norm
            torch.testing.assert_close(rec["mid", i].reshape(want.shape), want)


def test_gemma3_multimodal_wrapper_resolves():
    """model_type "gemma3" (Gemma3ForConditionalGeneration) keeps its text stack deeper."""
    text = {
        "hidden_size": D_MODEL,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "vocab_size": 512,
        "num_attention_heads": N_HEADS,
        "num_key_value_heads": N_KV_HEADS,
        "head_dim": 8,
        "layer_types": ["sliding_attention", "full_attention"],
        "sliding_window": 8,
    }
    vision = {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 28,
        "patch_size": 14,
    }
    config = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    model = tf.Gemma3ForConditionalGeneration(config).eval()
    assert len(arch.decoder_layers(model)) == 2
    assert arch.attn_shape(model) == (N_HEADS, N_KV_HEADS, 8)
    assert all(n is not None for n in arch.post_attn_norms(model))
    assert len(arch.trainable_params(model, "kv")) == 4
    arch.final_norm(model), arch.unembed(model)


def test_xglm_positions_follow_fairseq():
    """fairseq-dense (XGLM) positions: token i reads sinusoid row i + 2 (fairseq's
    padding_idx + 1 + i with pad id 1), a prefix cache continues the count, and no row the
    tiny model reads is zeroed (the real model's zeroed pad row 1 is never read either)."""
    model = tiny_model("xglm")
    pos = model.model.embed_positions
    n = 300  # past every test prompt
    table = pos.get_embedding(n + 2, D_MODEL, padding_idx=None)  # [pos, d_model], unzeroed
    got = pos(torch.arange(n)[None])[0]  # [pos, d_model]
    torch.testing.assert_close(got, table[2:])
    assert (got.abs().sum(-1) > 0).all()
    torch.testing.assert_close(pos(torch.arange(5)[None] + 10, 10)[0], table[12:17])
