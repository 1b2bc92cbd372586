"""LCGD: layer-causal GD (SPEC §1). Every layer's input is detached and every layer exits early
through the frozen final norm and unembedding; the exits' losses are summed. So layer l's
gradient depends on layers <= l only, as ICL's change to layer l does.

Exit point (option `exit`): "block" (after the whole block, as the reference code did; default)
or "attn" (after the attention sublayer: detached input + attention output, as the paper's
formula says).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from iclgd import arch
from iclgd.errors import IclgdError
from iclgd.plan import ProcessOption
from iclgd.processes.base import (
    Process,
    TrainContext,
    TrainResult,
    log_queries,
    recording,
    register_process,
)

EXITS = ("block", "attn")
NO_LOGITS = torch.zeros(0, dtype=torch.long)  # `logits_to_keep` that selects no position


def _first(x):
    return x[0] if isinstance(x, tuple) else x


@contextlib.contextmanager
def layer_causal(model, exit: str):
    """Detach every block's input and collect each block's exit hidden state [batch, pos, d_model]."""
    if exit not in EXITS:
        raise IclgdError(f"unknown LCGD exit {exit!r}; choose one of {EXITS}")
    exits: list[torch.Tensor | None] = [None] * len(arch.decoder_layers(model))
    inputs: list[torch.Tensor | None] = [None] * len(exits)
    handles = []

    def detach_input(layer):
        def hook(_mod, args, kwargs):
            if args:
                h = args[0].detach()
                inputs[layer] = h
                return (h, *args[1:]), kwargs
            h = kwargs["hidden_states"].detach()
            inputs[layer] = h
            return args, {**kwargs, "hidden_states": h}

        return hook

    try:
        norms = arch.post_attn_norms(model)
        for layer, block in enumerate(arch.decoder_layers(model)):
            handles.append(block.register_forward_pre_hook(detach_input(layer), with_kwargs=True))
            if exit == "block":
                handles.append(block.register_forward_hook(
                    lambda _m, _a, out, layer=layer: exits.__setitem__(layer, _first(out))))
            else:
                attn = arch.attention_modules(model)[layer]

                def attn_hook(_m, _a, out, layer=layer):
                    a = _first(out)
                    if norms[layer] is not None:  # Gemma's sandwich norm sits before the residual add
                        a = norms[layer](a)
                    exits[layer] = inputs[layer] + a

                handles.append(attn.register_forward_hook(attn_hook))
        yield exits
    finally:
        for h in handles:
            h.remove()


# Exits go through the frozen norm and head a few layers at a time, each group's logits at most
# this large; every group is back-propagated at once, so its vocabulary-sized buffer is freed
# before the next (the groups' graphs are disjoint: each block's input is detached). With the
# fused loss below a group holds one such buffer; a ~30-token demonstration of a 30-layer model
# with a 49k vocabulary fits in one group, so the head's products run on ~900 rows at once.
EXIT_CHUNK_BYTES = 192 * 2**20


class _ExitCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy(x·Wᵀ + b, target) [rows] for a frozen head W, b, differentiable in x only.

    The logits buffer becomes the softmax in place (one exp per entry) and is kept as the
    gradient buffer, where `F.cross_entropy` keeps logits, log-probabilities, a zero-filled
    one-hot gradient and the log-softmax gradient, and takes a second exp in its backward.
    The buffer is consumed by the one backward, so the graph cannot be retained. `out`, if given,
    is a [>= rows, vocab] buffer to reuse (fresh pages for every step's ~100 MB cost page faults).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, targets, out=None):
        probs = None if out is None else out[: len(x)]
        if probs is None:
            probs = F.linear(x, weight, bias)  # [rows, vocab] logits, overwritten below
        elif bias is None:
            torch.mm(x, weight.t(), out=probs)
        else:
            torch.addmm(bias, x, weight.t(), out=probs)
        picked = probs.gather(1, targets[:, None])  # [rows, 1]
        top = probs.amax(1, keepdim=True)
        probs.sub_(top).exp_()
        total = probs.sum(1, keepdim=True)
        probs.div_(total)
        ctx.save_for_backward(probs, weight, targets)
        ctx.consumed = False
        return (top + total.log() - picked)[:, 0]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # grad [rows]
        if ctx.consumed:
            raise IclgdError("the LCGD exit loss can be back-propagated once (its buffer is reused)")
        ctx.consumed = True
        probs, weight, targets = ctx.saved_tensors
        probs[torch.arange(len(targets), device=probs.device), targets] -= 1  # softmax - one-hot
        return probs.mul_(grad[:, None]) @ weight, None, None, None, None


def exit_loss_rows(x: torch.Tensor, head: nn.Module, params: dict[str, torch.Tensor], targets: torch.Tensor,
                   softcap: float | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy [rows] of the frozen `head` (with `params`) at x [rows, d_model]. The fused
    loss runs for a float32 linear head without soft-capping (reusing `out` as its buffer if
    given); otherwise `F.cross_entropy`."""
    if isinstance(head, nn.Linear) and softcap is None and x.dtype == torch.float32:
        return _ExitCrossEntropy.apply(x, params["weight"], params.get("bias"), targets, out)
    logits = functional_call(head, params, (x,))
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="none")


