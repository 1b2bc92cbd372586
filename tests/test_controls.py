"""Untrained controls (SPEC §7) re-initialize exactly what they say, seeded, leaving the trained
model untouched; a sweep runs them beside the trained cells."""

from __future__ import annotations

import pytest
import torch

from iclgd import arch, sweep
from iclgd.controls import control_model, kept_parameters
from iclgd.experiment import RunConfig, run
from iclgd.plan import PlanError

from conftest import SHARED_DATA
from tiny import tiny_loaded

FAMILIES = ("llama", "gpt2", "gemma3", "xglm")


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", FAMILIES)
def test_untrained_reinitializes_every_weight_seeded(family):
    lm = tiny_loaded(family)
    before = _params(lm.model)
    a, b, c = (control_model(lm, "untrained", s).model for s in (2, 2, 3))
    pa, pb, pc = _params(a), _params(b), _params(c)
    assert {n: t.shape for n, t in pa.items()} == {n: t.shape for n, t in before.items()}
    for n, t in pa.items():
        torch.testing.assert_close(t, pb[n], rtol=0, atol=0)  # the same seed: the same model
        if t.dim() >= 2:  # every matrix is new (vectors may be initialized to 0 or 1 in both)
            assert not torch.equal(t, before[n]), n
            assert not torch.equal(t, pc[n]), n  # another seed: another model
    after = _params(lm.model)
    assert all(torch.equal(before[n], after[n]) for n in before)  # the trained model is untouched
    assert a is not lm.model


@pytest.mark.parametrize("family", FAMILIES)
def test_untrained_partial_keeps_embeddings_norms_and_unembedding(family):
    lm = tiny_loaded(family)
    before = _params(lm.model)
    ctrl = control_model(lm, "untrained-partial", 2)
    after = _params(ctrl.model)
    kept = kept_parameters(lm.model)
    final_norm = {f"{arch.arch_spec(lm.model).final_norm}.{n}" for n, _ in arch.final_norm(lm.model).named_parameters()}
    assert final_norm <= kept and any("embed" in n or "wte" in n for n in kept)
    assert set(ctrl.identity["control_kept"]) == kept
    for n, t in after.items():
        if n in kept:
            assert torch.equal(t, before[n]), n
    moved = [n for n in after if n not in kept and after[n].dim() >= 2]
    layers = arch.arch_spec(lm.model).layers
    assert moved and all(n.startswith(layers) for n in moved)  # attention and MLP weights only
    assert all(not torch.equal(after[n], before[n]) for n in moved)


def test_a_control_cell_runs_and_says_what_it_is(tmp_path):
    lm = tiny_loaded("llama")
    cfg = RunConfig(task="sst2", seed=2, k=2, eval_cap=4, data_dir=str(SHARED_DATA), progress=False, lr=0.01,
                    settings=("zsl", "icl", "gd"), control="untrained-partial")
    cell = run(cfg, loaded=lm, out=tmp_path / "c")
    assert cell.config["control"] == "untrained-partial" and cell.config["model"]["control_seed"] == 2
    trained = run(RunConfig(**{**cfg.__dict__, "control": None}), loaded=lm)
    assert not torch.equal(cell.records["zsl"].attn_out, trained.records["zsl"].attn_out)


def test_sweep_runs_controls_beside_the_trained_cells(tmp_path):
    cells = sweep.plan_cells(["sst2"], [2, 3], model="tiny-llama", k=2, settings=("zsl", "icl"), eval_cap=4,
                             data_dir=str(SHARED_DATA), lr=0.01, progress=False, root=tmp_path,
                             controls=("untrained", "untrained-partial"), control_seeds=[2])
    assert [(c.seed, c.control) for c in cells] == [(2, None), (2, "untrained"), (2, "untrained-partial"), (3, None)]
    assert [c.out.name for c in cells] == ["sst2_s2", "sst2_s2_untrained", "sst2_s2_untrained-partial", "sst2_s3"]
    assert len({str(c.decisive()) for c in cells}) == 4


def test_control_seeds_first_takes_each_tasks_own_first_seed(tmp_path):
    """Tasks have different seeds (SST-2 2-4, CB 3-5): 'first' gives every task one controlled seed."""
    cells = sweep.plan_cells(["sst2", "cb"], None, model="tiny-llama", k=2, settings=("zsl", "icl"), eval_cap=4,
                             data_dir=str(SHARED_DATA), lr=0.01, progress=False,
                             controls=("untrained",), control_seeds="first")
    assert [(c.task.name, c.seed) for c in cells if c.control] == [("sst2", 2), ("cb", 3)]
    with pytest.raises(PlanError, match="first"):
        sweep.plan_cells(["sst2"], None, model="tiny-llama", k=2, eval_cap=4, data_dir=str(SHARED_DATA),
                         controls=("untrained",), control_seeds="second")


def test_a_misspelled_control_seeds_value_names_both_forms(capsys, no_model, tmp_path):
    from iclgd import cli

    code = cli.main(["reproduce", "--controls", "--control-seeds", "frist", "--data-dir", str(SHARED_DATA),
                     "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "'frist'" in err and "'first'" in err and not (tmp_path / "o").exists()
