"""One experiment cell: a `CellPlan` -> records, results and a run folder.

`run(RunConfig(...) or CellPlan)` is the one Python call behind `iclgd run`. It resolves the
request into a plan first (iclgd.plan: every input checked, nothing loaded), then loads the
model, builds the prompts and checks that they fit, and only then computes. All settings share
the model, the task, the seed and one list of k demonstrations in one order (SPEC §1, §6.2; a
cell's `order` permutes that list in `prepare`, before any prompt or training sequence is built). ZSL and ICL evaluate
the query with the original weights; every process trains on the demonstrations from θ0 with
the learning rate its plan gives (fixed, or chosen by iclgd.lrsearch), then evaluates the query
alone with the same capture. Where the plan asks (`CellPlan.records_ranking`), ICL's eval and
each process's training and eval also record the two sides of Dai et al.'s attention ranking
(iclgd.ranking_record), which goes into the same records and results.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from iclgd import arch, flags, ranking_record, runfolder
from iclgd.controls import control_model
from iclgd.data import Selection, demo_order, select_examples, switch_labels
from iclgd.errors import PromptError
from iclgd.evaluate import EvalOptions, Record, evaluate
from iclgd.lrsearch import choose_lr
from iclgd.plan import CellPlan, RunConfig, SettingPlan, resolve_cell
from iclgd.processes import PROCESSES, ProcessConfig, TrainContext
from iclgd.prompts import Prompts, build_prompts, check_fits, demos_that_fit, start_token

log = logging.getLogger(__name__)
__all__ = ["CellResult", "PeakMemory", "Prepared", "RunConfig", "prepare", "process_config", "run"]


class PeakMemory:
    """Peak resident memory (MB) of this process while the block runs, sampled every 5 ms."""

    def __enter__(self) -> PeakMemory:
        self.peak_mb = self.start_mb = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            self.peak_mb = max(self.peak_mb, _rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, _rss_mb())


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20
    except OSError:  # not Linux: fall back to the lifetime peak
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class CellResult:
    config: dict
    records: dict[str, Record]
    results: dict[str, dict]
    demos: list[dict] = field(default_factory=list)
    eval_ids: list = field(default_factory=list)
    path: Path | None = None

    def accuracy(self, setting: str) -> float:
        return self.results[setting]["accuracy"]


@dataclass
class Prepared:
    """What every setting of a cell shares: the seeded selection, the tokenized prompts, where to
    record (`extra` = 1 token appended for record_at "label") and the training sequences."""

    plan: CellPlan
    selection: Selection
    demo_labels: list[int]  # the labels the demonstrations carry (deranged under label switching)
    prompts: Prompts
    extra: int
    n_icl: int  # demonstrations ICL sees: k, or what fits under the dai2023 "drop" rule
    train_seqs: list[list[int]]
    pad_id: int
    prompt_info: dict = field(default_factory=dict)  # start token, tokenization: stored in config.json

    @property
    def gold(self) -> list[int]:
        return [e.label for e in self.selection.eval]


def prepare(plan: CellPlan, loaded) -> Prepared:
    """Select the cell's examples, build its prompts and check that every sequence the cell will
    run fits the model's context (PromptError naming the example otherwise). No model call."""
    task = plan.task
    sel = select_examples(task, plan.seed, plan.k, plan.data_dir, eval_cap=plan.eval_cap,
                          eval_seed=plan.protocol.eval_seed, source=plan.data_source)
    if plan.order:  # permuted before anything is built from the list: ICL and every process see this order
        sel = Selection(demos=tuple(sel.demos[i] for i in demo_order(plan.k, plan.seed, plan.order)), eval=sel.eval)
    gold_demo = [d.label for d in sel.demos]
    demo_labels = switch_labels(gold_demo, task.n_classes) if plan.label_switch else gold_demo
    tok = loaded.tokenizer
    start, rule = start_token(tok, arch.arch_spec(loaded.model).start_token)
    prompts = build_prompts(tok, task, sel, separator=plan.separator, demo_labels=demo_labels, start=start,
                            tokenization=plan.icl_tokenization)
    extra = 1 if plan.record_at == "label" else 0
    n_icl = plan.k
    if plan.protocol.icl_truncation == "drop":
        n_icl = demos_that_fit(prompts, loaded.max_length, extra=extra)
    eval_ids = [e.id for e in sel.eval]
    if any(s.name == "icl" for s in plan.settings) and plan.protocol.icl_truncation != "drop":
        check_fits(prompts, loaded.max_length, eval_ids=eval_ids, n_demos=plan.k, extra=extra)
    check_fits(prompts, loaded.max_length, eval_ids=eval_ids, n_demos=0, extra=extra)
    train_seqs = [prompts.training_sequence(i) for i in range(len(prompts.demos))]
    too_long = [i for i, s in enumerate(train_seqs) if len(s) > loaded.max_length]
    if too_long:
        raise PromptError(f"demonstration(s) {too_long} exceed the context ({loaded.max_length} tokens)")
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    info = {"start_token": start, "start_token_text": tok.convert_ids_to_tokens(start), "start_token_rule": rule,
            "icl_tokenization": plan.icl_tokenization, "separator_ids": list(prompts.separator),
            "icl_prefix_tokens": len(prompts.icl_prefix(n_icl))}
    return Prepared(plan, sel, demo_labels, prompts, extra, n_icl, train_seqs, pad, info)


