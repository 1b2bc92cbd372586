"""Evaluate query prompts and record what SPEC §2-3 asks for, one `Record` per setting.

Every setting is evaluated by this one function, so ZSL, ICL and every process compare like
with like: ZSL is `evaluate(prefix=BOS)`, ICL is `evaluate(prefix=BOS+demonstrations)`, a
process is `evaluate(prefix=BOS, params=its trained parameters)` and LinGD is the same with
`linearize=(theta0, delta)`.

ICL's demonstrations are identical for every eval example, so they are encoded once and their
key/value cache is reused for every batch of queries (`cache_prefix=True`): the batch attends to
the one batch-1 cache through `capture.shared_prefix`, with no per-batch copy (GPT-Neo, whose
attention kernel is its own, gets the cache repeated along the batch). Tests check that this
equals full re-encoding. Queries are right-padded, so real tokens never see padding and
positions stay contiguous in every architecture.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call
from tqdm.auto import tqdm

from iclgd.capture import Plan, capture, shared_prefix, supports_shared_prefix, use_iclgd_attention
from iclgd.compat import cache_kwargs, output_cache
from iclgd.dual import first_order
from iclgd.errors import IclgdError

RECORD_AT = ("last", "label")
NO_LOGITS = torch.zeros(0, dtype=torch.long)  # `logits_to_keep` that selects no position


@dataclass
class Record:
    """One setting's per-example arrays (the run folder's records/SETTING.npz)."""

    label_logprobs: torch.Tensor  # [batch, label]
    pred: torch.Tensor  # [batch] int64
    gold: torch.Tensor  # [batch] int64
    attn_out: torch.Tensor  # [batch, layer, d_model]
    attn_logits: torch.Tensor  # [batch, layer, head, q_pos], NaN past q_len
    q_len: torch.Tensor  # [batch] int64
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # grad_norms [layer, step], ...

    @property
    def accuracy(self) -> float:
        return float((self.pred == self.gold).float().mean())

    def arrays(self) -> dict[str, np.ndarray]:
        out = {k: getattr(self, k) for k in ("label_logprobs", "pred", "gold", "attn_out", "attn_logits", "q_len")}
        out.update(self.extras)
        return {k: v.detach().cpu().numpy() for k, v in out.items()}

    def save(self, path: str | Path) -> None:
        np.savez(path, **self.arrays())

    @classmethod
    def load(cls, path: str | Path) -> Record:
        with np.load(path) as z:
            arrays = {k: torch.from_numpy(z[k]) for k in z.files}
        core = {k: arrays.pop(k) for k in ("label_logprobs", "pred", "gold", "attn_out", "attn_logits", "q_len")}
        return cls(**core, extras=arrays)


@dataclass(frozen=True)
class EvalOptions:
    batch_size: int = 16
    record_at: str = "last"  # "last": the query's last token; "label": an appended label token (reference code)
    cache_prefix: bool = True  # encode demonstrations once and reuse their key/value cache
    progress: bool = True
    # the attention ranking (iclgd.ranking_record): ICL's side at these demonstration token
    # positions of the prefix, or a process's side (q before the rotary embedding); off by default
    demo_pos: tuple[int, ...] | None = None
    queries: bool = False

    def __post_init__(self) -> None:
        if self.record_at not in RECORD_AT:
            raise IclgdError(f"record_at must be one of {RECORD_AT}, got {self.record_at!r}")
        if self.batch_size < 1:
            raise IclgdError(f"batch_size must be >= 1, got {self.batch_size}")


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists -> input_ids [batch, pos], attention_mask [batch, pos]."""
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def run_captured(model, params, input_ids, attention_mask, plan: Plan, past=None) -> dict[str, torch.Tensor]:
    """One forward pass under capture; a pure function of `params` (so jvp can linearize it).

    Returns attn_out [batch, layer, d_model], attn_logits [batch, layer, head, q_pos],
    logits [batch, vocab] at plan.pred_pos.
    """
    # The capture computes the logits it needs at plan.pred_pos; the model's own head gets no
    # positions (an empty index), which also keeps forward-mode AD off the vocabulary matrix.
    kwargs = dict(attention_mask=attention_mask, logits_to_keep=NO_LOGITS)
    if past is not None:
        kwargs.update(cache_kwargs(model, past), use_cache=True)
    else:
        kwargs.update(use_cache=False)
    with capture(model, plan) as cap:
        if params:
            functional_call(model, params, (input_ids,), kwargs, strict=False)
        else:
            model(input_ids, **kwargs)
    return cap.stacked()


