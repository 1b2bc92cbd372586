"""Optimization processes against hand-written references and invariants (SPEC §1)."""

import pytest
import torch

from iclgd import arch
from iclgd.errors import IclgdError, NonFiniteError, UnknownNameError
from iclgd.evaluate import EvalOptions, evaluate
from iclgd.processes import PROCESSES, ProcessConfig, TrainContext
from iclgd.processes.base import clip, layer_norms, non_finite_layers
from iclgd.processes.lcgd import layer_causal

from tiny import FAMILIES, tiny_model

DEMOS = [[0, 5, 9, 13, 7, 11], [0, 8, 3, 40, 12], [0, 17, 4, 4, 9, 50, 11]]
QUERIES = [[5, 9, 13, 7], [8, 3], [17, 4, 4, 9, 50]]
LABELS = [11, 12]
QUIET = EvalOptions(progress=False)


def train(model, name, lr=0.05, **kw):
    cfg = ProcessConfig(name=name, lr=lr, **{k: v for k, v in kw.items() if k != "reference_norms"})
    ctx = TrainContext(model, DEMOS, cfg, reference_norms=kw.get("reference_norms"), progress=False)
    proc = PROCESSES.get(name)()
    return proc, ctx, proc.train(ctx)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_gd_equals_hand_written_sgd(family):
    model = tiny_model(family)
    _, ctx, result = train(model, "gd", lr=0.1)
    # Reference: a plain torch SGD loop on a deep copy, k/v parameters only, batch size 1.
    ref = tiny_model(family)
    names = {tp.name: tp.mask for tp in arch.trainable_params(ref, "kv")}
    named = dict(ref.named_parameters())
    for p in ref.parameters():
        p.requires_grad_(False)
    for n in names:
        named[n].requires_grad_(True)
    opt = torch.optim.SGD([named[n] for n in names], lr=0.1, momentum=0.0)
    for seq in DEMOS:
        ids = torch.tensor([seq])
        loss = ref(ids, labels=ids).loss  # HF's shifted token cross-entropy, mean over tokens
        opt.zero_grad()
        loss.backward()
        for n, mask in names.items():
            if mask is not None:
                named[n].grad *= mask
        opt.step()
    for n in names:
        torch.testing.assert_close(ctx.theta0[n] + result.delta[n], named[n].detach(), atol=1e-5, rtol=1e-4)
    assert result.grad_norms.shape == (2, len(DEMOS)) and (result.grad_norms > 0).all()


