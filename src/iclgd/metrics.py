"""Metrics comparing ICL with optimization processes: pure functions on tensors (SPEC §4).

No model and no file I/O here: every function takes tensors recorded in a run folder and returns
tensors or floats, so each can be tested on hand-made inputs.

Shapes (DESIGN.md vocabulary; N = batch of eval examples, L = layer, H = head, Q = q_pos):
- attention outputs ``h``: [batch, layer, d_model]
- attention logits ``m``: [batch, layer, head, q_pos], NaN-padded past each example's query
  length. The padding is the same in every setting for one example (all settings record logits
  to the same query tokens), so a NaN entry is simply an absent coordinate.
- predictions and gold labels: [batch] int.

Every cosine is computed in float64 (float32 attention outputs of a 2048-wide model lose digits
in the dot products) and is 0, never NaN, where either vector is zero, e.g. a process that did
not move an attention output (h_P == h_ZSL) has SimAOU 0.

Per example, then aggregated: every metric is first a value per eval example (``PerExample``:
[batch, layer] or [batch], with a weight [batch] saying which examples count), and the per-layer
curve and the headline are weighted means on top. The report needs the per-example values to
bootstrap over examples (SPEC §7) and to restrict a metric to the F2T subset (``f2t_mask``).

The bottom of the file holds ``METRICS``, a registry from metric names to functions over one
cell's records returning ``PerExample``; ``compute`` aggregates. The report uses it; the core
functions above it do not depend on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from iclgd.registry import Registry

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------
# core cosines
# ---------------------------------------------------------------------------------------------


def cosine(a: Tensor, b: Tensor, dim: int = -1) -> Tensor:
    """Cosine similarity of ``a`` and ``b`` along ``dim`` (the dimension is removed).

    Contract:
    - NaN entries are treated as absent: a coordinate that is NaN in either input is set to 0 in
      both, which drops it from the dot product and from both norms (NaN padding of attention
      logits therefore gives the same value as the unpadded computation).
    - Where either vector is zero (after that masking) the result is 0, not NaN.
    - Computed in float64; inputs broadcast against each other.
    """
    a, b = torch.broadcast_tensors(a.double(), b.double())
    absent = torch.isnan(a) | torch.isnan(b)
    a = a.masked_fill(absent, 0.0)
    b = b.masked_fill(absent, 0.0)
    dot = (a * b).sum(dim)
    denom = torch.linalg.vector_norm(a, dim=dim) * torch.linalg.vector_norm(b, dim=dim)
    # where() rather than an eps in the denominator: a zero vector has no direction, so 0 exactly
    return torch.where(denom > 0, dot / denom.clamp_min(torch.finfo(denom.dtype).tiny), 0.0)


def _unit(h: Tensor) -> Tensor:
    """h / ||h|| along the last dim (d_model), in float64; a zero vector stays zero."""
    h = h.double()
    norm = torch.linalg.vector_norm(h, dim=-1, keepdim=True)
    return torch.where(norm > 0, h / norm.clamp_min(torch.finfo(h.dtype).tiny), 0.0)


def _maybe_unit(h: Tensor, normalize: bool) -> Tensor:
    return _unit(h) if normalize else h.double()


# float64 elements per chunk. Attention logits of a 1.3B model on 2000 examples are ~2e8 values;
# computing their cosines in one go in float64 would need several GB of temporaries.
_CHUNK_ELEMS = 1 << 23


def _by_batch(fn, *xs: Tensor) -> Tensor:
    """fn(*xs) computed over chunks of the batch dim (dim 0, shared by every x) and concatenated.

    Every metric here is independent per example, so chunking changes memory, not the result.
    """
    n = xs[0].shape[0]
    step = max(1, _CHUNK_ELEMS // max(1, xs[0][:1].numel()))
    if n <= step:
        return fn(*xs)
    return torch.cat([fn(*(x[i : i + step] for x in xs)) for i in range(0, n, step)])


# ---------------------------------------------------------------------------------------------
# SimAOU: attention output updates
# ---------------------------------------------------------------------------------------------


def simaou(h_icl: Tensor, h_zsl: Tensor, h_p: Tensor, normalize: bool = True) -> Tensor:
    """SimAOU(P) per example and layer: cos(h_ICL − h_ZSL, h_P − h_ZSL) -> [batch, layer].

    h_*: [batch, layer, d_model]. ``normalize=True`` divides each h by its ℓ2 norm first (what
    the reference code of Dai et al. did); ``normalize=False`` is the raw form. SPEC §6.6: both
    are reported, labelled.
    """
    return _by_batch(lambda a, z, b: _update_cos(a, b, z, normalize), h_icl, h_zsl, h_p)


def _update_cos(h_a: Tensor, h_b: Tensor, h_zsl: Tensor, normalize: bool) -> Tensor:
    """cos(h_a − h_zsl, h_b − h_zsl) over d_model -> [batch, layer]."""
    a, b, zsl = (_maybe_unit(h, normalize) for h in (h_a, h_b, h_zsl))
    return cosine(a - zsl, b - zsl)


def simaou_random(
    h_icl: Tensor,
    h_zsl: Tensor,
    *,
    seed: int,
    kind: str = "gaussian",
    normalize: bool = True,
) -> Tensor:
    """SimAOU with a seeded random update in place of h_P − h_ZSL -> [batch, layer].

    kind:
    - ``"gaussian"``: a centred standard Gaussian direction per (example, layer); its cosine
      with any fixed update is 0 in expectation, so this is the honest chance level.
    - ``"uniform"``: the reference's variant, uniform [0, 1) noise used as the update as is
      (nothing subtracted). It is not centred, so it correlates with any update whose
      coordinates have a positive mean; offered only to compare with published numbers.
    The noise comes from a private ``torch.Generator`` seeded with ``seed``: the same seed gives
    the same value and the global RNG is neither used nor advanced.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    shape = tuple(h_icl.shape)  # [batch, layer, d_model]
    if kind == "gaussian":
        noise = torch.randn(shape, generator=gen)
    elif kind == "uniform":
        noise = torch.rand(shape, generator=gen)
    else:
        raise ValueError(f"unknown random baseline kind {kind!r}; known: gaussian, uniform")
    noise = noise.to(h_icl.device)  # drawn on CPU: the same numbers on every device

    def chunk(icl: Tensor, zsl: Tensor, r: Tensor) -> Tensor:
        icl, zsl = _maybe_unit(icl, normalize), _maybe_unit(zsl, normalize)
        return cosine(icl - zsl, r)

    return _by_batch(chunk, h_icl, h_zsl, noise)


