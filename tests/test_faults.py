"""Bad input and faults, met as a hostile user meets them (issue 11's matrix).

Every case asserts the exit code, that the one message names the problem, that no traceback is
printed, and that no user file is lost (a sentinel file in the working folder, and any folder a
case points --out at, must be intact afterwards). Input errors must come before any model loads:
the plan cases run with `load_model` replaced by a function that fails the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from iclgd import cli, locks, runfolder, sweep

from conftest import SHARED_DATA

D = str(SHARED_DATA)
SENTINEL = "precious.txt"


@pytest.fixture
def home(tmp_path, monkeypatch):
    """The user's working folder, holding a file that must survive every case."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / SENTINEL).write_text("mine")
    yield tmp_path
    assert (tmp_path / SENTINEL).read_text() == "mine", "a user file was lost"


def call(argv, capsys) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, err
    return code, out, err


def with_data(argv: list[str]) -> list[str]:
    """The data folder and --quiet after the subcommand (a case's own --data-dir comes later and wins)."""
    if argv[0] in ("run", "reproduce", "bench"):
        return [argv[0], "--data-dir", D, "--quiet", *argv[1:]]
    return argv


# (id, argv, a fragment the message must contain). Every one fails while planning: exit 2.
PLAN_ERRORS = [
    ("option typo", ["run", "--eval-cp", "5"], "did you mean '--eval-cap'"),
    ("k negative", ["run", "--k", "-1"], "k must be >= 0"),
    ("k not a number", ["run", "--k", "abc"], "invalid int value"),
    ("seed not a number", ["run", "--seed", "x"], "invalid int value"),
    ("eval cap 0", ["run", "--eval-cap", "0"], "eval cap must be >= 1"),
    ("batch size 0", ["run", "--batch-size", "0"], "batch size must be >= 1"),
    ("task typo", ["run", "--task", "sst3"], "did you mean 'sst"),
    ("task file missing", ["run", "--task", "nope.yaml"], "does not exist"),
    ("protocol typo", ["run", "--protocol", "dai2024"], "did you mean 'dai2023'"),
    ("model alias typo", ["run", "--model", "smolm2-135m"], "did you mean 'smollm2-135m'"),
    ("model folder missing", ["run", "--model", "./no/such/model"], "does not exist"),
    ("gguf missing", ["run", "--model", "x.gguf"], "does not exist"),
    ("model folder without config", ["run", "--model", "."], "no config.json"),
    ("model is a plain file", ["run", "--model", SENTINEL], "not a .gguf file"),
    ("revision on a local model", ["run", "--revision", "main"], "pins a Hub model"),
    ("device unknown", ["run", "--device", "tpu"], "unknown device 'tpu'"),
    ("dtype", ["run", "--dtype", "float64"], "invalid choice"),
    ("lr negative", ["run", "--lr", "-1"], "--lr must be a finite number"),
    ("lr nan", ["run", "--lr", "nan"], "--lr must be a finite number"),
    ("lr and lr source", ["run", "--lr", "1e-3", "--lr-source", "search"], "drop --lr-source"),
    ("record at", ["run", "--record-at", "middle"], "invalid choice"),
    ("empty separator", ["run", "--separator", ""], "separator is empty"),
    ("params typo", ["run", "--params", "qkv"], "did you mean 'qkvo'"),
    ("k above the demo pool", ["run", "--task", "cb", "--k", "300"], "k=300"),
    ("data folder missing", ["run", "--data-dir", "/no/such/dir"], "no local data"),
    ("process typo", ["run", "--settings", "zsl,lcdg"], "did you mean 'lcgd'"),
    ("lr option not a number", ["run", "--settings", "gd[lr=abc]"], "lr='abc' must be"),
    ("lr option negative", ["run", "--settings", "gd[lr=-1]"], "finite number >= 0"),
    ("option key typo", ["run", "--settings", "gd[lrr=1]"], "did you mean 'lr'"),
    ("process option value typo", ["run", "--settings", "lcgd[exit=attnn]"], "did you mean 'attn'"),
    ("process option key typo", ["run", "--settings", "lcgd[exti=attn]"], "did you mean 'exit'"),
    ("option of another process", ["run", "--settings", "gd[exit=attn]"], "unknown option of 'gd'"),
    ("clip without a bound", ["run", "--settings", "gd[clip=value]"], "needs a bound"),
    ("clip bound negative", ["run", "--settings", "gd[clip=value:-1]"], "must be a positive number"),
    ("clip mode typo", ["run", "--settings", "gd[clip=globl_l2:1]"], "did you mean 'global_l2'"),
    ("match_gd without gd", ["run", "--settings", "zsl,lcgd[clip=match_gd]"], "needs 'gd'"),
    ("match_gd with a bound", ["run", "--settings", "gd,lcgd[clip=match_gd:2]"], "takes no value"),
    ("params option", ["run", "--settings", "gd[params=kvq]"], "params='kvq' is not one of"),
    ("batch option", ["run", "--settings", "gd[batch=2]"], "batch='2' is not one of"),
    ("options on zsl", ["run", "--settings", "zsl[lr=1]"], "takes no options"),
    ("bracket never closed", ["run", "--settings", "gd[lr=1"], "never closed"),
    ("stray bracket", ["run", "--settings", "gd]"], "without its '['"),
    ("empty entry", ["run", "--settings", "zsl,,icl"], "empty entry"),
    ("setting twice", ["run", "--settings", "gd,gd"], "same setting"),
    ("setting twice, spelled apart", ["run", "--settings", "gd[lr=1e-3],gd[lr=0.001]"], "same setting"),
    ("option twice", ["run", "--settings", "gd[lr=1,lr=2]"], "given twice"),
    ("option without value", ["run", "--settings", "gd[lr]"], "must read key=value"),
    ("process with k 0", ["run", "--settings", "zsl,gd", "--k", "0"], "k = 0 gives none"),
    ("no settings", ["run", "--settings", ""], "no settings"),
    ("unparsable name", ["run", "--settings", "g*d"], "cannot parse"),
    ("seeds not numbers", ["reproduce", "--seeds", "2,x"], "--seeds must be"),
    ("no tasks", ["reproduce", "--tasks", ","], "no tasks"),
    ("task typo in a list", ["reproduce", "--tasks", "sst2,mrr"], "did you mean 'mr'"),
    ("cpus per cell", ["reproduce", "--cpus-per-cell", "0"], "--cpus-per-cell must be >= 1"),
    ("address without ray", ["reproduce", "--address", "auto"], "--address is for --backend ray"),
    ("backend", ["reproduce", "--backend", "dask"], "invalid choice"),
    ("bench repeat", ["bench", "--repeat", "0"], "--repeat must be >= 1"),
    ("bench k", ["bench", "--k", "-2"], "k must be >= 0"),
    ("report of nothing", ["report", "/no/such/runs"], "does not exist"),
    ("report of a folder without runs", ["report", "."], "no finished run folders"),
    ("subcommand typo", ["rnu"], "invalid choice"),
]


