"""Metrics on hand-made tensors: invariants (1, 0, −1, symmetry), padding, seeding, aggregation."""

import math
import statistics

import pytest
import torch

from iclgd import metrics as M
from iclgd.errors import UnknownNameError


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _h(n=4, layers=3, d=8, seed=0):
    return torch.randn(n, layers, d, generator=_gen(seed))  # [batch, layer, d_model]


def _m(n=4, layers=3, heads=2, q=5, seed=0):
    return torch.randn(n, layers, heads, q, generator=_gen(seed))  # [batch, layer, head, q_pos]


# --- cosine -----------------------------------------------------------------------------------


def test_cosine_identical_orthogonal_flip():
    a = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]])
    assert torch.allclose(M.cosine(a, a), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(M.cosine(a, -a), -torch.ones(2, dtype=torch.float64))
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])
    assert M.cosine(e1, e2).item() == 0.0


def test_cosine_zero_vector_is_zero_not_nan():
    a = torch.zeros(3, 4)
    b = torch.randn(3, 4, generator=_gen())
    out = M.cosine(a, b)
    assert not torch.isnan(out).any()
    assert (out == 0).all()


def test_cosine_nan_is_absent():
    a = torch.tensor([1.0, 2.0, float("nan")])
    b = torch.tensor([3.0, -1.0, 7.0])
    assert M.cosine(a, b).item() == pytest.approx(M.cosine(a[:2], b[:2]).item())


# --- SimAOU -----------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False])
def test_simaou_identical_update_is_one(normalize):
    h_icl, h_zsl = _h(seed=1), _h(seed=2)
    out = M.simaou(h_icl, h_zsl, h_icl.clone(), normalize=normalize)
    assert out.shape == (4, 3)
    assert torch.allclose(out, torch.ones_like(out))


def test_simaou_orthogonal_and_flip():
    zsl = torch.zeros(1, 1, 4)
    icl = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]])
    ortho = torch.tensor([[[0.0, 2.0, 0.0, 0.0]]])
    assert M.simaou(icl, zsl, ortho, normalize=False).item() == 0.0
    # raw: the flipped update is exactly antiparallel
    assert M.simaou(icl, zsl, -icl, normalize=False).item() == pytest.approx(-1.0)
    zsl = torch.tensor([[[0.0, 0.0, 0.0, 5.0]]])  # with a base point, a sign flip of the update
    flip = 2 * zsl - icl  # h_P − h_ZSL = −(h_ICL − h_ZSL)
    assert M.simaou(icl, zsl, flip, normalize=False).item() == pytest.approx(-1.0)


def test_simaou_zero_update_is_zero_without_nan():
    h_icl, h_zsl = _h(seed=1), _h(seed=2)
    for normalize in (True, False):
        out = M.simaou(h_icl, h_zsl, h_zsl.clone(), normalize=normalize)
        assert not torch.isnan(out).any()
        assert (out == 0).all()


def test_simaou_normalized_vs_raw():
    h_icl, h_zsl, h_p = _h(seed=1), _h(seed=2), _h(seed=3)
    h_p = h_p * torch.linspace(0.1, 10, 4).view(4, 1, 1)  # norms differ from ICL's and ZSL's
    norm, raw = M.simaou(h_icl, h_zsl, h_p, True), M.simaou(h_icl, h_zsl, h_p, False)
    assert not torch.allclose(norm, raw)
    unit = [h / h.norm(dim=-1, keepdim=True) * 2.5 for h in (h_icl, h_zsl, h_p)]  # equal norms
    assert torch.allclose(M.simaou(*unit, normalize=True), M.simaou(*unit, normalize=False))


def test_simaou_normalized_matches_manual_formula():
    h_icl, h_zsl, h_p = _h(seed=1), _h(seed=2), _h(seed=3)
    u = [h.double() / h.double().norm(dim=-1, keepdim=True) for h in (h_icl, h_zsl, h_p)]
    want = torch.nn.functional.cosine_similarity(u[0] - u[1], u[2] - u[1], dim=-1)
    assert torch.allclose(M.simaou(h_icl, h_zsl, h_p), want)


