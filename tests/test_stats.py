"""Uncertainty machinery on synthetic data: coverage, pairing, p-value rules, Holm, verdicts."""

import math
import pickle
import statistics

import numpy as np
import pytest
import scipy.stats
import torch

from iclgd import stats as S


def _rng(seed=0):
    return np.random.default_rng(seed)


# --- bootstrap indices and intervals ----------------------------------------------------------


def test_bootstrap_indices_seeded_private_and_in_range():
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    a = S.bootstrap_indices(7, 50, seed=3)
    b = S.bootstrap_indices(7, 50, seed=3)
    assert np.array_equal(np.random.get_state()[1], before)  # global RNG untouched
    assert a.shape == (50, 7) and a.dtype == np.int64
    assert np.array_equal(a, b)
    assert a.min() >= 0 and a.max() <= 6
    assert not np.array_equal(a, S.bootstrap_indices(7, 50, seed=4))
    with pytest.raises(ValueError):
        S.bootstrap_indices(0, 10, seed=0)


def test_percentile_interval_covers_the_mean_at_about_the_nominal_rate():
    reps, n, mu = 300, 50, 3.0
    data = _rng(1234).normal(mu, 2.0, size=(reps, n))  # [rep, batch]
    hits = 0
    for r in range(reps):
        iv = S.paired_bootstrap(S.mean_of(data[r]), n, n_boot=500, seed=r, batched=True)
        assert iv.low <= iv.estimate <= iv.high
        hits += iv.low <= mu <= iv.high
    assert 0.90 <= hits / reps <= 0.985


def test_point_estimate_and_quantile_rule():
    x = _rng(1).normal(size=30)
    iv = S.paired_bootstrap(lambda i: x[i].mean(), 30, n_boot=200, seed=5, level=0.9)
    assert iv.estimate == pytest.approx(x.mean())
    means = x[S.bootstrap_indices(30, 200, seed=5)].mean(axis=1)  # [n_boot]
    assert iv.low == pytest.approx(np.quantile(means, 0.05))
    assert iv.high == pytest.approx(np.quantile(means, 0.95))
    assert (iv.level, iv.n_boot, iv.n_invalid) == (0.9, 200, 0)


def test_batched_and_per_resample_calls_agree_and_arrays_are_per_element():
    x = _rng(2).normal(size=(40, 3))  # [batch, layer]: a per-layer curve
    loop = S.paired_bootstrap(lambda i: x[i].mean(axis=0), 40, n_boot=300, seed=9)
    vec = S.paired_bootstrap(S.mean_of(x), 40, n_boot=300, seed=9, batched=True)
    assert loop.low.shape == (3,)
    for f in ("estimate", "low", "high"):
        assert np.allclose(getattr(loop, f), getattr(vec, f), rtol=0, atol=1e-12)
    for layer in range(3):  # each element equals the scalar interval of that layer
        one = S.paired_bootstrap(S.mean_of(x[:, layer]), 40, n_boot=300, seed=9, batched=True)
        assert one.low == pytest.approx(vec.low[layer])
        assert one.high == pytest.approx(vec.high[layer])


def test_torch_inputs_are_accepted():
    x = torch.randn(20, 2, generator=torch.Generator().manual_seed(0))  # [batch, layer]
    iv = S.paired_bootstrap(lambda i: x[torch.as_tensor(i)].mean(0), 20, n_boot=50, seed=0)
    ref = S.paired_bootstrap(S.mean_of(x.numpy()), 20, n_boot=50, seed=0, batched=True)
    assert np.allclose(iv.low, ref.low) and np.allclose(iv.estimate, x.double().mean(0).numpy())


def test_undefined_resamples_are_dropped_and_counted():
    # a ratio whose denominator is one example: undefined in every resample that misses it
    n, n_boot = 10, 400
    num = np.arange(n, dtype=float)
    den = np.zeros(n)
    den[3] = 1.0

    def ratio(i):
        d = den[i].sum()
        return num[i].sum() / d if d > 0 else math.nan

    iv = S.paired_bootstrap(ratio, n, n_boot=n_boot, seed=0)
    idx = S.bootstrap_indices(n, n_boot, seed=0)
    missing = ~(idx == 3).any(axis=1)  # [n_boot]
    assert 0 < iv.n_invalid == int(missing.sum())
    kept = np.array([ratio(r) for r in idx[~missing]])
    assert iv.low == pytest.approx(np.quantile(kept, 0.025))
    assert iv.high == pytest.approx(np.quantile(kept, 0.975))