@pytest.mark.parametrize("argv,fragment", [c[1:] for c in PLAN_ERRORS], ids=[c[0] for c in PLAN_ERRORS])
def test_bad_input_fails_fast_with_one_message(argv, fragment, home, no_model, capsys):
    code, out, err = call(with_data(argv), capsys)
    assert code == 2 and fragment in err, err


def test_cuda_asked_without_a_gpu(home, no_model, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code, _, err = call(with_data(["run", "--device", "cuda"]), capsys)
    assert code == 2 and "no CUDA device" in err


# ---------------------------------------------------------------- output paths


def test_out_is_a_file(home, no_model, capsys):
    code, _, err = call(with_data(["run", "--out", SENTINEL]), capsys)
    assert code == 2 and "is a file" in err


def test_out_under_a_file(home, no_model, capsys):
    code, _, err = call(with_data(["run", "--out", f"{SENTINEL}/run"]), capsys)
    assert code == 2 and "is a file" in err


def test_out_in_a_folder_iclgd_did_not_make(home, no_model, capsys):
    mine = home / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    for argv in (["run", "--out", "mine"], ["reproduce", "--out", "mine"], ["bench", "--out", "mine"]):
        code, _, err = call(with_data(argv), capsys)
        assert code == 2 and "did not write" in err and "--overwrite" in err
    assert (mine / "notes.txt").read_text() == "keep"


def test_overwrite_never_replaces_a_user_file(home, no_model, capsys):
    mine = home / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("my own config")
    code, _, err = call(with_data(["run", "--out", "mine", "--overwrite"]), capsys)
    assert code == 2 and "config.json" in err and "did not write" in err
    assert (mine / "config.json").read_text() == "my own config"


def test_out_not_writable(home, no_model, capsys):
    if os.geteuid() == 0:
        pytest.skip("root may write anywhere")
    locked = home / "locked"
    locked.mkdir(mode=0o500)
    code, _, err = call(with_data(["run", "--out", "locked/run"]), capsys)
    assert code == 2 and "not writable" in err


def test_report_out_in_a_folder_iclgd_did_not_make(home, tiny_dir, capsys):
    run_dir = _tiny_run(home, tiny_dir, capsys)
    mine = home / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    code, _, err = call(["report", str(run_dir), "--out", "mine"], capsys)
    assert code == 2 and "did not write" in err
    assert (mine / "notes.txt").read_text() == "keep"
    code, out, _ = call(["report", str(run_dir), "--out", "mine", "--overwrite"], capsys)
    assert code == 0 and (mine / "notes.txt").read_text() == "keep" and (mine / "summary.md").exists()


def _tiny_run(home, tiny_dir, capsys, out="cell", extra=()) -> Path:
    argv = ["run", "--model", str(tiny_dir), "--k", "2", "--eval-cap", "4", "--settings", "zsl,icl,gd",
            "--lr", "0.01", "--out", out, *extra]
    code, _, err = call(with_data(argv), capsys)
    assert code == 0, err
    return home / out


def test_rerun_into_its_own_folder_keeps_the_users_files(home, tiny_dir, capsys):
    run_dir = _tiny_run(home, tiny_dir, capsys)
    (run_dir / "my_notes.md").write_text("analysis")
    (run_dir / "records" / "mine.npz").write_bytes(b"x")
    _tiny_run(home, tiny_dir, capsys, extra=("--settings", "zsl,icl"))
    assert (run_dir / "my_notes.md").read_text() == "analysis"
    assert (run_dir / "records" / "mine.npz").read_bytes() == b"x"
    assert not (run_dir / "records" / "gd.npz").exists()  # ours, and no longer part of the run
    assert runfolder.load_run(run_dir).settings == ["zsl", "icl"]


def test_overwrite_adds_a_run_beside_the_users_files(home, tiny_dir, capsys):
    mine = home / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    run_dir = _tiny_run(home, tiny_dir, capsys, out="mine", extra=("--overwrite",))
    assert (mine / "notes.txt").read_text() == "keep" and runfolder.is_done(run_dir)


# ---------------------------------------------------------------- data files


def _task(home, rows_train, rows_test=None, suffix="jsonl", extra="", bom=False) -> str:
    for split, rows in (("train", rows_train), ("test", rows_test or rows_train)):
        text = "\n".join(rows) + "\n"
        (home / f"{split}.{suffix}").write_text(("\ufeff" if bom else "") + text, encoding="utf-8")
    (home / "t.yaml").write_text(textwrap.dedent(f"""\
        name: t
        local_dir: ./{{split}}.{suffix}
        template: "Text: {{text}} Label:"
        label_words: ["no", "yes"]
        eval_split: test
        lr: 0.001
        """) + extra)
    return "t.yaml"


def test_csv_with_a_byte_order_mark(home, no_model, capsys):
    task = _task(home, ["text,label", "good,1", "bad,0", "fine,1", "awful,0"], suffix="csv", bom=True)
    code, out, err = call(with_data(["run", "--task", task, "--k", "2", "--settings", "zsl,icl", "--dry-run"]), capsys)
    assert code == 0 and "· t ·" in out, err


def test_malformed_jsonl_names_line_column_and_text(home, no_model, capsys):
    task = _task(home, ['{"text": "a", "label": 0}', '{"text": "bad", "label": 1', '{"text": "c", "label": 1}'])
    code, _, err = call(with_data(["run", "--task", task, "--k", "1"]), capsys)
    assert code == 2 and "line 2, column 28" in err and '{"text": "bad", "label": 1' in err


@pytest.mark.parametrize("rows,fragment", [
    (['{"text": "a", "label": 5}', '{"text": "b", "label": 0}'], "out of range"),
    (['{"txt": "a", "label": 0}', '{"txt": "b", "label": 0}'], "column(s) 'text'"),
    (['{"text": "a", "label": "maybe"}', '{"text": "b", "label": 0}'], "not an integer or a label word"),
], ids=["label out of range", "missing column", "label not a number"])
def test_bad_rows_are_named(rows, fragment, home, no_model, capsys):
    code, _, err = call(with_data(["run", "--task", _task(home, rows), "--k", "1"]), capsys)
    assert code == 2 and fragment in err and "line 1" in err


@pytest.mark.parametrize("extra,fragment", [
    ("label_wrds: [a, b]\n", "unknown key(s) label_wrds"),
    ("eval_cap: [\n", "not valid YAML"),
], ids=["unknown key", "malformed yaml"])
def test_bad_task_files(extra, fragment, home, no_model, capsys):
    task = _task(home, ['{"text": "a", "label": 0}', '{"text": "b", "label": 1}'], extra=extra)
    code, _, err = call(with_data(["run", "--task", task, "--k", "1"]), capsys)
    assert code == 2 and fragment in err


def test_task_without_a_reference_lr_and_a_process(home, no_model, capsys):
    task = _task(home, ['{"text": "a", "label": 0}', '{"text": "b", "label": 1}', '{"text": "c", "label": 1}'])
    (home / task).write_text((home / task).read_text().replace("lr: 0.001\n", ""))
    code, _, err = call(with_data(["run", "--task", task, "--k", "1", "--settings", "zsl,gd"]), capsys)
    assert code == 2 and "no reference learning rate" in err and "--lr" in err


def test_too_few_rows_for_the_lr_search(home, no_model, capsys):
    rows = [json.dumps({"text": f"t{i}", "label": i % 2}) for i in range(6)]
    code, _, err = call(with_data(["run", "--task", _task(home, rows), "--k", "2", "--settings", "zsl,gd"]), capsys)
    assert code == 2 and "held-out examples asked" in err


# ---------------------------------------------------------------- corrupt run folders


def _runs(home, tiny_dir, capsys, n=2) -> list[Path]:
    return [_tiny_run(home, tiny_dir, capsys, out=f"runs/cell{i}", extra=("--seed", str(i + 2))) for i in range(n)]


def test_truncated_records_file_is_named(home, tiny_dir, capsys):
    a, b = _runs(home, tiny_dir, capsys)
    npz = b / "records" / "gd.npz"
    npz.write_bytes(npz.read_bytes()[:100])
    code, _, err = call(["report", "runs", "--out", "rep"], capsys)
    assert code == 0 and f"skipped {b.relative_to(home)}" in err and "gd.npz" in err and "truncated or corrupt" in err
    assert "gd.npz" in (home / "rep" / "summary.md").read_text()
    code, _, err = call(["report", str(b), "--out", "rep2"], capsys)
    assert code == 2 and "gd.npz" in err


def test_malformed_results_file_is_named(home, tiny_dir, capsys):
    (run_dir,) = _runs(home, tiny_dir, capsys, n=1)
    (run_dir / "results.json").write_text("{ not json")
    code, _, err = call(["report", str(run_dir), "--out", "rep"], capsys)
    assert code == 2 and "results.json is not valid JSON" in err


def test_a_writers_staging_folder_is_never_a_run(home, tiny_dir, capsys):
    a, b = _runs(home, tiny_dir, capsys)
    # a writer killed between writing DONE and the rename leaves a complete-looking hidden folder
    staging = a.parent / f".{a.name}.tmp-0123abcd"
    os.rename(b, staging)
    runs, skipped = runfolder.find_runs(home / "runs")
    assert [r.path for r in runs] == [a] and skipped == []


def test_a_run_folder_of_a_newer_iclgd(home, tiny_dir, capsys):
    (run_dir,) = _runs(home, tiny_dir, capsys, n=1)
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "schema": runfolder.SCHEMA + 1}))
    code, _, err = call(["report", str(run_dir), "--out", "rep"], capsys)
    assert code == 2 and "newer iclgd" in err