def alpha_aou(h_p: Tensor, h_q: Tensor, h_zsl: Tensor, normalize: bool = True) -> Tensor:
    """SimAOU analogue of α: cos(h_P − h_ZSL, h_Q − h_ZSL) -> [batch, layer] (symmetric in P, Q)."""
    return _by_batch(lambda a, b, z: _update_cos(a, b, z, normalize), h_p, h_q, h_zsl)


# ---------------------------------------------------------------------------------------------
# SimAM: attention logits (per head, then mean over heads)
# ---------------------------------------------------------------------------------------------


def simam(m_a: Tensor, m_b: Tensor) -> Tensor:
    """cos(m_a, m_b) over q_pos per (example, layer, head), then mean over heads -> [batch, layer].

    m_*: [batch, layer, head, q_pos], NaN padding ignored. SimAM(P) = simam(m_ICL, m_P);
    SimAM before = simam(m_ICL, m_ZSL). Symmetric.
    """
    # cosine: [batch, layer, head]; mean over heads -> [batch, layer]
    return _by_batch(lambda a, b: cosine(a, b).mean(dim=-1), m_a, m_b)


def simam_delta(m_icl: Tensor, m_zsl: Tensor, m_p: Tensor) -> Tensor:
    """SimAM_Δ(P): cos(m_ICL − m_ZSL, m_P − m_ZSL) per head, mean over heads -> [batch, layer]."""

    def chunk(icl: Tensor, zsl: Tensor, p: Tensor) -> Tensor:
        zsl = zsl.double()
        return cosine(icl.double() - zsl, p.double() - zsl).mean(dim=-1)  # heads averaged

    return _by_batch(chunk, m_icl, m_zsl, m_p)


