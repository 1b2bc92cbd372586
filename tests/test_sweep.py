"""Sweeps on the tiny random model and the real local data: planning, resume, redo, Ray parity."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from iclgd import cli, runfolder, sweep
from iclgd.errors import IclgdError

from conftest import SHARED_DATA
from tiny import tiny_loaded

TESTS = Path(__file__).parent
SETTINGS = ("zsl", "icl", "gd")


def tiny_llama_loaded():
    """Model factory for sweeps (importable as 'test_sweep:tiny_llama_loaded' in Ray workers)."""
    return tiny_loaded("llama")


def _cells(tasks=("sst2", "mr"), seeds=(2,), **kw):
    # a fixed lr skips the held-out lr search: the cells take a fraction of a second
    opts = dict(model="tiny-llama", k=4, settings=SETTINGS, eval_cap=8, data_dir=str(SHARED_DATA), lr=1e-3,
                progress=False) | kw
    return sweep.plan_cells(list(tasks), list(seeds) if seeds else None, **opts)


def _records(path: Path) -> dict:
    return {f.stem: dict(np.load(f)) for f in sorted((path / "records").glob("*.npz"))}


def test_plan_cells_seeds_from_tasks_and_protocol():
    cells = sweep.plan_cells(["sst2", "cb"], None, protocol="default")
    assert [(c.task.name, c.seed) for c in cells] == [("sst2", 2), ("sst2", 3), ("sst2", 4),
                                                      ("cb", 3), ("cb", 4), ("cb", 5)]
    ref = sweep.plan_cells(["sst2", "cb"], None, protocol="dai2023", settings="zsl,lcgd[clip=value:1,lr=1]")
    assert [(c.task.name, c.seed) for c in ref] == [("sst2", 2), ("cb", 3)]
    assert ref[0].labels == ["zsl", "lcgd[clip=value:1,lr=1]"]
    assert [c.seed for c in sweep.plan_cells(["mr"], [9, 10])] == [9, 10]


def test_plan_cells_task_without_seeds(tmp_path):
    src = Path(sweep.__file__).parent / "tasks" / "sst2.yaml"
    yaml = tmp_path / "myst.yaml"
    yaml.write_text("".join(line for line in src.read_text().splitlines(True) if not line.startswith("seeds")))
    with pytest.raises(IclgdError, match="no reference seeds"):
        sweep.plan_cells([str(yaml)], None)
    assert sweep.plan_cells([str(yaml)], [1])[0].seed == 1


def test_cell_dir_is_stable_and_distinct(tmp_path):
    a, b = _cells(seeds=(2, 3), tasks=("sst2",))
    assert sweep.cell_dir(tmp_path, a) == tmp_path / "tiny-llama" / "default" / "sst2_s2"
    assert sweep.cell_dir(tmp_path, b).name == "sst2_s3"
    hub = sweep.plan_cells(["sst2"], [2], model="Qwen/Qwen2.5-0.5B", protocol="dai2023")[0]
    assert sweep.cell_dir(tmp_path, hub) == tmp_path / "Qwen2.5-0.5B" / "dai2023" / "sst2_s2"
    with pytest.raises(IclgdError, match="share a folder"):
        sweep.run_sweep([a, a], tmp_path, loaded=tiny_llama_loaded(), progress=False)


def test_interrupted_sweep_resumes_without_redoing(tmp_path, monkeypatch, capsys):
    cells = _cells()
    real_run, calls = sweep.run, []

    def crash_on_mr(cell, *, loaded=None):
        calls.append(cell.task.name)
        if cell.task.name == "mr":  # dies midway through writing: the writer's staging folder is left
            staging = cell.out.parent / f".{cell.out.name}.tmp-0123abcd"
            staging.mkdir(parents=True)
            (staging / "config.json").write_text("{}")
            raise RuntimeError("killed")
        return real_run(cell, loaded=loaded)

    loads = []
    monkeypatch.setattr(sweep, "run", crash_on_mr)
    with pytest.raises(sweep.SweepError, match="1 of 2 cells failed") as info:
        sweep.run_sweep(cells, tmp_path, model_factory=lambda: loads.append(1) or tiny_llama_loaded())
    assert isinstance(info.value.__cause__, RuntimeError)
    assert loads == [1]  # one load for the whole sweep
    sst2, mr = (sweep.cell_dir(tmp_path, c) for c in cells)
    assert runfolder.is_done(sst2) and not runfolder.is_done(mr)
    assert "[1/2] sst2 s2 k4  zsl " in capsys.readouterr().out
    stamp = (sst2 / runfolder.DONE).stat().st_mtime_ns
    before = _records(sst2)

    calls.clear()
    monkeypatch.setattr(sweep, "run", lambda cell, **kw: calls.append(cell.task.name) or real_run(cell, **kw))
    assert sweep.run_sweep(cells, tmp_path, loaded=tiny_llama_loaded(), progress=False) == [sst2, mr]
    assert calls == ["mr"]  # the finished cell is not run again
    assert (sst2 / runfolder.DONE).stat().st_mtime_ns == stamp
    assert runfolder.is_done(mr) and runfolder.load_run(mr).task == "mr"
    assert set(_records(sst2)) == set(before) == {"zsl", "icl", "gd"}
    assert not [p for p in mr.parent.iterdir() if p.name.startswith(".")]  # no temporary folders left

    calls.clear()
    sweep.run_sweep(cells, tmp_path, loaded=tiny_llama_loaded(), progress=False)
    assert calls == []


def test_finished_cell_with_other_options_is_redone(tmp_path, monkeypatch):
    (cell,) = _cells(tasks=("sst2",), settings=("zsl", "icl"))
    loaded = tiny_llama_loaded()
    (path,) = sweep.run_sweep([cell], tmp_path, loaded=loaded, progress=False)
    assert sweep.pending([cell], tmp_path) == []
    # settings given in another order or as a string are the same cell
    assert sweep.pending(_cells(tasks=("sst2",), settings="icl,zsl"), tmp_path) == []
    for changed in (_cells(tasks=("sst2",), settings=SETTINGS), _cells(tasks=("sst2",), settings=("zsl", "icl"),
                                                                        eval_cap=6)):
        assert [c.decisive() for c in sweep.pending(changed, tmp_path)] == [c.decisive() for c in changed]
    (smaller,) = _cells(tasks=("sst2",), settings=("zsl",), eval_cap=6)
    sweep.run_sweep([smaller], tmp_path, loaded=loaded, progress=False)
    results = json.loads((path / "results.json").read_text())
    assert list(results) == ["zsl"] and results["zsl"]["n"] == 6  # replaced whole, never mixed
    assert sorted(p.stem for p in (path / "records").iterdir()) == ["zsl"]


def test_local_sweep_never_imports_ray(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        import test_sweep
        from iclgd import sweep
        cells = test_sweep._cells(tasks=("mr",), settings=("zsl",))
        sweep.run_sweep(cells, {str(tmp_path)!r}, model_factory=test_sweep.tiny_llama_loaded, progress=False)
        assert sweep.pending(cells, {str(tmp_path)!r}) == []
        assert "ray" not in sys.modules, "a local sweep imported ray"
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_reproduce_cli_builds_report(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep, "_load", lambda cfg, factory: tiny_llama_loaded())  # no download
    argv = ["reproduce", "--model", "tiny-llama", "--tasks", "sst2,mr", "--seeds", "2", "--k", "4",
            "--eval-cap", "8", "--settings", "zsl,icl", "--data-dir", str(SHARED_DATA), "--out", str(tmp_path),
            "--quiet"]
    assert cli.main(argv) == 0
    html = tmp_path / "report" / "report.html"
    printed = capsys.readouterr().out
    assert f"report: {html}" in printed and "[2/2] mr s2 k4  zsl " in printed
    assert html.exists() and (tmp_path / "report" / "summary.md").exists()
    assert runfolder.is_done(tmp_path / "runs" / "tiny-llama" / "default" / "mr_s2")


def test_ray_backend_matches_local(tmp_path):
    pytest.importorskip("ray")
    cells = _cells()
    local = sweep.run_sweep(cells, tmp_path / "local", loaded=tiny_llama_loaded(), progress=False)
    # the workers import the factory from this folder, and the iclgd this test runs (the venv's, or a
    # checkout's on PYTHONPATH: a worker must not fall back to another copy)
    import iclgd

    env = {"env_vars": {"PYTHONPATH": f"{TESTS}:{Path(iclgd.__file__).parents[1]}"}}
    threads = torch.get_num_threads()  # bit-identical CPU results need the same thread count
    remote = sweep.run_sweep(cells, tmp_path / "ray", backend="ray", model_factory="test_sweep:tiny_llama_loaded",
                             runtime_env=env, cpus_per_cell=threads)
    assert [p.relative_to(tmp_path / "ray") for p in remote] == [p.relative_to(tmp_path / "local") for p in local]
    for a, b in zip(local, remote):
        assert runfolder.is_done(b)
        assert json.loads((b / "config.json").read_text())["provenance"]["torch_threads"] == threads
        ra, rb = _records(a), _records(b)
        assert set(ra) == set(rb) == {"zsl", "icl", "gd"}
        for setting in ra:
            for key in ra[setting]:
                assert np.array_equal(ra[setting][key], rb[setting][key], equal_nan=True), (a.name, setting, key)
    # resume on Ray too: nothing left to submit, so no Ray instance is even started
    assert sweep.pending(cells, tmp_path / "ray") == []