def encode_prefix(model, prefix: Sequence[int], params=None):
    """Run the demonstration prefix once and return its key/value cache."""
    ids = torch.tensor([list(prefix)], dtype=torch.long, device=model.device)
    kwargs = dict(use_cache=True, logits_to_keep=NO_LOGITS)
    with torch.no_grad():
        out = functional_call(model, params, (ids,), kwargs, strict=False) if params else model(ids, **kwargs)
    return output_cache(out)


def evaluate(
    model,
    queries: Sequence[Sequence[int]],
    gold: Sequence[int],
    label_ids: Sequence[int],
    *,
    prefix: Sequence[int] = (),
    params: dict[str, torch.Tensor] | None = None,
    linearize: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None,
    options: EvalOptions = EvalOptions(),
    pad_id: int = 0,
    desc: str = "eval",
) -> Record:
    """Evaluate each query after `prefix` and record SPEC §3's internals at its recording position.

    `params` overrides named parameters (a trained process) without touching the model.
    `linearize=(theta0, delta)` evaluates the first-order Taylor model around theta0 in the
    direction delta: every recorded quantity (vocabulary logits, attention outputs, attention
    logits) is primal + tangent of one forward-mode AD pass (`first_order`).

    The attention ranking's inputs, where `options` asks for them (capture's module docstring),
    come back in `Record.extras`: per example icl_q [batch, layer, head, d_head] and icl_seen
    [batch, layer], and icl_keys [layer, kv_head, demo_tok, d_head] and attn_scaling [layer]
    (`options.demo_pos`), or query [batch, layer, head * d_head] (`options.queries`). The caller
    takes them out before the record is stored (iclgd.ranking_record).
    """
    if len(queries) == 0:
        raise IclgdError("no eval examples to evaluate (empty eval set)")
    if len(queries) != len(gold):
        raise IclgdError(f"{len(queries)} queries but {len(gold)} gold labels")
    use_iclgd_attention(model)
    label_ids_t = torch.tensor(list(label_ids), dtype=torch.long)
    appended = [label_ids[0]] if options.record_at == "label" else []
    seqs = [list(q) + appended for q in queries]
    # Only a real demonstration prefix is cached; BOS alone is re-encoded with each query, so
    # ZSL and ICL with k = 0 run exactly the same computation.
    cached = options.cache_prefix and linearize is None and len(prefix) > 1
    past = encode_prefix(model, prefix, params) if cached else None
    head = [] if cached else list(prefix)

    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # similar lengths share a batch
    results: list[dict[str, torch.Tensor]] = [None] * len(seqs)  # type: ignore[list-item]
    batches = [order[i : i + options.batch_size] for i in range(0, len(order), options.batch_size)]
    bar = tqdm(batches, desc=desc, unit="batch", disable=not options.progress, leave=False)
    demo_pos = None if options.demo_pos is None else torch.tensor(options.demo_pos, dtype=torch.long)
    shared: dict[str, torch.Tensor] = {}  # outputs that are not per example (the same in every batch)
    for idx in bar:
        chunk = [head + seqs[i] for i in idx]
        input_ids, mask = pad_right(chunk, pad_id)
        own_len = torch.tensor([len(seqs[i]) for i in idx])
        plan = Plan(
            own_start=torch.full((len(idx),), len(head)),
            own_len=own_len,
            pred_pos=len(head) + torch.tensor([len(queries[i]) for i in idx]) - 1,
            math=linearize is not None,
            demo_pos=demo_pos,
            demo_keys="icl_keys" not in shared,  # the prefix's keys: the first batch's serve for all
            prefix_len=len(prefix),
            queries=options.queries,
        )
        input_ids, mask = input_ids.to(model.device), mask.to(model.device)
        if past is not None:
            mask = torch.cat([torch.ones(len(idx), len(prefix), dtype=mask.dtype, device=mask.device), mask], 1)
        if linearize is None:
            with torch.no_grad(), _batch_cache(model, past, len(idx)) as batch_past:
                out = run_captured(model, params, input_ids, mask, plan, batch_past)
        else:
            theta0, delta = linearize
            with torch.no_grad():
                primal, tangent = first_order(
                    lambda p, input_ids=input_ids, mask=mask, plan=plan: run_captured(model, p, input_ids, mask, plan),
                    theta0, delta)
            out = {k: primal[k] + tangent[k] for k in primal}
        for key in ("icl_keys", "attn_scaling"):
            if key in out:
                shared[key] = out.pop(key).float().cpu()
        for j, i in enumerate(idx):
            results[i] = {k: v[j].float().cpu() for k, v in out.items()}
    rec = _assemble(results, gold, label_ids_t, [len(s) for s in seqs])
    rec.extras.update(shared)
    return rec