# --- paired difference test -------------------------------------------------------------------


def test_bootstrap_p_rule_by_hand():
    # B = 3 finite; #{d ≤ 0} = 1, #{d ≥ 0} = 3 -> 2 · (1 + 1)/(3 + 1) = 1.0 after the cap
    assert S.bootstrap_p(np.array([-1.0, 1.0, 2.0, math.nan])) == pytest.approx(1.0)
    # B = 4; #{d ≤ 0} = 1, #{d ≥ 0} = 3 -> 2 · 2/5
    assert S.bootstrap_p(np.array([-1.0, 1.0, 2.0, 3.0])) == pytest.approx(0.8)
    # all positive: the floor 2/(B + 1)
    assert S.bootstrap_p(np.array([1.0, 2.0, 3.0])) == pytest.approx(0.5)
    assert S.bootstrap_p(np.ones(1999)) == pytest.approx(2 / 2000)
    assert math.isnan(S.bootstrap_p(np.array([math.nan, math.nan])))


def test_identical_sides_give_zero_effect_and_p_one():
    x = _rng(3).normal(size=25)
    t = S.paired_difference_test(S.mean_of(x), S.mean_of(x.copy()), 25, n_boot=300, batched=True)
    assert (t.effect, t.low, t.high, t.p) == (0.0, 0.0, 0.0, 1.0)


def test_pairing_cancels_shared_variation():
    # examples vary a lot (sd 10); the settings differ by a constant 0.1 on every example
    x = _rng(4).normal(0.0, 10.0, size=60)
    t = S.paired_difference_test(S.mean_of(x + 0.1), S.mean_of(x), 60, n_boot=500, batched=True)
    assert t.effect == pytest.approx(0.1)
    assert t.low == pytest.approx(0.1) and t.high == pytest.approx(0.1)
    assert t.p == pytest.approx(2 / 501)


def test_detects_a_clear_difference():
    rng = _rng(5)
    x = rng.normal(size=100)
    a, b = x + 0.3 + rng.normal(0, 0.2, 100), x + rng.normal(0, 0.2, 100)
    t = S.paired_difference_test(S.mean_of(a), S.mean_of(b), 100, n_boot=2000, batched=True)
    assert t.p < 0.01 and t.low > 0
    assert t.method == "paired percentile bootstrap" and t.n_boot == 2000


def test_null_difference_is_not_significant_and_p_is_calibrated():
    rng = _rng(6)
    a, b = rng.normal(size=(2, 200, 40))  # [setting, rep, batch], identical distributions
    t = S.paired_difference_test(S.mean_of(a[0]), S.mean_of(b[0]), 40, n_boot=1000, batched=True)
    assert t.p > 0.05 and t.low < 0 < t.high
    ps = np.array(
        [
            S.paired_difference_test(
                S.mean_of(a[r]), S.mean_of(b[r]), 40, n_boot=400, seed=r, batched=True
            ).p
            for r in range(200)
        ]
    )
    # a p-value is roughly uniform under H0: a missing factor 2 would give a mean near 0.25
    assert 0.4 < ps.mean() < 0.6
    assert (ps < 0.05).mean() <= 0.1


# --- across seeds and cells -------------------------------------------------------------------


def test_seed_summary_matches_scipy_t_interval():
    v = [0.21, 0.35, 0.30]
    s = S.seed_summary(v)
    sd = statistics.stdev(v)
    low, high = scipy.stats.t.interval(0.95, 2, loc=statistics.mean(v), scale=sd / math.sqrt(3))
    assert s.mean == pytest.approx(statistics.mean(v)) and s.sd == pytest.approx(sd)
    assert (s.low, s.high) == (pytest.approx(low), pytest.approx(high))
    assert s.n == 3
    # NaN seeds are dropped
    s2 = S.seed_summary([0.21, math.nan, 0.35, 0.30])
    assert (s2.n, s2.low, s2.high) == (3, pytest.approx(low), pytest.approx(high))


def test_seed_summary_small_n_and_zero_spread():
    one = S.seed_summary([0.4])
    assert one.mean == 0.4 and one.n == 1
    assert math.isnan(one.sd) and math.isnan(one.low) and math.isnan(one.high)
    none = S.seed_summary([math.nan])
    assert none.n == 0 and math.isnan(none.mean)
    flat = S.seed_summary([0.5, 0.5, 0.5])
    assert (flat.sd, flat.low, flat.high) == (0.0, 0.5, 0.5)


