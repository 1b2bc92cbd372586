"""Attention ranking (Kendall τ-b, top-k recall) against a direct loop, invariants and seeding."""

import itertools
import math

import numpy as np
import pytest
import scipy.stats
import torch

from iclgd import ranking as R
from iclgd.errors import UnknownNameError

LENGTHS = [3, 7, 5, 10, 2, 8, 5]  # 7 demonstrations, 40 tokens
SPANS = R.spans_from_lengths(LENGTHS)


def _scores(batch=5, layers=3, n_tok=40, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(batch, layers, n_tok, generator=g)  # [batch, layer, demo_tok]


def _direct(icl, ft, spans, k_tok, k_ex):
    """The metric written out independently: a loop, plain probabilities, sets."""

    def softmax(x):
        e = np.exp(x - x.max())
        return e / e.sum()

    def top(v, k):
        return set(sorted(range(len(v)), key=lambda j: -v[j])[:k])

    def recall(p, q, k):
        k = min(k, len(p))
        return len(top(p, k) & top(q, k)) / k

    icl, ft = icl.double().numpy(), ft.double().numpy()
    out = {m: np.zeros(icl.shape[:2]) for m in R.METRICS}
    for i, layer in itertools.product(range(icl.shape[0]), range(icl.shape[1])):
        p, q = softmax(icl[i, layer]), softmax(ft[i, layer])
        pe = np.array([p[a:b].sum() for a, b in spans])
        qe = np.array([q[a:b].sum() for a, b in spans])
        out["tau_token"][i, layer] = scipy.stats.kendalltau(p, q).statistic
        out["recall_token"][i, layer] = recall(p, q, k_tok)
        out["tau_example"][i, layer] = scipy.stats.kendalltau(pe, qe).statistic
        out["recall_example"][i, layer] = recall(pe, qe, k_ex)
    return out


def _tau_b_pairs(x, y):
    """τ-b by counting pairs: (concordant − discordant) / sqrt((n0 − n1)(n0 − n2))."""
    n0 = n1 = n2 = s = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
        n0 += 1
        n1 += dx == 0
        n2 += dy == 0
        s += dx * dy
    return s / math.sqrt((n0 - n1) * (n0 - n2))


# --- against the direct computation -----------------------------------------------------------


@pytest.mark.parametrize("k_tok,k_ex", [(10, 3), (100, 5)])
def test_matches_direct_loop(k_tok, k_ex):
    icl, ft = _scores(seed=1), _scores(seed=2)
    res = R.ranking(icl, ft, SPANS, seed=0, k_token=k_tok, k_example=k_ex)
    want = _direct(icl, ft, SPANS, k_tok, k_ex)
    for m in R.METRICS:
        got = res.get(m)
        assert got.shape == (5, 3) and got.dtype == torch.float64
        np.testing.assert_allclose(got.numpy(), want[m], rtol=1e-12, atol=1e-12, err_msg=m)


def test_related_scores_beat_the_baselines():
    icl = _scores(batch=20, seed=3)
    ft = icl + 0.5 * _scores(batch=20, seed=4)  # a noisy copy: same ranking, mostly
    res = R.ranking(icl, ft, SPANS, seed=0, k_token=10, k_example=3)
    assert res.headline("tau_token") > 0.6 > abs(res.headline("tau_token_random"))
    assert res.headline("recall_token") > res.headline("recall_token_random") + 0.3
    assert res.headline("tau_example") > res.headline("tau_example_shuffled") + 0.2


# --- identity, ties, k capping ----------------------------------------------------------------


def test_identical_scores_give_one_at_both_levels():
    icl = _scores(seed=5)
    res = R.ranking(icl, icl.clone(), SPANS, seed=0, k_token=10, k_example=3)
    for m in R.METRICS:
        assert torch.equal(res.get(m), torch.ones(5, 3, dtype=torch.float64)), m


def test_identical_scores_with_ties_give_one():
    x = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0, 2.0, 0.0, 3.0]])  # [layer, demo_tok]
    out = R.rank_agreement(x, x, R.spans_from_lengths([2, 3, 3]), k_token=4, k_example=1)
    assert all(v.item() == 1.0 for v in out.values())


def test_tau_b_with_ties_matches_pair_count():
    x = np.array([0.0, 0.0, 1.0, 1.0, 2.0, 3.0, 3.0, -1.0])
    y = np.array([0.0, 1.0, 1.0, 2.0, 2.0, 2.0, 5.0, 0.0])
    want = _tau_b_pairs(x, y)
    assert R.kendall_tau_b(x, y).item() == pytest.approx(want, abs=1e-12)
    # ties survive the softmax (equal scores give equal log-probabilities), so the token-level
    # τ is the same number
    out = R.rank_agreement(x[None], y[None], R.spans_from_lengths([8]))
    assert out["tau_token"].item() == pytest.approx(want, abs=1e-12)


