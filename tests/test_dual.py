"""`dual.first_order` against torch.func.jvp and plain forward-mode AD."""

import contextlib

import pytest
import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F
from torch.func import jvp

from iclgd import arch
from iclgd.capture import Plan, math_mode, use_iclgd_attention
from iclgd.dual import _ConstantOperands, first_order
from iclgd.evaluate import pad_right, run_captured

from tiny import FAMILIES, tiny_model

SEQS = [[0, 5, 9, 13, 7, 22, 31, 6, 44, 19, 3], [0, 8, 3, 40], [0, 17, 4, 4, 9, 50]]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("group", ["kv", "all"])
def test_first_order_equals_torch_func_jvp_on_every_recorded_quantity(family, group):
    """Every family, k/v only (frozen linears and norms on the shortcut) and every parameter
    (no constant operand left but rotary tables and masks)."""
    model = tiny_model(family)
    use_iclgd_attention(model)
    ids, mask = pad_right(SEQS, 2)
    own_len = torch.tensor([len(s) - 1 for s in SEQS])
    plan = Plan(own_start=torch.ones(3, dtype=torch.long), own_len=own_len, pred_pos=own_len, math=True)
    named = dict(model.named_parameters())
    theta0 = {tp.name: named[tp.name].detach() for tp in arch.trainable_params(model, group)}
    gen = torch.Generator().manual_seed(0)
    delta = {n: torch.randn(p.shape, generator=gen) * 0.1 for n, p in theta0.items()}

    def f(p):
        return run_captured(model, p, ids, mask, plan)

    with torch.no_grad():
        want_p, want_t = jvp(f, (theta0,), (delta,))
        got_p, got_t = first_order(f, theta0, delta)
    for k in want_p:
        torch.testing.assert_close(got_p[k], want_p[k], atol=1e-6, rtol=1e-6, equal_nan=True)
        torch.testing.assert_close(got_t[k], want_t[k], atol=1e-5, rtol=1e-5, equal_nan=True)
        assert torch.isfinite(got_t[k]).any()


CASES = {
    "linear, frozen weight": lambda x, w, b, c: F.linear(x, w),
    "linear, frozen weight and bias": lambda x, w, b, c: F.linear(x, w, b),
    "linear, keyword arguments": lambda x, w, b, c: F.linear(input=x, weight=w, bias=b),
    "dual x tensor": lambda x, w, b, c: x * c,
    "tensor x dual, broadcast": lambda x, w, b, c: c[:1] * x,
    "torch.mul": lambda x, w, b, c: torch.mul(c, x),
    "Tensor.mul": lambda x, w, b, c: x.mul(c),
    "dual x dual": lambda x, w, b, c: x * x,
    "dual x dual, broadcast": lambda x, w, b, c: x * x.mean(-1, keepdim=True),
    "torch.mul(dual, dual)": lambda x, w, b, c: torch.mul(x.sin(), x),
    "dual ** 2": lambda x, w, b, c: x**2,
    "dual.pow(2)": lambda x, w, b, c: x.pow(2),
    "dual.pow(3) (no shortcut)": lambda x, w, b, c: x.pow(3),
    "dual.pow(tensor) (no shortcut)": lambda x, w, b, c: x.abs().pow(torch.full((4,), 2.0)),
    "number x dual": lambda x, w, b, c: 3.0 * x,
    "dual x number": lambda x, w, b, c: x * 0.125,
    "torch.mul(dual, number)": lambda x, w, b, c: torch.mul(x, 0.125),
    "dual + number": lambda x, w, b, c: x + 1e-6,
    "number + dual": lambda x, w, b, c: 2 + x,
    "torch.add(dual, number)": lambda x, w, b, c: torch.add(x, 0.5),
    "torch.add with alpha": lambda x, w, b, c: torch.add(x, c, alpha=2.0),
    "dual - number": lambda x, w, b, c: x - 0.5,
    "number - dual": lambda x, w, b, c: 1.0 - x,
    "dual / number": lambda x, w, b, c: x / 30.0,
    "number / dual (not linear)": lambda x, w, b, c: 1.0 / x,
    "in place after + number": lambda x, w, b, c: (x + 1.0).mul_(c),
}