@pytest.mark.parametrize("name", ["gd", "lcgd", "lingd"])
def test_lr_zero_reproduces_zsl_exactly(name):
    model = tiny_model("llama")
    zsl = evaluate(model, QUERIES, [0, 1, 0], LABELS, prefix=[0], options=QUIET)
    proc, ctx, result = train(model, name, lr=0.0)
    rec = proc.evaluate(ctx, result, QUERIES, [0, 1, 0], LABELS, prefix=[0], options=QUIET)
    for key in ("label_logprobs", "attn_out", "attn_logits"):
        torch.testing.assert_close(getattr(rec, key), getattr(zsl, key), equal_nan=True, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("exit", ["block", "attn"])
def test_lcgd_layer_gradient_ignores_layers_above(family, exit):
    """Layer 0's LCGD gradient is unchanged when every parameter of layer 1 changes."""
    model = tiny_model(family)
    cfg = ProcessConfig(name="lcgd", lr=0.1, options={"exit": exit})
    ctx = TrainContext(model, DEMOS, cfg, progress=False)
    proc = PROCESSES.get("lcgd")()
    ids = [torch.tensor(DEMOS[0])]
    params = {n: p.clone().requires_grad_(True) for n, p in ctx.theta0.items()}
    _, g_before = proc.grads(ctx, params, ids)
    with torch.no_grad():  # perturb everything in block 1, not only the trained parameters
        for p in arch.decoder_layers(model)[1].parameters():
            p.add_(torch.randn_like(p) * 0.5)
    params2 = {n: p.clone().requires_grad_(True) for n, p in ctx.theta0.items()}
    _, g_after = proc.grads(ctx, params2, ids)
    for n in g_before:
        if ctx.layer_of[n] == 0:
            torch.testing.assert_close(g_before[n], g_after[n], atol=1e-6, rtol=1e-5)
        else:
            assert not torch.allclose(g_before[n], g_after[n])  # the check can fail


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3", "xglm"])
def test_lcgd_loss_is_the_sum_of_every_exits_token_loss(family):
    """Reference: each block's output from output_hidden_states through the final norm and the
    unembedding, one token loss per layer, summed; the last block's exit is the model's own logits."""
    model = tiny_model(family)
    ctx = TrainContext(model, DEMOS, ProcessConfig(name="lcgd", lr=0.1), progress=False)
    ids = torch.tensor(DEMOS[2])
    params = {n: p.clone().requires_grad_(True) for n, p in ctx.theta0.items()}
    loss, _ = PROCESSES.get("lcgd")().grads(ctx, params, [ids])
    with torch.no_grad():
        out = model(ids[None], output_hidden_states=True)
    norm, head = arch.final_norm(model), arch.unembed(model)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    want = torch.nn.functional.cross_entropy(out.logits[0, :-1], ids[1:])
    for h in out.hidden_states[1:-1]:  # blocks 0 .. L-2 (the last entry is already normed)
        logits = head(norm(h))[0]
        logits = logits if softcap is None else torch.tanh(logits / softcap) * softcap
        want = want + torch.nn.functional.cross_entropy(logits[:-1], ids[1:])
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("exit", ["block", "attn"])
def test_lcgd_gradient_does_not_depend_on_how_exits_are_grouped(monkeypatch, exit):
    """Exits back-propagated one layer at a time == all layers at once."""
    from iclgd.processes import lcgd

    model = tiny_model("llama")
    ctx = TrainContext(model, DEMOS, ProcessConfig(name="lcgd", lr=0.1, options={"exit": exit}), progress=False)
    out = []
    for budget in (1, 2**40):
        monkeypatch.setattr(lcgd, "EXIT_CHUNK_BYTES", budget)
        params = {n: p.clone().requires_grad_(True) for n, p in ctx.theta0.items()}
        out.append(PROCESSES.get("lcgd")().grads(ctx, params, [torch.tensor(d) for d in DEMOS]))
    torch.testing.assert_close(out[0][0], out[1][0])
    for n in out[0][1]:
        torch.testing.assert_close(out[0][1][n], out[1][1][n], atol=1e-6, rtol=1e-5)
    assert all(g.abs().sum() > 0 for g in out[0][1].values())


def test_gd_gradient_does_depend_on_layers_above():
    """The contrast that makes the LCGD test meaningful."""
    model = tiny_model("llama")
    ctx = TrainContext(model, DEMOS, ProcessConfig(name="gd", lr=0.1), progress=False)
    proc = PROCESSES.get("gd")()
    params = {n: p.clone().requires_grad_(True) for n, p in ctx.theta0.items()}
    _, g0 = proc.grads(ctx, params, [torch.tensor(DEMOS[0])])
    with torch.no_grad():
        for p in arch.decoder_layers(model)[1].parameters():
            p.add_(torch.randn_like(p) * 0.5)
    _, g1 = proc.grads(ctx, params, [torch.tensor(DEMOS[0])])
    layer0 = [n for n in g0 if ctx.layer_of[n] == 0]
    assert any(not torch.allclose(g0[n], g1[n]) for n in layer0)


def test_layer_causal_hooks_leave_nothing_behind():
    model = tiny_model("gpt2")
    with layer_causal(model, "block") as exits:
        model(torch.tensor([DEMOS[0]]))
    assert all(e is not None for e in exits)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_lingd_agrees_with_gd_to_first_order():
    """For a small step, LinGD's trained update approaches GD's; the gap shrinks like lr²."""
    model = tiny_model("llama")
    gaps = []
    for lr in (1e-2, 5e-3):
        _, _, gd = train(model, "gd", lr=lr)
        _, _, lin = train(model, "lingd", lr=lr)
        gaps.append(max((gd.delta[n] - lin.delta[n]).abs().max().item() for n in gd.delta))
        # The first step is taken at θ0, where f_lin and f have the same gradient.
        torch.testing.assert_close(gd.grad_norms[:, 0], lin.grad_norms[:, 0], atol=1e-5, rtol=1e-4)
    assert gaps[1] < gaps[0] / 3


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lingd_gradient_equals_a_torch_func_reference(family):
    """LinGD's step gradient at θ0 + Δ is Jᵀ·∇loss(f(θ0) + J·Δ): checked against torch.func's
    jvp and vjp of the plain model (SDPA attention), away from θ0 where f_lin and f differ."""
    from torch.func import functional_call, jvp, vjp

    from iclgd.capture import math_mode
    from iclgd.processes.base import token_loss

    model = tiny_model(family)
    proc = PROCESSES.get("lingd")()
    ctx = TrainContext(model, DEMOS, ProcessConfig(name="lingd", lr=0.1), progress=False)
    gen = torch.Generator().manual_seed(3)
    delta = {n: torch.randn(p.shape, generator=gen) * 0.05 * (ctx.masks.get(n, 1)) for n, p in ctx.theta0.items()}
    params = {n: (ctx.theta0[n] + delta[n]).requires_grad_(True) for n in delta}
    ids = torch.tensor(DEMOS[2])
    loss, got = proc.grads(ctx, params, [ids])

    def f(p):
        return functional_call(model, p, (ids[None],), {"use_cache": False}, strict=False).logits[0]

    with math_mode(model):  # SDPA has no forward-mode derivative; math == SDPA is tested elsewhere
        f0, jd = jvp(f, (ctx.theta0,), (delta,))
    lin = (f0 + jd).requires_grad_(True)
    want_loss = token_loss(lin, ids)
    (g,) = torch.autograd.grad(want_loss, lin)
    (want,) = vjp(f, ctx.theta0)[1](g)  # the backward runs through SDPA
    torch.testing.assert_close(loss, want_loss.detach(), atol=1e-5, rtol=1e-5)
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=1e-4)
    assert float(loss) != pytest.approx(float(token_loss(f(params), ids).detach()), abs=1e-4)  # f_lin != f here


