"""Report from synthetic run folders: tables match an independent numpy recomputation."""

import csv

import numpy as np
import pytest

from iclgd import report, runfolder
from iclgd.errors import DataError

from runfolders import H, L, N, Q, write_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(root, task, seed, settings=("zsl", "icl", "gd", "lcgd"), done=True, **kw):
    """A run folder with random records, written by the real writer (runfolders.write_run)."""
    return write_run(root, task, seed, settings, done, **kw)


@pytest.fixture
def runs_root(tmp_path):
    root = tmp_path / "runs"
    for task in ("sst2", "subj"):
        for seed in (2, 3):
            _write_run(root, task, seed)
    return root


def _csv(out, name):
    with (out / "tables" / f"{name}.csv").open() as f:
        return {(r["task"], r["column"]): r for r in csv.DictReader(f)}


def _npz(root, task, seed, setting):
    with np.load(root / f"{task}_s{seed}" / "records" / f"{runfolder.safe_name(setting)}.npz") as z:
        return {k: z[k] for k in z.files}


def _np_simaou_norm(icl, zsl, p):
    """Independent SimAOU_norm headline: unit vectors, cosine of updates, mean over all."""
    x64 = [x.astype(np.float64) for x in (icl, zsl, p)]
    u = [x / np.linalg.norm(x, axis=-1, keepdims=True) for x in x64]
    a, b = u[0] - u[1], u[2] - u[1]
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))  # [N, L]
    return cos.mean(0).mean()


def _np_simam_before(icl, zsl):
    a, b = np.nan_to_num(icl.astype(np.float64)), np.nan_to_num(zsl.astype(np.float64))
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))  # [N,L,H]
    return cos.mean(-1).mean()


def test_safe_name():
    assert runfolder.safe_name("lcgd[clip=match_gd]") == "lcgd_clip_match_gd_"
    assert runfolder.safe_name("lin-gd.v2_x") == "lin-gd.v2_x"
    assert runfolder.safe_name("a:b c/d") == "a_b_c_d"


def test_tables_match_numpy_recomputation(runs_root, tmp_path):
    out = tmp_path / "report"
    report.build_report(runs_root, out, figures=False)
    simaou, acc, simam = _csv(out, "simaou"), _csv(out, "accuracy"), _csv(out, "simam")
    task_means = {}
    for task in ("sst2", "subj"):
        per_seed, accs, before = [], [], []
        for seed in (2, 3):
            r = {s: _npz(runs_root, task, seed, s) for s in ("zsl", "icl", "gd")}
            per_seed.append(_np_simaou_norm(*(r[s]["attn_out"] for s in ("icl", "zsl", "gd"))))
            accs.append(100 * np.mean(r["gd"]["pred"] == r["gd"]["gold"]))
            before.append(_np_simam_before(r["icl"]["attn_logits"], r["zsl"]["attn_logits"]))
        row = simaou[task, "gd (norm)"]
        assert float(row["mean"]) == pytest.approx(np.mean(per_seed), abs=1e-9)
        assert float(row["sd"]) == pytest.approx(np.std(per_seed, ddof=1), abs=1e-9)
        assert int(row["n"]) == 2
        assert float(acc[task, "gd"]["mean"]) == pytest.approx(np.mean(accs), abs=1e-9)
        assert float(simam[task, "before"]["mean"]) == pytest.approx(np.mean(before), abs=1e-9)
        task_means[task] = np.mean(per_seed)
    avg = simaou["average", "gd (norm)"]
    assert float(avg["mean"]) == pytest.approx(np.mean(list(task_means.values())), abs=1e-9)
    assert float(avg["sd"]) == pytest.approx(np.std(list(task_means.values()), ddof=1), abs=1e-9)


def test_tables_rows_and_columns(runs_root, tmp_path):
    out = tmp_path / "report"
    report.build_report(runs_root, out, figures=False)
    for name in ("accuracy", "rec2ftp", "simaou", "simam", "simam_delta", "alpha"):
        md = (out / "tables" / f"{name}.md").read_text()
        for row in ("| sst2 |", "| subj |", "| average |"):
            assert row in md, (name, row)
        assert (out / "tables" / f"{name}.csv").exists()
    simaou_md = (out / "tables" / "simaou.md").read_text()
    for col in (
        "gd (norm)",
        "gd (raw)",
        "lcgd (norm)",
        "random gaussian (norm)",
        "random uniform, ref. (norm)",
    ):
        assert col in simaou_md
    summary = (out / "summary.md").read_text()
    assert "tiny-gpt2" in summary and "default" in summary and "seeds 2, 3" in summary


def test_figures_and_html(runs_root, tmp_path):
    out = tmp_path / "report"
    page = report.build_report(runs_root, out)
    assert page == out / "report.html"
    names = {"accuracy", "simaou_layers", "simam_delta_layers", "alpha", "grad_norms", "headline_intervals"}
    for name in names:
        png = out / "figures" / f"{name}.png"
        data = png.read_bytes()
        assert len(data) > 100 and data[:8] == PNG_MAGIC, name
    text = page.read_text()
    assert text.count("data:image/png;base64,") == len(names)
    assert "<table>" in text
    head = text[: text.index("<h2>Tables")]  # provenance comes before everything else
    assert "tiny-gpt2" in head and "default" in head and "seeds 2, 3" in head


def test_unfinished_folder_skipped(runs_root, tmp_path, capsys):
    cb = _write_run(runs_root, "cb", 3, done=False)
    runs, skipped = runfolder.find_runs(runs_root)
    assert {r.task for r in runs} == {"sst2", "subj"}
    assert [p for p, why in skipped] == [cb] and "unfinished" in skipped[0][1]
    out = tmp_path / "report"
    report.build_report(runs_root, out, figures=False)
    assert "cb" not in (out / "tables" / "accuracy.md").read_text()
    assert f"skipped {cb}: unfinished" in capsys.readouterr().err
    assert "unfinished" in (out / "summary.md").read_text()