def alpha(m_p: Tensor, m_q: Tensor, m_zsl: Tensor) -> Tensor:
    """α(P, Q): cos(m_P − m_ZSL, m_Q − m_ZSL) per head, mean over heads -> [batch, layer].

    Symmetric in P and Q; the paper uses α(GD, LCGD) to show how much of either process's
    SimAM_Δ comes from a shared direction.
    """
    return simam_delta(m_p, m_zsl, m_q)


# ---------------------------------------------------------------------------------------------
# predictions
# ---------------------------------------------------------------------------------------------


def accuracy(pred: Tensor, gold: Tensor) -> float:
    """Fraction of examples with pred == gold, in [0, 1] (pred, gold: [batch] int); NaN if empty."""
    pred, gold = torch.as_tensor(pred), torch.as_tensor(gold)
    if pred.shape != gold.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and gold {tuple(gold.shape)} differ in shape")
    if pred.numel() == 0:
        return math.nan
    return (pred == gold).double().mean().item()


def rec2ftp(pred_zsl: Tensor, pred_icl: Tensor, pred_p: Tensor, gold: Tensor) -> float:
    """Rec2FTP(P) in percent: |ZSL wrong ∧ P right ∧ ICL right| / |ZSL wrong ∧ P right| · 100.

    All inputs [batch] int. Of the examples the process fixed, the share that ICL also gets
    right. NaN when the process fixed no example (the denominator is 0): the ratio is
    undefined, and 0 or 100 would both be claims the data cannot support.
    """
    gold = torch.as_tensor(gold)
    fixed = (torch.as_tensor(pred_zsl) != gold) & (torch.as_tensor(pred_p) == gold)  # [batch]
    denom = int(fixed.sum())
    if denom == 0:
        return math.nan
    both = fixed & (torch.as_tensor(pred_icl) == gold)
    return 100.0 * int(both.sum()) / denom


def f2t_mask(pred_zsl: Tensor, pred_icl: Tensor, preds_p: Sequence[Tensor], gold: Tensor) -> Tensor:
    """The F2T subset (SPEC §4; the reference's ``mode='f2t'``) -> [batch] bool.

    Examples ZSL gets wrong while ICL and every process in ``preds_p`` get right: one process
    for SimAOU(P), SimAM(P), SimAM_Δ(P); both for α(P, Q), whose two updates must both be
    "false to true" (the reference analysed one process at a time). All inputs [batch] int.
    """
    gold = torch.as_tensor(gold)
    mask = (torch.as_tensor(pred_zsl) != gold) & (torch.as_tensor(pred_icl) == gold)
    for pred in preds_p:
        mask = mask & (torch.as_tensor(pred) == gold)
    return mask


# ---------------------------------------------------------------------------------------------
# aggregation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PerExample:
    """A metric before aggregation: per-example values and which examples count.

    ``values``: [batch, layer] for the similarity metrics, [batch] for predictions (accuracy as
    0/1, Rec2FTP as 100 · "ICL right"). ``weight``: [batch] 0/1, the examples the metric is
    taken over, or None for all of them: Rec2FTP counts only the examples P fixed, and a subset
    such as F2T is a weight. Every aggregate is a weighted mean over examples, so a bootstrap
    that resamples the whole eval set (paired with the other settings) resamples the subset too.
    """

    values: Tensor
    weight: Tensor | None = None

    def restrict(self, mask: Tensor) -> PerExample:
        """The same metric over the examples of ``mask`` [batch] bool only."""
        mask = torch.as_tensor(mask).double()
        return PerExample(self.values, mask if self.weight is None else self.weight * mask)

    @property
    def n(self) -> int:
        """Examples that count (0 for an empty subset)."""
        return len(self.values) if self.weight is None else int((self.weight > 0).sum())

    def per_layer(self) -> Tensor:
        """Weighted mean over examples: [layer] (0-d for [batch] values); NaN where none count."""
        return per_layer(self.values, self.weight)

    def headline(self) -> float:
        """Mean over examples, then over layers (SPEC §4); NaN where no example counts."""
        return self.per_layer().mean().item()

    def example_headline(self) -> Tensor:
        """[batch] float64: each example's mean over layers. Its weighted mean over examples is
        ``headline()`` (every example has every layer), so it is what a bootstrap resamples."""
        v = self.values.double()
        return v.flatten(1).mean(1) if v.ndim > 1 else v