# --- random baseline --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gaussian", "uniform"])
def test_simaou_random_seeded_and_global_rng_untouched(kind):
    h_icl, h_zsl = _h(seed=1), _h(seed=2)
    state = torch.get_rng_state()
    a = M.simaou_random(h_icl, h_zsl, seed=7, kind=kind)
    assert torch.equal(state, torch.get_rng_state())
    torch.manual_seed(123)  # the global RNG must not matter
    b = M.simaou_random(h_icl, h_zsl, seed=7, kind=kind)
    c = M.simaou_random(h_icl, h_zsl, seed=8, kind=kind)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_simaou_random_gaussian_near_zero_in_high_dimension():
    h_icl, h_zsl = (
        torch.randn(200, 2, 512, generator=_gen(1)),
        torch.randn(200, 2, 512, generator=_gen(2)),
    )
    for normalize in (True, False):
        x = M.simaou_random(h_icl, h_zsl, seed=0, kind="gaussian", normalize=normalize)
        # per-example cosines have sd ~ 1/sqrt(512) ≈ 0.044; mean of 400 is ~0.002
        assert abs(x.mean().item()) < 0.05


def test_simaou_random_uniform_positive_for_positive_update():
    h_zsl = torch.randn(50, 2, 64, generator=_gen(1))
    h_icl = h_zsl + 0.5 + 0.1 * torch.randn(50, 2, 64, generator=_gen(2))  # positive-mean update
    x = M.simaou_random(h_icl, h_zsl, seed=0, kind="uniform", normalize=False)
    assert x.mean().item() > 0.5
    g = M.simaou_random(h_icl, h_zsl, seed=0, kind="gaussian", normalize=False)
    assert abs(g.mean().item()) < 0.1


def test_simaou_random_unknown_kind():
    with pytest.raises(ValueError, match="gaussian"):
        M.simaou_random(_h(), _h(seed=1), seed=0, kind="normal")


# --- SimAM, SimAM_Δ, α --------------------------------------------------------------------------


def test_simam_identical_flip_symmetric():
    a, b = _m(seed=1), _m(seed=2)
    assert torch.allclose(M.simam(a, a), torch.ones(4, 3, dtype=torch.float64))
    assert torch.allclose(M.simam(a, -a), -torch.ones(4, 3, dtype=torch.float64))
    assert torch.allclose(M.simam(a, b), M.simam(b, a))


def test_simam_is_cosine_per_head_then_mean_over_heads():
    a, b = _m(seed=1), _m(seed=2)
    per_head = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)  # [N,L,H]
    assert torch.allclose(M.simam(a, b), per_head.mean(-1))
    # not the cosine of head-means: order matters
    pooled = torch.nn.functional.cosine_similarity(a.double().mean(2), b.double().mean(2), dim=-1)
    assert not torch.allclose(M.simam(a, b), pooled)


def test_simam_orthogonal_heads():
    a = torch.zeros(1, 1, 2, 4)
    b = torch.zeros(1, 1, 2, 4)
    a[..., 0], b[..., 1] = 1.0, 1.0  # every head orthogonal
    assert M.simam(a, b).item() == 0.0
    b[0, 0, 0] = a[0, 0, 0]  # head 0 identical, head 1 orthogonal -> mean 0.5
    assert M.simam(a, b).item() == pytest.approx(0.5)


def test_nan_padding_ignored():
    """Per-example padding past q_len gives the same value as the unpadded computation."""
    q_len = [5, 3, 1, 4]
    ms = [_m(seed=s) for s in (1, 2, 3)]
    padded = [m.clone() for m in ms]
    for i, n in enumerate(q_len):
        for m in padded:
            m[i, :, :, n:] = float("nan")
    for i, n in enumerate(q_len):
        icl, zsl, p = (m[i : i + 1, :, :, :n] for m in ms)
        picl, pzsl, pp = (m[i : i + 1] for m in padded)
        assert torch.allclose(M.simam(picl, pp), M.simam(icl, p))
        assert torch.allclose(M.simam_delta(picl, pzsl, pp), M.simam_delta(icl, zsl, p))
        assert torch.allclose(M.alpha(picl, pp, pzsl), M.alpha(icl, p, zsl))
    assert not torch.isnan(M.simam_delta(*padded)).any()


def test_simam_delta_invariants():
    icl, zsl, p = _m(seed=1), _m(seed=2), _m(seed=3)
    assert torch.allclose(M.simam_delta(icl, zsl, icl), torch.ones(4, 3, dtype=torch.float64))
    assert torch.allclose(
        M.simam_delta(icl, zsl, 2 * zsl - icl), -torch.ones(4, 3, dtype=torch.float64)
    )
    zero = M.simam_delta(icl, zsl, zsl.clone())
    assert not torch.isnan(zero).any() and (zero == 0).all()
    d = (icl - zsl).double(), (p - zsl).double()
    want = torch.nn.functional.cosine_similarity(*d, dim=-1).mean(-1)
    assert torch.allclose(M.simam_delta(icl, zsl, p), want)


