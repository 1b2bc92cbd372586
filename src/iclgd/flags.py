"""Degenerate results (SPEC §7): checks that flag a setting instead of passing its numbers off.

A flag is {"code", "message"} stored in results.json beside the setting's numbers, printed in the
run's table, shown in reports and carried into every aggregate that uses the cell; claims leave
flagged cells out and say so. The checks:
- `label_ties`: examples whose two highest label log-probabilities are within `TIE_TOL` (the
  prediction is then decided by argmax's tie rule, class order, not by the model); counted.
- `uniform_labels`: in more than half the examples every label has the same log-probability
  (a collapsed model: the 0.75-vs-0.50 "accuracy" of a run whose learning rate blew the model up
  to a uniform distribution came from ties broken to class 0).
- `one_class`: every example is predicted as the same class.
- `loss_not_falling`: after training, the loss on the first training batch is not below its
  loss before the first step.
- `vanishing_gradients`: every layer's gradient norm at every step is below `VANISHING`.
- `zero_update`: the learning rate is 0, so the process is ZSL by construction.
Non-finite losses and gradients are errors, not flags (SPEC §6.3).
"""

from __future__ import annotations

import torch

TIE_TOL = 1e-6  # log-probability units; float32 label scores resolve differences far below this
VANISHING = 1e-8
FLAG_CODES = ("label_ties", "uniform_labels", "one_class", "loss_not_falling", "vanishing_gradients", "zero_update")


def _flag(code: str, message: str) -> dict:
    return {"code": code, "message": message}


def count_ties(label_logprobs: torch.Tensor, tol: float = TIE_TOL) -> int:
    """Examples whose top two label log-probabilities differ by less than `tol` ([batch, label])."""
    if label_logprobs.shape[-1] < 2:
        return 0
    top2 = label_logprobs.double().topk(2, dim=-1).values  # [batch, 2]
    return int(((top2[:, 0] - top2[:, 1]) < tol).sum())


def record_flags(label_logprobs: torch.Tensor, pred: torch.Tensor) -> tuple[list[dict], int]:
    """Flags of one setting's predictions and its tie count (label_logprobs [batch, label])."""
    flags, n = [], len(pred)
    ties = count_ties(label_logprobs)
    lp = label_logprobs.double()
    flat = int(((lp.amax(-1) - lp.amin(-1)) < TIE_TOL).sum())  # every label equal
    if flat * 2 > n:
        flags.append(_flag("uniform_labels", f"all label scores are equal in {flat} of {n} examples (a "
                                             "collapsed, uniform output distribution)"))
    if ties:
        flags.append(_flag("label_ties", f"{ties} of {n} examples have tied top label scores (within "
                                         f"{TIE_TOL:g}); argmax picks the first label there"))
    if n > 1 and label_logprobs.shape[-1] > 1 and len(torch.unique(pred)) == 1:
        flags.append(_flag("one_class", f"every one of the {n} examples is predicted as class {int(pred[0])}"))
    return flags, ties


def training_flags(losses: torch.Tensor, loss_after: float | None, grad_norms: torch.Tensor,
                   lr: float) -> list[dict]:
    """Flags of one process's training: losses [step], grad_norms [layer, step]."""
    flags = []
    if lr == 0:
        flags.append(_flag("zero_update", "learning rate 0: the weights never move (this is ZSL)"))
    if loss_after is not None and len(losses) and not loss_after < float(losses[0]):
        flags.append(_flag("loss_not_falling", f"loss on the first training batch {float(losses[0]):.4g} before "
                                               f"training, {loss_after:.4g} after: it did not fall"))
    if grad_norms.numel() and float(grad_norms.max()) < VANISHING:
        flags.append(_flag("vanishing_gradients", f"every gradient norm is below {VANISHING:g} "
                                                  f"(largest {float(grad_norms.max()):.3g})"))
    return flags


def describe(flags: list[dict]) -> str:
    """One short line: the codes, for tables."""
    return ", ".join(f["code"] for f in flags)
