"""Output agreement between ICL and a process P: same prediction, KL and Jensen-Shannon.

SPEC §4, in the spirit of Shen, Mishra and Khashabi (ICML 2024), who ask whether ICL and
gradient descent agree on their outputs, not only on their internals. Inputs are the label
log-probabilities the run records for every setting, ``label_logprobs`` [batch, label]: the
log-softmax over the whole vocabulary read at each label word's first token (SPEC §2). Only the
labels are compared, so each row is first renormalized over the labels:
log p(label) = lp − logsumexp(lp), i.e. the distribution conditioned on answering with a label.

Per example:
- ``agree``: 1 where ICL and P predict the same label, else 0. The prediction is the argmax of
  the recorded row itself (renormalizing subtracts one constant per row, so it cannot change the
  argmax, but its rounding could merge two nearly equal values); a tie goes to the first label,
  as ``torch.argmax`` does. ``tie`` marks examples where either side's maximum is shared, so a
  report can count them (SPEC §7) instead of trusting a tie-break.
- ``kl``: KL(ICL ‖ P) = Σ p_ICL (log p_ICL − log p_P), in nats.
- ``js``: Jensen-Shannon divergence ½ KL(ICL ‖ M) + ½ KL(P ‖ M), M = ½ (p_ICL + p_P), in nats,
  so 0 ≤ JS ≤ ln 2. Not its square root (scipy's ``jensenshannon`` returns the distance, √JS).
Everything is computed in float64 and in log space: log M = logaddexp(log p, log q) − ln 2, and
a term with p = 0 contributes 0 (its limit). So a probability that underflows (a label at
log-probability −1000) leaves KL and JS finite and right. KL is +∞ only where P gives a label
exactly zero probability (log-probability −∞) that ICL does not: there it is +∞. Rounding can
push a value a hair outside its range; they are clamped to [0, ∞) and [0, ln 2].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Tensor = torch.Tensor

LN2 = math.log(2.0)


def renormalize(label_logprobs) -> Tensor:
    """Log-probabilities renormalized over the labels, float64: [batch, label] -> [batch, label].

    Each row becomes lp − logsumexp(lp), so exp() of it sums to 1. A row that gives every label
    −∞ (or holds a NaN or +∞) has no distribution over the labels and is an error.
    """
    lp = torch.as_tensor(label_logprobs).double()
    if lp.ndim != 2 or lp.shape[-1] < 1:
        raise ValueError(f"expected label_logprobs of shape [batch, label], got {list(lp.shape)}")
    norm = torch.logsumexp(lp, dim=-1, keepdim=True)  # [batch, 1]
    if torch.isnan(lp).any() or not torch.isfinite(norm).all():
        raise ValueError(
            "each row of label_logprobs needs a finite log-probability and no NaN/+inf"
        )
    return lp - norm


def predictions(label_logprobs) -> Tensor:
    """Predicted label per example, the first maximum on ties (torch.argmax): [batch] int64."""
    return torch.as_tensor(label_logprobs).argmax(dim=-1)


def has_tie(label_logprobs) -> Tensor:
    """[batch] bool: the row's maximum is reached by more than one label."""
    lp = torch.as_tensor(label_logprobs)
    return (lp == lp.max(dim=-1, keepdim=True).values).sum(-1) > 1


def _xlogy_ratio(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Σ p (log p − log q) over the last dim, a term with p = 0 being 0 (its limit)."""
    p = log_p.exp()
    # where() and not p·(…): with log p = −∞ the difference is NaN or ±∞ and 0·that is NaN
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)


def kl_divergence(lp_a, lp_b) -> Tensor:
    """KL(a ‖ b) in nats per example, over renormalized label distributions: [batch]."""
    a, b = renormalize(lp_a), renormalize(lp_b)
    return _xlogy_ratio(a, b).clamp_min(0.0)  # ≥ 0 (Gibbs); below only by rounding


def js_divergence(lp_a, lp_b) -> Tensor:
    """Jensen-Shannon divergence in nats per example (not its square root), in [0, ln 2]: [batch].

    Symmetric in a and b; finite even where a probability underflows or is exactly 0.
    """
    a, b = renormalize(lp_a), renormalize(lp_b)
    log_m = torch.logaddexp(a, b) - LN2  # [batch, label]; finite wherever a or b is
    js = 0.5 * _xlogy_ratio(a, log_m) + 0.5 * _xlogy_ratio(b, log_m)
    return js.clamp(0.0, LN2)


@dataclass(frozen=True)
class Agreement:
    """Per-example output agreement of ICL and a process P, each [batch].

    ``agree`` (float64 0/1), ``kl`` = KL(ICL ‖ P) and ``js`` in nats, ``tie`` (bool: either
    side's top label score is shared, so its prediction rests on the first-label tie-break).
    """

    agree: Tensor
    kl: Tensor
    js: Tensor
    tie: Tensor

    @property
    def rate(self) -> float:
        """Share of examples where ICL and P predict the same label; NaN if there are none."""
        return _mean(self.agree)

    @property
    def mean_kl(self) -> float:
        return _mean(self.kl)

    @property
    def mean_js(self) -> float:
        return _mean(self.js)

    @property
    def n_tied(self) -> int:
        return int(self.tie.sum())


def _mean(x: Tensor) -> float:
    return x.mean().item() if x.numel() else math.nan


def output_agreement(lp_icl, lp_p) -> Agreement:
    """Agreement, KL(ICL ‖ P) and JS per example from label log-probabilities [batch, label].

    ``lp_icl`` and ``lp_p`` are the recorded rows for ICL and for P (any additive constant per
    row is irrelevant: both are renormalized over the labels).
    """
    lp_icl, lp_p = torch.as_tensor(lp_icl), torch.as_tensor(lp_p)
    if lp_icl.shape != lp_p.shape:
        raise ValueError(f"lp_icl {list(lp_icl.shape)} and lp_p {list(lp_p.shape)} differ in shape")
    agree = (predictions(lp_icl) == predictions(lp_p)).double()
    return Agreement(
        agree=agree,
        kl=kl_divergence(lp_icl, lp_p),
        js=js_divergence(lp_icl, lp_p),
        tie=has_tie(lp_icl) | has_tie(lp_p),
    )
