"""Several learning rates of one process trained in lockstep, as one batched computation.

A learning-rate search (iclgd.lrsearch) trains every candidate rate from θ0 on the same
demonstrations in the same order. Run one by one, each candidate encodes each demonstration
alone, on ~31 rows per matmul. In lockstep the trained parameters carry a leading candidate
dimension ([cand, ...]) and a process's `grads_many` computes every candidate's loss and gradient
in one pass (GD and LCGD: `torch.func.vmap` over `functional_call`; LinGD: one primal f(θ0) and
batched tangents), so each step is one forward and backward over cand × pos rows, and everything
below the first trained weight runs once.

Candidates never interact: each one's rows depend only on its own parameters, so the gradient of
the sum of the candidates' losses with respect to the stacked parameters is each candidate's own
gradient. The SGD update, the per-layer norms, the non-finite checks and every clipping mode are
applied per candidate, exactly as `Process.train` applies them to one; tests/test_lrsearch.py
checks that the result equals training each candidate alone, for every process, with and
without clipping. With `TrainContext.record_queries` each step's q_train comes back stacked over
the candidates still training ([cand, layer, pos, d]) and is split per candidate here, so the
search's winner carries its own (tests/test_ranking_record.py). A candidate whose loss or gradient is non-finite stops there with the error
`Process.train` would raise (a diverging rate is a legitimate loser of a search) and leaves the
others running.

Shapes: cand = candidates still training; layer = decoder blocks; step = training steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from iclgd.errors import IclgdError, NonFiniteError

if TYPE_CHECKING:
    from iclgd.processes.base import Process, TrainContext, TrainResult


def supported(cls: type) -> bool:
    """True if `cls` can train candidates in lockstep: some class defines `grads_many`, and
    neither `grads` nor `train` is overridden below that class. A plugin that subclasses GD and
    overrides only `grads` (the README's sign-GD) changes the update GD's `grads_many` computes,
    so it trains its candidates one by one."""
    from iclgd.processes.base import Process

    return _owner(cls, "grads_many") is not Process and batched_below(cls, "grads_many", ("grads", "train"))


def batched_below(cls: type, batched: str, singles: Sequence[str]) -> bool:
    """True if the class that defines `batched` for `cls` sits at or below every class that
    defines one of `singles` (so the batched method computes what the single ones would)."""
    from iclgd.processes.base import Process

    owner = _owner(cls, batched)
    return owner is not None and all(issubclass(owner, _owner(cls, name) or Process) for name in singles)


def _owner(cls: type, name: str) -> type | None:
    """The class in cls's MRO whose own namespace defines `name`."""
    return next((c for c in cls.__mro__ if name in vars(c)), None)


def train(proc: Process, ctx: TrainContext, lrs: Sequence[float]) -> list[TrainResult | IclgdError]:
    """Train one candidate per learning rate in lockstep; each entry is the candidate's
    TrainResult, or the error that stopped it (as `Process.train` would have raised it)."""
    from iclgd.processes.base import TrainResult, train_queries

    cfg = ctx.config
    seqs = [torch.tensor(list(s), dtype=torch.long, device=ctx.model.device) for s in ctx.sequences]
    if not seqs:
        raise IclgdError(f"{proc.name}: no demonstrations to train on (k = 0)")
    if not lrs:
        return []
    for lr in lrs:
        cfg.with_(lr=lr)  # the same check of each rate as a ProcessConfig of its own
    batches = [seqs] if cfg.full_batch else [[s] for s in seqs]
    n_steps, n_cand = len(batches), len(lrs)
    alive = list(range(n_cand))  # candidate indices still training, in the order of the stacks
    errors: dict[int, IclgdError] = {}
    delta = {n: torch.zeros((n_cand, *p.shape), dtype=p.dtype, device=p.device)
             for n, p in ctx.theta0.items()}  # [cand, ...]
    norms = torch.zeros(n_cand, ctx.n_layers, n_steps)  # [cand, layer, step]
    losses = torch.zeros(n_cand, n_steps)  # [cand, step]
    recorded: list[list[torch.Tensor]] = [[] for _ in range(n_cand)]  # q_train per candidate and sequence
    bar = tqdm(batches, desc=f"train {proc.name} x{n_cand}", unit="step", disable=not ctx.progress, leave=False)
    for step, batch in enumerate(bar):
        rate = torch.tensor([lrs[c] for c in alive], dtype=torch.float32)  # [cand]
        params = {n: (ctx.theta0[n] + delta[n]).requires_grad_(True) for n in delta}
        ctx.queries = [] if ctx.record_queries else None
        try:
            loss, grads = proc.grads_many(ctx, params, batch)  # [cand], {name: [cand, ...]}
        finally:
            step_queries, ctx.queries = ctx.queries or [], None
        for q in step_queries:  # [cand, layer, pos - 1, d], rows in the order of `alive`
            for j, c in enumerate(alive):
                recorded[c].append(q[j])
        grads = {n: g * ctx.masks[n] if n in ctx.masks else g for n, g in grads.items()}
        step_norms = layer_norms_many(grads, ctx.layer_of, ctx.n_layers)  # [cand, layer]
        keep = []
        for j, c in enumerate(alive):
            err = _check(proc, grads, ctx, loss[j], step_norms[j], j, step, lrs[c])
            if err is None:
                keep.append(j)
            else:
                errors[c] = err
        if len(keep) < len(alive):  # drop the diverged candidates' rows from every stack
            sel = torch.tensor(keep, dtype=torch.long)
            grads = {n: g[sel.to(g.device)] for n, g in grads.items()}
            delta = {n: d[sel.to(d.device)] for n, d in delta.items()}
            loss, step_norms, rate = loss[sel], step_norms[sel], rate[sel]
            alive = [alive[j] for j in keep]
            if not alive:
                break
        idx = torch.tensor(alive, dtype=torch.long)
        norms[idx, :, step] = step_norms
        losses[idx, step] = loss.detach().float().cpu()
        grads = clip_many(grads, cfg, ctx, step, step_norms)
        for n, g in grads.items():
            # lr · g in float, rounded to g's dtype: what `cfg.lr * g` does with a Python number
            # (for bfloat16 too: the rate itself is never rounded to the parameters' dtype)
            r = rate.to(g.device).view(-1, *([1] * (g.dim() - 1)))
            delta[n] = delta[n] - (r * g.detach().float()).to(g.dtype)
        bar.set_postfix(loss=" ".join(f"{x:.3f}" for x in loss.tolist()))
    after = None
    if alive:  # the first batch once more at the trained weights (iclgd.flags), as Process.train does
        params = {n: (ctx.theta0[n] + delta[n]).requires_grad_(True) for n in delta}
        after = proc.grads_many(ctx, params, batches[0])[0]
    out: list[TrainResult | IclgdError] = []
    for c in range(n_cand):
        if c in errors:
            out.append(errors[c])
            continue
        j = alive.index(c)
        # a copy, not a view: the kept winner must not hold every candidate's stack alive
        out.append(TrainResult({n: d[j].clone() for n, d in delta.items()}, norms[c], losses[c], float(after[j]),
                               train_queries(recorded[c], len(seqs))))
    return out


def _check(proc, grads, ctx, loss, norms, j: int, step: int, lr: float) -> IclgdError | None:
    """Process.train's non-finite checks for candidate j (its row of every stack)."""
    if not torch.isfinite(loss):
        return NonFiniteError(
            f"{proc.name}: non-finite loss ({loss.item()}) at step {step} with lr {lr}; "
            "lower the learning rate or check the demonstrations")
    from iclgd.processes.base import non_finite_layers

    bad = non_finite_layers({n: g[j] for n, g in grads.items()}, ctx.layer_of, norms)
    if bad:
        return NonFiniteError(
            f"{proc.name}: non-finite gradient at step {step}, layer(s) {bad}, "
            f"with lr {lr}; lower the learning rate or enable clipping")
    return None


def layer_norms_many(grads: dict[str, torch.Tensor], layer_of: dict[str, int], n_layers: int) -> torch.Tensor:
    """ℓ2 norm of each candidate's gradient per layer [cand, layer] (grads {name: [cand, ...]});
    row c equals `base.layer_norms` of candidate c's gradients."""
    n_cand = next(iter(grads.values())).shape[0]
    sq = torch.zeros(n_cand, n_layers)
    for n, g in grads.items():
        if layer_of[n] >= 0:
            sq[:, layer_of[n]] += g.detach().float().pow(2).flatten(1).sum(1).cpu()
    return sq.sqrt()


def clip_many(grads: dict[str, torch.Tensor], cfg, ctx: TrainContext, step: int,
              norms: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """`base.clip` applied to each candidate's gradients (grads {name: [cand, ...]}, norms
    [cand, layer] from `layer_norms_many` if already computed). match_gd clips every candidate to
    the same bound: GD's norm at the same layer and step (`ctx.reference_norms`)."""
    if cfg.clip is None:
        return grads
    if cfg.clip == "value":
        return {n: g.clamp(-cfg.clip_value, cfg.clip_value) for n, g in grads.items()}
    if cfg.clip == "global_l2":
        total = torch.sqrt(sum(g.pow(2).flatten(1).sum(1) for g in grads.values()))  # [cand]
        # float64 from here, as base.clip's Python floats
        scale = torch.clamp(cfg.clip_value / (total.double() + 1e-12), max=1.0)
        return {n: (g.float() * scale.to(g.device, torch.float32).view(-1, *([1] * (g.dim() - 1)))).to(g.dtype)
                for n, g in grads.items()}
    if norms is None:
        norms = layer_norms_many(grads, ctx.layer_of, ctx.n_layers)  # [cand, layer]
    if cfg.clip == "layer_l2":
        bound = torch.full_like(norms, cfg.clip_value)
    else:  # match_gd
        if ctx.reference_norms is None or ctx.reference_norms.shape[1] <= step:
            raise IclgdError("clip=match_gd needs GD's gradient norms from the same cell; run 'gd' too")
        bound = ctx.reference_norms[:, step][None].expand_as(norms)
    scale = torch.clamp(bound / (norms + 1e-12), max=1.0)  # [cand, layer]
    out = {}
    for n, g in grads.items():
        layer = ctx.layer_of[n]
        if layer < 0:
            out[n] = g
        else:
            out[n] = g * scale[:, layer].to(g).view(-1, *([1] * (g.dim() - 1)))
    return out
