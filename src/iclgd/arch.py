"""Canonical names for each model family: one small `ArchSpec` table per family.

Everything above this module asks for "the decoder blocks", "the attention modules", "the key
and value projections" and never spells `c_attn`, `q_proj` or `self_attn`. Supporting a new
family means adding one table to `SPECS` (and its tiny model to `tests/tiny.py`).

Paths are dotted module paths resolved with `nn.Module.get_submodule`, checked against the
modeling code of transformers 5.23 (XGLM's against 5.24).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from iclgd.errors import IclgdError
from iclgd.registry import unknown_name


@dataclass(frozen=True)
class ArchSpec:
    """Where one family keeps its parts. `layers`, `final_norm`, `unembed` start at the model
    root; `attn` and `post_attn_norm` at a decoder block; `q`, `k`, `v`, `o` at the attention
    module, whose forward returns the attention sublayer output (after the output projection,
    before the residual add) as `output[0]`."""

    model_types: tuple[str, ...]
    layers: str
    attn: str
    q: str
    k: str
    v: str
    o: str
    final_norm: str
    unembed: str
    post_attn_norm: str | None = None  # Gemma's sandwich norm on the attention output
    fused_qkv: bool = False
    # how a fused projection stacks q, k, v along its output features:
    # "blocks": [q | k | v], each d_model wide (GPT-2 Conv1D, output dim is the LAST weight dim)
    # "per_head": per head [q_h | k_h | v_h], each d_head wide (GPT-NeoX Linear, output dim 0)
    fused_layout: str | None = None
    # "interface": attention math goes through transformers' AttentionInterface
    # "gpt_neo": GPT-Neo's own `_attn(query, key, value, attention_mask)`, no 1/sqrt(d) scaling
    # "xglm": XGLM computes attention inline in its forward (no interface call, no `_attn`), so a
    # capture swaps that forward for `capture._xglm_forward`
    attn_kernel: str = "interface"
    # the start token (SPEC §3; iclgd.prompts.start_token): None = the general rule, "bos" = the
    # tokenizer's bos_token (fairseq's <s>, which the reference code put at position 0)
    start_token: str | None = None
    # the query norm of families that normalize q per head (Qwen3, Gemma-3), used where the
    # attention module has it: q is read at its output (`query_sites`). Gemma applies it after
    # moving heads before positions ([batch, head, pos, d_head]), Qwen3 before ([batch, pos, head, d_head])
    q_norm: str | None = None
    q_norm_heads_first: bool = False


SPECS: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(
        model_types=("gpt2",),
        layers="transformer.h",
        attn="attn",
        q="c_attn",
        k="c_attn",
        v="c_attn",
        o="c_proj",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        fused_qkv=True,
        fused_layout="blocks",
    ),
    "gpt_neo": ArchSpec(
        # block.attn is a dispatcher; block.attn.attention holds the projections
        model_types=("gpt_neo",),
        layers="transformer.h",
        attn="attn.attention",
        q="q_proj",
        k="k_proj",
        v="v_proj",
        o="out_proj",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        attn_kernel="gpt_neo",
    ),
    "gpt_neox": ArchSpec(
        model_types=("gpt_neox",),
        layers="gpt_neox.layers",
        attn="attention",
        q="query_key_value",
        k="query_key_value",
        v="query_key_value",
        o="dense",
        final_norm="gpt_neox.final_layer_norm",
        unembed="lm_head",
        fused_qkv=True,
        fused_layout="per_head",
    ),
    "opt": ArchSpec(
        # pre-LN OPT only: OPT-350m (post-LN, project_out) has final_layer_norm = None
        model_types=("opt",),
        layers="model.decoder.layers",
        attn="self_attn",
        q="q_proj",
        k="k_proj",
        v="v_proj",
        o="out_proj",
        final_norm="model.decoder.final_layer_norm",
        unembed="lm_head",
    ),
    "llama": ArchSpec(
        # Llama's `post_attention_layernorm` is the pre-MLP norm, not a sandwich norm
        model_types=("llama", "mistral", "qwen2", "qwen3", "smollm3"),
        layers="model.layers",
        attn="self_attn",
        q="q_proj",
        k="k_proj",
        v="v_proj",
        o="o_proj",
        final_norm="model.norm",
        unembed="lm_head",
        q_norm="q_norm",  # Qwen3 and SmolLM3 only
    ),
    "gemma3": ArchSpec(
        # Gemma-2/3 blocks: x + post_attention_layernorm(attn(input_layernorm(x)))
        model_types=("gemma3_text", "gemma2"),
        layers="model.layers",
        attn="self_attn",
        q="q_proj",
        k="k_proj",
        v="v_proj",
        o="o_proj",
        final_norm="model.norm",
        unembed="lm_head",
        post_attn_norm="post_attention_layernorm",
        q_norm="q_norm",  # Gemma-3 only
        q_norm_heads_first=True,
    ),
    "gemma3_multimodal": ArchSpec(
        # Gemma3ForConditionalGeneration: the text stack sits under model.language_model
        model_types=("gemma3",),
        layers="model.language_model.layers",
        attn="self_attn",
        q="q_proj",
        k="k_proj",
        v="v_proj",
        o="o_proj",
        final_norm="model.language_model.norm",
        unembed="lm_head",
        post_attn_norm="post_attention_layernorm",
        q_norm="q_norm",
        q_norm_heads_first=True,
    ),
    "xglm": ArchSpec(
        # fairseq-dense GPT, the papers' own family (KoboldAI/fairseq-dense-1.3B on the Hub), and
        # XGLM: pre-LN blocks whose `final_layer_norm` is the pre-MLP norm, the stack's final
        # norm is model.layer_norm, lm_head is tied to model.embed_tokens
        model_types=("xglm",),
        layers="model.layers",
        attn="self_attn",
        q="q_proj",
        k="k_proj",
        v="v_proj",
        o="out_proj",
        final_norm="model.layer_norm",
        unembed="lm_head",
        attn_kernel="xglm",
        start_token="bos",
    ),
}

PARAM_GROUPS = ("kv", "qkvo", "attn", "all")


def supported_model_types() -> list[str]:
    return sorted(t for spec in SPECS.values() for t in spec.model_types)


def arch_spec(model: nn.Module) -> ArchSpec:
    """The spec serving `model.config.model_type`; IclgdError listing supported types otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for spec in SPECS.values():
        if model_type in spec.model_types:
            return spec
    raise IclgdError(
        f"model_type {model_type!r} is not supported; supported: "
        f"{', '.join(supported_model_types())}. Add an ArchSpec to iclgd/arch.py SPECS."
    )


