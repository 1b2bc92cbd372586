"""One cell end to end on a tiny model and the real offline data: run folder, invariants, errors."""

import json

import numpy as np
import pytest
import torch

from iclgd import metrics
from iclgd.cli import main
from iclgd.errors import IclgdError, PromptError
from iclgd.evaluate import Record
from iclgd.experiment import RunConfig, run
from iclgd.plan import PlanError, resolve_cell, split_settings
from iclgd.protocols import Protocol
from iclgd.runfolder import safe_name

from conftest import SHARED_DATA
from tiny import tiny_loaded

FAST = dict(task="sst2", seed=2, k=4, eval_cap=6, data_dir=str(SHARED_DATA), progress=False, lr=0.05)


@pytest.fixture(scope="module")
def loaded():
    return tiny_loaded("llama")


@pytest.fixture(scope="module")
def cell(loaded, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "cell"
    cfg = RunConfig(settings=("zsl", "icl", "gd", "lcgd", "lingd", "lcgd[clip=match_gd]"), **FAST)
    return run(cfg, loaded=loaded, out=out)


def test_run_folder_describes_itself(cell):
    path = cell.path
    assert (path / "DONE").exists()
    config = json.loads((path / "config.json").read_text())
    assert config["task"]["name"] == "sst2" and config["seed"] == 2 and config["k"] == 4
    assert config["protocol"]["name"] == "default"
    assert config["provenance"]["versions"]["torch"] in torch.__version__
    demos = [json.loads(line) for line in (path / "demos.jsonl").read_text().splitlines()]
    evals = [json.loads(line) for line in (path / "eval.jsonl").read_text().splitlines()]
    assert len(demos) == 4 and len(evals) == 6
    assert [e["gold"] for e in evals] == cell.records["zsl"].gold.tolist()
    results = json.loads((path / "results.json").read_text())
    for setting in config["settings"]:
        rec = Record.load(path / "records" / f"{safe_name(setting)}.npz")
        assert rec.attn_out.shape[:2] == (6, 2)
        assert abs(results[setting]["accuracy"] - rec.accuracy) < 1e-9
        assert results[setting]["peak_mem_mb"] > 0 and results[setting]["wall_s"] > 0
        if results[setting]["process"]:
            assert rec.extras["grad_norms"].shape == (2, 4)


def test_metric_recomputed_independently_from_raw_arrays(cell):
    """SimAOU (normalized) of GD from the npz files with numpy only == metrics.simaou."""
    arrays = {s: np.load(cell.path / "records" / f"{safe_name(s)}.npz") for s in ("zsl", "icl", "gd")}

    def unit(h):
        return h / np.linalg.norm(h, axis=-1, keepdims=True)

    z, i, g = (unit(arrays[s]["attn_out"].astype(np.float64)) for s in ("zsl", "icl", "gd"))
    a, b = i - z, g - z
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))  # [N, L]
    recs = {s: cell.records[s] for s in ("zsl", "icl", "gd")}
    got = metrics.simaou(recs["icl"].attn_out, recs["zsl"].attn_out, recs["gd"].attn_out)
    np.testing.assert_allclose(got.numpy(), cos, rtol=1e-5, atol=1e-6)


def test_match_gd_clipping_bounded_by_gd_norms(cell):
    gd = cell.records["gd"].extras["grad_norms"]
    assert cell.results["lcgd[clip=match_gd]"]["options"]["clip"] == "match_gd"
    lcgd = cell.records["lcgd"].extras["grad_norms"]
    assert (lcgd > gd).any()  # LCGD's raw gradients are larger somewhere, so clipping matters


def test_icl_with_k0_is_zsl_through_the_api(loaded):
    cell = run(RunConfig(settings=("zsl", "icl"), **{**FAST, "k": 0}), loaded=loaded)
    z, i = cell.records["zsl"], cell.records["icl"]
    assert torch.equal(z.attn_out, i.attn_out) and torch.equal(z.label_logprobs, i.label_logprobs)


def test_label_switch_changes_every_demo_label(loaded):
    cell = run(RunConfig(settings=("zsl",), label_switch=True, **FAST), loaded=loaded)
    assert all(d["label"] != d["gold"] for d in cell.demos)


def test_lr_search_uses_held_out_train_examples(loaded):
    proto = Protocol(name="t", lr_grid=(0.1, 1.0), lr_search_n=8, lr_extend=0)
    cfg = RunConfig(settings=("gd",), protocol=proto, **{**FAST, "lr": None})
    cell = run(cfg, loaded=loaded)
    opts = cell.results["gd"]["options"]
    assert opts["lr_source"] == "search" and set(opts["lr_search"]) == {"5e-05", "0.0005"}
    assert opts["lr"] in (5e-4 * 0.1, 5e-4 * 1.0) and cell.results["gd"]["lr"] == opts["lr"]
    assert opts["lr_search_reason"] == "bound reached"  # two rates: the winner is at an edge