def _grads(seed=0):
    model = tiny_model("llama")
    ctx = TrainContext(model, DEMOS, ProcessConfig(name="gd", lr=0.1), progress=False)
    gen = torch.Generator().manual_seed(seed)
    return ctx, {n: torch.randn(p.shape, generator=gen) * 3 for n, p in ctx.theta0.items()}


def test_clip_value_bounds_every_entry():
    ctx, g = _grads()
    out = clip(g, ProcessConfig(name="gd", lr=0.1, clip="value", clip_value=0.5), ctx, 0)
    assert max(v.abs().max().item() for v in out.values()) <= 0.5
    small = {n: v for n, v in g.items()}
    assert any((v.abs() < 0.5).any() for v in small.values())
    for n in g:  # entries inside the bound are untouched
        inside = g[n].abs() <= 0.5
        assert torch.equal(out[n][inside], g[n][inside])


def test_clip_global_l2_bounds_total_norm_and_keeps_direction():
    ctx, g = _grads()
    out = clip(g, ProcessConfig(name="gd", lr=0.1, clip="global_l2", clip_value=1.0), ctx, 0)
    total = torch.sqrt(sum(v.pow(2).sum() for v in out.values()))
    assert abs(total.item() - 1.0) < 1e-5
    ratio = {n: (out[n] / g[n]).flatten() for n in g}
    common = next(iter(ratio.values()))[0]
    assert all(torch.allclose(r, common) for r in ratio.values())


def test_clip_layer_l2_bounds_each_layer():
    ctx, g = _grads()
    out = clip(g, ProcessConfig(name="gd", lr=0.1, clip="layer_l2", clip_value=0.7), ctx, 0)
    norms = layer_norms(out, ctx.layer_of, ctx.n_layers)
    torch.testing.assert_close(norms, torch.full_like(norms, 0.7), atol=1e-5, rtol=1e-5)


def test_clip_match_gd_uses_gd_norm_at_same_layer_and_step():
    ctx, g = _grads()
    ctx.reference_norms = torch.tensor([[0.1, 100.0], [0.2, 100.0]])  # [layer, step]
    cfg = ProcessConfig(name="lcgd", lr=0.1, clip="match_gd")
    out0 = layer_norms(clip(g, cfg, ctx, 0), ctx.layer_of, ctx.n_layers)
    torch.testing.assert_close(out0, torch.tensor([0.1, 0.2]), atol=1e-5, rtol=1e-5)
    out1 = layer_norms(clip(g, cfg, ctx, 1), ctx.layer_of, ctx.n_layers)  # bound above: unchanged
    torch.testing.assert_close(out1, layer_norms(g, ctx.layer_of, ctx.n_layers))


def test_processes_do_not_leak_state():
    model = tiny_model("llama")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    _, _, b_alone = train(model, "lcgd")
    _, _, _ = train(model, "gd")
    _, _, b_after = train(model, "lcgd")
    for n in b_alone.delta:
        assert torch.equal(b_alone.delta[n], b_after.delta[n])
    for n, p in model.state_dict().items():
        assert torch.equal(p, before[n]), n


