"""GD: vanilla finetuning of the trained parameters on the demonstrations (SPEC §1)."""

from __future__ import annotations

import functools

import torch
from torch.func import functional_call, vmap

from iclgd.processes.base import Process, TrainContext, register_process, token_loss


def lm_logits(model, params, ids: torch.Tensor) -> torch.Tensor:
    """The model's next-token logits [pos, vocab] for one sequence ids [pos] under `params`."""
    out = functional_call(model, params, (ids[None],), {"use_cache": False}, strict=False)
    return out.logits[0]


@register_process("gd")
class GD(Process):
    """Loss: token cross-entropy of each demonstration (mean over its tokens; mean over a batch)."""

    def grads(self, ctx: TrainContext, params, batch):
        loss = sum(token_loss(lm_logits(ctx.model, params, ids), ids) for ids in batch) / len(batch)
        names = list(params)
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        return loss.detach(), dict(zip(names, grads))

    def grads_many(self, ctx: TrainContext, params, batch):
        """`grads` for every candidate at once (iclgd.processes.lockstep): params {name: [cand, ...]}."""
        from iclgd.capture import math_mode

        model = ctx.model

        def loss_of(p, ids):  # one candidate's token loss on one demonstration
            return token_loss(lm_logits(model, p, ids), ids)

        # The explicit attention math: SDPA has no vmap batching rule on CPU and would run the
        # candidates one by one.
        with math_mode(model):
            loss = sum(vmap(functools.partial(loss_of, ids=ids))(params) for ids in batch) / len(batch)  # [cand]
        names = list(params)
        grads = torch.autograd.grad(loss.sum(), [params[n] for n in names])  # candidates never interact
        return loss.detach(), dict(zip(names, grads))

    def train_flops(self, d, seq_len: int) -> int:
        """Logits at every position, backward through every block."""
        from iclgd.flops import backward_flops, forward_flops

        return forward_flops(d, seq_len, logits=seq_len) + backward_flops(d, seq_len, logits=seq_len)