# ---------------------------------------------------------------- plugins


README_PLUGIN = '''
from iclgd.processes import register_process
from iclgd.processes.gd import GD

@register_process("gd_sign")
class SignGD(GD):
    def grads(self, ctx, params, batch):
        loss, grads = super().grads(ctx, params, batch)
        return loss, {n: g.sign() for n, g in grads.items()}
'''


def _readme_plugin() -> str:
    """The plugin example of the README, as written there."""
    text = (Path(__file__).parents[1] / "README.md").read_text()
    start = text.index("# my_adam.py")
    return text[start: text.index("```", start)]


def test_readme_plugin_example_works_as_written(home, tiny_dir, registry, capsys):
    code_text = _readme_plugin()
    assert "register_process" in code_text and "gd_sign" in code_text
    (home / "my_adam.py").write_text(code_text)
    argv = ["run", "--plugin", "my_adam", "--model", str(tiny_dir), "--k", "2", "--eval-cap", "4", "--lr", "0.01",
            "--settings", "zsl,icl,gd_sign", "--out", "signed"]
    code, out, err = call(with_data(argv), capsys)
    assert code == 0, err
    assert "gd_sign" in out and runfolder.load_run(home / "signed").settings == ["zsl", "icl", "gd_sign"]


@pytest.mark.parametrize("source,spec,fragment", [
    (None, "no_such_plugin_mod", "not found"),
    (None, "./missing_plugin.py", "does not exist"),
    ("import os\nx = 1\nraise RuntimeError('boom')\n", "./broken.py", "failed to import at line 3"),
    ("import numpy_that_is_not_there\n", "brokenmod", "ModuleNotFoundError"),
    ("from iclgd.processes import register_process\n@register_process('gd')\nclass G:\n    pass\n",
     "./notproc.py", "not a subclass"),
    ("from iclgd.processes import register_process\nfrom iclgd.processes.gd import GD\n"
     "@register_process('gd')\nclass Mine(GD):\n    pass\n", "./dupe.py", "already registered"),
    ("from iclgd.processes import register_process\nfrom iclgd.processes.gd import GD\n"
     "@register_process('zsl')\nclass Mine(GD):\n    pass\n", "./basename.py", "not zsl or icl"),
], ids=["module not found", "file missing", "raises at import", "imports a missing module", "not a Process",
        "duplicate name", "takes zsl's name"])
