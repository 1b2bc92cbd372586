"""Claims, F2T, intervals and controls of the report, on constructed run folders (real writer)."""

import math

import numpy as np
import pytest
import scipy.stats

from iclgd import claims, report, report_cells, report_tables, runfolder, stats

from runfolders import D, L, shared, write_run

TASKS = ("sst2", "subj", "mr")


def _groups(root):
    runs, _ = report._collect_runs(root)
    return report.build_groups(runs)


def _by_name(results):
    return {r.spec.name: r for r in results}


def _updates(task, seed, n, lcgd_sign, gd_sign):
    """attn_out of ZSL, ICL, GD and LCGD [batch, layer, d_model]: a process with sign +1 moves
    along ICL's update (SimAOU near +1), −1 against it (near −1), 0 in a random direction."""
    rng = np.random.default_rng(100 + seed + sum(map(ord, task)))
    zsl = rng.standard_normal((n, L, D))
    icl = zsl + rng.standard_normal((n, L, D))

    def proc(sign):
        noise = 0.1 * rng.standard_normal((n, L, D)) if sign else rng.standard_normal((n, L, D))
        return zsl + 0.3 * sign * (icl - zsl) + noise

    return {"zsl": {"attn_out": zsl}, "icl": {"attn_out": icl}, "gd": {"attn_out": proc(gd_sign)},
            "lcgd": {"attn_out": proc(lcgd_sign)}}


def _write_scenario(root, lcgd_sign, gd_sign, tasks=TASKS, n=24, flags=None):
    for task in tasks:
        write_run(root, task, 2, n=n, arrays=_updates(task, 2, n, lcgd_sign, gd_sign),
                  flags=(flags or {}).get(task))


@pytest.mark.parametrize(("lcgd_sign", "gd_sign", "verdict"), [(1, -1, "holds"), (-1, 1, "reversed"),
                                                                (0, 0, "inconclusive")])
def test_claim_verdict_positive_negative_null(tmp_path, lcgd_sign, gd_sign, verdict):
    _write_scenario(tmp_path, lcgd_sign, gd_sign)
    r = _by_name(claims.evaluate(_groups(tmp_path)))["lcgd>gd simaou"]
    c = r.claim
    assert c.verdict == verdict, (c.effect, c.low, c.high, c.p_holm)
    assert c.n_cells == 3 and "3 tasks" in r.evidence
    # the pooled effect is the mean of the three per-cell effects, each a paired bootstrap
    assert c.effect == pytest.approx(np.mean([ce.effect for ce in r.cells]))
    if verdict == "inconclusive":
        assert c.low < 0 < c.high
    assert r.spec.published.startswith("+0.092") and c.published_model == claims.PUBLISHED_MODEL


def test_holm_is_applied_across_the_reports_claims(tmp_path):
    _write_scenario(tmp_path, 1, -1)
    results = claims.evaluate(_groups(tmp_path))
    measured = [r.claim for r in results if r.claim is not None]
    directional = [c for c in measured if c.direction != 0]
    assert len(directional) >= 5
    want = stats.holm([c.p for c in directional])
    assert np.allclose([c.p_holm for c in directional], want, equal_nan=True)
    assert any(c.p_holm > c.p for c in directional)  # the correction bites
    assert all(math.isnan(c.p_holm) for c in measured if c.direction == 0)  # equivalence: no p
    md = claims.markdown(results)
    assert "not measured (needs untrained control runs" in md  # no control runs here


def test_single_cell_uses_its_bootstrap_and_missing_setting_is_named(tmp_path):
    write_run(tmp_path, "sst2", 2, settings=("zsl", "icl", "gd"), n=24)
    r = _by_name(claims.evaluate(_groups(tmp_path)))
    assert "1 cell" in r["icl>zsl"].evidence and r["icl>zsl"].claim is not None
    ce = r["icl>zsl"].cells[0]
    assert (r["icl>zsl"].claim.low, r["icl>zsl"].claim.high) == (ce.low, ce.high)
    assert r["lcgd>gd simaou"].claim is None and r["lcgd>gd simaou"].status == "not measured (needs lcgd)"
    assert r["rec2ftp gd high"].claim is not None and r["rec2ftp lcgd high"].status == "not measured (needs lcgd)"


