"""One experiment cell: (model, task, seed, protocol, settings) -> records and a run folder.

`run(RunConfig(...))` is the one Python call behind `iclgd run`. All settings share the model,
the task, the seed and one list of k demonstrations (SPEC §1). ZSL and ICL evaluate the query
with the original weights; every process trains on the demonstrations from θ0, then evaluates
the query alone with the same capture.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from iclgd import runfolder
from iclgd.data import Selection, held_out, select_examples, switch_labels
from iclgd.errors import IclgdError, PromptError
from iclgd.evaluate import EvalOptions, Record, evaluate
from iclgd.processes import PROCESSES, ProcessConfig, TrainContext
from iclgd.prompts import Prompts, build_prompts, check_fits, demos_that_fit
from iclgd.protocols import Protocol, get_protocol
from iclgd.registry import unknown_name
from iclgd.tasks import Task, get_task

log = logging.getLogger(__name__)
BASE_SETTINGS = ("zsl", "icl")
_SETTING = re.compile(r"^([A-Za-z0-9_.-]+)(?:\[(.*)\])?$")


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides one cell. Unset fields (None) take the protocol's or task's value."""

    model: str = "smollm2-135m"
    task: str = "sst2"
    seed: int = 2
    k: int = 32
    settings: tuple[str, ...] = ("zsl", "icl")
    protocol: str = "default"
    eval_cap: int | None = None
    separator: str | None = None
    record_at: str | None = None
    label_switch: bool = False
    lr: float | None = None  # one learning rate for every process (else per process: search/reference)
    lr_source: str | None = None  # "search" or "reference"; None = the protocol's choice
    params: str = "kv"
    batch_size: int = 16
    cache_prefix: bool = True
    data_dir: str | None = None
    data_source: str = "auto"
    device: str = "cpu"
    dtype: str = "float32"
    progress: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        known = {f.name for f in fields(cls)}
        extra = sorted(set(d) - known)
        if extra:
            raise IclgdError(f"unknown run option(s) {extra}; known: {sorted(known)}")
        d = dict(d)
        if isinstance(d.get("settings"), str):
            d["settings"] = tuple(split_settings(d["settings"]))
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def split_settings(text: str) -> list[str]:
    """'zsl,icl,lcgd[clip=layer_l2:1,exit=attn]' -> ['zsl', 'icl', 'lcgd[clip=layer_l2:1,exit=attn]']."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def parse_setting(setting: str) -> tuple[str, dict[str, str]]:
    """'lcgd[clip=value:12,lr=1e-3]' -> ('lcgd', {'clip': 'value:12', 'lr': '1e-3'})."""
    m = _SETTING.match(setting.strip())
    if not m:
        raise IclgdError(f"cannot parse setting {setting!r}; write NAME or NAME[key=value,...]")
    name, opts = m.group(1), m.group(2)
    if name not in BASE_SETTINGS and name not in PROCESSES:
        raise unknown_name("setting", name, [*BASE_SETTINGS, *PROCESSES.names()])
    kv = {}
    for part in filter(None, (opts or "").split(",")):
        if "=" not in part:
            raise IclgdError(f"setting {setting!r}: option {part!r} must be key=value")
        key, value = part.split("=", 1)
        kv[key.strip()] = value.strip()
    if name in BASE_SETTINGS and kv:
        raise IclgdError(f"setting {name!r} takes no options (got {kv})")
    return name, kv


def process_config(setting: str, lr: float, params: str) -> ProcessConfig:
    """Build a ProcessConfig from a setting string; options lr, params, full_batch, clip, others."""
    name, kv = parse_setting(setting)
    kw: dict = {"name": name, "lr": float(kv.pop("lr", lr)), "params": kv.pop("params", params)}
    kw["full_batch"] = kv.pop("full_batch", "0").lower() in ("1", "true", "yes")
    if "clip" in kv:
        mode, _, value = kv.pop("clip").partition(":")
        kw["clip"], kw["clip_value"] = mode, float(value) if value else None
    return ProcessConfig(**kw, options=kv)


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


def _ordered(settings) -> list[str]:
    """ZSL and ICL first, then GD (match_gd clipping needs its norms), then the rest as given."""
    settings = list(dict.fromkeys(settings))
    if not settings:
        raise IclgdError("no settings to run; e.g. --settings zsl,icl,gd,lcgd,lingd")
    for s in settings:
        parse_setting(s)
    key = {"zsl": 0, "icl": 1, "gd": 2}
    return sorted(settings, key=lambda s: key.get(s, 3))


@dataclass
class Prepared:
    """What every setting of a cell shares: the resolved protocol and task, the seeded selection,
    the tokenized prompts and where to record (`extra` = 1 token appended for record_at "label")."""

    protocol: Protocol
    task: Task
    selection: Selection
    demo_labels: list[int]  # the labels the demonstrations carry (deranged under label switching)
    prompts: Prompts
    eval_cap: int
    separator: str
    record_at: str
    extra: int
    n_icl: int  # demonstrations ICL sees: k, or what fits under the dai2023 "drop" rule


def prepare(cfg: RunConfig, loaded) -> Prepared:
    """Select the demonstrations and eval examples of `cfg` and build its prompts (no model call)."""
    protocol, task = get_protocol(cfg.protocol), get_task(cfg.task)
    eval_cap = cfg.eval_cap if cfg.eval_cap is not None else min(task.eval_cap, protocol.eval_cap)
    sel = select_examples(task, cfg.seed, cfg.k, cfg.data_dir, eval_cap=eval_cap,
                          eval_seed=protocol.eval_seed, source=cfg.data_source)
    gold_demo = [d.label for d in sel.demos]
    demo_labels = switch_labels(gold_demo, len(task.label_words)) if cfg.label_switch else gold_demo
    separator = cfg.separator if cfg.separator is not None else protocol.separator
    prompts = build_prompts(loaded.tokenizer, task, sel, separator=separator, demo_labels=demo_labels)
    record_at = cfg.record_at or protocol.record_at
    extra = 1 if record_at == "label" else 0
    n_icl = cfg.k
    if protocol.icl_truncation == "drop":
        n_icl = demos_that_fit(prompts, loaded.max_length, extra=extra)
    return Prepared(protocol, task, sel, demo_labels, prompts, eval_cap, separator, record_at, extra, n_icl)


def run(cfg: RunConfig, *, loaded=None, out: str | Path | None = None,
        before_setting: Callable[[str], None] | None = None) -> CellResult:
    """Run one cell. `loaded` reuses an already loaded model; `out` writes the run folder;
    `before_setting(setting)` is called before each setting starts, outside its timing (the
    bench measures the machine's matmul peak there)."""
    from iclgd.models import load_model

    settings = _ordered(cfg.settings)
    if cfg.k < 0:
        raise IclgdError(f"k must be >= 0, got {cfg.k}")
    loaded = loaded or load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    prep = prepare(cfg, loaded)
    protocol, task, sel, prompts = prep.protocol, prep.task, prep.selection, prep.prompts
    record_at, extra, n_icl = prep.record_at, prep.extra, prep.n_icl
    tok = loaded.tokenizer
    eval_ids = [e.id for e in sel.eval]
    if "icl" in settings:
        if n_icl < cfg.k:
            log.warning("dai2023: ICL keeps %d of %d demonstrations that fit the context", n_icl, cfg.k)
        if protocol.icl_truncation != "drop":
            check_fits(prompts, loaded.max_length, eval_ids=eval_ids, n_demos=cfg.k, extra=extra)
    check_fits(prompts, loaded.max_length, eval_ids=eval_ids, n_demos=0, extra=extra)
    train_seqs = [prompts.training_sequence(i) for i in range(len(prompts.demos))]
    too_long = [i for i, s in enumerate(train_seqs) if len(s) > loaded.max_length]
    if too_long:
        raise PromptError(f"demonstration(s) {too_long} exceed the context ({loaded.max_length} tokens)")

    opts = EvalOptions(batch_size=cfg.batch_size, record_at=record_at, cache_prefix=cfg.cache_prefix,
                       progress=cfg.progress)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    gold = [e.label for e in sel.eval]
    common = dict(options=opts, pad_id=pad)
    records: dict[str, Record] = {}
    results: dict[str, dict] = {}
    for setting in settings:
        name, _ = parse_setting(setting)
        if before_setting is not None:
            before_setting(setting)
        t0 = time.perf_counter()
        info: dict = {"process": None, "options": {}}
        with PeakMemory() as mem:
            if name == "zsl":
                rec = evaluate(loaded.model, prompts.queries, gold, prompts.label_ids,
                               prefix=prompts.bos, desc="zsl", **common)
            elif name == "icl":
                rec = evaluate(loaded.model, prompts.queries, gold, prompts.label_ids,
                               prefix=prompts.icl_prefix(n_icl), desc="icl", **common)
                info["options"] = {"n_demos": n_icl}
            else:
                lr, lr_info = _learning_rate(cfg, prep, setting, loaded, train_seqs)
                pcfg = process_config(setting, lr, cfg.params)
                ref = records["gd"].extras["grad_norms"] if "gd" in records else None
                ctx = TrainContext(loaded.model, train_seqs, pcfg, reference_norms=ref, progress=cfg.progress)
                proc = PROCESSES.get(name)()
                rec = proc.evaluate(ctx, proc.train(ctx), prompts.queries, gold, prompts.label_ids,
                                    prefix=prompts.bos, **common)
                info = {"process": name, "options": {**_jsonable(asdict(pcfg)), **lr_info}}
        records[setting] = rec
        results[setting] = {"accuracy": rec.accuracy, "n": len(gold), "wall_s": time.perf_counter() - t0,
                            "peak_mem_mb": mem.peak_mb, **info}
        log.info("%s: accuracy %.4f (%.1f s)", setting, rec.accuracy, results[setting]["wall_s"])

    config = {
        "run": asdict(cfg) | {"settings": list(settings), "eval_cap": prep.eval_cap, "separator": prep.separator,
                              "record_at": record_at},
        "task": task.to_dict(), "seed": cfg.seed, "k": cfg.k, "model": loaded.identity,
        "protocol": protocol.to_dict(), "settings": list(settings), "label_switch": cfg.label_switch,
        "provenance": runfolder.provenance(),
    }
    demos = [{"id": d.id, "fields": d.fields, "gold": d.label, "label": y} for d, y in zip(sel.demos, prep.demo_labels)]
    result = CellResult(config, records, results, demos, eval_ids)
    if out is not None:
        result.path = runfolder.write(out, result)
    return result


def _jsonable(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (str, int, float, bool, type(None), dict, list))}