def test_alpha_symmetric_and_identical():
    p, q, zsl = _m(seed=1), _m(seed=2), _m(seed=3)
    assert torch.allclose(M.alpha(p, q, zsl), M.alpha(q, p, zsl))
    assert torch.allclose(M.alpha(p, p, zsl), torch.ones(4, 3, dtype=torch.float64))
    hp, hq, hz = _h(seed=1), _h(seed=2), _h(seed=3)
    for normalize in (True, False):
        pq, qp = M.alpha_aou(hp, hq, hz, normalize), M.alpha_aou(hq, hp, hz, normalize)
        assert torch.allclose(pq, qp)
        same = M.alpha_aou(hp, hp, hz, normalize)
        assert torch.allclose(same, torch.ones(4, 3, dtype=torch.float64))


# --- predictions --------------------------------------------------------------------------------


def test_accuracy():
    assert M.accuracy(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 0, 0])) == 0.5
    empty = torch.tensor([], dtype=torch.long)
    assert math.isnan(M.accuracy(empty, empty))
    with pytest.raises(ValueError):
        M.accuracy(torch.tensor([0, 1]), torch.tensor([0]))


def test_rec2ftp_known_case():
    gold = torch.tensor([0, 0, 0, 0, 0, 1])
    zsl = torch.tensor([1, 1, 1, 1, 0, 0])  # wrong on 0-3, 5
    p = torch.tensor([0, 0, 0, 1, 0, 1])  # right on 0-2, 4, 5 -> fixed: 0, 1, 2, 5
    icl = torch.tensor([0, 1, 0, 0, 1, 1])  # right on 0, 2, 3, 5 -> both: 0, 2, 5
    assert M.rec2ftp(zsl, icl, p, gold) == pytest.approx(75.0)


def test_rec2ftp_zero_denominator_is_nan():
    gold = torch.tensor([0, 1])
    assert math.isnan(M.rec2ftp(gold.clone(), gold.clone(), gold.clone(), gold))  # ZSL all right
    assert math.isnan(M.rec2ftp(1 - gold, gold, 1 - gold, gold))  # P fixes nothing


# --- aggregation ---------------------------------------------------------------------------------


def test_per_layer_and_headline():
    x = torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]])  # [batch=2, layer=3]
    assert torch.allclose(M.per_layer(x), torch.tensor([2.0, 3.0, 4.0], dtype=torch.float64))
    assert M.headline(x) == pytest.approx(3.0)


def test_mean_sd_matches_statistics():
    vals = [0.1, 0.25, 0.7, -0.3]
    mean, sd = M.mean_sd(vals)
    assert mean == pytest.approx(statistics.mean(vals))
    assert sd == pytest.approx(statistics.stdev(vals))
    mean1, sd1 = M.mean_sd([0.4])
    assert mean1 == pytest.approx(0.4) and math.isnan(sd1)
    mean_n, sd_n = M.mean_sd([0.1, float("nan"), 0.3])  # NaN seeds dropped
    assert mean_n == pytest.approx(0.2) and sd_n == pytest.approx(statistics.stdev([0.1, 0.3]))
    assert all(math.isnan(v) for v in M.mean_sd([]))


def test_mean_sd_curves():
    curves = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0]), torch.tensor([2.0, 1.0])]
    mean, sd = M.mean_sd(curves)
    assert mean.shape == (2,)
    assert mean[1].item() == pytest.approx(3.0)
    assert sd[0].item() == pytest.approx(statistics.stdev([1.0, 3.0, 2.0]))


# --- registry ----------------------------------------------------------------------------------


def _cell():
    recs = {}
    for i, s in enumerate(("zsl", "icl", "gd", "lcgd")):
        recs[s] = {
            "attn_out": _h(seed=10 + i),
            "attn_logits": _m(seed=20 + i),
            "pred": torch.tensor([0, 1, 1, 0]),
            "gold": torch.tensor([0, 1, 0, 0]),
        }
    return recs


