"""LinGD: GD on the first-order Taylor model f_lin(x; θ) = f(x; θ0) + J(x; θ0)(θ − θ0) (SPEC §1).

Both products with the Jacobian use standard AD, never a materialized J: each step is one
forward-mode pass at θ0 in the direction Δ = θ − θ0 (`iclgd.dual.first_order`) giving f(θ0) and
J·Δ, and the gradient of the loss at f_lin, Jᵀ·g, is one ordinary backward through that pass's
primal (which keeps its autograd graph) with output gradient g. The query is then
evaluated with every recorded quantity linearized the same way.

q_train (the attention ranking, iclgd.ranking_record) is the query of the linearized model,
q(θ0) + J_q(θ0)·Δ, the same first-order value as every quantity LinGD evaluates: its primal plus
tangent from the step's own forward-mode pass, so it costs no extra pass.
"""

from __future__ import annotations

import torch

from iclgd.dual import first_order, first_order_many
from iclgd.processes.base import (
    Process,
    TrainContext,
    TrainResult,
    log_queries,
    recording,
    register_process,
    token_loss,
)
from iclgd.processes.gd import lm_logits


def _outputs(model, params, ids, record: bool) -> dict[str, torch.Tensor]:
    """The function a step linearizes: logits [pos, vocab], and with `record` the queries
    [layer, pos, head * d_head] (returned, not stored: first_order unpacks their dual numbers)."""
    from iclgd.capture import record_queries

    with record_queries(model, on=record) as trace:
        out = {"logits": lm_logits(model, params, ids)}
    if trace is not None:
        out["q"] = trace.stacked()[:, 0]
    return out


@register_process("lingd")
class LinGD(Process):
    def grads(self, ctx: TrainContext, params, batch):
        from iclgd.capture import math_mode

        model, theta0 = ctx.model, ctx.theta0
        delta = {n: (params[n] - theta0[n]).detach() for n in params}
        names = list(theta0)
        total = torch.zeros(())
        grads = {n: torch.zeros_like(p) for n, p in theta0.items()}
        for ids in batch:
            # One forward-mode pass gives f(θ0) and J·Δ; the primal keeps its graph to θ0, so
            # Jᵀg is the backward of that same pass.
            leaves = {n: p.detach().requires_grad_(True) for n, p in theta0.items()}
            with math_mode(model):  # SDPA has no forward-mode derivative on CPU
                f0, jd = first_order(lambda p, ids=ids: _outputs(model, p, ids, recording(ctx)), leaves, delta)
            if "q" in f0:  # the linearized model's queries: primal + tangent [layer, pos, head * d_head]
                log_queries(ctx, f0["q"] + jd["q"])
            lin = (f0["logits"] + jd["logits"]).detach().requires_grad_(True)  # [pos, vocab]
            loss = token_loss(lin, ids) / len(batch)
            (g_out,) = torch.autograd.grad(loss, lin)
            for n, g in zip(names, torch.autograd.grad(f0["logits"], [leaves[n] for n in names], g_out)):
                grads[n] += g
            total = total + loss.detach()
        return total, grads

    def grads_many(self, ctx: TrainContext, params, batch):
        """`grads` for every candidate at once (iclgd.processes.lockstep): params {name: [cand, ...]}.

        f(θ0) is the same for every candidate (and every step): one forward-mode pass computes it
        once with the candidates' tangents J·Δ_c batched (`dual.first_order_many`), and Jᵀg_c for
        all c is one batched backward through that one primal (`is_grads_batched`)."""
        from iclgd.capture import math_mode

        model, theta0 = ctx.model, ctx.theta0
        deltas = {n: (params[n] - theta0[n]).detach() for n in params}  # [cand, ...]
        names = list(theta0)
        n_cand = deltas[names[0]].shape[0]
        total = torch.zeros(n_cand)
        grads = {n: torch.zeros_like(params[n]) for n in names}
        for ids in batch:
            leaves = {n: p.detach().requires_grad_(True) for n, p in theta0.items()}
            with math_mode(model):
                f0, jd = first_order_many(lambda p, ids=ids: _outputs(model, p, ids, recording(ctx)), leaves, deltas)
            if "q" in f0:  # [cand, layer, pos, head * d_head]
                log_queries(ctx, f0["q"][None] + jd["q"])
            lin = (f0["logits"] + jd["logits"]).detach().requires_grad_(True)  # [cand, pos, vocab]
            loss = torch.stack([token_loss(lin[c], ids) for c in range(n_cand)]) / len(batch)  # [cand]
            (g_out,) = torch.autograd.grad(loss.sum(), lin)  # [cand, pos, vocab]: row c is candidate c's
            batched = torch.autograd.grad(f0["logits"], [leaves[n] for n in names], g_out, is_grads_batched=True)
            for n, g in zip(names, batched):
                grads[n] += g
            total = total + loss.detach().float().cpu()
        return total, grads

    def label_logprobs_many(self, ctx: TrainContext, results, queries, label_ids, *, prefix=(), batch_size=16,
                            pad_id=0):
        """Every candidate's linearized label log-probabilities, f(θ0) computed once."""
        from iclgd.evaluate import label_logprobs_many

        deltas = {n: torch.stack([r.delta[n] for r in results]) for n in ctx.theta0}
        return label_logprobs_many(ctx.model, queries, label_ids, prefix=prefix, linearize=(ctx.theta0, deltas),
                                   batch_size=batch_size, pad_id=pad_id)

    def evaluate(self, ctx: TrainContext, result: TrainResult, queries, gold, label_ids, *,
                 prefix=(), options=None, pad_id: int = 0):
        from iclgd.evaluate import EvalOptions, evaluate

        rec = evaluate(ctx.model, queries, gold, label_ids, prefix=prefix, linearize=(ctx.theta0, result.delta),
                       options=options or EvalOptions(), pad_id=pad_id, desc=f"eval {self.name}")
        rec.extras.update(grad_norms=result.grad_norms, losses=result.losses)
        return rec

    def train_flops(self, d, seq_len: int) -> int:
        """A jvp (primal + tangent) and one backward per step."""
        from iclgd.flops import backward_flops, forward_flops

        return forward_flops(d, seq_len, logits=seq_len) + 2 * backward_flops(d, seq_len, logits=seq_len)

    def train_flops_many(self, d, seq_len: int, n: int) -> int:
        """n candidates share the primal f(θ0): one forward, then a tangent and a backward each."""
        from iclgd.flops import backward_flops, forward_flops

        return forward_flops(d, seq_len, logits=seq_len) + n * 2 * backward_flops(d, seq_len, logits=seq_len)

    def eval_flops_many(self, d, tokens, n: int) -> int:
        """n candidates share the primal: one query forward, then a tangent each."""
        from iclgd.flops import backward_flops, query_flops

        return query_flops(d, tokens) + n * sum(backward_flops(d, tokens.bos + q) for q in tokens.query_lens)

    def eval_flops(self, d, tokens) -> int:
        """The query as a jvp: primal plus tangent."""
        from iclgd.flops import backward_flops, query_flops

        return query_flops(d, tokens) + sum(backward_flops(d, tokens.bos + q) for q in tokens.query_lens)
