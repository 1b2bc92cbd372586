"""Choosing a process's learning rate (SPEC §6.4-5): fixed by the plan, or searched on held-out
train examples, never on the eval set.

The held-out examples come from the demo split with the run's seed, disjoint from the
demonstrations and, when the task's eval split is its demo split, from the run's eval examples
(iclgd.data.held_out, given the cell's eval cap and eval seed). Every candidate rate (the
protocol's grid of multiples of the task's reference rate) trains from θ0 on the same
demonstrations, all candidates in lockstep where the process supports it
(`Process.train_many`), and is scored on the held-out queries, all candidates batched
(`Process.score_many`).

The criterion is the mean gold-label log-probability renormalized over the label words (minus
the classification cross-entropy; `heldout_logprob`): continuous, so candidates do not tie as
they did under held-out accuracy (issue 14: on SST-2 two of five candidates tied at 0.625 on 64
examples and the winner sat at the grid's edge). If the winner sits at an edge of the rates
tried and beats its inner neighbour by more than `Protocol.lr_extend_margin` standard errors of
their difference (paired over the held-out examples), the grid extends one step past it with the
grid's own ratio at that edge, at most `Protocol.lr_extend` times. The margin keeps the search from
walking on noise: where finetuning barely changes the held-out log-probability (LCGD on SST-2,
bench/README.md) each smaller rate scores a hair better and an unguarded search walks to its
bound, toward a process that hardly moves the weights, at a full training per step.

Every candidate's score, accuracy and the standard error of its difference from the winner
(paired over the held-out examples), the winner and why it won (`REASONS`) go to results.json
(`LrChoice.info`). The winner's trained weights are the ones the cell evaluates: it is never
trained a second time.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from iclgd.data import Selection, held_out
from iclgd.errors import IclgdError
from iclgd.plan import SettingPlan
from iclgd.processes import PROCESSES, TrainContext, TrainResult
from iclgd.prompts import Prompts, build_prompts

log = logging.getLogger(__name__)

CRITERION = "mean held-out gold-label log-prob, renormalized over the label words"
REASONS = {
    "best": "best held-out log-prob",  # the winner lies inside the rates tried (or only one was)
    "extended": "extended past the edge",  # it did after extending the grid at least once
    "bound": "bound reached",  # it sits at an edge after Protocol.lr_extend extensions
    # it sits at an edge, but beats its inner neighbour by no more than Protocol.lr_extend_margin
    # paired standard errors: the trend toward the edge is noise, so the grid is not extended
    "flat": "at the edge, within noise of its neighbour",
}


@dataclass
class LrChoice:
    lr: float
    source: str
    trained: TrainResult | None = None  # the winner's training, if the search ran it
    scores: dict[float, float] = field(default_factory=dict)  # candidate lr -> held-out log-prob (-inf: diverged)
    n_held_out: int = 0
    accuracy: dict[float, float] = field(default_factory=dict)  # candidate lr -> held-out accuracy (context only)
    errors: dict[float, str] = field(default_factory=dict)  # candidate lr -> why it scored -inf
    reason: str | None = None  # one of REASONS' values
    extensions: int = 0  # grid steps added past an edge
    # candidate lr -> standard error of its score's difference from the winner's, paired over the
    # held-out examples: a difference well inside it is noise (context only; the rule is the score)
    paired_se: dict[float, float] = field(default_factory=dict)

    def info(self) -> dict:
        out: dict = {"lr": self.lr, "lr_source": self.source}
        if self.scores:
            def key(lr: float) -> str:
                return f"{lr:.6g}"

            out["lr_search"] = {key(lr): s for lr, s in self.scores.items()}
            out["lr_search_n"] = self.n_held_out
            out["lr_search_criterion"] = CRITERION
            out["lr_search_accuracy"] = {key(lr): a for lr, a in self.accuracy.items()}
            out["lr_search_winner"] = self.lr
            out["lr_search_reason"] = self.reason
            out["lr_search_extensions"] = self.extensions
            out["lr_search_paired_se"] = {key(lr): se for lr, se in self.paired_se.items()}
            if self.errors:
                out["lr_search_errors"] = {key(lr): e for lr, e in self.errors.items()}
        return out


def gold_logprob(label_logprobs: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """log p(gold label) per example [cand, batch], the label words' probabilities renormalized to
    sum to 1 (minus the classification cross-entropy). label_logprobs [cand, batch, label]
    (log-probabilities over the vocabulary, as evaluate records them), gold [batch]."""
    renorm = label_logprobs - torch.logsumexp(label_logprobs, dim=-1, keepdim=True)  # [cand, batch, label]
    return renorm.gather(-1, gold.view(1, -1, 1).expand(len(renorm), -1, 1))[..., 0].double()


def heldout_logprob(label_logprobs: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """The search criterion per candidate [cand]: the mean over examples of `gold_logprob`. A
    candidate with any non-finite value scores -inf."""
    score = gold_logprob(label_logprobs, gold).mean(-1)
    finite = torch.isfinite(label_logprobs).flatten(1).all(-1)
    return torch.where(finite, score, torch.full_like(score, -math.inf))


@dataclass
class _Trial:
    """One candidate multiple's outcome in a search."""

    score: float  # heldout_logprob; -inf if it diverged or scored non-finite
    accuracy: float = math.nan
    result: TrainResult | None = None  # kept only while it is the best so far
    error: str | None = None
    per_example: torch.Tensor | None = None  # [batch] gold_logprob


