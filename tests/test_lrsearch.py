"""The learning-rate search (issue 14): candidates in lockstep equal candidates one by one, the
held-out criterion, the grid extension and its bound, no retraining of the winner, no eval
example in the scoring.

Tolerance of "equal": float32 with a different summation order (batched matmuls, the explicit
attention math instead of SDPA, per-candidate norms as row sums): parameter updates agree to
atol 1e-6 + rtol 1e-4, losses and gradient norms to atol 1e-5 + rtol 1e-4; the measured
differences are around 1e-6 (a candidate's largest update entry is ~1e-2).
"""

import math

import pytest
import torch

from iclgd import lrsearch
from iclgd.data import select_examples
from iclgd.errors import NonFiniteError
from iclgd.evaluate import EvalOptions
from iclgd.experiment import RunConfig, prepare, run
from iclgd.plan import resolve_cell
from iclgd.processes import PROCESSES, Process, ProcessConfig, TrainContext, TrainResult, lockstep
from iclgd.processes.gd import GD
from iclgd.protocols import Protocol

from conftest import SHARED_DATA
from tiny import tiny_loaded, tiny_model

DEMOS = [[0, 5, 9, 13, 7, 11], [0, 8, 3, 40, 12], [0, 17, 4, 4, 9, 50, 11]]
QUERIES = [[0, 5, 9, 13, 7], [0, 8, 3], [0, 17, 4, 4, 9, 50], [0, 40, 12]]
LABELS = [11, 12]
LRS = [0.02, 0.1, 0.5]
CLIPS = [(None, None), ("global_l2", 0.05), ("layer_l2", 0.03), ("value", 0.002), ("match_gd", None)]


def close(a, b, what):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m: f"{what}: {m}")


def same_training(many: TrainResult, one: TrainResult, what: str) -> None:
    for n in one.delta:
        torch.testing.assert_close(many.delta[n], one.delta[n], atol=1e-6, rtol=1e-4,
                                   msg=lambda m, n=n: f"{what} {n}: {m}")
    close(many.grad_norms, one.grad_norms, f"{what} grad norms")
    close(many.losses, one.losses, f"{what} losses")
    assert many.loss_after == pytest.approx(one.loss_after, abs=1e-5, rel=1e-4)


def one_by_one(proc, model, cfg, lrs, reference_norms=None):
    return [proc.train(TrainContext(model, DEMOS, cfg.with_(lr=lr), reference_norms=reference_norms, progress=False))
            for lr in lrs]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: 2-layer steps, one thread


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama").requires_grad_(False)


@pytest.fixture(scope="module")
def gd_norms(llama):
    """GD's gradient norms [layer, step] at one rate, halved so that match_gd clips."""
    ctx = TrainContext(llama, DEMOS, ProcessConfig(name="gd", lr=0.1), progress=False)
    return PROCESSES.get("gd")().train(ctx).grad_norms * 0.5


# ---------------------------------------------------------------- lockstep == one by one


@pytest.mark.parametrize("clip,bound", CLIPS, ids=[c or "none" for c, _ in CLIPS])
@pytest.mark.parametrize("name", ["gd", "lcgd", "lingd"])
def test_lockstep_equals_one_by_one(llama, gd_norms, name, clip, bound):
    lrs = LRS if clip is None else LRS[1:]  # clipped: two candidates keep the suite fast
    cfg = ProcessConfig(name=name, lr=lrs[0], clip=clip, clip_value=bound)
    proc = PROCESSES.get(name)()
    assert lockstep.supported(type(proc))
    ctx = TrainContext(llama, DEMOS, cfg, reference_norms=gd_norms, progress=False)
    many = proc.train_many(ctx, lrs)
    for lr, m, o in zip(lrs, many, one_by_one(proc, llama, cfg, lrs, gd_norms)):
        same_training(m, o, f"{name} clip={clip} lr={lr}")
    # the check can fail: the clip bound lies below the unclipped gradients (norms are recorded
    # before clipping), so clipping changed the update
    norms = many[-1].grad_norms  # [layer, step]
    if clip == "global_l2":
        assert norms.pow(2).sum(0).sqrt().max() > bound
    elif clip == "layer_l2":
        assert norms.max() > bound
    elif clip == "match_gd":
        assert (norms > gd_norms).any()
    elif clip == "value":
        free = proc.train(TrainContext(llama, DEMOS, cfg.with_(lr=lrs[-1], clip=None, clip_value=None),
                                       progress=False))
        assert not all(torch.allclose(free.delta[n], many[-1].delta[n]) for n in free.delta)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neo", "gemma3", "gpt_neox", "xglm"])
