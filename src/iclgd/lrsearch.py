"""Choosing a process's learning rate (SPEC §6.4-5): fixed by the plan, or searched on held-out
train examples, never on the eval set.

The held-out examples come from the demo split with the run's seed, disjoint from the
demonstrations and, when the task's eval split is its demo split, from the run's eval examples
(iclgd.data.held_out). Each candidate rate trains from θ0 on the same demonstrations and is
scored on the held-out queries; the winner's trained weights are the ones the cell evaluates
(it is never trained a second time).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from iclgd.data import Selection, held_out
from iclgd.errors import IclgdError
from iclgd.evaluate import EvalOptions
from iclgd.plan import SettingPlan
from iclgd.processes import PROCESSES, TrainContext, TrainResult
from iclgd.prompts import build_prompts

log = logging.getLogger(__name__)


@dataclass
class LrChoice:
    lr: float
    source: str
    trained: TrainResult | None = None  # the winner's training, if the search ran it
    scores: dict[float, float] = field(default_factory=dict)  # candidate lr -> held-out score
    n_held_out: int = 0

    def info(self) -> dict:
        out: dict = {"lr": self.lr, "lr_source": self.source}
        if self.scores:
            out["lr_search"] = {f"{lr:.6g}": s for lr, s in self.scores.items()}
            out["lr_search_n"] = self.n_held_out
            out["lr_search_criterion"] = "held-out accuracy"
        return out


def choose_lr(setting: SettingPlan, prep, loaded, reference_norms=None) -> LrChoice:
    """The learning rate for `setting` (its plan's rule), with the winner's training if searched."""
    rule = setting.lr
    if rule.source != "search":
        return LrChoice(rule.lr, rule.source)
    from iclgd.experiment import process_config

    plan = prep.plan
    pool = held_out(plan.task, plan.seed, plan.k, rule.search_n, plan.data_dir, plan.data_source,
                    eval_cap=plan.eval_cap, eval_seed=plan.protocol.eval_seed)
    held = build_prompts(loaded.tokenizer, plan.task, Selection(demos=(), eval=tuple(pool)),
                         separator=plan.separator, start=prep.prompts.bos[0])
    gold = [e.label for e in pool]
    quiet = EvalOptions(batch_size=plan.compute.batch_size, progress=False)
    scores: dict[float, float] = {}
    best: tuple[float, float, TrainResult] | None = None
    for mult in rule.grid:
        lr = rule.lr * mult
        ctx = TrainContext(loaded.model, prep.train_seqs, process_config(setting, lr),
                           reference_norms=reference_norms, progress=False)
        proc = PROCESSES.get(setting.name)()
        try:
            trained = proc.train(ctx)
            rec = proc.evaluate(ctx, trained, held.queries, gold, held.label_ids, prefix=held.bos, options=quiet,
                                pad_id=prep.pad_id)
            scores[lr] = rec.accuracy
        except IclgdError as err:  # a diverging lr is a legitimate loser of the search
            log.info("lr search %s: lr %.3g diverged (%s)", setting.label, lr, err)
            scores[lr] = -math.inf
            continue
        key = (scores[lr], -abs(math.log(mult)))  # ties go to the multiple closest to 1
        if best is None or key > best[:2]:
            best = (*key, trained, lr)
    if best is None:
        raise IclgdError(f"{setting.label}: every learning rate of the search diverged "
                         f"({', '.join(f'{lr:g}' for lr in scores)}); lower the task's lr")
    lr = best[3]
    log.info("lr search %s: %s -> %g", setting.label, scores, lr)
    return LrChoice(lr, "search", best[2], scores, len(pool))