def test_registry_matches_core_functions():
    recs = _cell()
    curve = M.compute("simaou_norm", recs, "gd")
    want = M.per_layer(
        M.simaou(recs["icl"]["attn_out"], recs["zsl"]["attn_out"], recs["gd"]["attn_out"])
    )
    assert torch.allclose(curve, want)
    assert M.compute("accuracy", recs, "icl") == 0.75
    a = M.compute("alpha", recs, ("gd", "lcgd"))
    assert torch.allclose(a, M.compute("alpha", recs, ("lcgd", "gd")))
    r1 = M.compute("simaou_random_gaussian", recs, None, seed=3)
    assert torch.equal(r1, M.compute("simaou_random_gaussian", recs, None, seed=3))
    for name in M.METRICS.names():
        arg = ("gd", "lcgd") if name in M.PAIR_METRICS else "gd"
        M.compute(name, recs, arg)


def test_registry_did_you_mean():
    with pytest.raises(UnknownNameError, match="simaou_norm"):
        M.METRICS.get("simaou_nrom")


def test_chunking_over_batch_does_not_change_results(monkeypatch):
    h = [_h(n=7, seed=s) for s in (1, 2, 3)]
    m = [_m(n=7, seed=s) for s in (4, 5, 6)]
    m[0][2, :, :, 3:] = float("nan")

    def every_metric():
        return [M.simaou(*h), M.simaou_random(h[0], h[1], seed=1), M.alpha_aou(*h),
                M.simam(m[0], m[1]), M.simam_delta(*m)]

    whole = every_metric()
    monkeypatch.setattr(M, "_CHUNK_ELEMS", 1)  # one example per chunk
    chunked = every_metric()
    for a, b in zip(whole, chunked, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


# --- per example, weights and the F2T subset ----------------------------------------------------


def test_f2t_mask_hand_made():
    gold = torch.tensor([0, 0, 0, 0, 0, 1])
    zsl = torch.tensor([1, 1, 1, 1, 0, 0])  # wrong on 0-3, 5
    icl = torch.tensor([0, 1, 0, 0, 0, 1])  # right on 0, 2, 3, 4, 5
    gd = torch.tensor([0, 0, 1, 0, 0, 1])  # right on 0, 1, 3, 4, 5
    lcgd = torch.tensor([0, 0, 0, 1, 0, 0])  # right on 0, 1, 2, 4
    assert M.f2t_mask(zsl, icl, [gd], gold).tolist() == [1, 0, 0, 1, 0, 1]
    assert M.f2t_mask(zsl, icl, [lcgd], gold).tolist() == [1, 0, 1, 0, 0, 0]
    assert M.f2t_mask(zsl, icl, [gd, lcgd], gold).tolist() == [1, 0, 0, 0, 0, 0]


def test_weighted_aggregation_and_empty_subset():
    x = torch.tensor([[1.0, 3.0], [5.0, 7.0], [float("nan"), 0.0]])  # [batch=3, layer=2]
    pe = M.PerExample(x).restrict(torch.tensor([True, True, False]))
    assert pe.n == 2
    assert pe.per_layer().tolist() == [3.0, 5.0]  # the NaN row has weight 0: never read
    assert pe.headline() == pytest.approx(4.0)
    assert pe.example_headline()[:2].tolist() == [2.0, 6.0]
    empty = M.PerExample(x).restrict(torch.zeros(3, dtype=torch.bool))
    assert empty.n == 0 and math.isnan(empty.headline())  # never a number from 0 examples


def test_per_example_registry_aggregates_to_compute():
    recs = _cell()
    recs["zsl"]["pred"] = torch.tensor([1, 0, 1, 1])  # gold [0, 1, 0, 0]: wrong on all
    pe = M.examples("simam", recs, "gd")
    assert pe.values.shape == (4, 3) and pe.weight is None
    assert torch.allclose(pe.per_layer(), M.compute("simam", recs, "gd"))
    r = M.examples("rec2ftp", recs, "gd")
    want = M.rec2ftp(recs["zsl"]["pred"], recs["icl"]["pred"], recs["gd"]["pred"], recs["gd"]["gold"])
    assert r.headline() == pytest.approx(want) and M.compute("rec2ftp", recs, "gd") == pytest.approx(want)
    mask = M.f2t(recs, "gd")  # ZSL wrong everywhere; ICL and GD right on 0, 1, 3
    assert mask.tolist() == [True, True, False, True]
    sub = M.examples("simaou_norm", recs, "gd").restrict(mask)
    full = M.simaou(recs["icl"]["attn_out"], recs["zsl"]["attn_out"], recs["gd"]["attn_out"])
    assert sub.headline() == pytest.approx(full[[0, 1, 3]].double().mean().item())