def test_seed_summary_per_layer_curves():
    curves = [np.array([0.1, 0.2]), np.array([0.3, math.nan]), np.array([0.2, 0.4])]
    s = S.seed_summary(curves)
    assert s.n.tolist() == [3, 2]
    for layer in range(2):
        ref = S.seed_summary([c[layer] for c in curves])
        assert s.low[layer] == pytest.approx(ref.low) and s.sd[layer] == pytest.approx(ref.sd)


def test_one_sample_t_test_matches_scipy():
    v = [0.05, 0.12, 0.08, -0.01, 0.1]
    t = S.one_sample_test(v)
    assert t.p == pytest.approx(scipy.stats.ttest_1samp(v, 0.0).pvalue)
    assert t.effect == pytest.approx(np.mean(v))
    g = S.one_sample_test(v + [math.nan], null=0.02, alternative="greater")
    assert g.p == pytest.approx(scipy.stats.ttest_1samp(v, 0.02, alternative="greater").pvalue)
    assert g.n_invalid == 1 and g.effect == pytest.approx(np.mean(v) - 0.02)
    assert math.isnan(S.one_sample_test([0.3]).p)


def test_sign_flip_test_is_exact_by_hand():
    # 2^3 sign patterns; |mean| ≥ 2 only for the all-plus and all-minus ones -> p = 2/8
    t = S.one_sample_test([1.0, 2.0, 3.0], method="signflip")
    assert t.p == pytest.approx(0.25) and t.n_boot == 8
    with pytest.raises(ValueError):
        S.one_sample_test([1.0, 2.0], method="wilcoxon")


# --- Holm -------------------------------------------------------------------------------------


def test_holm_hand_computed():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04;
    # running max 0.02, 0.03, 0.06, 0.06; back in input order:
    assert np.allclose(S.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    # capped at 1: 2 · 0.5 = 1.0 and max(1.0, 0.6) = 1.0
    assert np.allclose(S.holm([0.5, 0.6]), [1.0, 1.0])
    assert np.allclose(S.holm([0.01, 0.01]), [0.02, 0.02])  # ties
    assert S.holm([]).shape == (0,)


def test_holm_nan_kept_and_not_counted():
    out = S.holm([0.01, math.nan, 0.04, 0.03, 0.005])
    assert math.isnan(out[1])
    assert np.allclose(out[[0, 2, 3, 4]], [0.03, 0.06, 0.06, 0.02])  # m = 4, as without the NaN
    assert np.isnan(S.holm([math.nan, math.nan])).all()


def test_holm_is_monotone_and_never_below_raw():
    p = _rng(7).uniform(0, 0.2, size=12)
    adj = S.holm(p)
    assert (adj >= p).all() and (adj <= 1).all()
    order = np.argsort(p)
    assert (np.diff(adj[order]) >= 0).all()


# --- verdicts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "low, high, p, direction, expected",
    [
        (0.1, 0.3, 0.01, 1, "holds"),
        (0.1, 0.3, 0.01, -1, "reversed"),
        (-0.3, -0.1, 0.01, 1, "reversed"),
        (-0.3, -0.1, 0.01, -1, "holds"),
        (-0.1, 0.3, 0.01, 1, "inconclusive"),  # interval straddles 0
        (-0.1, 0.3, 0.01, -1, "inconclusive"),
        (0.0, 0.3, 0.01, 1, "inconclusive"),  # touching 0 does not exclude it
        (0.1, 0.3, 0.2, 1, "inconclusive"),  # interval excludes 0, adjusted p does not reject
        (0.1, 0.3, 0.05, 1, "inconclusive"),  # p == alpha is not < alpha
        (-0.3, -0.1, 0.2, 1, "inconclusive"),
        (math.nan, math.nan, math.nan, 1, "inconclusive"),
    ],
)
def test_verdict_truth_table(low, high, p, direction, expected):
    assert S.verdict(low, high, p, direction=direction) == expected


def test_verdict_rejects_bad_direction():
    with pytest.raises(ValueError):
        S.verdict(0.1, 0.2, 0.01, direction=0)


@pytest.mark.parametrize(
    "low, high, expected",
    [
        (-0.01, 0.02, "holds"),
        (-0.05, 0.05, "holds"),  # on the margin counts as within
        (0.06, 0.1, "reversed"),
        (-0.2, -0.1, "reversed"),
        (0.03, 0.08, "inconclusive"),  # overlaps the margin's edge
        (-0.1, 0.1, "inconclusive"),  # too wide to tell
        (math.nan, 0.01, "inconclusive"),
    ],
)
def test_verdict_near_zero(low, high, expected):
    assert S.verdict_near_zero(low, high, margin=0.05) == expected


