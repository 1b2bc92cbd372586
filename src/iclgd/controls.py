"""Untrained control models (SPEC §7): what a model with nothing learned scores.

A similarity between ICL and a process is evidence only if it beats what the same architecture
scores with its learning undone. Two controls, built from the loaded model's own config:
- "untrained": every weight re-initialized as the architecture initializes a new model
  (transformers' `from_config` init), with the run's seed;
- "untrained-partial": the reference's variant: embeddings (token and position), every
  normalization and the unembedding kept from the trained model; every attention and MLP weight
  re-initialized, with the run's seed.
The control is a new model object: the trained model, which a sweep reuses for its next cells,
is never touched. The tokenizer, context length and everything else of the cell stay the same.
"""

from __future__ import annotations

import torch
from torch import nn

from iclgd import arch
from iclgd.errors import IclgdError

CONTROLS = ("untrained", "untrained-partial")


def kept_parameters(model: nn.Module) -> set[str]:
    """Names of the parameters "untrained-partial" keeps: embeddings, norms, unembedding."""
    keep: set[str] = set()
    head = arch.unembed(model)
    for mod_name, module in model.named_modules():
        if isinstance(module, nn.Embedding) or "Norm" in type(module).__name__ or module is head:
            keep |= {f"{mod_name}.{p}" if mod_name else p for p, _ in module.named_parameters(recurse=False)}
    names = {n for n, _ in model.named_parameters()}  # tied weights appear once, under one name
    return keep & names


def control_model(loaded, control: str, seed: int):
    """A LoadedModel like `loaded` whose model is the `control` of it (module docstring)."""
    from transformers import AutoModelForCausalLM

    from iclgd.models import LoadedModel

    if control not in CONTROLS:
        raise IclgdError(f"unknown control {control!r}; use one of {', '.join(CONTROLS)}")
    trained = loaded.model
    param = next(trained.parameters())
    impl = trained.config._attn_implementation
    impl = "sdpa" if impl not in ("eager", "sdpa") else impl  # iclgd's own is set again at evaluation
    with torch.random.fork_rng(devices=[]):  # the global RNG stream is left as it was
        torch.manual_seed(seed)
        fresh = AutoModelForCausalLM.from_config(trained.config, attn_implementation=impl)
    fresh = fresh.to(device=param.device, dtype=param.dtype).eval().requires_grad_(False)
    kept: list[str] = []
    if control == "untrained-partial":
        src = dict(trained.named_parameters())
        dst = dict(fresh.named_parameters())
        with torch.no_grad():
            for name in sorted(kept_parameters(trained)):
                dst[name].copy_(src[name])
                kept.append(name)
    identity = {**loaded.identity, "control": control, "control_seed": seed, "control_kept": kept,
                "control_reinitialized": sum(p.numel() for n, p in fresh.named_parameters() if n not in kept)}
    return LoadedModel(fresh, loaded.tokenizer, loaded.name, identity, loaded.max_length)