def test_lockstep_equals_one_by_one_in_other_families(family):
    """Fused qkv with masks (GPT-2, GPT-NeoX), GPT-Neo's own kernel, Gemma's sandwich norms and
    sliding window, XGLM's inline attention."""
    model = tiny_model(family).requires_grad_(False)
    demos = DEMOS[:2]
    for name, options in (("gd", {}), ("lcgd", {"exit": "attn"}), ("lingd", {})):
        cfg = ProcessConfig(name=name, lr=LRS[0], options=options)
        proc = PROCESSES.get(name)()
        many = proc.train_many(TrainContext(model, demos, cfg, progress=False), LRS[:2])
        for lr, m in zip(LRS, many):
            o = proc.train(TrainContext(model, demos, cfg.with_(lr=lr), progress=False))
            same_training(m, o, f"{family} {name} lr={lr}")


def test_lockstep_full_batch_and_lcgd_attention_exit(llama):
    for name, extra in (("gd", dict(full_batch=True)), ("lcgd", dict(options={"exit": "attn"}))):
        cfg = ProcessConfig(name=name, lr=LRS[0], **extra)
        proc = PROCESSES.get(name)()
        many = proc.train_many(TrainContext(llama, DEMOS, cfg, progress=False), LRS)
        for lr, m, o in zip(LRS, many, one_by_one(proc, llama, cfg, LRS)):
            same_training(m, o, f"{name} {extra} lr={lr}")


def test_lockstep_in_bfloat16_equals_one_by_one_to_bf16_precision():
    """The GPU path's dtype: the learning rate is applied in float, as `lr * g` with a Python number
    does, so only the batched products' rounding differs."""
    model = tiny_model("llama").to(torch.bfloat16).requires_grad_(False)
    for name in ("gd", "lcgd", "lingd"):
        cfg = ProcessConfig(name=name, lr=LRS[1], clip="global_l2", clip_value=0.05)
        proc = PROCESSES.get(name)()
        many = proc.train_many(TrainContext(model, DEMOS, cfg, progress=False), LRS[1:])
        for m, o in zip(many, one_by_one(proc, model, cfg, LRS[1:])):
            for n in o.delta:
                assert m.delta[n].dtype == torch.bfloat16
                rel = (m.delta[n].float() - o.delta[n].float()).norm() / o.delta[n].float().norm()
                assert rel < 0.02, (name, n, float(rel))  # bf16 keeps ~3 significant digits


@pytest.mark.parametrize("name", ["gd", "lingd"])
def test_a_diverging_candidate_stops_alone_with_the_error_train_raises(llama, name):
    lrs = [0.1, 1e37]  # 1e37 makes GD's gradient (step 2) and LinGD's loss (step 1) non-finite
    cfg = ProcessConfig(name=name, lr=lrs[0])
    proc = PROCESSES.get(name)()
    many = proc.train_many(TrainContext(llama, DEMOS, cfg, progress=False), lrs)
    assert isinstance(many[1], NonFiniteError)
    with pytest.raises(NonFiniteError) as alone:
        proc.train(TrainContext(llama, DEMOS, cfg.with_(lr=lrs[1]), progress=False))
    assert str(many[1]) == str(alone.value)
    same_training(many[0], one_by_one(proc, llama, cfg, lrs[:1])[0], f"{name} survivor")


class SignGD(GD):
    """The README's plugin: GD's gradient replaced by its sign (not registered here)."""

    name = "gd_sign"

    def grads(self, ctx, params, batch):
        loss, grads = super().grads(ctx, params, batch)
        return loss, {n: g.sign() for n, g in grads.items()}


def test_a_plugin_overriding_grads_trains_its_candidates_one_by_one(llama, monkeypatch):
    assert not lockstep.supported(SignGD) and lockstep.supported(GD)
    calls = []
    monkeypatch.setattr(SignGD, "train", lambda self, ctx: calls.append(ctx.config.lr) or GD.train(self, ctx))
    assert not lockstep.supported(SignGD)  # an overridden train also falls back
    cfg = ProcessConfig(name="gd_sign", lr=LRS[0])
    many = SignGD().train_many(TrainContext(llama, DEMOS, cfg, progress=False), LRS)
    assert calls == LRS
    for lr, m in zip(LRS, many):
        want = GD.train(SignGD(), TrainContext(llama, DEMOS, cfg.with_(lr=lr), progress=False))
        for n in want.delta:
            assert torch.equal(m.delta[n], want.delta[n])
        d = next(iter(want.delta.values()))
        assert d.abs().max() == pytest.approx(lr * len(DEMOS))  # signs: every step moves by lr


