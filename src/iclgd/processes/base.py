"""The shared machinery of every optimization process (SPEC §1): SGD over the demonstrations,
clipping, per-layer gradient norms and non-finite checks.

A process is a subclass of `Process` registered in `PROCESSES`; it says how to compute the loss
gradients for a batch of demonstration sequences (`grads`) and, if it must, how to evaluate its
result (`evaluate`). Training never touches the model: parameters live in a dict of tensors
(θ0 + Δ for the trained names only) passed through `torch.func.functional_call`, so ZSL, ICL and
every process start from the same θ0 and nothing leaks from one process into the next.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, ClassVar

import torch
from tqdm.auto import tqdm

from iclgd import arch
from iclgd.errors import IclgdError, NonFiniteError
from iclgd.plan import BASE_SETTINGS, CLIP_MODES, ProcessOption
from iclgd.registry import Registry

if TYPE_CHECKING:  # evaluate imports transformers: loaded only when a process evaluates
    from iclgd.evaluate import EvalOptions, Record
    from iclgd.flops import CellTokens, ModelDims


@dataclass(frozen=True)
class ProcessConfig:
    """How one process trains. `options` holds process-specific settings (e.g. LCGD's exit)."""

    name: str
    lr: float
    params: str = "kv"  # trained parameter group: kv, qkvo, attn, all (arch.trainable_params)
    full_batch: bool = False  # one step on all k demonstrations instead of k steps of one
    clip: str | None = None  # one of CLIP_MODES
    clip_value: float | None = None  # the bound for global_l2, layer_l2 and value
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr >= 0):
            raise IclgdError(f"learning rate must be a finite number >= 0, got {self.lr!r}")
        if self.clip is not None:
            if self.clip not in CLIP_MODES:
                from iclgd.registry import unknown_name

                raise unknown_name("clip mode", self.clip, list(CLIP_MODES))
            if self.clip != "match_gd" and (self.clip_value is None or self.clip_value <= 0):
                raise IclgdError(f"clip mode {self.clip!r} needs a positive clip value (e.g. clip={self.clip}:1.0)")

    def with_(self, **kw) -> ProcessConfig:
        return replace(self, **kw)


@dataclass
class TrainContext:
    """What a process trains on: the model, its trained parameters and the demonstrations."""

    model: torch.nn.Module
    sequences: Sequence[Sequence[int]]  # token ids of each formatted demonstration, in order
    config: ProcessConfig
    reference_norms: torch.Tensor | None = None  # [layer, step] GD's gradient norms (match_gd)
    progress: bool = True
    # record q_train, each demonstration token's query in the step that trains on it (the attention
    # ranking, iclgd.ranking_record); `queries` is the current step's list while a step runs
    record_queries: bool = False
    queries: list[torch.Tensor] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.train_params = arch.trainable_params(self.model, self.config.params)
        named = dict(self.model.named_parameters())
        self.theta0 = {tp.name: named[tp.name].detach() for tp in self.train_params}
        self.masks = {tp.name: tp.mask for tp in self.train_params if tp.mask is not None}
        self.layer_of = {tp.name: tp.layer for tp in self.train_params}
        self.n_layers = len(arch.decoder_layers(self.model))


@dataclass
class TrainResult:
    delta: dict[str, torch.Tensor]  # θ − θ0 for each trained parameter
    grad_norms: torch.Tensor  # [layer, step] ℓ2 norm of each layer's gradient (before clipping)
    losses: torch.Tensor  # [step]
    loss_after: float | None = None  # the first batch's loss at the trained weights (iclgd.flags)
    # [layer, demo_tok, head * d_head] q_train (TrainContext.record_queries): every demonstration
    # token's query before the rotary embedding, unscaled, in the step that trained on it, in
    # demonstration order, start tokens dropped; None if not recorded
    queries: torch.Tensor | None = None

    def params(self, theta0: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: theta0[n] + d for n, d in self.delta.items()}


PROCESSES: Registry[type[Process]] = Registry("process")


