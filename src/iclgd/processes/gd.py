"""GD: vanilla finetuning of the trained parameters on the demonstrations (SPEC §1)."""

from __future__ import annotations

import functools

import torch
from torch.func import functional_call, vmap

from iclgd.processes.base import (
    Process,
    TrainContext,
    log_queries,
    recording,
    register_process,
    token_loss,
)


def lm_logits(model, params, ids: torch.Tensor) -> torch.Tensor:
    """The model's next-token logits [pos, vocab] for one sequence ids [pos] under `params`."""
    out = functional_call(model, params, (ids[None],), {"use_cache": False}, strict=False)
    return out.logits[0]


@register_process("gd")
class GD(Process):
    """Loss: token cross-entropy of each demonstration (mean over its tokens; mean over a batch)."""

    def grads(self, ctx: TrainContext, params, batch):
        from iclgd.capture import record_queries

        total = 0
        for ids in batch:
            with record_queries(ctx.model, on=recording(ctx)) as trace:
                logits = lm_logits(ctx.model, params, ids)
            log_queries(ctx, trace and trace.stacked()[:, 0])  # [layer, pos, head * d_head]
            total = total + token_loss(logits, ids)
        loss = total / len(batch)
        names = list(params)
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        return loss.detach(), dict(zip(names, grads))

    def grads_many(self, ctx: TrainContext, params, batch):
        """`grads` for every candidate at once (iclgd.processes.lockstep): params {name: [cand, ...]}."""
        from iclgd.capture import math_mode, record_queries

        model = ctx.model
        rec = recording(ctx)

        def loss_of(p, ids):  # one candidate's token loss on one demonstration (and its queries)
            with record_queries(model, on=rec) as trace:
                loss = token_loss(lm_logits(model, p, ids), ids)
            return (loss, trace.stacked()[:, 0]) if rec else loss  # q returned: it may not escape vmap

        # The explicit attention math: SDPA has no vmap batching rule on CPU and would run the
        # candidates one by one.
        with math_mode(model):
            total = 0
            for ids in batch:
                out = vmap(functools.partial(loss_of, ids=ids))(params)  # [cand]
                if rec:
                    out, q = out
                    log_queries(ctx, q)  # [cand, layer, pos, head * d_head]
                total = total + out
            loss = total / len(batch)
        names = list(params)
        grads = torch.autograd.grad(loss.sum(), [params[n] for n in names])  # candidates never interact
        return loss.detach(), dict(zip(names, grads))

    def train_flops(self, d, seq_len: int) -> int:
        """Logits at every position, backward through every block."""
        from iclgd.flops import backward_flops, forward_flops

        return forward_flops(d, seq_len, logits=seq_len) + backward_flops(d, seq_len, logits=seq_len)