def process_config(setting: SettingPlan, lr: float) -> ProcessConfig:
    """The ProcessConfig a process trains with: the setting's resolved options and its lr."""
    return ProcessConfig(name=setting.name, lr=lr, params=setting.params, full_batch=setting.full_batch,
                         clip=setting.clip, clip_value=setting.clip_value, options=dict(setting.options))


def run(cfg: RunConfig | CellPlan, *, loaded=None, out: str | Path | None = None, overwrite: bool = False,
        before_setting: Callable[[str], None] | None = None) -> CellResult:
    """Run one cell. `loaded` reuses an already loaded model; `out` writes the run folder (only
    files iclgd wrote are ever replaced there; `overwrite` lets it add them to a folder it did not
    make); `before_setting(label)` is called before each setting starts, outside its timing (the
    bench measures the machine's matmul peak there)."""
    from iclgd.models import load_model

    plan = resolve_cell(cfg, out=out, overwrite=overwrite)
    loaded = loaded or load_model(plan.model.name, device=plan.compute.device, dtype=plan.compute.dtype,
                                  revision=plan.model.revision, progress=plan.compute.progress)
    if plan.control is not None:  # a re-initialized copy (SPEC §7); the loaded model stays as it is
        loaded = control_model(loaded, plan.control, plan.seed)
    prep = prepare(plan, loaded)
    if prep.n_icl < plan.k and "icl" in plan.labels:
        log.warning("dai2023: ICL keeps %d of %d demonstrations that fit the context", prep.n_icl, plan.k)
    records: dict[str, Record] = {}
    results: dict[str, dict] = {}
    rank = (ranking_record.CellRanking(prep.prompts, prep.n_icl, plan.seed, plan.compute.batch_size)
            if plan.records_ranking else None)
    for setting in plan.settings:
        if before_setting is not None:
            before_setting(setting.label)
        t0 = time.perf_counter()
        with PeakMemory() as mem:
            rec, info = _run_setting(setting, prep, loaded, records, rank)
        wall = time.perf_counter() - t0
        found, ties = flags.record_flags(rec.label_logprobs, rec.pred)
        info["flags"] = info.get("flags", []) + found
        records[setting.label] = rec
        results[setting.label] = {"accuracy": rec.accuracy, "n": len(prep.gold), "wall_s": wall,
                                  "train_s": wall - info.pop("eval_s", wall), "peak_mem_mb": mem.peak_mb,
                                  "ties": ties, **info}
        results[setting.label]["eval_s"] = wall - results[setting.label]["train_s"]
        log.info("%s: accuracy %.4f (%.1f s)", setting.label, rec.accuracy, wall)

    config = cell_config(plan, loaded.identity, prep.prompt_info)
    demos = [{"id": d.id, "fields": d.fields, "gold": d.label, "label": y}
             for d, y in zip(prep.selection.demos, prep.demo_labels)]
    result = CellResult(config, records, results, demos, [e.id for e in prep.selection.eval])
    if plan.out is not None:
        result.path = runfolder.write(plan.out, result, plan.overwrite)
    return result