def test_plugin_failures(source, spec, fragment, home, no_model, registry, capsys):
    if source is not None:
        name = spec.removeprefix("./")
        (home / (name if name.endswith(".py") else f"{name}.py")).write_text(source)
    code, _, err = call(with_data(["run", "--plugin", spec, "--settings", "zsl"]), capsys)
    assert code == 2 and fragment in err and "plugin" in err, err


# ---------------------------------------------------------------- interrupts and failures while computing


def test_ctrl_c_in_a_run_ends_with_one_line(home, tiny_dir, monkeypatch, capsys):
    from iclgd import experiment

    real = experiment._run_setting

    def interrupt_at_gd(setting, *a, **kw):
        if setting.name == "gd":
            raise KeyboardInterrupt
        return real(setting, *a, **kw)

    monkeypatch.setattr(experiment, "_run_setting", interrupt_at_gd)
    argv = ["run", "--model", str(tiny_dir), "--k", "2", "--eval-cap", "4", "--settings", "zsl,icl,gd",
            "--lr", "0.01", "--out", "cell"]
    code, _, err = call(with_data(argv), capsys)
    assert code == 130 and err.strip().startswith("iclgd: interrupted") and len(err.strip().splitlines()) == 1
    assert not (home / "cell").exists() and not list(home.glob(".cell.tmp-*"))