def test_settings_parsing():
    assert split_settings("zsl,icl,lcgd[clip=layer_l2:1,exit=attn]") == ["zsl", "icl", "lcgd[clip=layer_l2:1,exit=attn]"]
    plan = resolve_cell(RunConfig(settings="lcgd[exit=attn],gd[clip=value:12,lr=1e-3,full_batch=1]", **FAST),
                        check_data=False)
    lc, gd = plan.setting("lcgd[exit=attn]"), plan.setting("gd[clip=value:12,lr=1e-3,full_batch=1]")
    assert dict(lc.options) == {"exit": "attn"} and lc.lr.lr == 0.05 and lc.lr.source == "run"
    assert (gd.clip, gd.clip_value, gd.lr.lr, gd.lr.source, gd.full_batch) == ("value", 12.0, 1e-3, "setting", True)
    with pytest.raises(PlanError, match="did you mean 'lcgd'"):
        resolve_cell(RunConfig(settings="lcdg", **FAST), check_data=False)
    with pytest.raises(PlanError, match="takes no options"):
        resolve_cell(RunConfig(settings="zsl[lr=1]", **FAST), check_data=False)


def test_prompt_longer_than_context_names_example_and_lengths(loaded):
    with pytest.raises(PromptError, match=r"\d+.*\d+"):
        run(RunConfig(settings=("zsl", "icl"), **{**FAST, "k": 64}), loaded=loaded)


def test_dai2023_drops_demonstrations_that_do_not_fit_for_icl_only(loaded, caplog):
    """The reference rule: where the default protocol refuses (test above), ICL keeps what fits."""
    cell = run(RunConfig(settings=("zsl", "icl"), protocol="dai2023", **{**FAST, "k": 64}), loaded=loaded)
    kept = cell.results["icl"]["options"]["n_demos"]
    assert 0 < kept < 64 and "ICL keeps" in caplog.text
    assert len(cell.demos) == 64  # the processes would still train on all of them


def test_empty_eval_set_is_an_error(loaded):
    with pytest.raises(IclgdError):
        run(RunConfig(settings=("zsl",), **{**FAST, "eval_cap": 0}), loaded=loaded)


def test_cli_bad_names_exit_2_with_hint(capsys):
    assert main(["run", "--task", "sst3", "--quiet"]) == 2
    assert "'sst2'" in capsys.readouterr().err
    assert main(["run", "--task", "sst2", "--settings", "zsl,lcdg", "--quiet"]) == 2
    assert "did you mean 'lcgd'" in capsys.readouterr().err
    assert main(["run", "--protocol", "dai2024", "--quiet"]) == 2
    assert "dai2023" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3", "xglm"])
def test_start_token_begins_every_sequence_and_is_never_recorded_or_a_target(family):
    """SPEC §3 on every kind of setting: the start token is at position 0 of the ICL prefix, of
    the ZSL/process queries and of each training sequence; recorded logits cover the query's own
    tokens only; the training loss predicts tokens 1..n (the first real token is a target)."""
    from iclgd.experiment import prepare
    from iclgd.plan import resolve_cell
    from iclgd.processes.base import token_loss

    from tiny import tiny_loaded

    lm = tiny_loaded(family)
    cell = run(RunConfig(settings=("zsl", "icl", "gd"), **{**FAST, "k": 2, "eval_cap": 4}), loaded=lm)
    prep = prepare(resolve_cell(RunConfig(settings=("zsl", "icl", "gd"), **{**FAST, "k": 2, "eval_cap": 4})), lm)
    start = cell.config["prompts"]["start_token"]
    assert prep.prompts.bos == (start,) and prep.prompts.icl_prefix()[0] == start
    assert all(seq[0] == start and start not in seq[1:2] for seq in prep.train_seqs)
    own = [len(q) for q in prep.prompts.queries]
    for s in ("zsl", "icl", "gd"):
        assert cell.records[s].q_len.tolist() == own  # the start token is never a recorded key
    seq = torch.tensor(prep.train_seqs[0])
    logits = torch.randn(len(seq), 7).log_softmax(-1)
    seq7 = seq % 7
    manual = -torch.stack([logits[t, seq7[t + 1]] for t in range(len(seq) - 1)]).mean()
    torch.testing.assert_close(token_loss(logits, seq7), manual)  # targets are tokens 1..n