def held_out_prompts(plan, tokenizer, n: int, start: int) -> tuple[Prompts, list[int]]:
    """The n held-out search prompts of a cell and their gold labels (never an eval example:
    `held_out` skips the cell's eval set, given its eval cap and seed, and its demonstrations),
    each after the cell's start token `start` (SPEC §3), as its eval queries."""
    pool = held_out(plan.task, plan.seed, plan.k, n, plan.data_dir, plan.data_source,
                    eval_cap=plan.eval_cap, eval_seed=plan.protocol.eval_seed)
    held = build_prompts(tokenizer, plan.task, Selection(demos=(), eval=tuple(pool)), separator=plan.separator,
                         start=start)
    return held, [e.label for e in pool]


def choose_lr(setting: SettingPlan, prep, loaded, reference_norms=None, record_queries: bool = False) -> LrChoice:
    """The learning rate for `setting` (its plan's rule), with the winner's training if searched
    (`record_queries`: every candidate records its q_train, so the winner's comes with it)."""
    rule = setting.lr
    if rule.source != "search":
        return LrChoice(rule.lr, rule.source)
    from iclgd.experiment import process_config

    plan = prep.plan
    held, gold = held_out_prompts(plan, loaded.tokenizer, rule.search_n, start=prep.prompts.bos[0])
    ctx = TrainContext(loaded.model, prep.train_seqs, process_config(setting, rule.lr),
                       reference_norms=reference_norms, progress=False, record_queries=record_queries)
    proc = PROCESSES.get(setting.name)()
    gold_t = torch.tensor(gold, dtype=torch.long)
    trials: dict[float, _Trial] = {}  # multiple of the reference rate -> outcome

    def run(mults: list[float]) -> None:
        results = proc.train_many(ctx, [rule.lr * m for m in mults])
        done = [(m, r) for m, r in zip(mults, results) if isinstance(r, TrainResult)]
        for m, r in zip(mults, results):
            if not isinstance(r, TrainResult):  # a diverging lr is a legitimate loser of the search
                log.info("lr search %s: lr %.3g diverged (%s)", setting.label, rule.lr * m, r)
                trials[m] = _Trial(-math.inf, error=str(r))
        if done:
            lps = _score(proc, ctx, [r for _, r in done], held, plan.compute.batch_size, prep.pad_id)
            for (m, r), lp in zip(done, lps):
                score = -math.inf if lp is None else float(heldout_logprob(lp[None], gold_t)[0])
                if not math.isfinite(score):
                    trials[m] = _Trial(-math.inf, error="non-finite held-out log-probabilities")
                    continue
                trials[m] = _Trial(score, float((lp.argmax(-1) == gold_t).float().mean()), r,
                                   per_example=gold_logprob(lp[None], gold_t)[0])
        best = max(trials, key=lambda m: (trials[m].score, -abs(math.log(m))))
        for m, t in trials.items():  # only the best so far can win: free the others' trained weights
            if m != best:
                t.result = None

    grid = sorted(set(rule.grid))
    run(grid)
    def beyond_noise(winner: float, neighbour: float) -> bool:
        w, n = trials[winner].per_example, trials[neighbour].per_example
        if n is None:  # the neighbour diverged: the winner beats it for certain
            return True
        d = w - n  # [batch]
        se = float(d.std() / math.sqrt(len(d))) if len(d) > 1 else 0.0
        return float(d.mean()) > plan.protocol.lr_extend_margin * se

    winner, reason, extensions = pick(lambda: {m: t.score for m, t in trials.items()}, grid, lambda m: run([m]),
                                      plan.protocol.lr_extend, beyond_noise)
    if winner is None:
        raise IclgdError(f"{setting.label}: every learning rate of the search diverged "
                         f"({', '.join(f'{rule.lr * m:g}' for m in sorted(trials))}); lower the task's lr")
    order = sorted(trials)
    w = trials[winner].per_example
    se = {rule.lr * m: float((trials[m].per_example - w).std() / math.sqrt(len(w)))
          for m in order if trials[m].per_example is not None and len(w) > 1}
    choice = LrChoice(rule.lr * winner, "search", trials[winner].result, {rule.lr * m: trials[m].score for m in order},
                      len(gold), {rule.lr * m: trials[m].accuracy for m in order},
                      {rule.lr * m: trials[m].error for m in order if trials[m].error is not None}, reason, extensions,
                      se)
    log.info("lr search %s: %s -> %g (%s)", setting.label, choice.scores, choice.lr, reason)
    return choice


