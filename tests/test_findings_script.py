"""scripts/findings.py: publishing copies the report, writes RUN.md, never touches the README."""

import importlib.util
from pathlib import Path

import pytest

from iclgd import report

from runfolders import write_run

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "findings.py"


@pytest.fixture
def findings(tmp_path, monkeypatch):
    """The script as a module, with its project root moved to tmp_path."""
    spec = importlib.util.spec_from_file_location("findings_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "ROOT", tmp_path)
    return mod


def _reproduced(tmp_path, name):
    """What `iclgd reproduce --out runs/findings/NAME` leaves: run folders and their report."""
    out = tmp_path / "runs" / "findings" / name
    for seed in (2, 3):
        write_run(out / "runs", "sst2", seed)
    write_run(out / "runs", "sst2", 2, control="untrained")
    report.build_report(out / "runs", out / "report")
    return out


def test_publish_copies_the_report_and_keeps_the_written_reading(findings, tmp_path):
    out = _reproduced(tmp_path, "demo")
    dest = tmp_path / "docs" / "findings" / "demo"
    dest.mkdir(parents=True)
    (dest / "README.md").write_text("what the numbers say, by hand\n")
    (dest / "figures").mkdir()
    (dest / "figures" / "stale.png").write_bytes(b"old")  # a copy an earlier publish made ...
    (dest / ".published").write_text("figures/stale.png\n")  # ... and listed
    (dest / "figures" / "mine.png").write_bytes(b"drawn by hand")  # the author's, never listed
    extra = ["--model", "tiny-gpt2", "--tasks", "sst2", "--controls"]

    findings.publish("demo", out, extra, wall_s=90.0, ran=1)  # a resumed run: this invocation finished 1 cell

    assert (dest / "README.md").read_text() == "what the numbers say, by hand\n"
    assert (dest / "figures" / "mine.png").read_bytes() == b"drawn by hand"
    assert not (dest / "figures" / "stale.png").exists()
    for item in ("summary.md", "report.html", "tables/claims.md", "figures/headline_intervals.png"):
        assert (dest / item).read_bytes() == (out / "report" / item).read_bytes()
    copied = {str(p.relative_to(out / "report")) for p in (out / "report").rglob("*")
              if p.is_file() and p.name != ".iclgd"}  # the report folder's ownership mark stays there
    listed = set((dest / ".published").read_text().splitlines())
    assert listed == copied and "README.md" not in listed

    run_md = (dest / "RUN.md").read_text()
    assert "iclgd reproduce --model tiny-gpt2 --tasks sst2 --controls --out runs/findings/demo" in run_md
    assert "3 cells" in run_md  # two seeds and the control
    assert "1.5 min wall, finished 1 of the 3 cells; the other 2 were finished by earlier invocations" in run_md
    assert findings.finished_cells(out) == {d.parent for d in (out / "runs").rglob("DONE")} and len(
        findings.finished_cells(out)) == 3

    findings.publish("demo", out, extra, wall_s=0.5)  # again (--publish-only): the same files, the author's kept
    assert (dest / "figures" / "mine.png").exists() and set((dest / ".published").read_text().splitlines()) == listed
    run_md = (dest / "RUN.md").read_text()
    assert "publish only (no cell run" in run_md and "min wall" not in run_md


def test_publish_without_a_report_says_how_to_make_one(findings, tmp_path):
    out = tmp_path / "runs" / "findings" / "none"
    (out / "runs").mkdir(parents=True)
    with pytest.raises(SystemExit, match="run without --publish-only first"):
        findings.publish("none", out, [], wall_s=0.0)
    assert not (tmp_path / "docs").exists()


def test_publish_only_without_a_run_exits_2(findings, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["findings.py", "nosuch", "--publish-only"])
    assert findings.main() == 2
    assert "run without --publish-only first" in capsys.readouterr().err
    assert not (tmp_path / "docs").exists() and not (tmp_path / "runs").exists()
