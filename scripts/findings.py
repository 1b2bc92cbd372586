"""Run a findings reproduction and publish its report under docs/findings/<name>/.

    python scripts/findings.py NAME -- REPRODUCE-ARGS...
    python scripts/findings.py smollm2-135m -- --model smollm2-135m --eval-cap 64 --controls --control-seeds 2

Runs `iclgd reproduce REPRODUCE-ARGS --out runs/findings/NAME` (resumable: rerun the same line to
go on where it stopped; the cells already done are kept), then copies the report (summary.md,
report.html, figures/, tables/) into docs/findings/NAME/ and writes docs/findings/NAME/RUN.md:
the exact command, iclgd version and git commit, the compute the cells took (the sum of their
settings' wall seconds, read from the run folders, so a run spread over several sessions is
counted once per cell) and what this invocation did: its wall time and how many cells it finished
(a resumed run's earlier cells were finished by earlier invocations). `--publish-only` skips the
reproduce. Publishing again replaces what the last publish copied (listed in .published there)
and nothing else. The written interpretation (what the numbers say) goes in
docs/findings/NAME/README.md by hand: this script never writes or overwrites it.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", help="folder name under docs/findings/ and runs/findings/")
    ap.add_argument("--publish-only", action="store_true", help="copy an existing report without running")
    args = ap.parse_args(own)
    out = ROOT / "runs" / "findings" / args.name
    iclgd = str(Path(sys.executable).with_name("iclgd"))
    cmd = [iclgd, "reproduce", *extra, "--out", str(out)]
    t0 = time.time()
    saved = out.with_name(args.name + ".command")  # beside the run folder, which only iclgd writes into
    ran = None  # cells this invocation finished; None: it ran none (--publish-only)
    if args.publish_only:
        if not (out / "report" / "summary.md").exists():
            print(f"findings: nothing to publish: no report at {out / 'report'}; run without --publish-only first",
                  file=sys.stderr)
            return 2
        extra = shlex.split(saved.read_text()) if saved.exists() and not extra else extra
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(shlex.join(extra) + "\n")
        before = finished_cells(out)
        proc = subprocess.Popen(cmd)
        try:
            code = proc.wait()
        except KeyboardInterrupt:  # Ctrl-C reaches iclgd too: it keeps finished cells and exits 130
            code = proc.wait()
        if code != 0:
            print(f"findings: reproduce ended with exit code {code}; rerun the same command to resume", file=sys.stderr)
            return code
        ran = len(finished_cells(out) - before)
    publish(args.name, out, extra, time.time() - t0, ran)
    return 0


def finished_cells(out: Path) -> set[Path]:
    """The finished run folders under out/runs (each has its DONE file, written last)."""
    from iclgd import runfolder

    return {p.parent for p in (out / "runs").rglob(runfolder.DONE)} if (out / "runs").exists() else set()


def publish(name: str, out: Path, extra: list[str], wall_s: float, ran: int | None = None) -> None:
    """Copy out/report into docs/findings/NAME and write RUN.md; `ran`: how many cells the invocation
    that publishes finished (None: it ran none, a publish only)."""
    from importlib.metadata import version

    from iclgd import runfolder

    __version__ = version("iclgd")

    report = out / "report"
    if not (report / "summary.md").exists():
        raise SystemExit(f"findings: no report at {report}; run without --publish-only first")
    dest = ROOT / "docs" / "findings" / name
    dest.mkdir(parents=True, exist_ok=True)
    manifest = dest / ".published"  # what the last publish copied here: the only files it may remove
    if manifest.exists():
        for rel in manifest.read_text().splitlines():
            path = (dest / rel).resolve()
            if rel and path.is_relative_to(dest.resolve()) and path.name != "README.md":  # a listing edited by hand
                path.unlink(missing_ok=True)
    copied = ["summary.md", "report.html"] + sorted(
        str(p.relative_to(report)) for folder in ("figures", "tables") for p in (report / folder).rglob("*")
        if p.is_file())
    for rel in copied:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(report / rel, dest / rel)
    manifest.write_text("\n".join(copied) + "\n")
    runs, _ = runfolder.find_runs(out / "runs")
    cell_s = sum(sum(float(r.get("wall_s", 0.0)) for r in run.results.values() if isinstance(r, dict))
                 for run in runs)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    command = shlex.join(["iclgd", "reproduce", *extra, "--out", f"runs/findings/{name}"])
    (dest / "RUN.md").write_text(
        f"# How this was made\n\n"
        f"```\n{command}\n```\n\n"
        f"(`python scripts/findings.py {name} -- {shlex.join(extra)}` runs it into runs/findings/{name} and copies "
        f"the report here.)\n\n"
        f"- iclgd {__version__}, git commit {commit or 'unknown'} (each run folder's provenance, in summary.md, "
        f"names the commit that computed it)\n"
        f"- {len(runs)} cells; compute: {cell_s / 3600:.2f} h, the sum of every setting's wall time over the cells "
        f"(on the machine the provenance names)\n"
        f"- {invocation(wall_s, ran, len(runs))}, published {datetime.date.today().isoformat()}\n")
    print(f"findings: published {dest} ({len(runs)} cells, {cell_s / 3600:.2f} h of cell compute)")


def invocation(wall_s: float, ran: int | None, cells: int) -> str:
    """What the publishing invocation did, for RUN.md."""
    if ran is None:
        return "this invocation: publish only (no cell run; the compute above is the cells' own)"
    earlier = "" if ran == cells else f"; the other {cells - ran} were finished by earlier invocations"
    return f"this invocation: {wall_s / 60:.1f} min wall, finished {ran} of the {cells} cells{earlier}"


if __name__ == "__main__":
    sys.exit(main())