def register_process(name: str):
    """Class decorator: `@register_process("gd")` makes a `Process` subclass available by name.

    Refuses (IclgdError) a class that is not a Process, a name the setting grammar cannot spell or
    that zsl/icl already use, and a name another class holds (the same class loaded again, e.g. a
    plugin imported twice, replaces itself)."""

    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, Process)):
            raise IclgdError(f"@register_process({name!r}) decorates {cls!r}, which is not a subclass of "
                             "iclgd.processes.Process; subclass Process (or GD) and implement grads()")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in BASE_SETTINGS:
            raise IclgdError(f"process name {name!r} must be letters, digits, '_', '.', '-' and not zsl or icl")
        if name in PROCESSES:
            old = PROCESSES.get(name)
            if (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
                raise IclgdError(f"process {name!r} is already registered by {old.__module__}.{old.__qualname__}; "
                                 f"register {cls.__module__}.{cls.__qualname__} under another name")
        cls.name = name
        PROCESSES.add(name, cls, overwrite=True)
        return cls

    return deco


def log_queries(ctx: TrainContext, q: torch.Tensor | None) -> None:
    """Keep one training sequence's recorded queries if the current step records them (a process's
    `grads` / `grads_many` calls this after each sequence's forward; `Process.train` collects).

    q: [layer, pos, head * d_head], or [cand, layer, pos, head * d_head] in lockstep, position 0
    the start token (dropped: it is never a demonstration token). LinGD passes the linearized
    model's query (primal + tangent)."""
    if ctx.queries is not None and q is not None:
        ctx.queries.append(q.detach()[..., 1:, :].float())


def recording(ctx: TrainContext) -> bool:
    """Whether the current step records q_train (the final loss check does not)."""
    return ctx.queries is not None


def token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Causal-LM cross-entropy summed over predicted tokens / their count. logits [pos, vocab], ids [pos]."""
    return torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="mean")


class Process:
    """Base class: SGD with momentum 0, one step per demonstration in demonstration order.

    `options` declares the setting options this process takes beyond the common ones
    (iclgd.plan's grammar), e.g. LCGD's `{"exit": ProcessOption("block", ("block", "attn"))}`."""

    name = "process"
    options: ClassVar[dict[str, ProcessOption]] = {}

    def grads(self, ctx: TrainContext, params: dict[str, torch.Tensor], batch: list[torch.Tensor]):
        """Return (loss, {name: gradient}) for one batch of demonstration sequences (each [pos])."""
        raise NotImplementedError

    def train(self, ctx: TrainContext) -> TrainResult:
        cfg = ctx.config
        seqs = [torch.tensor(list(s), dtype=torch.long, device=ctx.model.device) for s in ctx.sequences]
        if not seqs:
            raise IclgdError(f"{self.name}: no demonstrations to train on (k = 0)")
        batches = [seqs] if cfg.full_batch else [[s] for s in seqs]
        delta = {n: torch.zeros_like(p) for n, p in ctx.theta0.items()}
        norms = torch.zeros(ctx.n_layers, len(batches))
        losses = torch.zeros(len(batches))
        bar = tqdm(batches, desc=f"train {self.name}", unit="step", disable=not ctx.progress, leave=False)
        recorded: list[torch.Tensor] = []  # q_train per sequence [layer, pos - 1, head * d_head]
        for step, batch in enumerate(bar):
            params = {n: (ctx.theta0[n] + delta[n]).requires_grad_(True) for n in delta}
            ctx.queries = [] if ctx.record_queries else None
            try:
                loss, grads = self.grads(ctx, params, batch)
            finally:
                recorded += ctx.queries or []
                ctx.queries = None
            if not torch.isfinite(loss):
                raise NonFiniteError(
                    f"{self.name}: non-finite loss ({loss.item()}) at step {step} with lr {cfg.lr}; "
                    "lower the learning rate or check the demonstrations"
                )
            grads = {n: g * ctx.masks[n] if n in ctx.masks else g for n, g in grads.items()}
            norms[:, step] = layer_norms(grads, ctx.layer_of, ctx.n_layers)
            bad = non_finite_layers(grads, ctx.layer_of, norms[:, step])
            if bad:
                raise NonFiniteError(
                    f"{self.name}: non-finite gradient at step {step}, layer(s) {bad}, "
                    f"with lr {cfg.lr}; lower the learning rate or enable clipping"
                )
            grads = clip(grads, cfg, ctx, step)
            for n, g in grads.items():
                delta[n] = delta[n] - cfg.lr * g.detach()
            losses[step] = loss.detach()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        # the first batch once more at the trained weights: did training lower its loss? (flags)
        params = {n: (ctx.theta0[n] + delta[n]).requires_grad_(True) for n in delta}
        loss_after = float(self.grads(ctx, params, batches[0])[0])
        return TrainResult(delta, norms, losses, loss_after, train_queries(recorded, len(seqs)))

    def grads_many(self, ctx: TrainContext, params: dict[str, torch.Tensor], batch: list[torch.Tensor]):
        """`grads` for several candidates at once: params {name: [cand, ...]} -> (loss [cand],
        {name: [cand, ...]}), row c equal to `grads` at candidate c's parameters. Optional: a
        process that defines it trains a learning-rate search's candidates in lockstep
        (iclgd.processes.lockstep); without it they train one by one."""
        raise NotImplementedError

    def train_many(self, ctx: TrainContext, lrs: Sequence[float]) -> list[TrainResult | IclgdError]:
        """Train one candidate per learning rate from θ0 (ctx.config's other options): each entry
        is the candidate's TrainResult or the IclgdError that stopped it. In lockstep where the
        process supports it (`lockstep.supported`), else (and for a single rate, which gains
        nothing from batching) one `train` after another."""
        from iclgd.processes import lockstep

        if len(lrs) > 1 and lockstep.supported(type(self)):
            return lockstep.train(self, ctx, lrs)
        out: list[TrainResult | IclgdError] = []
        for lr in lrs:
            one = replace(ctx, config=ctx.config.with_(lr=lr))
            try:
                out.append(self.train(one))
            except IclgdError as err:
                out.append(err)
        return out

    def score_many(self, ctx: TrainContext, results: Sequence[TrainResult], queries, label_ids, *,
                   prefix=(), batch_size: int = 16, pad_id: int = 0) -> torch.Tensor:
        """Label log-probabilities [cand, batch, label] of the queries (as `evaluate` records them)
        under each trained candidate. Batched over the candidates (`label_logprobs_many`) unless
        `evaluate` is overridden below the class that batches, then one `evaluate` per candidate."""
        from iclgd.processes import lockstep

        if lockstep.batched_below(type(self), "label_logprobs_many", ("evaluate",)):
            return self.label_logprobs_many(ctx, results, queries, label_ids, prefix=prefix,
                                            batch_size=batch_size, pad_id=pad_id)
        from iclgd.evaluate import EvalOptions

        opts = EvalOptions(batch_size=batch_size, progress=False)
        gold = [0] * len(queries)  # scoring reads the log-probabilities only
        return torch.stack([self.evaluate(ctx, r, queries, gold, label_ids, prefix=prefix, options=opts,
                                          pad_id=pad_id).label_logprobs for r in results])

    def label_logprobs_many(self, ctx: TrainContext, results: Sequence[TrainResult], queries, label_ids, *,
                            prefix=(), batch_size: int = 16, pad_id: int = 0) -> torch.Tensor:
        """The batched `score_many` for processes evaluated at θ0 + Δ (as `Process.evaluate`)."""
        from iclgd.evaluate import label_logprobs_many

        stacked = {n: torch.stack([ctx.theta0[n] + r.delta[n] for r in results]) for n in ctx.theta0}
        return label_logprobs_many(ctx.model, queries, label_ids, prefix=prefix, params=stacked,
                                   batch_size=batch_size, pad_id=pad_id)

    def evaluate(self, ctx: TrainContext, result: TrainResult, queries, gold, label_ids, *,
                 prefix=(), options: EvalOptions | None = None, pad_id: int = 0) -> Record:
        """Run the query prompts alone with the trained parameters (SPEC §1)."""
        from iclgd.evaluate import EvalOptions, evaluate

        rec = evaluate(ctx.model, queries, gold, label_ids, prefix=prefix, params=result.params(ctx.theta0),
                       options=options or EvalOptions(), pad_id=pad_id, desc=f"eval {self.name}")
        rec.extras.update(grad_norms=result.grad_norms, losses=result.losses)
        return rec

    def train_flops(self, dims: ModelDims, seq_len: int) -> int:
        """The FLOP floor of training on one sequence of `seq_len` tokens (iclgd.flops); a process
        without one is left out of `iclgd bench`'s floor."""
        raise NotImplementedError(f"process {self.name!r} has no FLOP model")

    def eval_flops(self, dims: ModelDims, tokens: CellTokens) -> int:
        """The FLOP floor of evaluating the queries: by default ZSL's (the query alone)."""
        from iclgd.flops import query_flops

        return query_flops(dims, tokens)

    def train_flops_many(self, dims: ModelDims, seq_len: int, n: int) -> int:
        """The floor of training n candidates on one sequence in lockstep: by default n times
        `train_flops` (a process whose candidates share work, as LinGD's primal, says so)."""
        return n * self.train_flops(dims, seq_len)

    def eval_flops_many(self, dims: ModelDims, tokens: CellTokens, n: int) -> int:
        """The floor of scoring n candidates on the queries: by default n times `eval_flops`."""
        return n * self.eval_flops(dims, tokens)


def train_queries(recorded: list[torch.Tensor], n_seqs: int) -> torch.Tensor | None:
    """q_train [layer, demo_tok, head * d_head] from one tensor per training sequence, or None if
    the process did not record every sequence (one whose `grads` does not call `log_queries`)."""
    if len(recorded) != n_seqs or not recorded:
        return None
    return torch.cat(recorded, dim=1)


def layer_norms(grads: dict[str, torch.Tensor], layer_of: dict[str, int], n_layers: int) -> torch.Tensor:
    """ℓ2 norm of each layer's gradient [layer] (parameters outside blocks are left out)."""
    sq = torch.zeros(n_layers)
    for n, g in grads.items():
        if layer_of[n] >= 0:
            sq[layer_of[n]] += g.detach().float().pow(2).sum().cpu()
    return sq.sqrt()


def non_finite_layers(grads: dict[str, torch.Tensor], layer_of: dict[str, int], norms: torch.Tensor) -> list[int]:
    """Layers (-1: outside the blocks) with a non-finite gradient entry. A finite layer norm
    proves its entries finite, so only layers whose norm is not finite are scanned."""
    suspect = {n: g for n, g in grads.items() if layer_of[n] < 0 or not math.isfinite(norms[layer_of[n]])}
    return sorted({layer_of[n] for n, g in suspect.items() if not torch.isfinite(g).all()})


def clip(grads: dict[str, torch.Tensor], cfg: ProcessConfig, ctx: TrainContext, step: int):
    """Apply the configured clipping; returns new gradients (inputs are not modified)."""
    if cfg.clip is None:
        return grads
    if cfg.clip == "value":
        return {n: g.clamp(-cfg.clip_value, cfg.clip_value) for n, g in grads.items()}
    if cfg.clip == "global_l2":
        total = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
        scale = min(1.0, cfg.clip_value / (float(total) + 1e-12))
        return {n: g * scale for n, g in grads.items()}
    norms = layer_norms(grads, ctx.layer_of, ctx.n_layers)  # [layer]
    if cfg.clip == "layer_l2":
        bound = torch.full_like(norms, cfg.clip_value)
    else:  # match_gd: each layer to GD's norm at the same layer and step
        if ctx.reference_norms is None or ctx.reference_norms.shape[1] <= step:
            raise IclgdError("clip=match_gd needs GD's gradient norms from the same cell; run 'gd' too")
        bound = ctx.reference_norms[:, step]
    scale = torch.clamp(bound / (norms + 1e-12), max=1.0)  # [layer]
    return {n: g * scale[ctx.layer_of[n]].to(g) if ctx.layer_of[n] >= 0 else g for n, g in grads.items()}