def exit_loss(x: torch.Tensor, head: nn.Module, params: dict[str, torch.Tensor], targets: torch.Tensor,
              softcap: float | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_rows cross-entropy of the frozen `head` at x [rows, d_model] (`exit_loss_rows`, summed)."""
    return exit_loss_rows(x, head, params, targets, softcap, out).sum()


@register_process("lcgd")
class LCGD(Process):
    options = {"exit": ProcessOption("block", EXITS, "after the whole block (reference code) or after the "
                                     "attention sublayer (the paper's formula)")}

    def train_flops(self, d, seq_len: int) -> int:
        """An exit (norm + unembedding) per layer, forward and backward; backward into that block only."""
        from iclgd.flops import backward_flops, forward_flops

        exits = d.n_layers * seq_len * 2 * d.d_model * d.vocab
        return forward_flops(d, seq_len) + backward_flops(d, seq_len, logits=0) + 2 * exits

    def grads(self, ctx: TrainContext, params, batch):
        from iclgd.capture import record_queries

        model = ctx.model
        exit = ctx.config.options.get("exit", "block")
        norm, head = arch.final_norm(model), arch.unembed(model)
        frozen = _frozen_exit_params(model, params)
        softcap = getattr(model.config, "final_logit_softcapping", None)
        names = list(params)
        grads = {n: torch.zeros_like(params[n]) for n in names}
        loss = torch.zeros(())
        for ids in batch:
            with layer_causal(model, exit) as exits, record_queries(model, on=recording(ctx)) as trace:
                functional_call(model, params, (ids[None],), {"use_cache": False, "logits_to_keep": NO_LOGITS},
                                strict=False)
            log_queries(ctx, trace and trace.stacked()[:, 0])  # [layer, pos, head * d_head]
            n_pos = len(ids) - 1  # the last position predicts nothing
            per_layer = n_pos * head.weight.shape[0] * head.weight.element_size()
            step = max(1, EXIT_CHUNK_BYTES // per_layer)
            for start in range(0, len(exits), step):
                h = torch.cat(exits[start : start + step], dim=0)[:, :-1]  # [layers, pos - 1, d_model]
                x = functional_call(norm, frozen["norm"], (h,)).flatten(0, 1)
                # the sum over these layers of each exit's mean token loss
                part = exit_loss(x, head, frozen["head"], ids[1:].repeat(len(h)), softcap,
                                 out=self._buffer(len(x), head.weight)) / n_pos / len(batch)
                for n, g in zip(names, torch.autograd.grad(part, [params[n] for n in names], allow_unused=True)):
                    if g is not None:
                        grads[n] += g
                loss += part.detach()
                del part
        return loss, grads

    def grads_many(self, ctx: TrainContext, params, batch):
        """`grads` for every candidate at once (iclgd.processes.lockstep): params {name: [cand, ...]}.

        The blocks run under vmap and return every layer's exit hidden state; the exits' loss runs
        outside vmap, on all candidates' rows at once (the fused cross-entropy has no batching
        rule, and its groups fill the same buffer as one candidate's). Each group's gradient is
        taken with respect to its exit states only, and one backward carries them all through
        the blocks: each block's input is detached, so that is each exit's own backward, as in
        `grads`."""
        from iclgd.capture import math_mode, record_queries

        model = ctx.model
        rec = recording(ctx)
        exit = ctx.config.options.get("exit", "block")
        norm, head = arch.final_norm(model), arch.unembed(model)
        frozen = _frozen_exit_params(model, params)
        softcap = getattr(model.config, "final_logit_softcapping", None)
        names = list(params)
        n_cand = params[names[0]].shape[0]
        grads = {n: torch.zeros_like(params[n]) for n in names}
        loss = torch.zeros(n_cand)
        for ids in batch:
            def exits_of(p, ids=ids):  # one candidate: [layer, pos, d_model] (and its queries)
                with layer_causal(model, exit) as exits, record_queries(model, on=rec) as trace:
                    functional_call(model, p, (ids[None],), {"use_cache": False, "logits_to_keep": NO_LOGITS},
                                    strict=False)
                h = torch.cat(exits, dim=0)
                return (h, trace.stacked()[:, 0]) if rec else h  # q returned: it may not escape vmap

            with math_mode(model):  # SDPA has no vmap batching rule on CPU
                h = vmap(exits_of)(params)
            if rec:
                h, q = h
                log_queries(ctx, q)  # [cand, layer, pos, head * d_head]
            h = h[:, :, :-1]  # [cand, layer, pos - 1, d_model]; the last predicts nothing
            n_layers, n_pos = h.shape[1], h.shape[2]
            flat = h.detach().flatten(0, 1)  # [cand * layer, pos - 1, d_model]
            g_flat = torch.zeros_like(flat)
            per_layer = n_pos * head.weight.shape[0] * head.weight.element_size()
            step = max(1, EXIT_CHUNK_BYTES // per_layer)
            for start in range(0, len(flat), step):
                x_in = flat[start : start + step].detach().requires_grad_(True)  # [exits, pos - 1, d_model]
                x = functional_call(norm, frozen["norm"], (x_in,)).flatten(0, 1)
                rows = exit_loss_rows(x, head, frozen["head"], ids[1:].repeat(len(x_in)), softcap,
                                      out=self._buffer(len(x), head.weight))  # [exits * (pos - 1)]
                part = rows.sum() / n_pos / len(batch)
                (g_flat[start : start + step],) = torch.autograd.grad(part, x_in)
                # each exit's mean token loss, added to its candidate's
                per_exit = rows.detach().view(len(x_in), n_pos).sum(1).float().cpu() / n_pos / len(batch)
                cand = torch.arange(start, start + len(x_in)) // n_layers
                loss.index_add_(0, cand, per_exit)
                del rows, part
            block_grads = torch.autograd.grad(h, [params[n] for n in names], g_flat.view_as(h), allow_unused=True)
            for n, g in zip(names, block_grads):
                if g is not None:
                    grads[n] += g
        return loss, grads

    def train(self, ctx: TrainContext) -> TrainResult:
        try:
            return super().train(ctx)
        finally:
            self._exit_buf = None  # the exit buffer lives for one training run only

    def train_many(self, ctx: TrainContext, lrs):
        try:
            return super().train_many(ctx, lrs)
        finally:
            self._exit_buf = None

    def _buffer(self, rows: int, weight: torch.Tensor) -> torch.Tensor:
        """The exit logits buffer, kept across groups and steps and grown to the longest need."""
        buf = getattr(self, "_exit_buf", None)
        if buf is None or buf.shape[0] < rows or buf.device != weight.device or buf.dtype != weight.dtype:
            buf = self._exit_buf = torch.empty(rows, weight.shape[0], dtype=weight.dtype, device=weight.device)
        return buf


def _frozen_exit_params(model, params) -> dict[str, dict[str, torch.Tensor]]:
    """θ0 of the final norm and unembedding, detached: the exits never train them (SPEC §1)."""
    out = {}
    for key, mod in (("norm", arch.final_norm(model)), ("head", arch.unembed(model))):
        out[key] = {n: p.detach() for n, p in mod.named_parameters()}
    return out