def cell_config(plan: CellPlan, identity: dict, prompt_info: dict | None = None) -> dict:
    """A run folder's config.json (runfolder adds the schema): the plan, what report tables group
    by, the model's identity, how prompts were tokenized, and the provenance."""
    return {
        "prompts": prompt_info or {},
        "task": plan.task.to_dict(), "seed": plan.seed, "k": plan.k,
        "model": {**identity, "revision": plan.model.revision}, "protocol": plan.protocol.to_dict(),
        "settings": plan.labels, "label_switch": plan.label_switch, "control": plan.control,
        "order": plan.order, "demo_order": list(demo_order(plan.k, plan.seed, plan.order)), "plan": plan.to_dict(),
        "decisive": plan.decisive(), "provenance": runfolder.provenance(),
    }


def _run_setting(setting: SettingPlan, prep: Prepared, loaded, records: dict[str, Record],
                 rank: ranking_record.CellRanking | None = None) -> tuple[Record, dict]:
    """One setting's record and its results entry (without the timing and memory); `rank` records
    the attention ranking's sides (iclgd.ranking_record) where the plan asks."""
    plan, prompts = prep.plan, prep.prompts
    opts = EvalOptions(batch_size=plan.compute.batch_size, record_at=plan.record_at,
                       cache_prefix=plan.compute.cache_prefix, progress=plan.compute.progress,
                       **(rank.eval_options(setting.name if not setting.process else "process") if rank else {}))
    common = dict(options=opts, pad_id=prep.pad_id)
    if setting.name == "zsl":
        rec = evaluate(loaded.model, prompts.queries, prep.gold, prompts.label_ids, prefix=prompts.bos,
                       desc="zsl", **common)
        return rec, {"process": None, "options": {}}
    if setting.name == "icl":
        rec = evaluate(loaded.model, prompts.queries, prep.gold, prompts.label_ids,
                       prefix=prompts.icl_prefix(prep.n_icl), desc="icl", **common)
        info = {"process": None, "options": {"n_demos": prep.n_icl}}
        if rank is not None:
            info["ranking"] = rank.after_icl(rec, loaded.model)
        return rec, info
    ref = records["gd"].extras["grad_norms"] if "gd" in setting.needs else None
    record_queries = rank is not None and rank.defined
    choice = choose_lr(setting, prep, loaded, reference_norms=ref, record_queries=record_queries)
    pcfg = process_config(setting, choice.lr)
    proc = PROCESSES.get(setting.name)()
    ctx = TrainContext(loaded.model, prep.train_seqs, pcfg, reference_norms=ref, progress=plan.compute.progress,
                       record_queries=record_queries)
    trained = choice.trained if choice.trained is not None else proc.train(ctx)
    t_eval = time.perf_counter()
    rec = proc.evaluate(ctx, trained, prompts.queries, prep.gold, prompts.label_ids, prefix=prompts.bos, **common)
    info = {"process": setting.name, "options": {**_jsonable(asdict(pcfg)), **choice.info()},
            "lr": choice.lr, "lr_source": choice.source}
    if rank is not None:
        info["ranking"] = rank.after_process(rec, trained.queries)
    eval_s = time.perf_counter() - t_eval
    found = flags.training_flags(trained.losses, trained.loss_after, trained.grad_norms, choice.lr)
    return rec, {**info, "flags": found, "eval_s": eval_s}


def _jsonable(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (str, int, float, bool, type(None), dict, list))}