def per_layer(x: Tensor, weight: Tensor | None = None) -> Tensor:
    """Per-layer curve: mean over examples of a [batch, layer] metric -> [layer].

    ``weight`` [batch]: a weighted mean Σ w·x / Σ w instead (NaN where Σ w = 0; an entry with
    weight 0 is never read, so it may be NaN).
    """
    x = x.double()
    if weight is None:
        return x.mean(dim=0)
    w = torch.as_tensor(weight).double().reshape(-1, *([1] * (x.ndim - 1)))  # [batch, 1, ...]
    total = w.sum(dim=0)
    num = torch.where(w > 0, x * w, 0.0).sum(dim=0)
    return torch.where(total > 0, num / total.clamp_min(torch.finfo(total.dtype).tiny), math.nan)


def headline(x: Tensor, weight: Tensor | None = None) -> float:
    """Headline number: mean over examples, then over layers, of a [batch, layer] metric."""
    return per_layer(x, weight).mean().item()


def mean_sd(values: Sequence) -> tuple:
    """Mean and sample standard deviation (ddof=1) across seeds (or tasks).

    ``values``: floats -> ``(float, float)``; or equal-shaped tensors/arrays such as per-layer
    curves [layer] -> ``(Tensor [layer], Tensor [layer])``, elementwise over the first axis.
    NaN values (undefined metrics, e.g. Rec2FTP with nothing fixed) are dropped first, so the
    statistics are over the seeds where the metric is defined. The sd is NaN when fewer than two
    values remain (tables then show "—"); the mean is NaN when none remain.
    """
    if len(values) == 0:
        return math.nan, math.nan
    scalar = all(np.ndim(v) == 0 for v in values)
    x = torch.stack([torch.as_tensor(np.asarray(v, dtype=np.float64)) for v in values])  # [n, ...]
    valid = ~torch.isnan(x)
    n = valid.sum(0)
    x0 = x.masked_fill(~valid, 0.0)
    mean = torch.where(n > 0, x0.sum(0) / n.clamp_min(1), math.nan)
    sq = ((x0 - mean) ** 2).masked_fill(~valid, 0.0).sum(0)
    sd = torch.where(n > 1, (sq / (n - 1).clamp_min(1)).sqrt(), math.nan)
    if scalar:
        return mean.item(), sd.item()
    return mean, sd


# ---------------------------------------------------------------------------------------------
# metric registry: names -> functions over one cell's records
# ---------------------------------------------------------------------------------------------

# One cell's records: setting name -> {"label_logprobs", "pred", "gold", "attn_out",
# "attn_logits", "q_len", ...} as tensors (any Mapping, so the report can load keys lazily).
Records = Mapping[str, Mapping[str, Tensor]]
# An aggregated metric: a per-layer curve [layer] or a scalar.
MetricValue = Tensor | float
# (records, process, *, seed) -> PerExample. ``process`` is a setting name, or for the
# two-process metrics (alpha, alpha_aou*) a (P, Q) pair; ``seed`` only matters for the random
# baselines. Registered functions return per-example values; ``compute`` aggregates them.
MetricFn = Callable[..., PerExample]

METRICS: Registry[MetricFn] = Registry("metric")

# Which metrics need which process argument; the report reads these to lay out its tables.
CELL_METRICS = (
    "simam_before",
    "simaou_random_gaussian",
    "simaou_random_uniform",
    "simaou_random_gaussian_raw",
    "simaou_random_uniform_raw",
)  # process ignored
PAIR_METRICS = ("alpha", "alpha_aou", "alpha_aou_raw")  # process is a (P, Q) pair
SCALAR_METRICS = ("accuracy", "rec2ftp")  # per-example values [batch]; aggregate to a float


def examples(name: str, records: Records, process, *, seed: int = 0) -> PerExample:
    """The registered metric ``name`` on one cell, per example (unknown names: did-you-mean)."""
    return METRICS.get(name)(records, process, seed=seed)


def compute(name: str, records: Records, process, *, seed: int = 0) -> MetricValue:
    """The registered metric ``name`` on one cell, aggregated: a per-layer curve [layer], or a
    float for accuracy (a fraction) and Rec2FTP (percent; NaN when P fixed no example)."""
    value = examples(name, records, process, seed=seed).per_layer()
    return value.item() if value.ndim == 0 else value


