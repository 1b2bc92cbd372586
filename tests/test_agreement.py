"""Output agreement (argmax, KL, JS) against scipy and invariants: identity, symmetry, bounds."""

import math

import numpy as np
import pytest
import scipy.spatial.distance
import scipy.special
import scipy.stats
import torch

from iclgd import agreement as A


def _lp(batch=8, labels=4, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    # stand-ins for vocabulary log-softmax values: unnormalized over the labels on purpose
    return scale * torch.randn(batch, labels, generator=g) - 5.0  # [batch, label]


def _probs(lp):
    return scipy.special.softmax(lp.double().numpy(), axis=-1)


def test_kl_and_js_match_scipy():
    a, b = _lp(seed=1), _lp(seed=2)
    p, q = _probs(a), _probs(b)
    res = A.output_agreement(a, b)
    kl_entropy = np.array([scipy.stats.entropy(pi, qi) for pi, qi in zip(p, q)])
    kl_rel = scipy.special.rel_entr(p, q).sum(-1)
    # jensenshannon returns the distance √JS; base=None means natural log, like ours
    js_scipy = np.array([scipy.spatial.distance.jensenshannon(pi, qi) for pi, qi in zip(p, q)]) ** 2
    np.testing.assert_allclose(res.kl.numpy(), kl_entropy, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(res.kl.numpy(), kl_rel, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(res.js.numpy(), js_scipy, rtol=1e-9, atol=1e-14)
    js_bits = np.array(
        [scipy.spatial.distance.jensenshannon(pi, qi, base=2) for pi, qi in zip(p, q)]
    )
    np.testing.assert_allclose(res.js.numpy() / math.log(2), js_bits**2, rtol=1e-9, atol=1e-14)
    assert res.kl.dtype == res.js.dtype == torch.float64
    assert res.mean_kl == pytest.approx(kl_rel.mean()) and res.mean_js == pytest.approx(
        js_scipy.mean()
    )


def test_agreement_is_argmax_equality():
    a = torch.tensor([[0.0, 1.0, -2.0], [3.0, 0.0, 0.0], [-1.0, -1.5, -0.5], [0.0, 0.1, 0.2]])
    b = torch.tensor([[-5.0, 2.0, 1.0], [0.0, 1.0, 0.0], [-9.0, -9.0, -8.0], [0.3, 0.1, 0.2]])
    res = A.output_agreement(a, b)
    assert res.agree.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert res.rate == 0.5
    assert A.predictions(a).tolist() == [1, 0, 2, 2]


def test_identical_inputs_agree_with_zero_divergence():
    a = _lp(seed=3)
    res = A.output_agreement(a, a.clone())
    assert res.rate == 1.0
    assert torch.equal(res.kl, torch.zeros(8, dtype=torch.float64))
    assert torch.equal(res.js, torch.zeros(8, dtype=torch.float64))


def test_js_is_symmetric_and_bounded_kl_is_not_symmetric():
    a, b = _lp(seed=4, scale=6.0), _lp(seed=5, scale=6.0)
    ab, ba = A.output_agreement(a, b), A.output_agreement(b, a)
    np.testing.assert_allclose(ab.js.numpy(), ba.js.numpy(), rtol=1e-12, atol=1e-15)
    assert ((ab.js >= 0) & (ab.js <= math.log(2))).all()
    assert (ab.kl >= 0).all()
    assert not torch.allclose(ab.kl, ba.kl)


def test_disjoint_distributions_reach_ln2():
    a = torch.tensor([[0.0, float("-inf")], [0.0, -1000.0]])
    b = torch.tensor([[float("-inf"), 0.0], [-1000.0, 0.0]])
    res = A.output_agreement(a, b)
    assert res.js.tolist() == pytest.approx([math.log(2), math.log(2)], abs=1e-12)
    assert res.kl[0].item() == math.inf  # P gives ICL's label probability exactly 0
    assert res.kl[1].item() == pytest.approx(1000.0)  # underflowed, not zero: finite


def test_renormalization_invariance():
    # float64 inputs: adding 50 to a float32 value would itself round by ~4e-6
    a, b = _lp(seed=6).double(), _lp(seed=7).double()
    shift_a = torch.linspace(-30.0, 30.0, 8, dtype=torch.float64)[:, None]  # one per example
    shift_b = torch.linspace(50.0, -10.0, 8, dtype=torch.float64)[:, None]
    base, moved = A.output_agreement(a, b), A.output_agreement(a + shift_a, b + shift_b)
    assert torch.equal(base.agree, moved.agree)
    np.testing.assert_allclose(moved.kl.numpy(), base.kl.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(moved.js.numpy(), base.js.numpy(), rtol=1e-9, atol=1e-12)
    r = A.renormalize(a + shift_a)
    np.testing.assert_allclose(r.exp().sum(-1).numpy(), 1.0, rtol=1e-12)


def test_underflow_stays_finite():
    # exp(-800) and exp(-1200) are 0 in float64, so a probability-space computation would see
    # zeros (and 0·log 0, or log 0 in the mixture); log space keeps every term finite
    a = torch.tensor([[0.0, -800.0, -1200.0]], dtype=torch.float64)
    b = torch.tensor([[-1200.0, 0.0, -800.0]], dtype=torch.float64)
    res = A.output_agreement(a, b)
    assert math.isfinite(res.kl.item()) and math.isfinite(res.js.item())
    assert res.kl.item() == pytest.approx(1200.0, rel=1e-12)  # p_ICL ≈ (1, 0, 0)
    assert res.js.item() == pytest.approx(math.log(2), abs=1e-12)
    assert res.agree.item() == 0.0
    f16 = A.output_agreement(a.half(), b.half())  # half-precision records: upcast first
    assert f16.kl.dtype == torch.float64
    assert f16.kl.item() == pytest.approx(1200.0, rel=1e-12) and math.isfinite(f16.js.item())


def test_ties_take_the_first_label_and_are_flagged():
    a = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    b = torch.tensor([[0.0, 2.0, 2.0], [0.0, 2.0, 1.0]])
    assert A.predictions(a).tolist() == torch.argmax(a, dim=-1).tolist() == [0, 1]
    res = A.output_agreement(a, b)
    assert res.tie.tolist() == [True, False] and res.n_tied == 1
    assert res.agree.tolist() == [0.0, 1.0]  # ICL picks label 0, P label 1


def test_bad_inputs_raise_and_empty_batch_gives_nan():
    with pytest.raises(ValueError, match="shape"):
        A.output_agreement(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="finite"):
        A.output_agreement(torch.full((1, 2), float("-inf")), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="finite"):
        A.output_agreement(torch.tensor([[0.0, float("nan")]]), torch.zeros(1, 2))
    empty = A.output_agreement(torch.zeros(0, 2), torch.zeros(0, 2))
    assert math.isnan(empty.rate) and math.isnan(empty.mean_js) and empty.n_tied == 0