def _resolve(root: nn.Module, path: str, spec: ArchSpec, what: str) -> nn.Module:
    try:
        module = root.get_submodule(path)
    except AttributeError as err:
        raise IclgdError(
            f"{what} path {path!r} does not resolve on {type(root).__name__} "
            f"(family {spec.model_types[0]!r}): {err}"
        ) from None
    if module is None:  # e.g. OPT-350m sets final_layer_norm = None
        raise IclgdError(f"{what} path {path!r} is None on {type(root).__name__}")
    return module


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks, bottom to top."""
    spec = arch_spec(model)
    return list(_resolve(model, spec.layers, spec, "decoder layers"))


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Per block, the module whose forward `output[0]` is the attention sublayer output
    [batch, pos, d_model] after the output projection and before the residual add."""
    spec = arch_spec(model)
    return [_resolve(block, spec.attn, spec, "attention") for block in decoder_layers(model)]


def final_norm(model: nn.Module) -> nn.Module:
    spec = arch_spec(model)
    return _resolve(model, spec.final_norm, spec, "final norm")


def unembed(model: nn.Module) -> nn.Module:
    """The output projection d_model -> vocab (possibly tied to the input embedding)."""
    spec = arch_spec(model)
    return _resolve(model, spec.unembed, spec, "unembedding")


def post_attn_norms(model: nn.Module) -> list[nn.Module | None]:
    """Per block, the norm applied to the attention output before the residual add, or None."""
    spec = arch_spec(model)
    if spec.post_attn_norm is None:
        return [None for _ in decoder_layers(model)]
    return [_resolve(b, spec.post_attn_norm, spec, "post-attn norm") for b in decoder_layers(model)]


def query_sites(model: nn.Module) -> list[tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]]:
    """Per block, the module whose output holds the attention query before any rotary embedding,
    and the function turning that output into q [batch, pos, head * d_head] (heads concatenated).

    The site is the query norm where the family has one (`ArchSpec.q_norm`), else the query
    projection; a fused qkv projection gives its q part ("blocks": the first d_model features;
    "per_head": each head's first d_head). No scaling is applied: the attention's own scaling is
    the caller's (iclgd.capture reads it where attention runs)."""
    spec = arch_spec(model)
    n_heads, _, d_head = attn_shape(model)
    out = []
    for attn in attention_modules(model):
        norm = getattr(attn, spec.q_norm, None) if spec.q_norm else None
        if isinstance(norm, nn.Module):
            if spec.q_norm_heads_first:  # [batch, head, pos, d_head]
                out.append((norm, lambda q: q.transpose(1, 2).flatten(2)))
            else:  # [batch, pos, head, d_head]
                out.append((norm, lambda q: q.flatten(2)))
            continue
        proj = _resolve(attn, spec.q, spec, "query projection")
        if not spec.fused_qkv:
            out.append((proj, lambda q: q))
        elif spec.fused_layout == "blocks":  # [q | k | v], each n_heads * d_head wide
            out.append((proj, lambda qkv: qkv[..., : n_heads * d_head]))
        else:  # per head [q_h | k_h | v_h]
            out.append((proj, lambda qkv: qkv.unflatten(-1, (n_heads, 3 * d_head))[..., :d_head].flatten(-2)))
    return out


