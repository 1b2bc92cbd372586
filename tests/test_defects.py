"""One test per defect that issue 11 found by trying iclgd as a hostile new user would.

Each test drives iclgd only through what a user touches (the command line, its files, a plugin),
so it runs unchanged against the code before the fix, where it fails, and after, where it passes
(the closing note of issue 11 has the table). tests/test_faults.py holds the wider matrix.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from iclgd import cli

from conftest import SHARED_DATA
from tiny import tiny_model
from tiny_tokenizer import tiny_tokenizer

D = str(SHARED_DATA)
ROOT = Path(__file__).parents[1]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def cli_run(argv, capsys) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    except BaseException as e:  # the defect: an exception escaped as a traceback
        return -1, "", f"Traceback: {type(e).__name__}: {e}"
    out, err = capsys.readouterr()
    return code, out, err


def tiny_run(tiny_dir, *extra) -> list[str]:
    return ["run", "--model", str(tiny_dir), "--data-dir", D, "--quiet", "--k", "2", "--eval-cap", "4",
            "--lr", "0.01", *extra]


# ---------------------------------------------------------------- data loss


def test_run_out_never_removes_a_users_folder(home, tiny_dir, capsys):
    (home / "thesis").mkdir()
    (home / "thesis" / "chapter1.tex").write_text("months of work")
    code, _, err = cli_run(tiny_run(tiny_dir, "--settings", "zsl", "--out", "thesis"), capsys)
    assert (home / "thesis" / "chapter1.tex").read_text() == "months of work"
    assert code == 2 and "thesis" in err


# ---------------------------------------------------------------- silent wrong results


def test_misspelled_process_option_is_refused(home, tiny_dir, capsys):
    code, _, err = cli_run(tiny_run(tiny_dir, "--settings", "zsl,lcgd[exti=attn]", "--out", "r"), capsys)
    assert code == 2 and "exti" in err and "exit" in err and not (home / "r").exists()


def test_a_collapsed_model_is_flagged(home, tiny_dir, capsys):
    """A model whose output distribution is uniform (here: a zero unembedding) predicts class 0
    for every example through argmax's tie rule; the accuracy that gives must carry flags."""
    import torch

    flat = home / "flat-model"
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.zero_()
    model.save_pretrained(flat)
    tiny_tokenizer().save_pretrained(flat)
    code, _, err = cli_run(tiny_run(flat, "--settings", "zsl", "--out", "r"), capsys)
    assert code == 0, err
    entry = json.loads((home / "r" / "results.json").read_text())["zsl"]
    assert {"uniform_labels", "label_ties"} <= {f["code"] for f in entry.get("flags", [])}


def test_report_ignores_staging_folders_of_interrupted_writers(home, tiny_dir, capsys):
    code, _, err = cli_run(tiny_run(tiny_dir, "--settings", "zsl,icl", "--out", "runs/a"), capsys)
    assert code == 0, err
    # a writer killed after writing DONE but before renaming its folder into place leaves this
    staging = home / "runs" / ".b.tmp-0123abcd"
    staging.mkdir()
    for f in (home / "runs" / "a").rglob("*"):
        if f.is_file():
            (staging / f.relative_to(home / "runs" / "a")).parent.mkdir(parents=True, exist_ok=True)
            (staging / f.relative_to(home / "runs" / "a")).write_bytes(f.read_bytes())
    code, _, err = cli_run(["report", "runs", "--out", "rep"], capsys)
    assert code == 0, err
    assert "Built from 1 run folder(s)" in (home / "rep" / "summary.md").read_text()


def test_lr_search_never_scores_an_eval_example(home, tiny_dir, capsys, monkeypatch):
    """A task whose eval split is its demo split, with the run's eval cap above the task's own:
    the held-out examples of the search must still avoid every eval example of the run."""
    import iclgd.data

    rows = [json.dumps({"text": f"example number {i}", "label": i % 2}) for i in range(200)]
    (home / "all.jsonl").write_text("\n".join(rows) + "\n")
    (home / "t.yaml").write_text(textwrap.dedent("""\
        name: t
        local_dir: ./all.jsonl
        template: "Text: {text} Label:"
        label_words: ["no", "yes"]
        eval_split: train
        eval_cap: 10
        lr: 0.001
        """))
    seen = []
    real = iclgd.data.held_out

    def spy(*a, **kw):
        out = real(*a, **kw)
        seen.extend(e.id for e in out)
        return out

    import importlib

    for module in ("iclgd.experiment", "iclgd.lrsearch"):  # wherever the search imports it from
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        if hasattr(mod, "held_out"):
            monkeypatch.setattr(mod, "held_out", spy)
    argv = ["run", "--model", str(tiny_dir), "--data-dir", D, "--quiet", "--task", "t.yaml", "--k", "2",
            "--eval-cap", "60", "--settings", "zsl,gd", "--out", "r"]
    code, _, err = cli_run(argv, capsys)
    assert code == 0, err
    eval_ids = {json.loads(line)["id"] for line in (home / "r" / "eval.jsonl").read_text().splitlines()}
    assert len(eval_ids) == 60 and seen and not eval_ids & set(seen)