def test_ctrl_c_in_a_sweep_keeps_finished_cells_and_resumes(home, tiny_dir, monkeypatch, capsys):
    real, calls = sweep.run, []

    def interrupt_second(cell, **kw):
        calls.append(cell.seed)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(cell, **kw)

    monkeypatch.setattr(sweep, "run", interrupt_second)
    argv = ["reproduce", "--model", str(tiny_dir), "--tasks", "sst2", "--seeds", "2,3", "--k", "2", "--eval-cap", "4",
            "--settings", "zsl,icl", "--out", "rep"]
    code, _, err = call(with_data(argv), capsys)
    assert code == 130 and "interrupted" in err
    root = home / "rep" / "runs"
    done = [c for c in sorted(root.rglob("sst2_s*")) if runfolder.is_done(c)]
    assert [c.name for c in done] == ["sst2_s2"] and not list(root.rglob(".*.claim"))
    monkeypatch.setattr(sweep, "run", lambda cell, **kw: calls.append(cell.seed) or real(cell, **kw))
    code, out, err = call(with_data(argv), capsys)
    assert code == 0 and calls[2:] == [3], err  # only the unfinished cell runs again


def test_non_finite_training_exits_1_naming_step_and_lr(home, tiny_dir, capsys):
    argv = ["run", "--model", str(tiny_dir), "--k", "2", "--eval-cap", "4", "--settings", "zsl,gd", "--lr", "1e38",
            "--out", "cell"]
    code, _, err = call(with_data(argv), capsys)
    assert code == 1 and "non-finite" in err and "1e+38" in err and not (home / "cell").exists()