def test_topk_ties_go_to_the_earlier_token():
    assert R.topk(np.array([1.0, 2.0, 2.0, 2.0, 0.0]), 2).tolist() == [1, 2]
    a = np.array([0.0, 2.0, 2.0, 2.0])  # top-2: {1, 2}
    b = np.array([2.0, 2.0, 0.0, 2.0])  # top-2: {0, 1}
    assert R.topk_recall(a, b, 2).item() == 0.5
    assert R.topk_recall(a, b, 2).item() == R.topk_recall(b, a, 2).item()


def test_constant_side_gives_undefined_tau_left_out_of_means():
    icl, ft = _scores(batch=3, layers=2, seed=6), _scores(batch=3, layers=2, seed=7)
    icl[0, 1] = 1.0  # example 0, layer 1: ICL attends uniformly
    res = R.ranking(icl, ft, SPANS, seed=0)
    tau = res.get("tau_token")
    assert math.isnan(tau[0, 1]) and not tau.isnan().sum() > 1
    assert res.per_layer("tau_token")[1].item() == pytest.approx(tau[1:, 1].mean().item())
    assert not math.isnan(res.headline("tau_token"))


def test_k_is_capped_at_the_item_count():
    icl, ft = (
        _scores(batch=2, layers=2, n_tok=4, seed=8),
        _scores(batch=2, layers=2, n_tok=4, seed=9),
    )
    res = R.ranking(icl, ft, [(0, 1), (1, 4)], seed=0)  # defaults k = 100 and 5
    assert (res.k_token, res.k_example) == (4, 2)
    for m in ("recall_token", "recall_example", "recall_token_random", "recall_example_random"):
        assert torch.equal(res.get(m), torch.ones(2, 2, dtype=torch.float64)), m
    assert R.topk_recall(np.arange(4.0), np.arange(4.0)[::-1].copy(), 2).item() == 0.0


def test_underflowing_probabilities_keep_their_order():
    # float64 softmax turns every entry but the first into exactly 0 (a 4-way tie);
    # in log space the order, and τ = 1, survive
    x = torch.tensor([[0.0, -2000.0, -3000.0, -4000.0, -5000.0, -6000.0]])
    out = R.rank_agreement(x, x.clone(), [(0, 1), (1, 2), (2, 4), (4, 6)], k_token=3, k_example=2)
    assert out["tau_token"].item() == pytest.approx(1.0, abs=1e-15)
    assert out["tau_example"].item() == pytest.approx(1.0, abs=1e-15)
    assert R.kendall_tau_b(np.exp(x.double().numpy()), np.arange(6.0)[::-1]).item() < 1.0


# --- example-level sums -----------------------------------------------------------------------


def test_example_mass_is_token_probabilities_summed_by_span():
    x = _scores(batch=2, layers=3, seed=10)
    p = torch.softmax(x.double(), dim=-1).numpy()
    want = np.stack([p[..., a:b].sum(-1) for a, b in SPANS], -1)  # [batch, layer, demo]
    got = R.example_mass(x, SPANS)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
    np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-12)


def test_spans_must_tile_demo_tok():
    assert R.spans_from_lengths([2, 3]) == ((0, 2), (2, 5))
    for bad in ([], [(0, 2), (3, 5)], [(0, 3), (2, 5)], [(0, 0), (0, 5)], [(1, 5)]):
        with pytest.raises(ValueError):
            R.check_spans(bad)
    with pytest.raises(ValueError, match="cover 5 tokens"):
        R.check_spans([(0, 2), (2, 5)], n_tok=6)


# --- random baselines -------------------------------------------------------------------------


def test_random_baseline_is_chance_on_average():
    icl, ft = _scores(batch=100, layers=2, seed=11), _scores(batch=100, layers=2, seed=12)
    res = R.ranking(icl, ft, SPANS, seed=3, k_token=10, k_example=3)
    assert abs(res.get("tau_token_random").mean().item()) < 0.05  # se ≈ 0.008
    assert abs(res.get("tau_example_random").mean().item()) < 0.1  # se ≈ 0.02
    assert res.get("recall_token_random").mean().item() == pytest.approx(10 / 40, abs=0.04)
    assert res.get("recall_example_random").mean().item() == pytest.approx(3 / 7, abs=0.08)