def attn_shape(model: nn.Module) -> tuple[int, int, int]:
    """(n_query_heads, n_kv_heads, d_head), read from the (text) config."""
    arch_spec(model)  # unsupported families fail here, with the helpful message
    config = model.config.get_text_config()
    n_heads = int(config.num_attention_heads)  # GPT-2/Neo map n_head/num_heads onto this
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
    d_head = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return n_heads, n_kv, int(d_head)


@dataclass(frozen=True, eq=False)  # eq=False: comparing masks elementwise makes no sense
class TrainParam:
    """One trained parameter: its `model.named_parameters()` name, its block, and a 0/1 mask
    (same shape and dtype as the parameter) selecting the trained entries, or None for all."""

    name: str
    layer: int
    mask: torch.Tensor | None


def _block_prefixes(model: nn.Module) -> list[str]:
    spec = arch_spec(model)
    return [f"{spec.layers}.{i}." for i in range(len(decoder_layers(model)))]


def layer_of_param(model: nn.Module) -> dict[str, int]:
    """Every parameter name -> its block index, or -1 outside the blocks (embeddings, norms)."""
    prefixes = _block_prefixes(model)
    out = {}
    for name, _ in model.named_parameters():
        out[name] = next((i for i, p in enumerate(prefixes) if name.startswith(p)), -1)
    return out


def _fused_kv_mask(param: torch.Tensor, spec: ArchSpec, n_heads: int) -> torch.Tensor:
    """1.0 on the k and v outputs of a fused qkv weight or bias, 0.0 on the q outputs."""
    mask = torch.zeros_like(param)
    if spec.fused_layout == "blocks":
        # GPT-2 Conv1D: weight [d_model, 3 * d_model], bias [3 * d_model]; split(d, dim=-1)
        d = param.shape[-1] // 3
        mask[..., d:] = 1.0
    elif spec.fused_layout == "per_head":
        # GPT-NeoX Linear: weight [3 * d_model, d_model], bias [3 * d_model]; forward views the
        # output as [..., head, 3 * d_head] and chunks the last dim into q, k, v
        d_head = param.shape[0] // (3 * n_heads)
        view = mask.view(n_heads, 3, d_head, *param.shape[1:])  # [head, qkv, d_head, (d_model)]
        view[:, 1:] = 1.0
    else:
        raise IclgdError(f"unknown fused_layout {spec.fused_layout!r} for {spec.model_types}")
    return mask


def trainable_params(model: nn.Module, group: str = "kv") -> list[TrainParam]:
    """The parameters an optimization process trains, in `named_parameters()` order.

    Groups: "kv" key and value projections, weights and biases (the SPEC default; on fused
    qkv projections a mask selects the k/v outputs); "qkvo" all four projections; "attn" every
    parameter inside the attention modules (Gemma's q/k norms too); "all" every parameter,
    with layer -1 outside the blocks. Tied weights appear once, as in `named_parameters()`.
    """
    if group not in PARAM_GROUPS:
        raise unknown_name("parameter group", group, list(PARAM_GROUPS))
    spec = arch_spec(model)
    layer_of = layer_of_param(model)
    if group == "all":
        return [TrainParam(n, layer_of[n], None) for n, _ in model.named_parameters()]

    # absolute module prefixes of the selected parts, per block
    attn_prefix = [f"{spec.layers}.{i}.{spec.attn}" for i in range(len(decoder_layers(model)))]
    parts = (spec.k, spec.v) if group == "kv" else (spec.q, spec.k, spec.v, spec.o)
    for prefix in attn_prefix:  # fail loudly on a wrong path rather than select nothing
        for part in parts:
            _resolve(model, f"{prefix}.{part}", spec, f"{group} projection")
    wanted = {f"{p}.{part}." for p in attn_prefix for part in parts}
    n_heads = attn_shape(model)[0]

    out = []
    for name, param in model.named_parameters():
        if group == "attn":
            hit = any(name.startswith(p + ".") for p in attn_prefix)
        else:
            hit = any(name.startswith(w) for w in wanted)
        if not hit:
            continue
        fused = spec.fused_qkv and name.startswith(tuple(f"{p}.{spec.k}." for p in attn_prefix))
        mask = _fused_kv_mask(param.detach(), spec, n_heads) if fused and group == "kv" else None
        out.append(TrainParam(name, layer_of[name], mask))
    return out
