"""Uncertainty for the report (SPEC §7): bootstrap intervals, paired tests, Holm, verdicts.

Pure functions on numpy arrays (torch tensors are converted): no model, no file I/O, and no
global RNG: every draw comes from ``np.random.default_rng(seed)``, so a report rebuilds
byte-identically. Within a cell, ``paired_bootstrap`` and ``paired_difference_test`` resample
eval examples; every setting of the cell (ZSL, ICL, each process, a control model on the same
examples) sees the same ``bootstrap_indices`` rows, so the example-to-example variation the
settings share cancels out of their differences. Across seeds: ``seed_summary``; across cells
(per-task or per-seed effects of one claim): ``one_sample_test``. ``holm`` corrects one report's
p-values together and ``evaluate_claims`` turns them into holds / reversed / inconclusive.

A *statistic* is a callable ``stat(idx)`` giving a number, or an array such as a per-layer curve
[layer], on the eval examples ``idx``; ``stat(np.arange(n))`` is the point estimate. With
``batched=True`` it takes idx [n_boot, n] and returns [n_boot, ...] instead (``mean_of``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import scipy.stats

Stat = Callable[[np.ndarray], "float | np.ndarray"]

HOLDS, REVERSED, INCONCLUSIVE = "holds", "reversed", "inconclusive"

# Values gathered per batched call (rows of idx · n · statistic size): 32 MB of float64, so a
# per-layer statistic on 2000 examples does not gather [n_boot, 2000, layer] at once.
_BATCH_ELEMS = 1 << 22


@dataclass(frozen=True)
class Interval:
    """A point estimate and its two-sided percentile interval (arrays for an array statistic)."""

    estimate: float | np.ndarray
    low: float | np.ndarray
    high: float | np.ndarray
    level: float
    n_boot: int  # resamples drawn, valid or not
    method: str
    n_invalid: int | np.ndarray = 0  # resamples dropped because the statistic was NaN or ±inf


@dataclass(frozen=True)
class Test:
    """An effect with its interval and a p-value for H0 "effect = 0" (or = ``null``)."""

    effect: float | np.ndarray
    low: float | np.ndarray
    high: float | np.ndarray
    p: float | np.ndarray
    n_boot: int  # resamples or permutations behind p; 0 for the t test
    method: str
    level: float = 0.95
    n_invalid: int | np.ndarray = 0  # dropped resamples (bootstrap) or NaN values (t, sign-flip)


@dataclass(frozen=True)
class SeedStat:
    """Across-seed mean, sample sd (ddof=1) and t interval; ``n`` counts the non-NaN values."""

    mean: float | np.ndarray
    sd: float | np.ndarray
    low: float | np.ndarray
    high: float | np.ndarray
    n: int | np.ndarray
    level: float = 0.95


def _as_array(x) -> np.ndarray:
    """float64 numpy array from a float, array or torch tensor (detached, moved to CPU)."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")


def _scalar(x: np.ndarray):
    """0-d arrays become Python floats/ints so scalar statistics give scalar fields."""
    return x.item() if x.ndim == 0 else x


# ---------------------------------------------------------------------------------------------
# within a cell: paired bootstrap over eval examples
# ---------------------------------------------------------------------------------------------


def bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n] int64 indices into the eval examples, drawn with replacement.

    From a private ``np.random.default_rng(seed)``: the global RNG is neither used nor advanced.
    Pass the same array (or the same seed) to every setting of a cell: that is the pairing.
    """
    if n < 1 or n_boot < 1:
        raise ValueError(f"need n >= 1 and n_boot >= 1, got n={n}, n_boot={n_boot}")
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n), dtype=np.int64)


def _indices(n: int, n_boot: int, seed: int, idx: np.ndarray | None) -> np.ndarray:
    """The resamples: ``idx`` when given (checked against n and n_boot), else drawn from seed."""
    if idx is None:
        return bootstrap_indices(n, n_boot, seed)
    if idx.shape != (n_boot, n):
        raise ValueError(f"idx has shape {idx.shape}, expected (n_boot, n) = {(n_boot, n)}")
    return idx


def mean_of(values, weight=None) -> Stat:
    """Statistic "mean over examples" of ``values`` [batch, ...] -> scalar or [...] per resample.

    Works for both call forms: idx [n] -> [...]; idx [n_boot, n] -> [n_boot, ...] (batched).
    ``weight`` [batch] (e.g. a 0/1 mask of the examples a metric is defined on) makes it the
    weighted mean Σ w·x / Σ w over the resampled examples: a ratio such as Rec2FTP, or a metric
    restricted to a subset, resampled with the whole eval set so that it stays paired with the
    other settings. A resample with Σ w = 0 gives NaN (``paired_bootstrap`` drops and counts it).
    """
    x = _as_array(values)
    if weight is None:
        return lambda idx: x[idx].mean(axis=np.ndim(idx) - 1)
    w = _as_array(weight)
    if w.shape != x.shape[:1]:
        raise ValueError(f"weight {w.shape} must be [batch] for values {x.shape}")
    wb = w.reshape(w.shape + (1,) * (x.ndim - 1))  # [batch, 1, ...]: broadcasts against x
    wx = np.where(wb > 0, x * wb, 0.0)  # 0 where w is 0, even where x is NaN there

    def stat(idx):
        axis = np.ndim(idx) - 1
        den = w[idx].sum(axis=axis)
        den = den.reshape(den.shape + (1,) * (x.ndim - 1))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, wx[idx].sum(axis=axis) / np.where(den > 0, den, 1.0), np.nan)

    return stat


def _replicates(stat: Stat, idx: np.ndarray, batched: bool) -> tuple[np.ndarray, np.ndarray]:
    """(point estimate [...], replicates [n_boot, ...]) of ``stat`` over the rows of ``idx``."""
    n_boot, n = idx.shape
    if batched:
        est = _as_array(stat(np.arange(n)[None, :]))[0]
        rows = max(1, _BATCH_ELEMS // (n * max(1, est.size)))
        reps = np.concatenate([_as_array(stat(idx[i : i + rows])) for i in range(0, n_boot, rows)])
    else:
        est = _as_array(stat(np.arange(n)))
        reps = np.stack([_as_array(stat(row)) for row in idx])
    if reps.shape != (n_boot, *est.shape):
        raise ValueError(
            f"statistic gave replicates of shape {reps.shape}, expected {(n_boot, *est.shape)}"
        )
    return est, reps


def _percentile_interval(reps: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Quantiles (1−level)/2 and (1+level)/2 of the finite replicates, per element (NaN if none)."""
    _check_level(level)
    reps = np.where(np.isfinite(reps), reps, np.nan)
    with warnings.catch_warnings():  # an element with no finite replicate is NaN, as documented
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanquantile(reps, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return low, high


def paired_bootstrap(
    stat: Stat,
    n: int,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    batched: bool = False,
    idx: np.ndarray | None = None,
) -> Interval:
    """Percentile bootstrap interval of ``stat`` over ``n`` eval examples.

    The resamples are ``bootstrap_indices(n, n_boot, seed)``, so two calls with the same seed on
    different settings of a cell are paired. Interval: the (1−level)/2 and (1+level)/2 quantiles
    (numpy's default linear interpolation) of the replicates. A replicate that is NaN or ±inf
    (a ratio whose denominator is 0 in that resample, such as Rec2FTP) is dropped and counted in
    ``n_invalid``; the interval is then conditional on the statistic being defined, so a large
    ``n_invalid`` is a warning sign the caller should show. Array statistics (per-layer curves)
    give array fields, with drops counted per element. ``batched=True``: ``stat`` takes blocks
    of rows idx [rows, n] and returns [rows, ...] (``mean_of``); the result is the same.
    ``idx``: the resamples already drawn (``bootstrap_indices(n, n_boot, seed)``, shape
    [n_boot, n]), so a caller bootstrapping many statistics of one cell draws them once.
    """
    est, reps = _replicates(stat, _indices(n, n_boot, seed, idx), batched)
    low, high = _percentile_interval(reps, level)
    n_invalid = (~np.isfinite(reps)).sum(axis=0)
    est, low, high, n_invalid = map(_scalar, (est, low, high, n_invalid))
    return Interval(est, low, high, level, n_boot, "paired percentile bootstrap", n_invalid)


def bootstrap_p(reps: np.ndarray) -> float | np.ndarray:
    """Two-sided bootstrap p-value for H0 "difference = 0" from replicates d* [n_boot, ...].

    p = min(1, 2 · min((1 + #{d* ≤ 0}) / (B + 1), (1 + #{d* ≥ 0}) / (B + 1))), B the number of
    finite replicates (per element). This inverts the percentile interval: p < α when 0 lies in
    a tail of mass < α/2, i.e. outside the (1−α) percentile interval (up to the +1 and the
    quantile interpolation), so p and the interval of ``paired_difference_test`` agree.
    The +1 counts the observed sample as one of the resamples (as in Monte Carlo p-values), so
    p is never 0 and its floor is 2/(B+1): with Holm over m claims, B must exceed 2m/α for a
    claim to be able to hold at all (B = 2000 allows m ≤ 50 at α = 0.05). Replicates exactly
    0 count on both sides, which is conservative for discrete statistics such as accuracy
    differences, and makes identical settings give p = 1.
    """
    d = _as_array(reps)
    finite = np.isfinite(d)
    b = finite.sum(axis=0)
    below = (finite & (d <= 0)).sum(axis=0)
    above = (finite & (d >= 0)).sum(axis=0)
    p = np.minimum(1.0, 2 * np.minimum(1 + below, 1 + above) / (b + 1))
    return _scalar(np.where(b > 0, p, np.nan))


def paired_difference_test(
    stat_a: Stat,
    stat_b: Stat,
    n: int,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    batched: bool = False,
    idx: np.ndarray | None = None,
) -> Test:
    """Effect stat_a − stat_b on all n examples, its paired percentile interval, and p.

    Both statistics are evaluated on the same resamples (one ``bootstrap_indices`` array), the
    difference is taken per resample, then the interval is as in ``paired_bootstrap`` and p is
    ``bootstrap_p`` (two-sided, H0: difference = 0). Resamples where either side is NaN/±inf
    are dropped and counted in ``n_invalid``. Array statistics give array fields. ``idx``: the
    resamples already drawn, as in ``paired_bootstrap``.
    """
    idx = _indices(n, n_boot, seed, idx)
    est_a, reps_a = _replicates(stat_a, idx, batched)
    est_b, reps_b = _replicates(stat_b, idx, batched)
    valid = np.isfinite(reps_a) & np.isfinite(reps_b)  # [n_boot, ...]
    with np.errstate(invalid="ignore"):  # inf − inf in a dropped resample
        d = np.where(valid, reps_a - reps_b, np.nan)
    low, high = _percentile_interval(d, level)
    effect, low, high, n_invalid = map(_scalar, (est_a - est_b, low, high, (~valid).sum(0)))
    p = bootstrap_p(d)
    return Test(effect, low, high, p, n_boot, "paired percentile bootstrap", level, n_invalid)


# ---------------------------------------------------------------------------------------------
# across seeds and cells
# ---------------------------------------------------------------------------------------------


def seed_summary(values: Sequence, level: float = 0.95) -> SeedStat:
    """Mean, sample sd (ddof=1) and t interval mean ± t_{(1+level)/2, n−1} · sd/√n.

    ``values``: floats (one per seed) -> scalar fields; or equal-shaped arrays such as per-layer
    curves [layer] -> array fields, elementwise over the first axis. NaN values are dropped
    first (per element). With n < 2 the sd and interval are NaN (the mean is NaN when n = 0);
    with sd = 0 the interval is the single point ``mean``.
    """
    _check_level(level)
    x = np.stack([_as_array(v) for v in values]) if len(values) else np.full(0, np.nan)
    valid = ~np.isnan(x)
    n = valid.sum(axis=0)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(x, axis=0)
        sd = np.where(n > 1, np.nanstd(x, axis=0, ddof=1), np.nan)
        tq = scipy.stats.t.ppf((1 + level) / 2, np.maximum(n - 1, 1))
        half = np.where(n > 1, tq * sd / np.sqrt(np.maximum(n, 1)), np.nan)
    return SeedStat(*map(_scalar, (mean, sd, mean - half, mean + half, n)), level=level)


def one_sample_test(
    values: Sequence[float],
    null: float = 0.0,
    alternative: str = "two-sided",
    *,
    method: str = "t",
    level: float = 0.95,
    n_resamples: int = 9999,
    seed: int = 0,
) -> Test:
    """Test per-cell (per-task or per-seed) effects against ``null``.

    effect = mean(values) − null; low/high = two-sided t interval of that effect at ``level``
    (``seed_summary``), whatever the method. NaN values are dropped (counted in ``n_invalid``).
    ``alternative``: "two-sided", "greater" (claim: effect > 0) or "less".
    method:
    - ``"t"`` (default): ``scipy.stats.ttest_1samp``. Assumes the per-cell effects are roughly
      normal; the only choice that can reach p < 0.05 with 3 seeds or 3-5 tasks.
    - ``"signflip"``: ``scipy.stats.permutation_test`` flipping the sign of each value (exact
      over all 2^n flips when 2^n ≤ n_resamples, else seeded random flips). Assumes only that
      the effects are symmetric about ``null`` under H0, but its smallest two-sided p is 2/2^n
      (0.25 for n = 3, 0.03 for n = 6): use it as a robustness check when n ≥ 6, e.g. six tasks.
    With fewer than 2 values p is NaN. Zero spread gives scipy's t-test answer (p = 0 if the
    values differ from ``null``, NaN if they equal it).
    """
    x = _as_array(values).ravel()
    n_nan = int(np.isnan(x).sum())
    x = x[~np.isnan(x)]
    if method not in ("t", "signflip") or alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"unknown method {method!r} or alternative {alternative!r}")
    s = seed_summary(list(x), level=level)
    if x.size < 2:
        p, n_perm = math.nan, 0
    elif method == "t":
        with warnings.catch_warnings():  # zero spread: scipy warns, and returns the answer above
            warnings.simplefilter("ignore", RuntimeWarning)
            p = float(scipy.stats.ttest_1samp(x, null, alternative=alternative).pvalue)
        n_perm = 0
    else:
        res = scipy.stats.permutation_test(
            (x - null,),
            lambda y, axis: np.mean(y, axis=axis),
            permutation_type="samples",  # one sample: permuting = flipping signs
            vectorized=True,
            n_resamples=n_resamples,
            alternative=alternative,
            rng=np.random.default_rng(seed),
        )
        p, n_perm = float(res.pvalue), int(len(res.null_distribution))
    name = "one-sample t test" if method == "t" else "sign-flip permutation test"
    return Test(s.mean - null, s.low - null, s.high - null, p, n_perm, name, level, n_nan)