def test_verdict_near_zero_needs_a_positive_margin():
    with pytest.raises(ValueError):
        S.verdict_near_zero(-0.01, 0.01, margin=0.0)


def test_evaluate_claims_holm_over_directional_claims():
    def claim(name, low, high, p, direction, **kw):
        return S.Claim(
            name=name, description="", effect=(low + high) / 2, low=low, high=high, p=p,
            direction=direction, **kw,
        )  # fmt: skip

    claims = [
        claim("icl>zsl", 0.1, 0.3, 0.01, 1, published="92.7 vs 70.5", published_model="GPT 1.3B"),
        claim("lcgd>gd", 0.01, 0.05, 0.04, 1),  # excludes 0, but not after Holm
        claim("gd>lcgd", 0.02, 0.2, 0.03, -1),  # excludes 0 on the other side, not after Holm
        claim("random≈0", -0.004, 0.003, 0.5, 0, margin=0.02),
    ]
    out = S.evaluate_claims(claims)
    # Holm over the three directional p: sorted 0.01, 0.03, 0.04 times 3, 2, 1 -> 0.03, 0.06, 0.06
    assert np.allclose([c.p_holm for c in out[:3]], [0.03, 0.06, 0.06])
    assert [c.verdict for c in out] == ["holds", "inconclusive", "inconclusive", "holds"]
    assert math.isnan(out[3].p_holm)
    assert claims[0].verdict == "" and math.isnan(claims[0].p_holm)  # inputs untouched
    assert out[0].published_model == "GPT 1.3B"
    strict = S.evaluate_claims(claims[:3], alpha=0.1)
    assert [c.verdict for c in strict] == ["holds", "holds", "reversed"]
    with pytest.raises(ValueError):
        S.evaluate_claims([claim("no margin", -0.1, 0.1, 0.5, 0)])


# --- determinism ------------------------------------------------------------------------------


def test_same_seed_same_bytes():
    x = _rng(8).normal(size=(30, 4))

    def run(seed):
        iv = S.paired_bootstrap(S.mean_of(x), 30, n_boot=200, seed=seed, batched=True)
        t = S.paired_difference_test(
            S.mean_of(x[:, :2]), S.mean_of(x[:, 2:]), 30, n_boot=200, seed=seed, batched=True
        )
        sf = S.one_sample_test(x[:20, 0], method="signflip", n_resamples=500, seed=seed)
        return pickle.dumps((iv, t, sf))

    assert run(0) == run(0)
    assert run(0) != run(1)


# --- weighted statistics and shared resamples -------------------------------------------------


def test_weighted_mean_of_is_a_ratio_and_nan_without_weight():
    x = np.array([1.0, 2.0, np.nan, 4.0])  # NaN where the weight is 0: never read
    w = np.array([1.0, 0.0, 0.0, 1.0])
    stat = S.mean_of(x, weight=w)
    assert stat(np.arange(4)) == pytest.approx(2.5)  # (1 + 4) / 2
    idx = np.array([[0, 0, 1, 2], [1, 2, 1, 2], [3, 3, 3, 0]])
    got = stat(idx)
    assert got[0] == pytest.approx(1.0) and math.isnan(got[1]) and got[2] == pytest.approx(13 / 4)
    iv = S.paired_bootstrap(stat, 4, n_boot=300, seed=1, batched=True)
    assert 0 < iv.n_invalid < 300  # resamples without examples 0 or 3 are dropped and counted


def test_precomputed_indices_give_the_same_result():
    x = _rng(11).normal(size=25)
    idx = S.bootstrap_indices(25, 200, seed=7)
    a = S.paired_bootstrap(S.mean_of(x), 25, n_boot=200, seed=7, batched=True)
    b = S.paired_bootstrap(S.mean_of(x), 25, n_boot=200, idx=idx, batched=True)
    assert (a.low, a.high) == (b.low, b.high)
    t1 = S.paired_difference_test(S.mean_of(x), S.mean_of(x * 0), 25, n_boot=200, seed=7)
    t2 = S.paired_difference_test(S.mean_of(x), S.mean_of(x * 0), 25, n_boot=200, idx=idx)
    assert (t1.low, t1.high, t1.p) == (t2.low, t2.high, t2.p)
    with pytest.raises(ValueError, match="idx has shape"):
        S.paired_bootstrap(S.mean_of(x), 25, n_boot=100, idx=idx)
