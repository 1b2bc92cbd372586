"""scripts/gpu_check.sh's CPU fallback (CI size): the same steps as on a GPU, on a 2-layer model."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_its_cpu_fallback_and_writes_one_summary(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a GPU machine
    out = tmp_path / "check"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--out", str(out), "--synthetic-data"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and summary["device"] == "cpu" and summary["size"] == "ci" and summary["data"]["synthetic"]
    steps = summary["steps"]
    assert list(steps) == ["agreement_float32", "bench_float32", "bench_bfloat16", "reproduce_float32",
                           "reproduce_bfloat16"]
    assert all(s["ok"] for s in steps.values())
    assert all(x["pass"] for x in steps["agreement_float32"]["settings"].values())
    for dtype in ("float32", "bfloat16"):
        bench = steps[f"bench_{dtype}"]
        for key in ("floor_ratio", "search_overhead", "default_floor_ratio", "icl_cache_speedup"):
            assert bench[key] > 0, (dtype, key)
        assert (out / f"bench_{dtype}" / "bench.json").is_file()
        assert json.loads((out / f"bench_{dtype}" / "bench.json").read_text())["run"]["dtype"] == dtype
        cells = steps[f"reproduce_{dtype}"]["cells"]
        assert len(cells) == 1 and all(0 <= x["accuracy"] <= 1 for x in next(iter(cells.values())).values())
        assert (out / f"reproduce_{dtype}" / "report" / "report.html").is_file()
    assert set(steps["bench_float32"]["default_settings"]) == {"zsl", "icl", "gd", "lcgd", "lingd"}
    assert "all steps ok" in (out / "summary.md").read_text()
