"""Recording Dai et al.'s attention ranking during a run (SPEC §4; the metric: iclgd.ranking).

For each eval example and layer the metric compares two score vectors over the demonstration
tokens (demo_tok: every token of every demonstration, in order; no start token, no separator):
- ICL: the pre-softmax score q·k·scaling from the recording position to each demonstration token
  of the ICL prompt, summed over query heads (grouped key/value heads repeated), the model's own
  scores: after the rotary embedding, with its scaling (GPT-Neo: none) and attention soft-capping
  (Gemma-2). Recorded in ICL's eval (`EvalOptions.demo_pos`, iclgd.capture): the recording
  position's scaled query per head [layer, head, d_head] per example and the demonstration tokens'
  keys once per cell, their product taken here.
- FT: q_test · q_train(t) for process P. q_test: the query of the recording position under P's
  weights, in P's eval (`EvalOptions.queries`); q_train(t): the query of demonstration token t in
  the training step that trained on it, weights after the previous steps, recorded in that step's
  own forward pass (`TrainContext.record_queries`, `Process.train`; no second pass). Both are
  read before any rotary embedding (`arch.query_sites`: the q projection, after the query norm
  where the family has one), all heads concatenated, each times the attention's scaling: the
  reference model had absolute positions, so its q carried no position; a rotated q would add
  the relative offset between an eval query and a training token, which the reference's did not
  have. So the score is scaling² · q_test · q_train per layer. LinGD: both queries are the
  linearized model's, q(θ0) + J·Δ (primal + tangent of the pass LinGD already makes), as every
  quantity LinGD evaluates. A learning-rate search trains its candidates in lockstep, each
  recording its own q_train; only the winner's training is kept, with its q_train.

Alignment. A training sequence is the start token + demonstration i's ids (prompts); the start
token is dropped, leaving exactly demonstration i's tokens. The ICL prompt holds the same ids at
`Prompts.demo_spans` (piecewise by construction; natural tokenization by character offsets, and
only where no token crosses a demonstration's boundary: iclgd.prompts). So demo_tok lines up
token for token. The metric is undefined for a cell, with the reason in results.json (never a
silent misalignment), where the spans are None (a boundary merged in natural tokenization, or no
offsets), or ICL saw fewer demonstrations than the processes trained on (dai2023's drop rule,
SPEC §6.1). It is undefined (NaN) for an (example, layer) whose recording row does not see every
demonstration key (a sliding-window layer shorter than the prompt, whose cache also drops old
keys): Gemma-3's local layers on long prompts; per-layer means leave those out, and the layers
left out are named in results.json.

Memory. ICL's side is held for the cell as the query per head [example, layer, head, d_head] (as
large as the attention outputs every setting already records) plus the keys [layer, kv_head,
demo_tok, d_head]; a process's q_test [example, layer, head * d_head] only during its eval, and
its q_train [layer, demo_tok, head * d_head] only while it runs. The [example, layer, demo_tok]
score arrays never exist whole: `rank` streams `chunk` examples at a time into
`ranking.RankingAccumulator`, which keeps [example, layer] values. The random baselines rest on
ICL's scores alone: computed once per cell (into ICL's record), with the seed `rank_seed`.

Records: ICL's records file gets ``ranking_<name>_random`` [example, layer]; each process's gets
``ranking_<name>`` for the metric and the shuffled baseline (iclgd.ranking.METRICS, SHUFFLED);
results.json gets per setting ``ranking``: per-layer means, headlines, k, demo_tok, or why the
metric is undefined.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from iclgd import ranking

PREFIX = "ranking_"
ICL_KEYS = ("icl_q", "icl_seen", "icl_keys", "attn_scaling")  # Record.extras of ICL's eval (iclgd.evaluate)
QUERY_KEY = "query"  # Record.extras of a process's eval


def record_name(metric: str) -> str:
    """The records-file key of a ranking array (``ranking_tau_token``, ``ranking_tau_token_random``)."""
    return PREFIX + metric


def rank_seed(seed: int) -> int:
    """The random baselines' seed for a cell of this seed (numpy's SeedSequence needs >= 0)."""
    return int(seed) % 2**63


@dataclass(frozen=True)
class Layout:
    """Where the demonstrations sit: their token positions in the ICL prefix (start token at 0),
    the spans of each demonstration on demo_tok, or why the metric is undefined for the cell."""

    demo_pos: tuple[int, ...] = ()
    spans: tuple[tuple[int, int], ...] = ()
    undefined: str = ""


def layout(prompts, n_icl: int) -> Layout:
    """The cell's `Layout` from its prompts (iclgd.prompts.Prompts) and the demonstrations ICL saw."""
    k = len(prompts.demos)
    if n_icl < k:
        return Layout(undefined=f"ICL saw {n_icl} of the {k} demonstrations the processes trained on (the "
                                "protocol's drop rule): the two sides do not hold the same tokens")
    if prompts.demo_spans is None:
        return Layout(undefined=prompts.spans_note or "the demonstrations' positions in the ICL prompt are unknown")
    pos = tuple(t for a, b in prompts.demo_spans for t in range(a, b))
    return Layout(pos, ranking.spans_from_lengths([b - a for a, b in prompts.demo_spans]))


