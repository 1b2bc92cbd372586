"""First-order (forward-mode AD) evaluation of a function of the parameters, for LinGD.

`first_order(fn, θ0, Δ)` returns fn(θ0) and the directional derivative J_fn(θ0)·Δ in one pass of
dual numbers (`torch.autograd.forward_ad`). It gives the same values as `torch.func.jvp`
(tested), faster:

PyTorch's forward AD gives an operand without a tangent a zero tangent and still applies the
product rule to it. For y = x·Wᵀ with a frozen W (every weight but the trained k/v) it computes
x·0ᵀ, materializes the zeros and adds them to ẋ·Wᵀ; for x ⊙ c with a constant c (rotary cos/sin,
norm weights) it goes through a slow zero-tensor path. While `first_order` runs, the
`_ConstantOperands` mode applies linearity directly where exactly one operand carries a tangent:
(x + εẋ)·Wᵀ = x·Wᵀ + ε·ẋ·Wᵀ and (x + εẋ) ⊙ c = x ⊙ c + ε·ẋ ⊙ c; likewise for +, −, ÷ with a
Python number (the attention scaling, a norm's epsilon). Two smaller savings: a product of two
duals takes its tangent as one fused multiply-add, and x² (RMS norms) as 2·x·ẋ directly. The
primal is computed by the same call as without the mode, so it is bit-identical, and tangents
agree with PyTorch's rules to rounding (tested); the primal keeps its autograd graph, so a
backward through it still works (LinGD's training step relies on it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_MULS = frozenset({torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__})
_POWS = frozenset({torch.pow, torch.Tensor.pow, torch.Tensor.__pow__})
# Arithmetic with a Python number: the number becomes a wrapped 0-d tensor with a zero tangent,
# which sends the op through the zero-tensor path (scores · scaling, variance + eps, x / softcap).
_SCALAR_OPS = {
    torch.add: "add", torch.Tensor.add: "add", torch.Tensor.__add__: "add", torch.Tensor.__radd__: "add",
    torch.sub: "sub", torch.Tensor.sub: "sub", torch.Tensor.__sub__: "sub",
    torch.div: "div", torch.Tensor.div: "div", torch.Tensor.__truediv__: "div",
}


def _tangent(x) -> torch.Tensor | None:
    return fwad.unpack_dual(x).tangent if isinstance(x, torch.Tensor) else None


class _ConstantOperands(TorchFunctionMode):
    """Dual × constant products without the zero tangent of the constant (module docstring).

    `batched`: the tangents carry a candidate dimension under `torch._vmap_internals._vmap`
    (`first_order_many`), whose batching rules cover `mm`, `mul` and `add` but not `linear`,
    `matmul` or `addcmul`, which it would run once per candidate: the tangent's product with a
    frozen weight is then one `mm` over every candidate's rows, and the product rule plain
    multiplies and an add."""

    def __init__(self, batched: bool = False):
        super().__init__()
        self.batched = batched

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2:
            x, w = args[0], args[1]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            dx = _tangent(x)
            if dx is not None and _tangent(w) is None and _tangent(b) is None:
                if self.batched:  # [..., in] -> [rows, in] @ [in, out] -> [..., out]
                    dy = torch.mm(dx.reshape(-1, dx.shape[-1]), w.t()).view(*dx.shape[:-1], w.shape[0])
                else:
                    dy = F.linear(dx, w)
                return fwad.make_dual(F.linear(fwad.unpack_dual(x).primal, w, b), dy)
        elif func in _MULS and len(args) == 2 and not kwargs:
            a, b = args
            da, db = _tangent(a), _tangent(b)
            if (da is None) != (db is None) and _constant(a if da is None else b):
                (x, dx), c = ((a, da), b) if da is not None else ((b, db), a)
                return fwad.make_dual(fwad.unpack_dual(x).primal * c, dx * c)
            if da is not None and db is not None:  # ȧ·b + a·ḃ in two passes instead of three
                ap, bp = fwad.unpack_dual(a).primal, fwad.unpack_dual(b).primal
                tangent = da * bp + ap * db if self.batched else torch.addcmul(da * bp, ap, db)
                return fwad.make_dual(ap * bp, tangent)
        elif func in _POWS and len(args) == 2 and not kwargs and _is_number(args[1]) and args[1] == 2:
            dx = _tangent(args[0])
            if dx is not None:  # d(x²) = 2·x·ẋ; the factor 2 is exact, so this equals PyTorch's rule
                xp = fwad.unpack_dual(args[0]).primal
                return fwad.make_dual(xp.pow(2), (xp * dx) * 2 if self.batched else (xp * dx).mul_(2))
        elif func in _SCALAR_OPS and len(args) == 2 and not kwargs and _is_number(args[1]):
            x, c = args
            dx = _tangent(x)
            if dx is not None:
                p, op = fwad.unpack_dual(x).primal, _SCALAR_OPS[func]
                if op == "div":
                    return fwad.make_dual(p / c, dx / c)
                return fwad.make_dual(p + c if op == "add" else p - c, dx.clone())  # own tangent
        return func(*args, **kwargs)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _constant(x) -> bool:
    """A tensor without a tangent, or a Python number."""
    return isinstance(x, torch.Tensor) or _is_number(x)


def first_order(
    fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    theta0: dict[str, torch.Tensor],
    delta: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(fn(θ0), J_fn(θ0)·Δ) for `fn` mapping a parameter dict to a dict of tensors.

    Outputs that do not depend on θ get a zero tangent. Works under `no_grad`; if θ0 requires
    grad, the primal outputs stay differentiable with respect to it.
    """
    with fwad.dual_level(), _ConstantOperands():
        out = fn({n: fwad.make_dual(theta0[n], delta[n]) for n in theta0})
        primal, tangent = {}, {}
        for k, v in out.items():
            p, t = fwad.unpack_dual(v)
            primal[k], tangent[k] = p, (torch.zeros_like(p) if t is None else t)
    return primal, tangent


def first_order_many(
    fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    theta0: dict[str, torch.Tensor],
    deltas: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(fn(θ0), J_fn(θ0)·Δ_c for every c) with the directions stacked: deltas {name: [cand, ...]}.

    The primal is computed once, unbatched (it keeps its autograd graph to θ0 as in
    `first_order`); only the tangents carry the candidate dimension, so every product with a
    frozen weight is one matmul over all candidates' rows. The batching is
    `torch._vmap_internals._vmap`, the vmap behind `torch.autograd.grad(is_grads_batched=True)`
    and torch.autograd.functional's forward-mode jacobian: it carries batched tangents through
    forward AD, where torch.func.vmap has no batching rule for `make_dual` (torch 2.13). Tangents
    equal `first_order` per candidate to rounding (tests/test_lrsearch.py). Returns
    (primal {key: [...]}, tangents {key: [cand, ...]}).
    """
    from torch._vmap_internals import _vmap

    primal: dict[str, torch.Tensor] = {}
    names = list(theta0)

    def tangents(*delta: torch.Tensor) -> tuple[torch.Tensor, ...]:  # this vmap maps tensors and tuples only
        with fwad.dual_level(), _ConstantOperands(batched=True):
            out = fn({n: fwad.make_dual(theta0[n], d) for n, d in zip(names, delta)})
            tangent = []
            for k, v in out.items():
                p, t = fwad.unpack_dual(v)
                primal[k] = p  # unbatched: the primal never sees the candidate dimension
                tangent.append(torch.zeros_like(p) if t is None else t)
        return tuple(tangent)

    batched = _vmap(tangents)(*(deltas[n] for n in names))
    return primal, dict(zip(primal, batched))