def test_flagged_cell_is_excluded_and_named(tmp_path):
    _write_scenario(tmp_path, 1, -1, flags={"subj": {"gd": ["one_class"], "icl": ["label_ties"]}})
    r = _by_name(claims.evaluate(_groups(tmp_path)))
    simaou = r["lcgd>gd simaou"]
    assert simaou.claim.n_cells == 2
    assert simaou.excluded == ["subj s2 (gd: one_class)"]  # label_ties alone does not exclude
    assert simaou.claim.excluded == simaou.excluded
    assert "subj s2 (gd: one_class)" in claims.markdown(list(r.values()))
    assert r["icl>zsl"].claim.n_cells == 3  # does not use gd
    assert r["lcgd>gd simam_delta"].claim.n_cells == 2  # excluded there too
    # AGNews is excepted by the SimAM_Δ claim, and said so
    write_run(tmp_path, "agnews", 3, n=24)
    r = _by_name(claims.evaluate(_groups(tmp_path)))
    assert "agnews s3 (excepted by the claim)" in r["lcgd>gd simam_delta"].excluded
    assert "agnews s3 (excepted by the claim)" not in r["gd>lcgd simam"].excluded


def test_f2t_restricts_to_the_right_examples(tmp_path):
    n = 6
    gold = shared("sst2", 2, n)[0]
    wrong = 1 - gold
    zsl = np.where(np.arange(n) < 5, wrong, gold)  # ZSL wrong on 0-4
    icl = np.where(np.isin(np.arange(n), [0, 1, 3, 5]), gold, wrong)  # ICL right on 0, 1, 3, 5
    gd = np.where(np.isin(np.arange(n), [0, 2, 3, 4]), gold, wrong)  # GD right on 0, 2, 3, 4
    lcgd = wrong  # LCGD right nowhere: its F2T subset is empty
    arrays = {s: {"pred": p} for s, p in zip(("zsl", "icl", "gd", "lcgd"), (zsl, icl, gd, lcgd), strict=True)}
    path = write_run(tmp_path, "sst2", 2, n=n, arrays=arrays)
    groups = _groups(tmp_path)
    cell = groups[0].cells[0]
    assert cell.counts["f2t:gd", "n"] == 2 and cell.counts["f2t:lcgd", "n"] == 0
    run = runfolder.load_run(path)
    h = {s: run.records(s)["attn_out"].double().numpy() for s in ("zsl", "icl", "gd")}
    u = {s: x / np.linalg.norm(x, axis=-1, keepdims=True) for s, x in h.items()}
    a, b = u["icl"] - u["zsl"], u["gd"] - u["zsl"]
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))  # [N, L]
    f2t = cell.values["f2t:gd", "SimAOU (norm)"]
    assert f2t.estimate == pytest.approx(cos[[0, 3]].mean(), abs=1e-12)  # examples 0 and 3 only
    assert f2t.n == 2 and cell.values["simaou", "gd (norm)"].estimate == pytest.approx(cos.mean(), abs=1e-12)
    md = report_tables.markdown("f2t:lcgd", groups)
    assert "F2T subset of lcgd" in md
    row = next(line for line in md.splitlines() if line.startswith("| sst2 |"))
    assert row.split(" | ")[1] == "0" and row.count("n/a") == len(report_cells.F2T_COLUMNS)
    assert math.isnan(cell.values["f2t:lcgd", "SimAM"].estimate)  # never a number from 0 examples