@dataclass
class IclSide:
    """ICL's recorded inputs: q [example, layer, head, d_head] (scaled, after rotary) at the
    recording position, keys [layer, kv_head, demo_tok, d_head], seen [example, layer] bool,
    scaling [layer], the model's attention soft-cap (or None)."""

    q: torch.Tensor
    keys: torch.Tensor
    seen: torch.Tensor
    scaling: torch.Tensor
    softcap: float | None = None

    def scores(self, rows: slice | Sequence[int]) -> torch.Tensor:
        """ICL's scores [batch, layer, demo_tok] of these examples: Σ_heads softcap(q_h · k_h)."""
        q = self.q[rows].float()  # [batch, layer, head, d_head]
        keys = self.keys.float()  # [layer, kv_head, demo_tok, d_head]
        b, n_layers, n_heads, d = q.shape
        q = q.view(b, n_layers, keys.shape[1], n_heads // keys.shape[1], d)  # head h reads kv_head h // group
        if self.softcap is None:  # Σ_h q_h · k_kv(h) = Σ_kv (Σ_{h of kv's group} q_h) · k_kv
            return torch.einsum("blkd,lktd->blt", q.sum(3), keys)
        s = torch.einsum("blkgd,lktd->blkgt", q, keys)  # [batch, layer, kv_head, group, demo_tok]
        return (torch.tanh(s / self.softcap) * self.softcap).sum((2, 3))


def take_icl_side(rec, model) -> IclSide:
    """Remove ICL's ranking inputs from its record's extras (they are not stored) -> `IclSide`."""
    x = {k: rec.extras.pop(k) for k in ICL_KEYS}
    softcap = getattr(model.config.get_text_config(), "attn_logit_softcapping", None)
    return IclSide(x["icl_q"], x["icl_keys"], x["icl_seen"].bool(), x["attn_scaling"].float(), softcap)


def take_queries(rec) -> torch.Tensor:
    """Remove a process's q_test [example, layer, head * d_head] from its record's extras."""
    return rec.extras.pop(QUERY_KEY)


def ft_scores(query: torch.Tensor, q_train: torch.Tensor, scaling: torch.Tensor) -> torch.Tensor:
    """FT's scores [batch, layer, demo_tok] = scaling² · q_test · q_train per layer: query [batch,
    layer, head * d_head] and q_train [layer, demo_tok, head * d_head], both unscaled."""
    s = torch.einsum("bld,ltd->blt", query.float(), q_train.float())
    return s * scaling.float().pow(2)[None, :, None]


def rank(icl: IclSide, lay: Layout, seed: int, *, query: torch.Tensor | None = None,
         q_train: torch.Tensor | None = None, chunk: int = 16) -> ranking.RankingResult:
    """The metric for one process (query and q_train given: its comparison and the shuffled
    baseline) or the random baselines (neither given), `chunk` eval examples at a time; NaN where
    ICL's recording row does not see every demonstration key."""
    n, n_layers = icl.seen.shape
    parts = "random" if query is None else "compare"
    acc = ranking.RankingAccumulator(n_layers, lay.spans, seed=rank_seed(seed), parts=parts)
    for start in range(0, n, max(1, int(chunk))):
        rows = slice(start, min(n, start + chunk))
        ft = None if query is None else ft_scores(query[rows], q_train, icl.scaling)
        acc.add(icl.scores(rows), ft)
    res = acc.result()
    unseen = ~icl.seen  # [example, layer]
    if bool(unseen.any()):
        res = replace(res, **{m: v.masked_fill(unseen, math.nan) for m, v in res.arrays().items()})
    return res


def summary(res: ranking.RankingResult, lay: Layout) -> dict:
    """results.json's ``ranking`` entry: per-layer means over examples (NaN-free examples; None
    where a layer has none), headlines (mean over the layers that have values), k, demo_tok."""
    per_layer, headline = {}, {}
    undefined_layers: set[int] = set()
    for m in res.arrays():
        curve = res.per_layer(m).numpy()  # [layer], NaN where no example has a value
        undefined_layers |= {i for i, x in enumerate(curve) if not np.isfinite(x)}
        per_layer[m] = [float(x) if np.isfinite(x) else None for x in curve]
        finite = curve[np.isfinite(curve)]
        headline[m] = float(finite.mean()) if finite.size else None
    out = {"defined": True, "headline": headline, "per_layer": per_layer, "k_token": res.k_token,
           "k_example": res.k_example, "demo_tok": len(lay.demo_pos), "demonstrations": len(lay.spans)}
    if undefined_layers:
        out["layers_without_values"] = sorted(undefined_layers)
    return out


def undefined(reason: str) -> dict:
    return {"defined": False, "reason": reason}


def store(rec, res: ranking.RankingResult) -> None:
    """Put the per-example, per-layer arrays into a record's extras (its records file)."""
    for m, v in res.arrays().items():
        rec.extras[record_name(m)] = v.float()


class CellRanking:
    """The attention ranking of one cell, across its settings: ICL's side once, then each
    process's comparison (iclgd.experiment calls these in the cell's order: ICL runs first)."""

    def __init__(self, prompts, n_icl: int, seed: int, chunk: int):
        self.layout = layout(prompts, n_icl)
        self.seed, self.chunk = seed, chunk
        self.icl: IclSide | None = None

    @property
    def defined(self) -> bool:
        return not self.layout.undefined

    def eval_options(self, name: str) -> dict:
        """EvalOptions fields for setting `name` (zsl records nothing)."""
        if not self.defined or name == "zsl":
            return {}
        return {"demo_pos": self.layout.demo_pos} if name == "icl" else {"queries": True}

    def after_icl(self, rec, model) -> dict:
        """Take ICL's side out of its record, store the random baselines there; results entry."""
        if not self.defined:
            return undefined(self.layout.undefined)
        self.icl = take_icl_side(rec, model)
        res = rank(self.icl, self.layout, self.seed, chunk=self.chunk)
        store(rec, res)
        return summary(res, self.layout)

    def after_process(self, rec, q_train: torch.Tensor | None) -> dict:
        """Take the process's q_test out of its record, store the comparison there; results entry."""
        query = rec.extras.pop(QUERY_KEY, None)
        if not self.defined:
            return undefined(self.layout.undefined)
        if self.icl is None:
            return undefined("ICL's side was not recorded (no icl setting before this process)")
        if q_train is None or query is None:
            return undefined("the process recorded no training queries (a process whose grads do not call "
                             "iclgd.processes.base.log_queries, or an evaluate that drops EvalOptions)")
        if q_train.shape[1] != len(self.layout.demo_pos):
            return undefined(f"the process trained on {q_train.shape[1]} demonstration tokens, ICL's prompt "
                             f"holds {len(self.layout.demo_pos)}")
        res = rank(self.icl, self.layout, self.seed, query=query, q_train=q_train.cpu(), chunk=self.chunk)
        store(rec, res)
        return summary(res, self.layout)