def pick(scores: Callable[[], dict[float, float]], grid: list[float], extend: Callable[[float], None],
         max_extensions: int, beyond_noise: Callable[[float, float], bool] = lambda w, n: True,
         ) -> tuple[float | None, str, int]:
    """(winning multiple, reason, extensions) over `scores()` {multiple: score}: the best score,
    ties to the multiple closest to 1. While the winner is the lowest or highest multiple tried,
    beats its inner neighbour beyond noise (`beyond_noise(winner, neighbour)`) and fewer than
    `max_extensions` steps were added, `extend(m)` tries m one grid step past it (the grid's ratio
    at that edge), after which `scores()` includes it. None if every score is -inf."""
    def best(s: dict[float, float]) -> float | None:
        alive = [m for m in s if s[m] > -math.inf]
        return max(alive, key=lambda m: (s[m], -abs(math.log(m)))) if alive else None

    extensions = 0
    while True:
        winner = best(scores())
        if winner is None:
            return None, REASONS["best"], extensions
        tried = sorted(scores())
        edge = winner in (tried[0], tried[-1]) and len(grid) > 1
        if not edge:
            return winner, REASONS["extended" if extensions else "best"], extensions
        if extensions >= max_extensions:
            return winner, REASONS["bound"], extensions
        neighbour = tried[-2] if winner == tried[-1] else tried[1]
        if not beyond_noise(winner, neighbour):
            return winner, REASONS["flat"], extensions
        ratio = grid[-1] / grid[-2] if winner == tried[-1] else grid[0] / grid[1]
        extend(winner * ratio)
        extensions += 1


def _score(proc, ctx, results: list[TrainResult], held: Prompts, batch_size: int, pad_id: int) -> list:
    """Each candidate's held-out label log-probabilities [batch, label], None where they cannot
    be computed (a candidate whose logits are non-finite makes `evaluate` raise; scored alone)."""
    try:
        lps = proc.score_many(ctx, results, held.queries, held.label_ids, prefix=held.bos, batch_size=batch_size,
                              pad_id=pad_id)
        return list(lps)
    except IclgdError:
        if len(results) == 1:
            return [None]
        return [x for r in results for x in _score(proc, ctx, [r], held, batch_size, pad_id)]