def test_report_without_gd_and_lcgd(tmp_path):
    root = tmp_path / "runs"
    _write_run(root, "sst2", 2, settings=("zsl", "icl"))
    _write_run(root, "mr", 5, settings=("zsl", "icl", "lingd", "lcgd[clip=layer_l2:1]"))
    out = tmp_path / "report"
    page = report.build_report(root, out)
    acc = (out / "tables" / "accuracy.md").read_text()
    assert "| sst2 |" in acc and "| mr |" in acc and "lcgd[clip=layer_l2:1]" in acc
    assert "lingd (norm)" in (out / "tables" / "simaou.md").read_text()
    assert not (out / "tables" / "alpha.md").exists()
    assert not (out / "figures" / "simaou_layers.png").exists()
    assert (out / "figures" / "accuracy.png").exists()
    assert (out / "figures" / "grad_norms.png").exists()
    assert "sd" not in _csv(out, "accuracy")["sst2", "zsl"]["sd"]  # single seed: NaN sd
    assert "—" in acc
    assert page.exists()


def test_zsl_icl_only_single_run(tmp_path):
    path = _write_run(tmp_path, "cb", 3, settings=("zsl", "icl"))
    out = tmp_path / "report"
    report.build_report([path], out)
    assert not (out / "figures" / "grad_norms.png").exists()
    assert (out / "tables" / "simam.md").exists()  # SimAM before needs only ZSL and ICL


def test_load_run_and_find_runs_errors(tmp_path):
    with pytest.raises(DataError, match="config.json"):
        runfolder.load_run(tmp_path)
    with pytest.raises(DataError, match="no finished run"):
        report.build_report(tmp_path, tmp_path / "out")
    path = _write_run(tmp_path, "sst2", 2)
    run = runfolder.find_runs(path)[0][0]  # a run folder itself is a root
    assert run.task == "sst2" and run.seed == 2 and run.is_process("gd")
    assert not run.is_process("icl")
    assert run.records("gd")["attn_logits"].shape == (N, L, H, Q)
    with pytest.raises(DataError, match="no records"):
        run.records("lingd")


def _files(out):
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != ".iclgd"}


def test_report_rebuilds_byte_identically(tmp_path):
    """Two `iclgd report` runs on the same folders, in two processes with different string
    hashing, write the same bytes: summary, tables, claims, figures and the HTML page."""
    import os
    import subprocess
    import sys

    root = tmp_path / "runs"
    _write_run(root, "sst2", 2)
    _write_run(root, "sst2", 3, settings=("zsl", "icl"))  # two seeds: t intervals across seeds
    _write_run(root, "sst2", 2, control="untrained")  # claims against a control
    a, b = tmp_path / "a", tmp_path / "b"
    report.build_report(root, a)
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", f"from iclgd import report; report.build_report({str(root)!r}, "
                    f"{str(b)!r})"], check=True, env=env, capture_output=True)
    fa, fb = _files(a), _files(b)
    assert "summary.md" in fa and "tables/claims.md" in fa and "figures/headline_intervals.png" in fa
    assert sorted(fa) == sorted(fb)
    assert [k for k in fa if fa[k] != fb[k]] == []


def test_summary_has_claims_and_controls_beside_the_trained_model(tmp_path):
    root = tmp_path / "runs"
    for seed in (2, 3):
        _write_run(root, "sst2", seed)
        _write_run(root, "sst2", seed, control="untrained")
    out = tmp_path / "report"
    report.build_report(root, out, figures=False)
    summary = (out / "summary.md").read_text()
    assert "## Claims (SPEC §7)" in summary and "the trained model's above the untrained control's" in summary
    assert "fairseq-dense 1.3B" in summary and "holds if the interval excludes 0" in summary
    claims_csv = (out / "tables" / "claims.csv").read_text()
    assert "trained>untrained SimAM gd" in claims_csv and "icl>zsl" in claims_csv
    html = (out / "report.html").read_text()
    assert "<h2>Claims (SPEC §7)</h2>" in html and "sst2 · untrained" in html
    simaou = (out / "tables" / "simaou.md").read_text().splitlines()
    rows = [line.split(" | ")[0] for line in simaou if line.startswith("| ")][1:]  # after the header
    assert rows == ["| sst2", "| sst2 · untrained", "| average", "| average · untrained"]
    with (out / "tables" / "simaou.csv").open() as f:
        lines = list(csv.DictReader(f))
    got = {(r["control"], r["task"]): float(r["mean"]) for r in lines if r["column"] == "gd (norm)"}
    for control, folder in (("trained", "sst2_s{}"), ("untrained", "sst2_s{}_untrained")):
        per_seed = []
        for seed in (2, 3):
            r = {s: _npz_at(root / folder.format(seed), s) for s in ("zsl", "icl", "gd")}
            per_seed.append(_np_simaou_norm(*(r[s]["attn_out"] for s in ("icl", "zsl", "gd"))))
        assert got[control, "sst2"] == pytest.approx(np.mean(per_seed), abs=1e-9)  # never pooled
    cells = (out / "tables" / "simaou_cells.md").read_text()
    assert "| sst2 | 3 | untrained |" in cells and "[" in cells
    for name in ("agreement", "f2t_gd", "f2t_lcgd", "claims_cells"):
        assert (out / "tables" / f"{name}.md").exists() and (out / "tables" / f"{name}.csv").exists()


def _npz_at(path, setting):
    with np.load(path / "records" / f"{runfolder.safe_name(setting)}.npz") as z:
        return {k: z[k] for k in z.files}