def f2t(records: Records, process) -> Tensor:
    """The F2T subset of ``process`` (a setting, or a (P, Q) pair: both) -> [batch] bool."""
    procs = (process,) if isinstance(process, str) else tuple(process)
    return f2t_mask(records["zsl"]["pred"], records["icl"]["pred"],
                    [records[p]["pred"] for p in procs], records["zsl"]["gold"])


@METRICS.register("accuracy")
def _accuracy(recs: Records, process: str, *, seed: int = 0) -> PerExample:
    pred, gold = torch.as_tensor(recs[process]["pred"]), torch.as_tensor(recs[process]["gold"])
    if pred.shape != gold.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and gold {tuple(gold.shape)} differ in shape")
    return PerExample((pred == gold).double())  # [batch] 0/1


@METRICS.register("rec2ftp")
def _rec2ftp(recs: Records, process: str, *, seed: int = 0) -> PerExample:
    # the weighted mean of 100 · "ICL right" over the examples P fixed is rec2ftp()
    gold = torch.as_tensor(recs[process]["gold"])
    fixed = (torch.as_tensor(recs["zsl"]["pred"]) != gold) & (torch.as_tensor(recs[process]["pred"]) == gold)
    icl_right = (torch.as_tensor(recs["icl"]["pred"]) == gold).double()
    return PerExample(100.0 * icl_right, fixed.double())  # [batch], weight [batch]


def _aou(recs: Records, setting: str) -> Tensor:
    return recs[setting]["attn_out"]  # [batch, layer, d_model]


def _logits(recs: Records, setting: str) -> Tensor:
    return recs[setting]["attn_logits"]  # [batch, layer, head, q_pos]


@METRICS.register("simaou_norm")
def _simaou_norm(recs: Records, process: str, *, seed: int = 0) -> PerExample:
    return PerExample(simaou(_aou(recs, "icl"), _aou(recs, "zsl"), _aou(recs, process), True))


@METRICS.register("simaou_raw")
def _simaou_raw(recs: Records, process: str, *, seed: int = 0) -> PerExample:
    return PerExample(simaou(_aou(recs, "icl"), _aou(recs, "zsl"), _aou(recs, process), False))


def _random(kind: str, normalize: bool) -> MetricFn:
    def fn(recs: Records, process=None, *, seed: int = 0) -> PerExample:
        return PerExample(simaou_random(
            _aou(recs, "icl"), _aou(recs, "zsl"), seed=seed, kind=kind, normalize=normalize
        ))

    return fn


METRICS.add("simaou_random_gaussian", _random("gaussian", True))
METRICS.add("simaou_random_uniform", _random("uniform", True))
METRICS.add("simaou_random_gaussian_raw", _random("gaussian", False))
METRICS.add("simaou_random_uniform_raw", _random("uniform", False))


@METRICS.register("simam_before")
def _simam_before(recs: Records, process=None, *, seed: int = 0) -> PerExample:
    return PerExample(simam(_logits(recs, "icl"), _logits(recs, "zsl")))


@METRICS.register("simam")
def _simam(recs: Records, process: str, *, seed: int = 0) -> PerExample:
    return PerExample(simam(_logits(recs, "icl"), _logits(recs, process)))


@METRICS.register("simam_delta")
def _simam_delta(recs: Records, process: str, *, seed: int = 0) -> PerExample:
    return PerExample(simam_delta(_logits(recs, "icl"), _logits(recs, "zsl"), _logits(recs, process)))


@METRICS.register("alpha")
def _alpha(recs: Records, process: tuple[str, str], *, seed: int = 0) -> PerExample:
    p, q = process
    return PerExample(alpha(_logits(recs, p), _logits(recs, q), _logits(recs, "zsl")))


@METRICS.register("alpha_aou")
def _alpha_aou(recs: Records, process: tuple[str, str], *, seed: int = 0) -> PerExample:
    p, q = process
    return PerExample(alpha_aou(_aou(recs, p), _aou(recs, q), _aou(recs, "zsl"), True))


@METRICS.register("alpha_aou_raw")
def _alpha_aou_raw(recs: Records, process: tuple[str, str], *, seed: int = 0) -> PerExample:
    p, q = process
    return PerExample(alpha_aou(_aou(recs, p), _aou(recs, q), _aou(recs, "zsl"), False))