def test_random_baseline_is_seeded_and_leaves_global_rngs_alone():
    icl, ft = _scores(seed=13), _scores(seed=14)
    np_state, torch_state = np.random.get_state()[1].copy(), torch.random.get_rng_state()
    a = R.ranking(icl, ft, SPANS, seed=7, k_token=10, k_example=3)
    b = R.ranking(icl, ft, SPANS, seed=7, k_token=10, k_example=3)
    c = R.ranking(icl, ft, SPANS, seed=8, k_token=10, k_example=3)
    assert np.array_equal(np.random.get_state()[1], np_state)
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    for m in R.RANDOM + R.SHUFFLED:
        assert torch.equal(a.get(m), b.get(m)), m
    assert not torch.equal(a.get("tau_token_random"), c.get("tau_token_random"))
    for m in R.METRICS:  # the metric itself has no randomness
        assert torch.equal(a.get(m), c.get(m)), m


def test_shuffled_baseline_shows_the_length_confound():
    # unrelated token scores, demonstrations of very different lengths: summed probabilities
    # rank demonstrations by length on both sides, so τ_example is high by construction
    spans = R.spans_from_lengths([1, 2, 4, 8, 16, 32])
    icl, ft = (
        _scores(batch=40, layers=2, n_tok=63, seed=15, scale=1.0),
        _scores(batch=40, layers=2, n_tok=63, seed=16, scale=1.0),
    )
    res = R.ranking(icl, ft, spans, seed=0, k_example=2)
    assert res.headline("tau_example") > 0.5
    assert abs(res.headline("tau_example_random")) < 0.15
    assert res.headline("tau_example_shuffled") == pytest.approx(
        res.headline("tau_example"), abs=0.1
    )
    assert abs(res.headline("tau_token")) < 0.05


# --- streaming --------------------------------------------------------------------------------


def test_streaming_equals_batch():
    icl, ft = _scores(batch=6, seed=17), _scores(batch=6, seed=18)
    batch = R.ranking(icl, ft, SPANS, seed=4, k_token=10, k_example=3)
    one = R.RankingAccumulator(3, SPANS, k_token=10, k_example=3, seed=4)
    for i in range(6):
        one.add(icl[i], ft[i])  # [layer, demo_tok]
    chunks = R.RankingAccumulator(3, SPANS, k_token=10, k_example=3, seed=4)
    for a, b in ((0, 2), (2, 5), (5, 6)):
        chunks.add(icl[a:b], ft[a:b])  # [batch, layer, demo_tok]
    assert len(one) == len(chunks) == 6
    for res in (one.result(), chunks.result()):
        for m, v in batch.arrays().items():
            np.testing.assert_array_equal(res.get(m).numpy(), v.numpy(), err_msg=m)  # NaN == NaN
        assert (res.k_token, res.k_example) == (batch.k_token, batch.k_example)


def test_accumulator_checks_shapes_and_values():
    acc = R.RankingAccumulator(3, SPANS, seed=0)
    assert acc.result().get("tau_token").shape == (0, 3)
    with pytest.raises(ValueError, match="demo_tok"):
        acc.add(torch.zeros(3, 39), torch.zeros(3, 39))
    with pytest.raises(ValueError, match="demo_tok"):
        acc.add(torch.zeros(2, 40), torch.zeros(2, 40))
    bad = torch.zeros(3, 40)
    bad[0, 0] = float("-inf")
    with pytest.raises(ValueError, match="finite"):
        acc.add(bad, torch.zeros(3, 40))
    with pytest.raises(ValueError, match="seed"):
        R.RankingAccumulator(3, SPANS, seed=-1)
    with pytest.raises(UnknownNameError, match="did you mean 'tau_token'"):
        acc.result().get("tau_tokn")


def test_parts_split_the_same_numbers():
    """A run computes the random baselines once per cell (parts="random", ICL's scores alone) and
    each process's comparison apart (parts="compare"): together they are the "all" numbers."""
    icl, ft = _scores(batch=5, seed=19), _scores(batch=5, seed=20)
    whole = R.ranking(icl, ft, SPANS, seed=6, k_token=10, k_example=3)
    compare = R.RankingAccumulator(3, SPANS, k_token=10, k_example=3, seed=6, parts="compare")
    random = R.RankingAccumulator(3, SPANS, k_token=10, k_example=3, seed=6, parts="random")
    compare.add(icl, ft)
    random.add(icl[:2])
    random.add(icl[2:])
    got = {**compare.result().arrays(), **random.result().arrays()}
    assert set(got) == set(whole.arrays()) and set(random.result().arrays()) == set(R.RANDOM)
    for m, v in whole.arrays().items():
        np.testing.assert_array_equal(got[m].numpy(), v.numpy(), err_msg=m)
    with pytest.raises(ValueError, match="ft_scores are needed"):
        compare.add(icl)
    with pytest.raises(UnknownNameError):
        R.RankingAccumulator(3, SPANS, seed=0, parts="rand")