def test_intervals_on_a_hand_checkable_case(tmp_path):
    n = 10
    right = np.arange(n) < 7  # ICL right on 7 of 10 examples; ZSL right on all
    for seed in (2, 3, 4):
        gold = shared("sst2", seed, n)[0]
        icl = np.where(right if seed < 4 else np.arange(n) < 4, gold, 1 - gold)  # seed 4: 4 of 10
        write_run(tmp_path, "sst2", seed, settings=("zsl", "icl"), n=n,
                  arrays={"zsl": {"pred": gold}, "icl": {"pred": icl}})
    groups = _groups(tmp_path)
    cell = groups[0].cells[0]
    zsl, icl = cell.values["accuracy", "zsl"], cell.values["accuracy", "icl"]
    assert (zsl.estimate, zsl.low, zsl.high) == (100.0, 100.0, 100.0)  # every resample is 100%
    # ICL: percentiles of the resampled accuracies, with the cell's own seeded resamples
    idx = stats.bootstrap_indices(n, report_cells.N_BOOT, report_cells.cell_seed("sst2", 2))
    boot = 100 * right[idx].mean(1)
    assert icl.estimate == pytest.approx(70.0)
    assert (icl.low, icl.high) == pytest.approx(tuple(np.quantile(boot, [0.025, 0.975])))
    assert icl.low < 70 < icl.high and icl.low >= 30 - 1e-9
    # across seeds: mean, sd and the t interval of the three cells' accuracies
    accs = [70.0, 70.0, 40.0]
    st = groups[0].tasks[0].values["accuracy", "icl"]
    half = scipy.stats.t.ppf(0.975, 2) * np.std(accs, ddof=1) / np.sqrt(3)
    assert (st.mean, st.sd) == pytest.approx((np.mean(accs), np.std(accs, ddof=1)))
    assert (st.low, st.high) == pytest.approx((np.mean(accs) - half, np.mean(accs) + half))
    # the same task and seed draw the same resamples: a second build gives the same intervals
    again = _groups(tmp_path)[0].cells[0].values["accuracy", "icl"]
    assert (again.low, again.high) == (icl.low, icl.high)


def test_controls_pair_with_the_trained_run_and_are_never_pooled(tmp_path):
    arrays = _updates("sst2", 2, 24, 1, 1)
    write_run(tmp_path, "sst2", 2, n=24, arrays=arrays)
    untrained = {s: {"attn_out": np.random.default_rng(5).standard_normal((24, L, D))} for s in ("gd", "lcgd")}
    write_run(tmp_path, "sst2", 2, n=24, control="untrained", arrays={**arrays, **untrained},
              flags={"zsl": ["one_class"]})  # expected of an untrained model: does not exclude
    write_run(tmp_path, "sst2", 2, n=24, control="untrained-partial", arrays=arrays,
              eval_ids=[f"x{i}" for i in range(24)])  # other eval examples: cannot be paired
    g = _groups(tmp_path)[0]
    assert [t.label for t in g.tasks] == ["sst2", "sst2 · untrained", "sst2 · untrained-partial"]
    for t in g.tasks:  # each row is its own cell, nothing pooled across models
        assert len(t.cells) == 1 and t.values["simaou", "gd (norm)"].mean == t.cells[0].values[
            "simaou", "gd (norm)"].estimate
    trained, control = (t.values["simaou", "gd (norm)"].mean for t in g.tasks[:2])
    assert trained > 0.5 and abs(control) < 0.5
    r = _by_name(claims.evaluate([g]))
    c = r["trained>untrained SimAOU (norm) gd"]
    assert c.claim is not None and c.claim.effect == pytest.approx(trained - control)
    assert "1 cell" in c.evidence and c.claim.verdict == "holds"
    partial = r["trained>untrained-partial SimAM gd"]
    assert partial.claim is None and partial.excluded == [
        "sst2 s2 (eval examples differ from the untrained-partial run's)"]
    md = report_tables.markdown("simaou", [g])
    assert "| sst2 · untrained |" in md and "| average · untrained-partial |" in md