# ---------------------------------------------------------------------------------------------
# multiplicity and verdicts
# ---------------------------------------------------------------------------------------------


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values, in the input order -> [m] float64.

    Sorted ascending, p_(i) (i = 1..m) becomes max_{j ≤ i} min(1, (m − j + 1) · p_(j)): step-down,
    monotone in p, capped at 1. NaN entries stay NaN and do not count in m (a claim without a
    p-value is not tested, so it should not make the others stricter).
    """
    p = _as_array(pvalues).ravel()
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    order = ok[np.argsort(p[ok], kind="stable")]  # stable: ties get equal values anyway
    m = order.size
    scaled = (m - np.arange(m)) * p[order]
    out[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return out


def verdict(
    effect_low: float, effect_high: float, p_adjusted: float, *, direction: int, alpha: float = 0.05
) -> str:
    """Verdict of a directional claim: "holds", "reversed" or "inconclusive".

    direction = +1 claims effect > 0, −1 claims effect < 0. "holds": the interval excludes 0 on
    the claimed side (strictly) and p_adjusted < alpha; "reversed": it excludes 0 on the other
    side and p_adjusted < alpha; anything else, NaN included, is "inconclusive". Requiring both
    guards against an interval and a p-value from different procedures disagreeing.
    """
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1, got {direction}")
    lo, hi = direction * effect_low, direction * effect_high  # flip: the claim becomes "> 0"
    lo, hi = min(lo, hi), max(lo, hi)
    if not p_adjusted < alpha:  # also False for NaN
        return INCONCLUSIVE
    if lo > 0:
        return HOLDS
    if hi < 0:
        return REVERSED
    return INCONCLUSIVE


def verdict_near_zero(low: float, high: float, margin: float) -> str:
    """Verdict for a claim "effect ≈ 0" (e.g. SimAOU random ≈ 0), given the effect's interval.

    "holds" if [low, high] lies within [−margin, margin]; "reversed" if it lies entirely outside
    (low > margin or high < −margin); else "inconclusive" (NaN too). This is an equivalence
    test: a (1 − 2α) interval inside the margin is the two one-sided tests at level α, so a 95%
    interval is conservative at α = 0.05. ``margin`` is the caller's scientific choice (what
    counts as negligible for that metric, fixed before looking) and must be reported with the
    verdict.
    """
    if not margin > 0:
        raise ValueError(f"margin must be > 0, got {margin}")
    if math.isnan(low) or math.isnan(high):
        return INCONCLUSIVE
    if -margin <= low and high <= margin:
        return HOLDS
    if low > margin or high < -margin:
        return REVERSED
    return INCONCLUSIVE


@dataclass(frozen=True, kw_only=True)
class Claim:
    """One claim of a report; ``evaluate_claims`` fills ``p_holm`` and ``verdict``.

    direction: +1 / −1 claims effect > 0 / < 0; 0 claims effect ≈ 0 (judged with ``margin``).
    ``published``: the papers' figure as text, from ``published_model`` (compare directions).
    ``n_cells``: cells (task × seed) behind the effect; ``excluded``: cells left out, each with
    its reason (e.g. "AGNews: excepted by the claim", "CB seed 4: degenerate").
    """

    name: str
    description: str
    effect: float
    low: float
    high: float
    p: float
    p_holm: float = math.nan
    direction: int
    published: str | None = None
    published_model: str | None = None
    verdict: str = ""
    n_cells: int = 1
    excluded: list[str] = field(default_factory=list)
    margin: float | None = None  # only for direction 0


def evaluate_claims(claims: list[Claim], alpha: float = 0.05) -> list[Claim]:
    """New claims with ``p_holm`` (Holm over the directional claims given) and ``verdict`` set.

    The Holm family is the directional claims of this call; near-zero claims (direction 0) get
    p_holm NaN and stay out of it, since their verdict rests on the equivalence interval, not on
    rejecting "effect = 0". The inputs are not modified; the order is kept.
    """
    directional = [i for i, c in enumerate(claims) if c.direction != 0]
    adjusted = holm([claims[i].p for i in directional])
    p_holm = dict(zip(directional, adjusted.tolist()))
    out = []
    for i, c in enumerate(claims):
        if c.direction != 0:
            v = verdict(c.low, c.high, p_holm[i], direction=c.direction, alpha=alpha)
        elif c.margin is None:
            raise ValueError(f"claim {c.name!r}: a near-zero claim (direction 0) needs a margin")
        else:
            v = verdict_near_zero(c.low, c.high, c.margin)
        out.append(replace(c, p_holm=p_holm.get(i, math.nan), verdict=v))
    return out