@pytest.mark.parametrize("case", list(CASES))
def test_constant_operand_shortcuts_match_plain_forward_ad_and_keep_the_primal_graph(case):
    """The mode's primal and tangent equal forward AD without it, and the primal stays
    differentiable (LinGD back-propagates through it)."""
    fn = CASES[case]
    gen = torch.Generator().manual_seed(1)
    x0, dx = torch.randn(2, 3, 4, generator=gen), torch.randn(2, 3, 4, generator=gen)
    w, b, c = torch.randn(5, 4, generator=gen), torch.randn(5, generator=gen), torch.randn(2, 3, 4, generator=gen)
    results = []
    for use_mode in (False, True):
        x = x0.clone().requires_grad_(True)
        with fwad.dual_level():
            if use_mode:
                with _ConstantOperands():
                    out = fn(fwad.make_dual(x, dx), w, b, c)
            else:
                out = fn(fwad.make_dual(x, dx), w, b, c)
            p, t = fwad.unpack_dual(out)
        (g,) = torch.autograd.grad(p.sum(), x)
        results.append((p.detach(), t.detach(), g))
    for a, b_ in zip(*results):
        torch.testing.assert_close(a, b_, atol=1e-6, rtol=1e-6)


SHORTCUTS = ["linear, frozen weight", "linear, frozen weight and bias", "dual x tensor", "tensor x dual, broadcast",
             "number x dual", "dual x number", "dual + number", "number + dual", "dual - number", "dual / number"]


@pytest.mark.parametrize("case", SHORTCUTS)
def test_shortcuts_materialize_no_zero_tangent(case):
    """What the shortcuts are for: without the mode each of these builds a zero tangent for its
    constant operand (checked, so the test can fail); with it, none."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    gen = torch.Generator().manual_seed(2)
    x0, dx = torch.randn(2, 3, 4, generator=gen), torch.randn(2, 3, 4, generator=gen)
    w, b, c = torch.randn(5, 4, generator=gen), torch.randn(5, generator=gen), torch.randn(2, 3, 4, generator=gen)
    zeros = {}
    for use_mode in (False, True):
        with fwad.dual_level():
            x = fwad.make_dual(x0, dx)
            with Ops() as ops, (_ConstantOperands() if use_mode else contextlib.nullcontext()):
                CASES[case](x, w, b, c)
        zeros[use_mode] = [n for n in ops.names if "zero" in n]
    assert zeros[False] and not zeros[True]


def test_shortcut_outputs_do_not_share_a_tangent_with_their_input():
    """y = x + c gets its own tangent: changing y in place leaves x's tangent alone."""
    x0, dx = torch.randn(3), torch.randn(3)
    with fwad.dual_level(), _ConstantOperands():
        x = fwad.make_dual(x0, dx.clone())
        y = x + 1.0
        y.mul_(torch.full((3,), 5.0))
        x_t = fwad.unpack_dual(x).tangent
        y_t = fwad.unpack_dual(y).tangent
    torch.testing.assert_close(x_t, dx)
    torch.testing.assert_close(y_t, 5 * dx)


def test_first_order_gives_zero_tangents_to_outputs_that_do_not_depend_on_theta():
    theta0, delta = {"a": torch.ones(3)}, {"a": torch.full((3,), 2.0)}
    p, t = first_order(lambda q: {"y": q["a"] * q["a"], "z": torch.arange(3.0)}, theta0, delta)
    torch.testing.assert_close(t["y"], 2 * theta0["a"] * delta["a"])
    assert torch.equal(p["z"], torch.arange(3.0)) and torch.equal(t["z"], torch.zeros(3))


def test_first_order_inside_math_mode_leaves_nothing_behind():
    model = tiny_model("llama")
    theta0 = {n: p.detach() for n, p in model.named_parameters() if "v_proj" in n}
    ids = torch.tensor([SEQS[0]])
    with math_mode(model):
        first_order(lambda p: {"l": torch.func.functional_call(model, p, (ids,), strict=False).logits}, theta0,
                    {n: torch.ones_like(p) for n, p in theta0.items()})
    assert not torch._C._is_torch_function_mode_enabled()