def label_logprobs_many(
    model,
    queries: Sequence[Sequence[int]],
    label_ids: Sequence[int],
    *,
    prefix: Sequence[int] = (),
    params: dict[str, torch.Tensor] | None = None,
    linearize: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None,
    batch_size: int = 16,
    pad_id: int = 0,
) -> torch.Tensor:
    """Label log-probabilities [cand, batch, label] of each query after `prefix` (re-encoded with
    every query, as for ZSL and the processes) under several candidates' parameters at once.

    `params` {name: [cand, ...]} holds each candidate's parameters (a process at θ0 + Δ_c);
    `linearize=(θ0, Δ)` with Δ {name: [cand, ...]} the first-order model of each Δ_c (LinGD), whose
    primal f(θ0) is computed once for all candidates (`dual.first_order_many`). The candidates run
    as one batched computation (torch.func.vmap over the parameters): every frozen matmul sees
    cand × batch × pos rows. Attention is the explicit math (`Plan.math`; SDPA has no vmap
    batching rule on CPU), so values equal `evaluate`'s label_logprobs per candidate to rounding
    (tests/test_lrsearch.py). Non-finite values are returned as they are: the caller decides
    (a learning-rate search scores such a candidate -inf).
    """
    from torch.func import vmap

    from iclgd.dual import first_order_many

    if (params is None) == (linearize is None):
        raise IclgdError("label_logprobs_many needs exactly one of params and linearize")
    if len(queries) == 0:
        raise IclgdError("no queries to score")
    use_iclgd_attention(model)
    label_ids_t = torch.tensor(list(label_ids), dtype=torch.long)
    head = list(prefix)
    order = sorted(range(len(queries)), key=lambda i: -len(queries[i]))  # similar lengths share a batch
    out: torch.Tensor | None = None
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        input_ids, mask = pad_right([head + list(queries[i]) for i in idx], pad_id)
        own_len = torch.tensor([len(queries[i]) for i in idx])
        plan = Plan(own_start=torch.full((len(idx),), len(head)), own_len=own_len, pred_pos=len(head) + own_len - 1,
                    math=True)
        input_ids, mask = input_ids.to(model.device), mask.to(model.device)

        def logits_of(p, input_ids=input_ids, mask=mask, plan=plan):
            return {"logits": run_captured(model, p, input_ids, mask, plan)["logits"]}  # [batch, vocab]

        with torch.no_grad():
            if linearize is None:
                logits = vmap(logits_of)(params)["logits"]  # [cand, batch, vocab]
            else:
                primal, tangent = first_order_many(logits_of, *linearize)
                logits = primal["logits"] + tangent["logits"]
        lp = torch.log_softmax(logits.float(), dim=-1)[..., label_ids_t.to(logits.device)].cpu()  # [cand, batch, label]
        if out is None:
            out = torch.empty(lp.shape[0], len(queries), lp.shape[-1])
        out[:, idx] = lp
    return out


@contextlib.contextmanager
def _batch_cache(model, past, batch: int):
    """The prefix cache as a batch of queries sees it: shared without copies where the model's
    attention runs through iclgd's interface, else repeated along the batch (GPT-Neo)."""
    if past is None:
        yield None
    elif supports_shared_prefix(model):
        with shared_prefix(model, past) as shared:
            yield shared
    else:
        repeated = copy.deepcopy(past)
        repeated.batch_repeat_interleave(batch)
        yield repeated


def _assemble(results, gold, label_ids: torch.Tensor, own_lens: list[int]) -> Record:
    logits = torch.stack([r["logits"] for r in results])  # [batch, vocab]
    if not torch.isfinite(logits).all():
        bad = torch.nonzero(~torch.isfinite(logits).all(-1)).flatten().tolist()
        raise IclgdError(f"non-finite logits for eval examples at positions {bad[:10]}")
    label_logprobs = torch.log_softmax(logits, dim=-1)[:, label_ids]  # [batch, label]
    q_max = max(own_lens)
    attn_logits = torch.stack(
        [torch.nn.functional.pad(r["attn_logits"], (0, q_max - r["attn_logits"].shape[-1]), value=float("nan")) for r in results]
    )  # [batch, layer, head, q_pos]
    extra = [k for k in results[0] if k not in ("logits", "attn_out", "attn_logits")]  # the ranking's inputs
    return Record(
        label_logprobs=label_logprobs,
        pred=label_logprobs.argmax(-1),
        gold=torch.tensor(list(gold), dtype=torch.long),
        attn_out=torch.stack([r["attn_out"] for r in results]),
        attn_logits=attn_logits,
        q_len=torch.tensor(own_lens, dtype=torch.long),
        extras={k: torch.stack([r[k] for r in results]) for k in extra},
    )