# ---------------------------------------------------------------- tracebacks instead of messages


def test_bad_option_value_is_found_before_any_compute(home, tiny_dir, capsys):
    code, out, err = cli_run(tiny_run(tiny_dir, "--settings", "zsl,gd[clip=value:abc]", "--out", "r"), capsys)
    assert code == 2 and "Traceback" not in err and "clip" in err
    assert "zsl" not in out  # nothing ran first


def test_out_at_a_file(home, tiny_dir, capsys):
    (home / "results.csv").write_text("a,b\n1,2\n")
    code, _, err = cli_run(tiny_run(tiny_dir, "--settings", "zsl", "--out", "results.csv"), capsys)
    assert code == 2 and "Traceback" not in err and "results.csv" in err
    assert (home / "results.csv").read_text() == "a,b\n1,2\n"


def test_truncated_records_in_a_run_folder(home, tiny_dir, capsys):
    code, _, err = cli_run(tiny_run(tiny_dir, "--settings", "zsl,icl", "--out", "r"), capsys)
    assert code == 0, err
    npz = home / "r" / "records" / "icl.npz"
    npz.write_bytes(npz.read_bytes()[:64])
    code, _, err = cli_run(["report", "r", "--out", "rep"], capsys)
    assert code == 2 and "Traceback" not in err and "icl.npz" in err


def test_plugin_that_is_not_there(home, tiny_dir, capsys, registry):
    code, _, err = cli_run(tiny_run(tiny_dir, "--plugin", "not_a_plugin", "--settings", "zsl"), capsys)
    assert code == 2 and "Traceback" not in err and "not_a_plugin" in err


def test_readme_plugin_example_from_the_current_folder(home, tiny_dir, capsys, registry):
    text = (ROOT / "README.md").read_text()
    start = text.index("# my_adam.py")
    (home / "my_adam.py").write_text(text[start: text.index("```", start)])
    code, out, err = cli_run(tiny_run(tiny_dir, "--plugin", "my_adam", "--settings", "zsl,gd_sign", "--out", "r"),
                             capsys)
    assert code == 0 and "Traceback" not in err and "gd_sign" in out, err


def test_two_processes_registered_under_one_name(home, tiny_dir, capsys, registry):
    (home / "dupe.py").write_text(textwrap.dedent("""\
        from iclgd.processes import register_process
        from iclgd.processes.gd import GD

        @register_process("gd")
        class MyGD(GD):
            pass
        """))
    code, _, err = cli_run(tiny_run(tiny_dir, "--plugin", "dupe", "--settings", "zsl"), capsys)
    assert code == 2 and "Traceback" not in err and "already registered" in err


def test_ctrl_c(home, tiny_dir):
    """A real SIGINT while a sweep computes its second cell: one line, exit 130, the first cell kept.

    The second cell's training blocks (a plugin process that sleeps on the second cell's demonstrations), so the
    signal lands inside it however fast or loaded the machine is."""
    import signal
    import time

    (home / "sleepy.py").write_text(textwrap.dedent("""\
        import time
        from iclgd.processes import register_process
        from iclgd.processes.gd import GD
        seen = set()

        @register_process("sleepy")
        class Sleepy(GD):
            def grads(self, ctx, params, batch):
                seen.add(tuple(map(tuple, ctx.sequences)))
                if len(seen) > 1:  # the second cell: other demonstrations
                    open("sleeping", "w").close()
                    time.sleep(300)
                return super().grads(ctx, params, batch)
        """))
    argv = [sys.executable, "-m", "iclgd.cli", "reproduce", "--data-dir", D, "--quiet", "--model", str(tiny_dir),
            "--tasks", "sst2", "--seeds", "2,3", "--k", "2", "--eval-cap", "4", "--plugin", "sleepy",
            "--settings", "zsl,icl,sleepy[lr=0.01]", "--out", "rep"]
    # SIGINT as a terminal delivers it: a suite started in the background (`pytest &`, as CI may)
    # inherits SIGINT ignored, which Python, and so the child, would keep
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stdout:  # the first cell is finished: interrupt the second
        if line.startswith("[1/2]"):
            break
    else:
        pytest.fail(f"the sweep ended before its first cell was reported: {proc.wait()} {proc.stderr.read()}")
    for _ in range(600):  # the second cell is inside its training
        if (home / "sleeping").exists() or proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert (home / "rep" / "runs" / "tiny-llama" / "default" / "sst2_s2" / "DONE").exists()


