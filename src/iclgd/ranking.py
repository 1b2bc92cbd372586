"""Attention ranking of the demonstrations, ICL vs finetuning: Kendall τ-b and top-k recall.

Dai et al. 2023's fourth metric (SPEC §4). For one eval example and one layer, two score vectors
over the demonstration tokens (the demo_tok axis: every token of every demonstration, in prompt
order, and nothing else: no start token, no separator):
- ICL side ``icl_scores`` [layer, demo_tok]: the pre-softmax score q·k/√d_head from the recording
  position to each demonstration token in the ICL prompt, summed over heads.
- FT side ``ft_scores`` [layer, demo_tok]: q_test · q_train(t). q_test is the scaled query
  (q/√d_head) at the recording position under the finetuned weights; q_train(t) is the scaled
  query of demonstration token t in the training step that saw it (weights after the previous
  steps); all heads concatenated. For rotary models q is taken before the rotary embedding: the
  reference model had absolute positions, so its q carried no position.
The caller builds both (this module holds no model and does no I/O). Both go through a softmax
over demo_tok. Token level: Kendall's τ-b and top-k recall |topk(ICL) ∩ topk(FT)| / k with
k = 100; example level: the same on each demonstration's summed probability, k = 5. Mean over
eval examples per layer, then over layers, each beside a random baseline.

What the reference computes (microsoft/LMOps, ``understand_icl/icl_ft/``
``compute_training_example_attn.py``, and the recorders it reads):
- ICL record (``struprompting/criterions/fs_eval.py``): ``attn_map[:, :, -1, :c_len]`` summed
  over heads, where ``attn_map`` is ``torch.bmm(q, kᵀ)`` from fairseq's ``multihead_attention.py``
  taken after ``q *= scaling`` (head_dim^-1/2) and before the mask and the softmax: scaled logits
  from the last position (the appended first label word) to every context token.
- FT record (``struprompting/criterions/fs_ft.py``): ``qkv_val['q']``, the scaled q of all heads
  concatenated (embed_dim wide), for every token of each batch-size-1 training sequence, in the
  training forward pass. The ``ftzs`` record holds the scaled q at the recording position of
  each eval example under the finetuned model. The FT score is their plain dot product, so both
  factors carry head_dim^-1/2: it is Σ_h q_h·q'_h / d_head. Its scale is a softmax temperature,
  which does not move the token ranks but does move the example-level sums, so callers keep it.
- Alignment (``slice_icl_attn_map``, ``compact_ft_attn_q``): position 0 (``<s>``) of every
  training sequence is dropped; in the ICL context position 0 and the one separator after each
  demonstration are skipped; the remaining tokens line up one to one.
- ``np_softmax`` over those tokens on both sides (float64: the records come from JSON). Example
  level: the probabilities summed within each demonstration's range.
- Top-k: ``np.argsort(-x)[:k]`` on both sides (quicksort: the order among ties is unspecified),
  hits counted over the k ICL entries, divided by k·n_examples per layer; k = 100 (token) and
  5 (example), never capped.
- Kendall: ``scipy.stats.kendalltau(icl, ft)[0]``, scipy's default variant, τ-b.
- Random baselines, unseeded: Kendall with ``np.random.random`` (uniform [0, 1)) in place of
  the FT vector, drawn per token at the token level and per demonstration at the example level;
  recall with k indices drawn by ``random.randint`` (with replacement), each a hit when it is in
  FT's top-k, so its expectation is k/n.
- Per layer: the sum over examples divided by their number; headline: ``np.mean`` over layers.
  Only the first 100 eval examples (``debug_n``). ``icl_k_dict`` (CB 19, AGNews 22
  demonstrations) is defined but never used: the FT record holds all training steps, so where
  ICL dropped demonstrations the two sides would not line up (SPEC §6.1).

Where iclgd follows it and where it deviates, and why:
- Same metric, inputs and alignment; the caller supplies the scores with the start token and the
  separators already left out. The recording position is the caller's (SPEC §3).
- Log space: ranks are taken on log_softmax(scores) and on log Σ_{t∈demo} p_t (a logsumexp per
  demonstration), in float64. These order exactly as the reference's probabilities wherever a
  float64 probability does not underflow; where one would (a score more than ~745 below the
  maximum), the reference sees false ties at 0 and iclgd keeps the true order.
- Ties in top-k are broken toward the earlier token (a stable sort), so the set is defined and
  identical inputs give recall 1 even with ties.
- k is capped at the number of items; uncapped, fewer than k items would give identical inputs a
  recall below 1. With k ≥ n the recall is 1 by construction (its baseline too).
- Random recall is the same formula as the metric with random scores in place of FT's: a
  uniformly random k-subset, without the reference's repeated indices; same expectation, k/n.
- Random scores are uniform [0, 1) as in the reference (any i.i.d. continuous draw gives the same
  uniformly random ranking, so the choice does not matter for rank metrics), seeded: example i
  draws from ``np.random.default_rng([seed, i])``, so the numbers do not depend on how the
  examples are streamed or chunked, and the global RNGs are neither used nor advanced.
- Added (not in the reference): a *shuffled* example-level baseline. A demonstration's summed
  probability grows with its length on both sides, so τ and recall at the example level rise
  above the random baseline even when the token scores are unrelated. Permuting FT's token
  scores over demo_tok (per layer, seeded) before the softmax and the sums keeps the lengths and
  FT's score distribution and removes any token-level alignment with ICL: the chance level that
  the example-level numbers should be read against.
- τ-b is undefined (NaN) where a side is constant or has fewer than two items; per-layer means
  leave such examples out instead of turning the whole layer into NaN. All eval examples are
  used (SPEC) and per-example values are kept, for bootstrap intervals over examples.

Memory: a run streams its eval examples through ``RankingAccumulator``, which keeps only the
per-example, per-layer values ([batch, layer] floats per metric), never the score arrays.
``ranking`` does the same computation on a whole batch at once, for small inputs and tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import scipy.special
import scipy.stats
import torch

from iclgd.registry import unknown_name

Tensor = torch.Tensor
Spans = tuple[tuple[int, int], ...]

K_TOKEN = 100
K_EXAMPLE = 5


# ---------------------------------------------------------------------------------------------
# demonstration spans
# ---------------------------------------------------------------------------------------------


def spans_from_lengths(lengths: Sequence[int]) -> Spans:
    """Half-open (start, stop) ranges on demo_tok for consecutive demonstrations of these lengths."""
    stops = np.cumsum([int(n) for n in lengths])
    return check_spans(tuple(zip((0, *stops[:-1].tolist()), stops.tolist())))


def check_spans(spans: Sequence[Sequence[int]], n_tok: int | None = None) -> Spans:
    """Validate demonstration spans: non-empty half-open ranges that tile [0, n_tok) in order.

    demo_tok holds demonstration tokens only, so every token belongs to exactly one
    demonstration; a gap or an overlap means the caller's alignment is off, and is an error.
    """
    out = tuple((int(a), int(b)) for a, b in spans)
    if not out:
        raise ValueError("demo_spans is empty: at least one demonstration is needed")
    expected = 0
    for i, (a, b) in enumerate(out):
        if a != expected or b <= a:
            raise ValueError(
                f"demo_spans must be non-empty ranges tiling demo_tok in order; span {i} is "
                f"({a}, {b}), expected to start at {expected} and end after it"
            )
        expected = b
    if n_tok is not None and expected != n_tok:
        raise ValueError(f"demo_spans cover {expected} tokens but the scores have {n_tok}")
    return out


# ---------------------------------------------------------------------------------------------
# softmax over demo_tok, per-demonstration sums
# ---------------------------------------------------------------------------------------------


def _float64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def log_softmax(scores) -> np.ndarray:
    """log softmax over the last axis (demo_tok), float64: [..., demo_tok] -> [..., demo_tok]."""
    return scipy.special.log_softmax(_float64(scores), axis=-1)


def example_log_mass(logp: np.ndarray, spans: Spans) -> np.ndarray:
    """log Σ_{t in demonstration} p_t for token log-probabilities: [..., demo_tok] -> [..., demo].

    A logsumexp per span, shifted by the span's own maximum, so a demonstration whose every
    probability underflows float64 still gets a finite, ordered value.
    """
    starts = np.array([a for a, _ in spans])
    lengths = np.array([b - a for a, b in spans])
    # one vectorized pass over all spans (a scipy logsumexp per span was a third of the run time)
    top = np.maximum.reduceat(logp, starts, axis=-1)  # [..., demo]
    shifted = np.exp(logp - np.repeat(top, lengths, axis=-1))  # in (0, 1], 1 at each maximum
    return top + np.log(np.add.reduceat(shifted, starts, axis=-1))


def example_mass(scores, spans: Sequence[Sequence[int]]) -> np.ndarray:
    """Softmax over demo_tok, then summed per demonstration: [..., demo_tok] -> [..., demo].

    The reference's example-level attention; each row sums to 1.
    """
    x = _float64(scores)
    return np.exp(example_log_mass(log_softmax(x), check_spans(spans, x.shape[-1])))


# ---------------------------------------------------------------------------------------------
# rank statistics over the last axis
# ---------------------------------------------------------------------------------------------


def kendall_tau_b(a, b) -> np.ndarray:
    """Kendall's τ-b between a and b along the last axis: [..., n] -> [...].

    scipy.stats.kendalltau, variant 'b' (ties in either vector are corrected for). NaN where
    either vector is constant or n < 2: τ is undefined there.
    """
    a, b = _float64(a), _float64(b)
    if a.shape[-1] < 2:
        return np.full(a.shape[:-1], np.nan)
    # The method only changes the p-value, which is not used: 'asymptotic' skips the exact one
    # scipy computes for short tie-free vectors (the example level), which costs time; its
    # variance formula divides by n − 2, hence 'auto' for two items.
    method = "asymptotic" if a.shape[-1] > 2 else "auto"
    res = scipy.stats.kendalltau(a, b, variant="b", method=method, axis=-1)
    return np.asarray(res.statistic, dtype=np.float64)


def topk(x, k: int) -> np.ndarray:
    """Indices of the k largest entries along the last axis: [..., n] -> [..., min(k, n)].

    Ties go to the earlier index (a stable sort), so the set is defined even with equal scores.
    """
    x = _float64(x)
    k = min(int(k), x.shape[-1])
    return np.argsort(-x, axis=-1, kind="stable")[..., :k]


def topk_recall(a, b, k: int) -> np.ndarray:
    """|topk(a) ∩ topk(b)| / k along the last axis, k capped at n: [..., n] -> [...].

    Symmetric in a and b.
    """
    a, b = _float64(a), _float64(b)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    ta, tb = topk(a, k), topk(b, k)
    in_b = np.zeros(b.shape, dtype=bool)
    np.put_along_axis(in_b, tb, True, axis=-1)
    hits = np.take_along_axis(in_b, ta, axis=-1).sum(-1)  # [...]
    return hits / ta.shape[-1]


# ---------------------------------------------------------------------------------------------
# the metric, its baselines, and the streaming accumulator
# ---------------------------------------------------------------------------------------------

METRICS = ("tau_token", "recall_token", "tau_example", "recall_example")
RANDOM = tuple(f"{m}_random" for m in METRICS)
SHUFFLED = ("tau_example_shuffled", "recall_example_shuffled")


def rank_agreement(
    icl_scores,
    ft_scores,
    demo_spans: Sequence[Sequence[int]],
    *,
    k_token: int = K_TOKEN,
    k_example: int = K_EXAMPLE,
) -> dict[str, np.ndarray]:
    """τ-b and top-k recall of ICL vs FT attention at token and example level.

    icl_scores, ft_scores: [..., demo_tok] pre-softmax scores (e.g. [layer, demo_tok] or
    [batch, layer, demo_tok]); demo_spans tile demo_tok. Returns ``METRICS`` -> [...] float64.
    """
    a, b = _float64(icl_scores), _float64(ft_scores)
    if a.shape != b.shape:
        raise ValueError(f"icl_scores {a.shape} and ft_scores {b.shape} differ in shape")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("scores must be finite (pre-softmax scores, nothing masked)")
    spans = check_spans(demo_spans, a.shape[-1])
    la, lb = log_softmax(a), log_softmax(b)  # [..., demo_tok]
    ea, eb = example_log_mass(la, spans), example_log_mass(lb, spans)  # [..., demo]
    return {
        "tau_token": kendall_tau_b(la, lb),
        "recall_token": topk_recall(la, lb, k_token),
        "tau_example": kendall_tau_b(ea, eb),
        "recall_example": topk_recall(ea, eb, k_example),
    }


def _draws(seed: int, index: int, n_layers: int, n_tok: int, n_demo: int):
    """Example ``index``'s random numbers: uniform token scores [layer, demo_tok], uniform
    demonstration scores [layer, demo] and a permutation of demo_tok per layer [layer, demo_tok].

    Keyed by (seed, index) rather than drawn from one running stream, so streaming one example at
    a time, in chunks or as one batch gives the same numbers.
    """
    rng = np.random.default_rng([int(seed), int(index)])
    r_tok = rng.random((n_layers, n_tok))
    r_demo = rng.random((n_layers, n_demo))
    perm = np.argsort(rng.random((n_layers, n_tok)), axis=-1)
    return r_tok, r_demo, perm


PARTS = ("all", "compare", "random")


def _measure(
    icl: np.ndarray,
    ft: np.ndarray | None,
    spans: Spans,
    *,
    seed: int,
    start: int,
    k_token: int,
    k_example: int,
    parts: str = "all",
) -> dict[str, np.ndarray]:
    """The metric and baselines for examples start, start+1, ...: [batch, layer, demo_tok] ->
    name -> [batch, layer]. ``parts``: "all"; "compare" (``METRICS`` and ``SHUFFLED``: what
    depends on FT); "random" (``RANDOM``: ICL's scores against random ones; ``ft`` unused)."""
    out = {} if parts == "random" else rank_agreement(icl, ft, spans, k_token=k_token, k_example=k_example)
    n, n_layers, n_tok = icl.shape
    draws = [_draws(seed, start + i, n_layers, n_tok, len(spans)) for i in range(n)]
    r_tok, r_demo, perm = (np.stack(d) for d in zip(*draws))  # [batch, layer, ·]
    la = log_softmax(icl)
    ea = example_log_mass(la, spans)
    if parts != "compare":
        # random scores in place of FT's: token scores at the token level, one score per
        # demonstration at the example level (the reference's draws)
        out["tau_token_random"] = kendall_tau_b(la, r_tok)
        out["recall_token_random"] = topk_recall(la, r_tok, k_token)
        out["tau_example_random"] = kendall_tau_b(ea, r_demo)
        out["recall_example_random"] = topk_recall(ea, r_demo, k_example)
    if parts != "random":
        # FT's own token scores, shuffled over demo_tok, through the same softmax and sums
        es = example_log_mass(log_softmax(np.take_along_axis(ft, perm, axis=-1)), spans)
        out["tau_example_shuffled"] = kendall_tau_b(ea, es)
        out["recall_example_shuffled"] = topk_recall(ea, es, k_example)
    return out


@dataclass(frozen=True)
class RankingResult:
    """Per-example, per-layer values, each [batch, layer] float64, of the metric and baselines.

    ``*_random``: uniform random scores in place of FT's; ``*_example_shuffled``: FT's token
    scores permuted over demo_tok (the length-matched chance level; module docstring).
    ``k_token`` and ``k_example`` are the k actually used (capped at the item count). An
    accumulator that computed only some parts (``RankingAccumulator(parts=...)``) leaves the
    others None.
    """

    k_token: int
    k_example: int
    tau_token: Tensor | None = None
    recall_token: Tensor | None = None
    tau_example: Tensor | None = None
    recall_example: Tensor | None = None
    tau_token_random: Tensor | None = None
    recall_token_random: Tensor | None = None
    tau_example_random: Tensor | None = None
    recall_example_random: Tensor | None = None
    tau_example_shuffled: Tensor | None = None
    recall_example_shuffled: Tensor | None = None

    def arrays(self) -> dict[str, Tensor]:
        """Every computed [batch, layer] array by name (for a run folder or a bootstrap)."""
        names = [f.name for f in fields(self) if f.name.startswith(("tau_", "recall_"))]
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def get(self, name: str) -> Tensor:
        arrays = self.arrays()
        if name not in arrays:
            raise unknown_name("ranking metric", name, list(arrays))
        return arrays[name]

    def per_layer(self, name: str) -> Tensor:
        """Mean over eval examples -> [layer]; examples where τ is undefined (NaN) are left out."""
        return torch.nanmean(self.get(name), dim=0)

    def headline(self, name: str) -> float:
        """Mean over examples per layer, then over layers (NaN if some layer has no value)."""
        return self.per_layer(name).mean().item()


class RankingAccumulator:
    """Streams eval examples one at a time (or in chunks) and keeps only [batch, layer] values.

    All examples of one cell share the demonstrations, hence ``demo_spans``. Example i (counted
    from 0 in the order added) draws its baselines' random numbers from (seed, i). ``parts``:
    "all", "compare" (the metric and the shuffled baseline: what depends on FT's scores) or
    "random" (the random baselines only: ICL's scores alone, so a run computes them once per cell
    and passes ``ft_scores=None``); the same seed gives the same numbers in every split.
    """

    def __init__(
        self,
        n_layers: int,
        demo_spans: Sequence[Sequence[int]],
        *,
        k_token: int = K_TOKEN,
        k_example: int = K_EXAMPLE,
        seed: int,
        parts: str = "all",
    ):
        if parts not in PARTS:
            raise unknown_name("ranking parts", parts, list(PARTS))
        if k_token < 1 or k_example < 1:
            raise ValueError(f"k must be at least 1, got k_token={k_token}, k_example={k_example}")
        if int(seed) < 0:
            raise ValueError(f"seed must be non-negative (numpy SeedSequence), got {seed}")
        self.n_layers = int(n_layers)
        self.spans = check_spans(demo_spans)
        self.n_tok = self.spans[-1][1]
        self.k_token, self.k_example, self.seed = int(k_token), int(k_example), int(seed)
        self.parts = parts
        self._parts: list[dict[str, np.ndarray]] = []
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def add(self, icl_scores, ft_scores=None) -> None:
        """Add one example ([layer, demo_tok]) or a chunk ([batch, layer, demo_tok]) of both
        (``ft_scores`` None: the random baselines only, ``parts="random"``)."""
        icl = _float64(icl_scores)
        if ft_scores is None:
            if self.parts != "random":
                raise ValueError(f"ft_scores are needed for parts={self.parts!r}")
            if not np.isfinite(icl).all():
                raise ValueError("scores must be finite (pre-softmax scores, nothing masked)")
        ft = icl if ft_scores is None else _float64(ft_scores)
        if icl.ndim == 2:
            icl, ft = icl[None], ft[None]
        want = (self.n_layers, self.n_tok)
        if icl.ndim != 3 or icl.shape[1:] != want or ft.shape != icl.shape:
            raise ValueError(
                f"expected icl_scores and ft_scores of shape [layer, demo_tok] = {list(want)} "
                f"(or with a batch dim in front); got {list(icl.shape)} and {list(ft.shape)}"
            )
        part = _measure(
            icl,
            ft,
            self.spans,
            seed=self.seed,
            start=self._n,
            k_token=self.k_token,
            k_example=self.k_example,
            parts=self.parts,
        )
        self._parts.append(part)
        self._n += icl.shape[0]

    def result(self) -> RankingResult:
        """Everything added so far as a ``RankingResult`` (arrays [batch, layer])."""
        names = {"all": METRICS + RANDOM + SHUFFLED, "compare": METRICS + SHUFFLED, "random": RANDOM}[self.parts]
        if self._parts:
            arrays = {m: np.concatenate([p[m] for p in self._parts]) for m in names}
        else:
            arrays = {m: np.zeros((0, self.n_layers)) for m in names}
        return RankingResult(
            **{m: torch.from_numpy(v) for m, v in arrays.items()},
            k_token=min(self.k_token, self.n_tok),
            k_example=min(self.k_example, len(self.spans)),
        )


def ranking(
    icl_scores,
    ft_scores,
    demo_spans: Sequence[Sequence[int]],
    *,
    seed: int,
    k_token: int = K_TOKEN,
    k_example: int = K_EXAMPLE,
) -> RankingResult:
    """The whole metric on a batch held in memory: [batch, layer, demo_tok] twice -> result.

    Same numbers as streaming the examples through ``RankingAccumulator`` in this order.
    """
    icl = _float64(icl_scores)
    if icl.ndim != 3:
        raise ValueError(f"expected [batch, layer, demo_tok], got shape {list(icl.shape)}")
    acc = RankingAccumulator(
        icl.shape[1], demo_spans, k_token=k_token, k_example=k_example, seed=seed
    )
    acc.add(icl, ft_scores)
    return acc.result()