def test_non_finite_loss_stops_with_step_and_lr():
    model = tiny_model("llama")
    with torch.no_grad():
        arch.attention_modules(model)[1].k_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"step 0 with lr 0.05"):
        train(model, "gd", lr=0.05)


def test_non_finite_layers_finds_every_bad_layer_and_only_those():
    """The norm shortcut: NaN/inf entries are found per layer (outside the blocks too); a finite
    gradient whose squared norm overflows float32 is not reported."""
    layer_of = {"a": 0, "b": 0, "c": 1, "d": 2, "emb": -1}
    grads = {n: torch.randn(4, 3) for n in layer_of}
    grads["b"][1, 2] = float("nan")
    grads["d"][0, 0] = float("-inf")
    grads["emb"][3, 1] = float("inf")
    grads["c"][:] = 3e38  # finite, but its squared norm is inf
    norms = layer_norms(grads, layer_of, 3)
    assert not torch.isfinite(norms[1])
    assert non_finite_layers(grads, layer_of, norms) == [-1, 0, 2]
    clean = {n: torch.randn(4, 3) for n in layer_of}
    assert non_finite_layers(clean, layer_of, layer_norms(clean, layer_of, 3)) == []


def test_non_finite_gradient_names_the_layer(monkeypatch):
    """A finite loss with a NaN gradient in one layer stops training and names that layer."""
    model = tiny_model("llama")
    gd = PROCESSES.get("gd")
    bad_name = next(tp.name for tp in arch.trainable_params(model, "kv") if tp.layer == 1)
    real = gd.grads

    def poisoned(self, ctx, params, batch):
        loss, grads = real(self, ctx, params, batch)
        grads[bad_name] = grads[bad_name] * float("nan")
        return loss, grads

    monkeypatch.setattr(gd, "grads", poisoned)
    with pytest.raises(NonFiniteError, match=r"non-finite gradient at step 0, layer\(s\) \[1\]"):
        train(model, "gd", lr=0.05)


def test_bad_process_config_errors():
    with pytest.raises(UnknownNameError, match="did you mean 'lcgd'"):
        PROCESSES.get("lcdg")
    with pytest.raises(IclgdError, match="clip value"):
        ProcessConfig(name="gd", lr=0.1, clip="value")
    with pytest.raises(UnknownNameError, match="clip mode"):
        ProcessConfig(name="gd", lr=0.1, clip="l3")
    with pytest.raises(IclgdError, match="learning rate"):
        ProcessConfig(name="gd", lr=float("nan"))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("buffer", [False, True])
def test_lcgd_exit_loss_equals_cross_entropy_in_value_and_gradient(bias, softcap, buffer):
    """The fused exit loss (float32, no softcap; in a fresh or a reused, larger, dirty buffer)
    and its fallback against F.cross_entropy."""
    from iclgd.processes.lcgd import exit_loss

    gen = torch.Generator().manual_seed(3)
    head = torch.nn.Linear(16, 300, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(300, 16, generator=gen))
        if bias:
            head.bias.copy_(torch.randn(300, generator=gen))
    params = {n: p.detach() for n, p in head.named_parameters()}
    x0 = torch.randn(40, 16, generator=gen) * 3
    targets = torch.randint(0, 300, (40,), generator=gen)
    x = x0.clone().requires_grad_(True)
    out = torch.full((57, 300), float("nan")) if buffer else None
    got = exit_loss(x, head, params, targets, softcap, out=out)
    (g_got,) = torch.autograd.grad(got * 0.7, x)
    ref_x = x0.clone().requires_grad_(True)
    logits = head(ref_x)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    want = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    (g_want,) = torch.autograd.grad(want * 0.7, ref_x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(g_got, g_want, atol=1e-5, rtol=1e-5)


def test_lcgd_fused_exit_loss_refuses_a_second_backward():
    from iclgd.processes.lcgd import exit_loss

    head = torch.nn.Linear(8, 50, bias=False)
    x = torch.randn(5, 8, requires_grad=True)
    loss = exit_loss(x, head, {"weight": head.weight.detach()}, torch.arange(5))
    torch.autograd.grad(loss, x, retain_graph=True)
    with pytest.raises(IclgdError, match="once"):
        torch.autograd.grad(loss, x)


def test_lcgd_releases_its_exit_buffer_after_training():
    proc, _, result = train(tiny_model("llama"), "lcgd")
    assert getattr(proc, "_exit_buf", None) is None and all(torch.isfinite(d).all() for d in result.delta.values())