def test_corrupt_weights_exit_1_with_one_line(home, tiny_dir, capsys):
    broken = home / "broken-model"
    broken.mkdir()
    for f in tiny_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:200])
    argv = ["run", "--model", str(broken), "--k", "2", "--eval-cap", "4", "--settings", "zsl", "--out", "cell"]
    code, _, err = call(with_data(argv), capsys)
    assert code == 1 and "--debug" in err and len(err.strip().splitlines()) == 1


def test_debug_shows_the_traceback(home, tiny_dir):
    broken = home / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(Exception):  # noqa: B017 - whatever transformers raises, it is not swallowed
        cli.main(["--debug", *with_data(["run", "--model", str(broken), "--k", "2", "--settings", "zsl"])])


# ---------------------------------------------------------------- concurrent workers


def _sweep_argv(tiny_dir, out="rep"):
    return [sys.executable, "-m", "iclgd.cli", "reproduce", "--data-dir", D, "--quiet", "--model", str(tiny_dir),
            "--tasks", "sst2,mr", "--seeds", "2,3", "--k", "2", "--eval-cap", "24", "--settings", "zsl,icl,gd",
            "--lr", "0.01", "--out", out]


def test_two_sweeps_on_one_folder_compute_every_cell_once(home, tiny_dir):
    procs = [subprocess.Popen(_sweep_argv(tiny_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1][-2000:] for r in results]
    events = locks.read_log(home / "rep" / "runs" / locks.LOG)
    computed = [e["cell"] for e in events if e["event"] == "computed"]
    assert sorted(computed) == sorted(set(computed)) and len(computed) == 4
    assert len({e["owner"] for e in events if e["event"] == "computed"}) >= 1
    assert all(runfolder.is_done(Path(c)) for c in computed)
    assert not list((home / "rep" / "runs").rglob(".*.claim"))


def _cells(root, seeds=(2,)):
    return sweep.plan_cells(["sst2"], list(seeds), model="tiny-llama", k=2, settings=("zsl", "icl"), eval_cap=4,
                            data_dir=D, lr=0.01, progress=False, root=root)


def test_a_dead_workers_claim_is_taken_over(home):
    from tiny import tiny_loaded

    (cell,) = _cells(home / "runs")
    claim = locks.claim_path(cell.out)
    claim.parent.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    claim.write_text(json.dumps({"owner": "ghost", "host": os.uname().nodename, "pid": int(dead.stdout), "since": 0}))
    sweep.run_sweep([cell], home / "runs", loaded=tiny_loaded("llama"), progress=False)
    events = [e["event"] for e in locks.read_log(home / "runs" / locks.LOG)]
    assert events == ["took over a stale claim", "claimed", "computed"] and runfolder.is_done(cell.out)


def test_a_live_claim_is_waited_for_not_doubled(home, monkeypatch):
    import threading

    from tiny import tiny_loaded

    monkeypatch.setattr(sweep, "WAIT_S", 0.2)
    (cell,) = _cells(home / "runs")
    other = locks.try_claim(cell.out, "other-worker", home / "runs" / locks.LOG)
    loaded = tiny_loaded("llama")

    def other_worker_finishes():
        time.sleep(1.0)
        from iclgd.experiment import run

        run(cell, loaded=loaded)
        other.release("computed")

    t = threading.Thread(target=other_worker_finishes)
    t.start()
    runs = []
    monkeypatch.setattr(sweep, "run", lambda c, **kw: runs.append(c) or None)
    sweep.run_sweep([cell], home / "runs", loaded=loaded, progress=False)
    t.join()
    assert runs == [] and runfolder.is_done(cell.out)  # this worker waited and computed nothing


# ---------------------------------------------------------------- degenerate numbers


def test_learning_rate_zero_is_flagged(home, tiny_dir, capsys):
    argv = ["run", "--model", str(tiny_dir), "--k", "2", "--eval-cap", "4", "--settings", "zsl,gd", "--lr", "0",
            "--out", "cell"]
    code, out, _ = call(with_data(argv), capsys)
    assert code == 0 and "zero_update" in out
    codes = {f["code"] for f in runfolder.load_run(home / "cell").flags("gd")}
    assert {"zero_update", "loss_not_falling"} <= codes


def test_a_collapsed_model_is_flagged_not_reported_as_accuracy():
    from iclgd.flags import record_flags

    uniform = torch.full((4, 2), -np.log(2.0))  # every label equally likely: argmax says class 0
    flags, ties = record_flags(uniform, uniform.argmax(-1))
    assert ties == 4 and {f["code"] for f in flags} == {"uniform_labels", "label_ties", "one_class"}
    lp = torch.tensor([[-0.1, -2.0], [-2.0, -0.1], [-0.5, -0.5 + 1e-9]])
    flags, ties = record_flags(lp, lp.argmax(-1))
    assert ties == 1 and {f["code"] for f in flags} == {"label_ties"}


def test_vanishing_gradients_and_a_loss_that_does_not_fall():
    from iclgd.flags import training_flags

    norms = torch.full((2, 3), 1e-12)
    codes = {f["code"] for f in training_flags(torch.tensor([1.0, 0.9, 0.8]), 1.2, norms, 0.1)}
    assert codes == {"vanishing_gradients", "loss_not_falling"}
    assert training_flags(torch.tensor([1.0]), 0.5, torch.ones(2, 1), 0.1) == []


def test_a_sweep_checks_every_cells_prompts_before_computing_any(home, tiny_dir, capsys):
    """CB's long premises do not fit the tiny model's 512 positions: the sweep says so for every
    such cell right after loading the model, and computes nothing."""
    argv = ["reproduce", "--model", str(tiny_dir), "--tasks", "sst2,cb", "--seeds", "2,3", "--k", "2",
            "--eval-cap", "24", "--settings", "zsl,icl", "--out", "rep"]
    code, _, err = call(with_data(argv), capsys)
    assert code == 2 and "cannot run on this model, so none was started" in err and "cb s2" in err and "cb s3" in err
    assert not [p for p in (home / "rep").rglob("DONE")]