def _learning_rate(cfg, prep: Prepared, setting, loaded, train_seqs):
    """The lr for a process: the setting's own, the run's override, the task reference, or a search."""
    protocol, task = prep.protocol, prep.task
    _, kv = parse_setting(setting)
    if "lr" in kv:
        return float(kv["lr"]), {"lr_source": "setting"}
    if cfg.lr is not None:
        return cfg.lr, {"lr_source": "run"}
    if task.lr is None:
        raise IclgdError(f"task {task.name!r} has no reference lr; pass --lr or add lr: to its YAML")
    source = cfg.lr_source or protocol.lr_source
    if source not in ("search", "reference"):
        raise unknown_name("lr source", source, ["search", "reference"])
    if source == "reference" or not train_seqs:
        return task.lr, {"lr_source": "reference"}
    return search_lr(cfg, prep, setting, loaded, train_seqs)


def search_lr(cfg, prep: Prepared, setting, loaded, train_seqs):
    """Pick the lr (reference x grid) with the best held-out accuracy on train-split examples.

    The held-out slice comes from the demo split, disjoint from the demonstrations and never the
    eval set (SPEC §6.4-5). Ties go to the multiple closest to 1.
    """
    name, _ = parse_setting(setting)
    protocol, task = prep.protocol, prep.task
    pool = held_out(task, cfg.seed, cfg.k, protocol.lr_search_n, cfg.data_dir, source=cfg.data_source)

    held = build_prompts(loaded.tokenizer, task, Selection(demos=(), eval=tuple(pool)),
                         separator=prep.separator)
    gold = [e.label for e in pool]
    quiet = EvalOptions(batch_size=cfg.batch_size, progress=False)
    scores = {}
    for mult in protocol.lr_grid:
        lr = task.lr * mult
        pcfg = process_config(setting, lr, cfg.params)
        ctx = TrainContext(loaded.model, train_seqs, pcfg, progress=False)
        proc = PROCESSES.get(name)()
        try:
            rec = proc.evaluate(ctx, proc.train(ctx), held.queries, gold, held.label_ids, prefix=held.bos,
                                options=quiet)
            scores[mult] = rec.accuracy
        except IclgdError as err:  # a diverging lr is a legitimate loser of the search
            log.info("lr search %s: lr %.3g diverged (%s)", setting, lr, err)
            scores[mult] = -math.inf
    best = max(scores, key=lambda m: (scores[m], -abs(math.log(m))))
    log.info("lr search %s: %s -> x%g", setting, scores, best)
    return task.lr * best, {"lr_source": "search", "lr_search": {str(m): s for m, s in scores.items()},
                            "lr_search_n": len(pool)}