@pytest.mark.parametrize("name", ["gd", "lcgd", "lingd"])
def test_batched_scoring_equals_evaluate_per_candidate(llama, name):
    proc = PROCESSES.get(name)()
    ctx = TrainContext(llama, DEMOS, ProcessConfig(name=name, lr=LRS[0]), progress=False)
    results = proc.train_many(ctx, LRS)
    scored = proc.score_many(ctx, results, QUERIES, LABELS, prefix=[], batch_size=3, pad_id=2)  # [cand, batch, label]
    assert scored.shape == (len(LRS), len(QUERIES), len(LABELS))
    for c, r in enumerate(results):
        rec = proc.evaluate(ctx, r, QUERIES, [0] * len(QUERIES), LABELS, options=EvalOptions(progress=False), pad_id=2)
        torch.testing.assert_close(scored[c], rec.label_logprobs, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(scored[0], scored[-1])  # the candidates differ


def test_first_order_many_equals_first_order_per_candidate(llama):
    """The primal once and every candidate's tangent, for every recorded quantity of an eval batch."""
    from iclgd.capture import Plan, use_iclgd_attention
    from iclgd.dual import first_order, first_order_many
    from iclgd.evaluate import pad_right, run_captured

    use_iclgd_attention(llama)
    ids, mask = pad_right(QUERIES, 2)
    lens = torch.tensor([len(q) for q in QUERIES])
    plan = Plan(own_start=torch.ones(len(QUERIES), dtype=torch.long), own_len=lens - 1, pred_pos=lens - 1, math=True)
    ctx = TrainContext(llama, DEMOS, ProcessConfig(name="lingd", lr=0.1), progress=False)
    gen = torch.Generator().manual_seed(0)
    deltas = {n: 0.05 * torch.randn((3, *p.shape), generator=gen) for n, p in ctx.theta0.items()}

    def fn(p):
        return run_captured(llama, p, ids, mask, plan)

    with torch.no_grad():
        primal, tangent = first_order_many(fn, ctx.theta0, deltas)
        for c in range(3):
            p1, t1 = first_order(fn, ctx.theta0, {n: d[c] for n, d in deltas.items()})
            for k in p1:
                torch.testing.assert_close(primal[k], p1[k], equal_nan=True, atol=0, rtol=0)  # the same primal
                torch.testing.assert_close(tangent[k][c], t1[k], equal_nan=True, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(tangent["logits"][0], tangent["logits"][1])


# ---------------------------------------------------------------- the criterion and the grid


def test_heldout_logprob_is_the_renormalized_gold_log_probability():
    p = torch.tensor([[0.2, 0.2], [0.1, 0.3]])  # probabilities of the label words, over the vocabulary
    lp = p.log()[None]  # [cand 1, batch 2, label 2]
    want = (math.log(0.5) + math.log(0.75)) / 2  # gold 0 then 1: 0.2/0.4 and 0.3/0.4
    assert float(lrsearch.heldout_logprob(lp, torch.tensor([0, 1]))[0]) == pytest.approx(want)
    bad = lp.clone()
    bad[0, 0, 0] = math.nan
    assert lrsearch.heldout_logprob(bad, torch.tensor([0, 1]))[0] == -math.inf


REF = 5e-4  # sst2's reference rate


class FakeSearch(Process):
    """Training does nothing; each rate's held-out label log-probabilities come from `table`."""

    name = "fake"
    calls: list = []

    def train_many(self, ctx, lrs):
        FakeSearch.calls.append(list(lrs))
        return [TrainResult({"lr": torch.tensor(lr, dtype=torch.float64)}, torch.zeros(1, 1), torch.zeros(1))
                for lr in lrs]

    def score_many(self, ctx, results, queries, label_ids, **kw):
        return torch.stack([self.table(float(r.delta["lr"]) / REF) for r in results])


def _search(monkeypatch, table, grid=(1 / 3, 1.0, 3.0), extend=2, margin=1.0):
    """choose_lr on the tiny model's sst2 cell, scores from `table(multiple, gold) -> [batch, label]`
    log-probabilities on the cell's real held-out examples."""
    proto = Protocol(name="t", lr_grid=grid, lr_search_n=8, lr_extend=extend, lr_extend_margin=margin)
    loaded = tiny_loaded("llama")
    plan = resolve_cell(RunConfig(task="sst2", seed=2, k=4, eval_cap=6, data_dir=str(SHARED_DATA), progress=False,
                                  settings=("gd",), protocol=proto))
    gold = lrsearch.held_out_prompts(plan, loaded.tokenizer, 8, start=0)[1]
    FakeSearch.calls = []
    FakeSearch.table = staticmethod(lambda mult: table(mult, gold))
    monkeypatch.setattr(lrsearch, "PROCESSES", {"gd": FakeSearch})
    monkeypatch.setattr(lrsearch, "TrainContext", lambda *a, **k: None)
    return lrsearch.choose_lr(plan.setting("gd"), prepare(plan, loaded), loaded)


def _two_labels(gold, p_gold):
    """[batch, label] log-probabilities with p_gold[i] on example i's gold label (x 0.01: the
    label words hold 1% of the vocabulary's mass, so the criterion must renormalize)."""
    lp = torch.empty(len(gold), 2)
    for i, (g, p) in enumerate(zip(gold, p_gold)):
        lp[i, g], lp[i, 1 - g] = math.log(p * 0.01), math.log((1 - p) * 0.01)
    return lp


def test_the_criterion_breaks_an_accuracy_tie(monkeypatch):
    """Every rate gets the same examples right (accuracy ties); the one that puts the most
    probability on the gold labels wins, though it is not the multiple closest to 1 (the old
    tie-break) and sits at the grid's edge, so the grid extends once and the extension loses."""
    when_right = {1 / 3: 0.6, 1.0: 0.7, 3.0: 0.9, 9.0: 0.8}

    def table(mult, gold):
        p = when_right[min(when_right, key=lambda m: abs(math.log(m / mult)))]
        return _two_labels(gold, [p if i % 4 else 0.45 for i in range(len(gold))])  # every 4th wrong

    choice = _search(monkeypatch, table)
    assert len(set(choice.accuracy.values())) == 1  # accuracy ties among every candidate
    assert choice.lr == pytest.approx(3.0 * REF) and choice.reason == "extended past the edge"
    assert choice.extensions == 1 and FakeSearch.calls[1] == [pytest.approx(9.0 * REF)]
    info = choice.info()
    assert info["lr_search_winner"] == choice.lr and info["lr_search_reason"] == "extended past the edge"
    assert set(info["lr_search"]) == {f"{m * REF:.6g}" for m in (1 / 3, 1.0, 3.0, 9.0)}
    assert info["lr_search"][f"{3 * REF:.6g}"] == max(info["lr_search"].values())
    se = info["lr_search_paired_se"]  # the winner against itself: no difference, no error
    assert se[f"{3 * REF:.6g}"] == 0 and all(v > 0 for k, v in se.items() if k != f"{3 * REF:.6g}")
    assert info["lr_search_criterion"] == lrsearch.CRITERION


def _monotone(direction):
    """Held-out log-probabilities that rise with the rate (direction 1) or fall with it (-1)."""
    def table(mult, gold):
        return _two_labels(gold, [1 / (1 + mult ** -direction)] * len(gold))
    return table


@pytest.mark.parametrize("direction", [1, -1])
@pytest.mark.parametrize("extend", [0, 2])
def test_the_extended_grid_stops_at_its_bound(monkeypatch, direction, extend):
    choice = _search(monkeypatch, _monotone(direction), extend=extend)
    ratio = edge = 3.0 if direction == 1 else 1 / 3
    assert len(FakeSearch.calls) == 1 + extend  # the grid in lockstep, then one rate per extension
    assert [c for call in FakeSearch.calls[1:] for c in call] == pytest.approx(
        [REF * edge * ratio ** (i + 1) for i in range(extend)])
    assert choice.lr == pytest.approx(REF * edge * ratio**extend)
    assert choice.reason == "bound reached" and choice.extensions == extend
    assert len(choice.scores) == 3 + extend


def test_an_edge_winner_within_noise_of_its_neighbour_is_not_extended(monkeypatch):
    """The lowest rate wins by a hair, well inside the paired noise: no extension (the margin);
    with margin 0 the same scores extend."""
    patterns = ([1, -1] * 4, [1, 1, -1, -1] * 2, [1, -1, -1, 1] * 2)  # the same values, paired differently

    def noisy(mult, gold):  # each step down gains 0.001 in probability; examples differ by ±0.1
        step = round(math.log(mult, 3))  # -3 .. 1
        signs = patterns[step % 3]
        return _two_labels(gold, [0.65 + 0.1 * z - 0.001 * step for z in signs])

    choice = _search(monkeypatch, noisy)
    assert choice.lr == pytest.approx(REF / 3) and choice.extensions == 0
    assert choice.reason == "at the edge, within noise of its neighbour" and len(FakeSearch.calls) == 1
    choice = _search(monkeypatch, noisy, margin=0.0)
    assert choice.extensions == 2 and choice.reason == "bound reached"


def test_a_winner_inside_the_grid_is_not_extended(monkeypatch):
    def peaked(mult, gold):  # best at the reference rate
        return _two_labels(gold, [0.5 + 0.4 / (1 + abs(math.log(mult)))] * len(gold))

    choice = _search(monkeypatch, peaked)
    assert choice.lr == pytest.approx(REF) and choice.reason == "best held-out log-prob" and choice.extensions == 0
    assert len(FakeSearch.calls) == 1


# ---------------------------------------------------------------- the search inside a cell


@pytest.fixture(scope="module")
def loaded():
    return tiny_loaded("llama")


def test_the_winner_is_trained_once_and_its_weights_are_evaluated(loaded, monkeypatch):
    trained, evaluated, singles, inside = [], [], [], []
    train_many, evaluate, train = Process.train_many, Process.evaluate, Process.train

    def spy_many(self, ctx, lrs):
        inside.append(True)
        try:
            out = train_many(self, ctx, lrs)
        finally:
            inside.pop()
        trained.extend(zip(lrs, out))
        return out

    def spy_eval(self, ctx, result, *a, **k):
        evaluated.append(result)
        return evaluate(self, ctx, result, *a, **k)

    monkeypatch.setattr(Process, "train_many", spy_many)
    monkeypatch.setattr(Process, "evaluate", spy_eval)
    monkeypatch.setattr(Process, "train", lambda self, ctx: singles.append((ctx.config.lr, bool(inside)))
                        or train(self, ctx))
    proto = Protocol(name="t", lr_grid=(1 / 3, 1.0, 3.0), lr_search_n=8, lr_extend=1)
    cell = run(RunConfig(task="sst2", seed=2, k=4, eval_cap=6, data_dir=str(SHARED_DATA), progress=False,
                         settings=("gd",), protocol=proto), loaded=loaded)
    res = cell.results["gd"]
    # the search trains through train_many only (a single extension rate through train, inside
    # it), and the cell reuses its winner: nothing trains outside the search
    assert all(within for _, within in singles)
    lrs = [lr for lr, _ in trained]
    assert len(lrs) == len(set(lrs)) == len(res["options"]["lr_search"])  # every rate trained exactly once
    winner = dict(trained)[res["lr"]]
    assert len(evaluated) == 1 and evaluated[0] is winner
    assert res["options"]["lr_search_reason"] in lrsearch.REASONS.values()


def test_the_search_scores_held_out_examples_never_eval_ones(loaded, monkeypatch):
    seen = {}
    real = lrsearch.held_out

    def spy(*args, **kwargs):
        seen.update(kwargs)
        seen["rows"] = real(*args, **kwargs)
        return seen["rows"]

    monkeypatch.setattr(lrsearch, "held_out", spy)
    proto = Protocol(name="t", lr_grid=(1.0, 3.0), lr_search_n=8, lr_extend=0, eval_seed=7)
    cfg = RunConfig(task="sst2", seed=2, k=4, eval_cap=6, data_dir=str(SHARED_DATA), progress=False,
                    settings=("gd",), protocol=proto)
    cell = run(cfg, loaded=loaded)
    assert seen["eval_cap"] == 6 and seen["eval_seed"] == 7  # the cell's, not held_out's defaults
    sel = select_examples("sst2", 2, 4, str(SHARED_DATA), eval_cap=6, eval_seed=7)
    ids = {e.id for e in seen["rows"]}
    assert len(ids) == 8 and not ids & {e.id for e in sel.eval} and not ids & {e.id for e in sel.demos}
    assert cell.results["gd"]["options"]["lr_search_n"] == 8