# ---------------------------------------------------------------- double work


def test_two_reproduce_commands_share_the_work(home, tiny_dir):
    (home / "spy.py").write_text(textwrap.dedent(f"""\
        import os
        import iclgd.sweep as sweep

        _real = sweep.run

        def run(cell, *a, **kw):
            task = getattr(cell.task, "name", cell.task)
            with open({str(home / 'computed.log')!r}, "a") as f:
                f.write(f"{{task}}_s{{cell.seed}} {{os.getpid()}}\\n")
            return _real(cell, *a, **kw)

        sweep.run = run
        """))
    argv = [sys.executable, "-m", "iclgd.cli", "reproduce", "--plugin", "spy", "--model", str(tiny_dir),
            "--data-dir", D, "--quiet", "--tasks", "sst2,mr", "--seeds", "2,3", "--k", "2", "--eval-cap", "24",
            "--settings", "zsl,icl", "--out", "rep"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(home), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-1500:] for o in outs]
    cells = [line.split()[0] for line in (home / "computed.log").read_text().splitlines()]
    assert sorted(cells) == ["mr_s2", "mr_s3", "sst2_s2", "sst2_s3"]  # each exactly once


# ---------------------------------------------------------------- smaller ones


def test_csv_with_a_byte_order_mark(home, tiny_dir, capsys):
    rows = ["text,label"] + [f"sentence {i},{i % 2}" for i in range(12)]
    for split in ("train", "test"):
        (home / f"{split}.csv").write_text("\ufeff" + "\n".join(rows) + "\n", encoding="utf-8")
    (home / "t.yaml").write_text('name: t\nlocal_dir: ./{split}.csv\ntemplate: "Text: {text} Label:"\n'
                                 'label_words: ["no", "yes"]\neval_split: test\nlr: 0.001\n')
    code, _, err = cli_run(tiny_run(tiny_dir, "--task", "t.yaml", "--settings", "zsl", "--out", "r"), capsys)
    assert code == 0, err


def test_malformed_json_message_is_whole(home, tiny_dir, capsys):
    rows = ['{"text": "a", "label": 0}', '{"text": "the bad line", "label": 1', '{"text": "c", "label": 1}']
    for split in ("train", "test"):
        (home / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    (home / "t.yaml").write_text('name: t\nlocal_dir: ./{split}.jsonl\ntemplate: "Text: {text} Label:"\n'
                                 'label_words: ["no", "yes"]\neval_split: test\nlr: 0.001\n')
    code, _, err = cli_run(tiny_run(tiny_dir, "--task", "t.yaml", "--k", "1", "--settings", "zsl"), capsys)
    assert code == 2 and "line 2" in err and "column" in err and "the bad line" in err


def test_html_report_shows_provenance(home, tiny_dir, capsys):
    import torch

    code, _, err = cli_run(tiny_run(tiny_dir, "--settings", "zsl,icl", "--out", "r"), capsys)
    assert code == 0, err
    code, _, err = cli_run(["report", "r", "--out", "rep"], capsys)
    assert code == 0, err
    page = (home / "rep" / "report.html").read_text()
    assert torch.__version__.split("+")[0] in page and "command: " in page and "git commit" in page


def test_no_warnings_a_user_cannot_act_on(home, tiny_dir):
    proc = subprocess.run([sys.executable, "-m", "iclgd.cli", *tiny_run(tiny_dir, "--settings", "zsl,icl",
                                                                        "--out", "r")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Warning" not in proc.stderr, proc.stderr[-2000:]


def test_packaging_metadata_uses_an_spdx_license():
    """setuptools warns at every install about a license table; an SPDX string is the fix."""
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^license = "[A-Za-z0-9.\- ]+"$', text, re.M) and "license = {" not in text
