"""Tiny random models, one per supported family, built from a config in milliseconds.

Every model: 2 decoder blocks, d_model 32, 4 query heads (2 key/value heads where the family
groups them), zero dropout, >= 256 positions, bos/eos/pad = 0/1/2 (the ids of the tiny
tokenizer in `tests/tiny_tokenizer.py`; XGLM's config names no pad id, see `_config`), eval mode, float32, weights fixed by `seed`.
Family quirks are kept on purpose so tests exercise them: GPT-Neo has a local layer, Gemma-3
has a sliding-window layer, Qwen2 has q/k/v biases, GPT-NeoX has its fused per-head qkv, XGLM
(fairseq-dense) has sinusoidal positions offset by 2, embeddings scaled by sqrt(d_model), a tied
head and its own inline attention.
"""

from __future__ import annotations

import torch
import transformers as tf

FAMILIES = ("gpt2", "gpt_neo", "gpt_neox", "opt", "llama", "qwen2", "gemma3", "xglm")

D_MODEL, N_LAYERS, N_HEADS, N_KV_HEADS, N_POS = 32, 2, 4, 2, 512
SPECIAL = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}


def _config(family: str, vocab_size: int) -> tf.PretrainedConfig:
    common = dict(vocab_size=vocab_size, **SPECIAL)
    if family == "gpt2":
        return tf.GPT2Config(
            n_embd=D_MODEL,
            n_layer=N_LAYERS,
            n_head=N_HEADS,
            n_positions=N_POS,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **common,
        )
    if family == "gpt_neo":
        # block 0 global, block 1 local with a window shorter than the test prompts
        return tf.GPTNeoConfig(
            hidden_size=D_MODEL,
            num_layers=N_LAYERS,
            num_heads=N_HEADS,
            attention_types=[[["global", "local"], 1]],
            window_size=8,
            max_position_embeddings=N_POS,
            intermediate_size=4 * D_MODEL,
            resid_dropout=0.0,
            embed_dropout=0.0,
            attention_dropout=0.0,
            **common,
        )
    if family == "gpt_neox":
        # Pythia's layout: fused per-head qkv, parallel residual, partial rotary
        return tf.GPTNeoXConfig(
            hidden_size=D_MODEL,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=N_HEADS,
            intermediate_size=4 * D_MODEL,
            max_position_embeddings=N_POS,
            use_parallel_residual=True,
            attention_bias=True,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            tie_word_embeddings=False,
            **common,
        )
    if family == "opt":
        return tf.OPTConfig(
            hidden_size=D_MODEL,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=N_HEADS,
            ffn_dim=4 * D_MODEL,
            word_embed_proj_dim=D_MODEL,
            max_position_embeddings=N_POS,
            do_layer_norm_before=True,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            layerdrop=0.0,
            **common,
        )
    if family == "xglm":
        # XGLM reads sinusoid row p + 2 for position p (fairseq's offset for its pad id 1) and
        # zeroes row pad_token_id. The real model's pad 1 zeroes a row it never reads; pad 2 would
        # zero position 0's row (the start token's), so this config names no pad id (the
        # tokenizer's pad 2 still pads). 2 + N_POS rows cover every test prompt (and XGLM grows
        # the table past them).
        return tf.XGLMConfig(
            d_model=D_MODEL,
            num_layers=N_LAYERS,
            attention_heads=N_HEADS,
            ffn_dim=4 * D_MODEL,
            max_position_embeddings=N_POS,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            layerdrop=0.0,
            **{**common, "pad_token_id": None},
        )
    gqa = dict(
        hidden_size=D_MODEL,
        intermediate_size=2 * D_MODEL,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV_HEADS,
        max_position_embeddings=N_POS,
        attention_dropout=0.0,
        **common,
    )
    if family == "llama":
        return tf.LlamaConfig(**gqa)
    if family == "qwen2":
        return tf.Qwen2Config(**gqa)  # q/k/v carry biases by construction
    if family == "gemma3":
        # both layer kinds exist: block 0 sliding (window 8), block 1 full attention
        return tf.Gemma3TextConfig(
            **gqa,
            head_dim=D_MODEL // N_HEADS,
            query_pre_attn_scalar=D_MODEL // N_HEADS,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
        )
    raise ValueError(f"unknown tiny family {family!r}; known: {', '.join(FAMILIES)}")


def tiny_model(family: str, vocab_size: int = 512, seed: int = 0) -> tf.PreTrainedModel:
    """A 2-block random causal LM of `family`, eval mode, float32, deterministic in `seed`."""
    config = _config(family, vocab_size)
    # GPT-Neo has no sdpa class in transformers 5.x; eager works for every family
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    # the default init (std 0.02) makes attention nearly uniform; widen it so that the
    # tests' invariants are checked on non-trivial attention patterns
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            elif p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.float().eval()


def tiny_loaded(family: str, seed: int = 0):
    """`tiny_model(family)` wrapped as a `LoadedModel` with the tiny test tokenizer."""
    from iclgd.models import LoadedModel, context_length, model_identity

    from tiny_tokenizer import tiny_tokenizer  # lazy; conftest puts tests/ on sys.path

    tok = tiny_tokenizer()
    model = tiny_model(family, seed=seed).requires_grad_(False)  # vocab 512 >= len(tok)
    name = f"tiny-{family}"
    identity = model_identity(model, name=name, source="tests/tiny.py")
    return LoadedModel(model, tok, name, identity, context_length(model, tok))
