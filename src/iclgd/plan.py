"""The plan: every decision of a run, resolved and checked before any model loads.

A request (CLI flags, a `RunConfig` from Python, a sweep's task and seed lists) is resolved here,
once, into immutable objects: a `CellPlan` per (model, task, seed) with every setting's options
fully resolved (learning-rate rule and where it came from, trained parameters, batching,
clipping, process options with their defaults), the protocol's choices, the output folder and
what depends on what; and a `Plan` holding the cells of one command. Everything downstream
(experiment, sweep, bench, report) reads these objects; nothing re-parses a setting string or
re-states a default. A cell's `order` (0: the demonstrations as selected; o >= 1: the seeded
permutation o of the same demonstrations, `iclgd.data.demo_order`) is decisive: ICL and every
process of the cell see that one order (SPEC §6.2). Resolving checks every input, the data included (k against the demo pool,
a non-empty eval set, enough held-out rows for a learning-rate search), so a bad request fails in
seconds with one `PlanError` that names the problem and the fix. What needs the tokenizer (does
the prompt fit the context, do label words collide) is checked right after the model loads,
before any setting runs.

Setting grammar (the one definition; `iclgd run --help` points here):

    SETTING := NAME | NAME "[" OPTION ("," OPTION)* "]"
    NAME    := zsl | icl | a registered process (gd, lcgd, lingd, or one a --plugin adds)
    OPTION  := KEY "=" VALUE

    options every process takes
      lr=FLOAT           a fixed learning rate (>= 0): overrides --lr and the protocol's rule
      params=GROUP       trained parameters: kv (default), qkvo, attn, all
      batch=1|full       one SGD step per demonstration (default), or one step on all k: SPEC §1's
                         full-batch variant, on the mean of the k demonstrations' losses, so it
                         does not depend on their order beyond float rounding (tested)
                         (full_batch=1 is read as batch=full)
      clip=MODE[:VALUE]  global_l2:V, layer_l2:V, value:V (elementwise), or match_gd (each
                         layer to GD's gradient norm at the same step: needs gd in the cell)
    options of one process: declared by its class (`Process.options`), e.g. lcgd's exit=block|attn

zsl and icl take no options. A setting keeps the text it was given (whitespace removed) as its
label: the key in results.json and the name of its records file.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from iclgd.errors import IclgdError
from iclgd.protocols import Protocol, get_protocol
from iclgd.registry import unknown_name
from iclgd.tasks import Task, get_task

BASE_SETTINGS = ("zsl", "icl")
PARAM_GROUPS = ("kv", "qkvo", "attn", "all")  # iclgd.arch.trainable_params
CLIP_MODES = ("global_l2", "layer_l2", "value", "match_gd")
COMMON_OPTIONS = ("lr", "params", "batch", "full_batch", "clip")
LR_SOURCES = ("search", "reference")
RECORD_AT = ("last", "label")
TOKENIZATIONS = ("piecewise", "natural")  # iclgd.prompts
DTYPES = ("float32", "bfloat16", "float16")
DATA_SOURCES = ("auto", "hub", "local")
CONTROLS = ("untrained", "untrained-partial")  # SPEC §7: re-initialized models (iclgd.controls)


class PlanError(IclgdError):
    """A request that cannot run as given; the message names the problem and the fix."""


# ---------------------------------------------------------------- the request


@dataclass(frozen=True)
class RunConfig:
    """One cell as a user asks for it. Unset fields (None) take the protocol's or task's value.

    This is the request, not the decision: `resolve_cell` turns it into a `CellPlan`."""

    model: str = "smollm2-135m"
    task: str | Task = "sst2"
    seed: int = 2
    k: int = 32
    settings: tuple[str, ...] | str = ("zsl", "icl")
    protocol: str | Protocol = "default"
    eval_cap: int | None = None
    separator: str | None = None
    record_at: str | None = None
    icl_tokenization: str | None = None  # "piecewise" or "natural"; None = the protocol's
    label_switch: bool = False
    lr: float | None = None  # one learning rate for every process (else the protocol's rule)
    lr_source: str | None = None  # "search" or "reference"; None = the protocol's choice
    params: str = "kv"
    batch_size: int = 16
    cache_prefix: bool = True
    data_dir: str | None = None
    data_source: str = "auto"
    device: str = "cpu"
    dtype: str = "float32"
    revision: str | None = None
    control: str | None = None  # None: the trained model; else one of CONTROLS
    order: int = 0  # demonstration order: 0 the seeded selection's own, o >= 1 a permutation (iclgd.data.demo_order)
    progress: bool = True
    ranking: bool = True  # record Dai et al.'s attention ranking (SPEC §4; iclgd.ranking_record); off: nothing hooked

    @classmethod
    def from_dict(cls, d: Mapping) -> RunConfig:
        known = [f.name for f in fields(cls)]
        for key in d:
            if key not in known:
                raise unknown_name("run option", key, known)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class LrRule:
    """How a process gets its learning rate, and from where.

    source: "setting" (lr= in the setting), "run" (--lr), "reference" (the task's reference rate)
    or "search" (the protocol's held-out search over `grid` multiples of `lr`, scored on
    `search_n` held-out train examples)."""

    source: str
    lr: float
    grid: tuple[float, ...] = ()
    search_n: int = 0

    @property
    def candidates(self) -> tuple[float, ...]:
        return tuple(self.lr * m for m in self.grid) if self.source == "search" else (self.lr,)

    def describe(self) -> str:
        if self.source == "search":
            grid = ", ".join(f"{m:g}" for m in self.grid)
            return f"search x[{grid}] of {self.lr:g} on {self.search_n} held-out examples"
        return f"{self.lr:g} ({self.source})"


@dataclass(frozen=True)
class SettingPlan:
    """One setting of a cell, every option resolved. `process` is None for zsl and icl."""

    label: str
    name: str
    process: bool = False
    lr: LrRule | None = None
    params: str | None = None
    full_batch: bool = False
    clip: str | None = None
    clip_value: float | None = None
    options: tuple[tuple[str, object], ...] = ()  # the process's own options, defaults filled in
    needs: tuple[str, ...] = ()  # labels of settings that must run first in the same cell

    def to_dict(self) -> dict:
        d = asdict(self)
        d["options"] = dict(self.options)
        d["lr"] = None if self.lr is None else {**asdict(self.lr), "grid": list(self.lr.grid)}
        return d


@dataclass(frozen=True)
class _ParsedSetting:
    label: str
    name: str
    options: tuple[tuple[str, str], ...]


def split_settings(text: str) -> list[str]:
    """'zsl,icl,lcgd[clip=layer_l2:1,exit=attn]' -> ['zsl', 'icl', 'lcgd[clip=layer_l2:1,exit=attn]']."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if depth < 0:
            raise PlanError(f"settings {text!r}: a ']' without its '['")
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if depth:
        raise PlanError(f"settings {text!r}: a '[' is never closed; write NAME[key=value,...]")
    if cur.strip():
        out.append(cur.strip())
    if any(not s for s in out):
        raise PlanError(f"settings {text!r} has an empty entry (two commas in a row?)")
    return out


def _parse(setting: str) -> _ParsedSetting:
    text = "".join(setting.split())
    name, bracket, rest = text.partition("[")
    if not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
        raise PlanError(f"cannot parse setting {setting!r}; write NAME or NAME[key=value,...]")
    if bracket and not rest.endswith("]"):
        raise PlanError(f"setting {setting!r}: options must end with ']'")
    opts: list[tuple[str, str]] = []
    for part in filter(None, rest[:-1].split(",") if bracket else ()):
        key, eq, value = part.partition("=")
        if not eq or not key or not value:
            raise PlanError(f"setting {setting!r}: option {part!r} must read key=value")
        if key in dict(opts):
            raise PlanError(f"setting {setting!r}: option {key!r} is given twice")
        opts.append((key, value))
    return _ParsedSetting(text, name, tuple(opts))


def _float(setting: str, key: str, value: str, *, positive: bool = False) -> float:
    try:
        x = float(value)
    except ValueError:
        x = math.nan
    if not math.isfinite(x) or x < 0 or (positive and x == 0):
        need = "a positive number" if positive else "a finite number >= 0"
        raise PlanError(f"setting {setting!r}: {key}={value!r} must be {need}")
    return x


def _choice(setting: str, key: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise PlanError(f"setting {setting!r}: {key}={value!r} is not one of {', '.join(choices)}{hint}")
    return value


def _process_class(name: str, label: str):
    from iclgd.processes import PROCESSES

    if name not in PROCESSES:
        err = unknown_name("setting", name, [*BASE_SETTINGS, *PROCESSES.names()])
        raise PlanError(f"{err} (in {label!r}; a process from a plugin needs --plugin)")
    return PROCESSES.get(name)


def parse_settings(settings: str | Sequence[str]) -> list[tuple[_ParsedSetting, dict]]:
    """Parse and check every setting's name and options (the module docstring's grammar).

    Returns (parsed, options) pairs; options are typed (floats, choices, process options with
    their defaults) except the learning rate, which `resolve_cell` decides with the task."""
    texts = split_settings(settings) if isinstance(settings, str) else list(settings)
    if not texts:
        raise PlanError("no settings to run; e.g. --settings zsl,icl,gd,lcgd,lingd")
    out, seen = [], {}
    for text in texts:
        p = _parse(text)
        if p.name in BASE_SETTINGS:
            if p.options:
                raise PlanError(f"setting {p.name!r} takes no options (got {p.label!r})")
            opts: dict = {}
        else:
            opts = _process_options(p, _process_class(p.name, p.label))
        key = (p.name, tuple(sorted((k, repr(v)) for k, v in opts.items())))
        if key in seen:
            raise PlanError(f"settings {seen[key]!r} and {p.label!r} are the same setting; list it once")
        seen[key] = p.label
        out.append((p, opts))
    return out


def _process_options(p: _ParsedSetting, cls) -> dict:
    own = dict(getattr(cls, "options", {}) or {})
    known = [*COMMON_OPTIONS, *own]
    opts: dict = {"params": None, "full_batch": False, "clip": None, "clip_value": None}
    for key, value in p.options:
        if key not in known:
            err = unknown_name(f"option of {p.name!r}", key, known)
            raise PlanError(f"setting {p.label!r}: {err}")
        if key == "lr":
            opts["lr"] = _float(p.label, key, value)
        elif key == "params":
            opts["params"] = _choice(p.label, key, value, PARAM_GROUPS)
        elif key in ("batch", "full_batch"):
            allowed = ("1", "full") if key == "batch" else ("0", "1", "true", "false", "yes", "no")
            v = _choice(p.label, key, value.lower(), allowed)
            opts["full_batch"] = v in ("full", "1", "true", "yes") if key == "full_batch" else v == "full"
        elif key == "clip":
            mode, _, bound = value.partition(":")
            opts["clip"] = _choice(p.label, "clip", mode, CLIP_MODES)
            if mode == "match_gd":
                if bound:
                    raise PlanError(f"setting {p.label!r}: clip=match_gd takes no value (GD's norms are the bound)")
            elif not bound:
                raise PlanError(f"setting {p.label!r}: clip={mode} needs a bound, e.g. clip={mode}:1.0")
            else:
                opts["clip_value"] = _float(p.label, "clip bound", bound, positive=True)
        else:
            opts[key] = own[key].parse(p.label, key, value)
    for key, option in own.items():
        opts.setdefault(key, option.default)
    return opts


@dataclass(frozen=True)
class ProcessOption:
    """A process-specific setting option (declared in `Process.options`)."""

    default: object
    choices: tuple[str, ...] | None = None
    doc: str = ""

    def parse(self, setting: str, key: str, value: str):
        if self.choices is not None:
            return _choice(setting, key, value, self.choices)
        return value


# ---------------------------------------------------------------- cells


@dataclass(frozen=True)
class ModelSpec:
    name: str
    revision: str | None = None


@dataclass(frozen=True)
class Compute:
    """How a cell is computed; none of it changes the numbers beyond float rounding order."""

    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 16
    cache_prefix: bool = True
    progress: bool = True


@dataclass(frozen=True)
class CellPlan:
    """Everything that decides one cell, resolved (no None meaning "the default" is left)."""

    model: ModelSpec
    task: Task
    seed: int
    k: int
    eval_cap: int
    protocol: Protocol
    separator: str
    record_at: str
    label_switch: bool
    settings: tuple[SettingPlan, ...]  # in run order: dependencies first
    icl_tokenization: str = "piecewise"
    control: str | None = None  # None, or a re-initialized control model (CONTROLS)
    order: int = 0  # 0: the demonstrations in their selected order; o >= 1: permutation o (data.demo_order)
    data_dir: str | None = None
    data_source: str = "auto"
    compute: Compute = field(default_factory=Compute)
    out: Path | None = None
    overwrite: bool = False
    n_eval: int | None = None  # eval examples the data gives (<= eval_cap), once the data is checked
    ranking: bool = True  # record the attention ranking (iclgd.ranking_record) where ICL and a process run

    @property
    def labels(self) -> list[str]:
        return [s.label for s in self.settings]

    @property
    def records_ranking(self) -> bool:
        """Whether the cell records the attention ranking: asked for, and ICL and a process to compare."""
        return self.ranking and "icl" in self.labels and any(s.process for s in self.settings)

    def setting(self, label: str) -> SettingPlan:
        for s in self.settings:
            if s.label == label:
                return s
        raise KeyError(label)

    def decisive(self) -> dict:
        """What changes this cell's numbers: a finished folder is reused only if this matches."""
        return {
            "model": asdict(self.model), "task": self.task.to_dict(), "seed": self.seed, "k": self.k,
            "eval_cap": self.eval_cap, "protocol": self.protocol.to_dict(), "separator": self.separator,
            "record_at": self.record_at, "label_switch": self.label_switch, "dtype": self.compute.dtype,
            "control": self.control, "icl_tokenization": self.icl_tokenization,
            "settings": sorted((s.to_dict() for s in self.settings), key=lambda s: s["label"]),
            # order 0 is the unpermuted cell, which folders made before orders existed also are: left
            # out, so a sweep that adds --orders reuses them
            **({"order": self.order} if self.order else {}),
            # adds records without changing any other number: iclgd.sweep.mismatch lets a folder that
            # has them serve a request without them
            "ranking": self.records_ranking,
        }

    def to_dict(self) -> dict:
        d = self.decisive()
        d["settings"] = [s.to_dict() for s in self.settings]
        d.update(data_dir=self.data_dir, data_source=self.data_source, compute=asdict(self.compute),
                 out=None if self.out is None else str(self.out))
        return d

    def with_(self, **kw) -> CellPlan:
        return replace(self, **kw)


def resolve_cell(cfg: RunConfig | CellPlan, *, out: str | Path | None = None, overwrite: bool = False,
                 check_data: bool = True, check_out: bool = True) -> CellPlan:
    """Resolve and check one cell (PlanError on any bad input). A CellPlan passes through,
    with `out` set if given. `check_data` reads the task's data to check k, the eval set and
    the held-out pool; `check_out` checks the output folder (iclgd.runfolder.check_out)."""
    if isinstance(cfg, CellPlan):
        plan = cfg if out is None else replace(cfg, out=Path(out), overwrite=overwrite)
        if check_out and plan.out is not None:
            _check_out(plan)
        return plan
    if not isinstance(cfg, RunConfig):
        raise TypeError(f"expected a RunConfig or CellPlan, got {type(cfg).__name__}")
    protocol, task = get_protocol(cfg.protocol), get_task(cfg.task)
    _check_int("k", cfg.k, 0)
    _check_int("seed", cfg.seed, None)
    _check_int("batch size", cfg.batch_size, 1)
    if cfg.eval_cap is not None:
        _check_int("eval cap", cfg.eval_cap, 1)
    _check_order(cfg.order, cfg.k)
    for what, value, choices in (("record_at", cfg.record_at, RECORD_AT),
                                 ("ICL tokenization", cfg.icl_tokenization, TOKENIZATIONS),("lr source", cfg.lr_source, LR_SOURCES),
                                 ("dtype", cfg.dtype, DTYPES), ("data source", cfg.data_source, DATA_SOURCES),
                                 ("parameter group", cfg.params, PARAM_GROUPS), ("control", cfg.control, CONTROLS)):
        if value is not None and value not in choices:
            raise PlanError(str(unknown_name(what, value, list(choices))))
    if cfg.lr is not None and not (isinstance(cfg.lr, (int, float)) and math.isfinite(cfg.lr) and cfg.lr >= 0):
        raise PlanError(f"--lr must be a finite number >= 0, got {cfg.lr!r}")
    if cfg.lr is not None and cfg.lr_source is not None:
        raise PlanError("--lr fixes every process's learning rate; drop --lr-source (or --lr)")
    separator = protocol.separator if cfg.separator is None else cfg.separator
    if not separator:
        raise PlanError("the separator is empty; use e.g. '\\n\\n', '\\n' or eos")
    _check_device(cfg.device)
    _check_model_name(cfg.model, cfg.revision)

    parsed = parse_settings(cfg.settings)
    settings = []
    for p, opts in parsed:
        if p.name in BASE_SETTINGS:
            settings.append(SettingPlan(p.label, p.name))
            continue
        if cfg.k == 0:
            raise PlanError(f"setting {p.label!r} trains on the demonstrations, but k = 0 gives none; "
                            "use k >= 1 or drop the process")
        own = {k: v for k, v in opts.items() if k not in ("lr", "params", "full_batch", "clip", "clip_value")}
        settings.append(SettingPlan(
            p.label, p.name, process=True, lr=_lr_rule(p.label, opts.get("lr"), cfg, task, protocol),
            params=opts["params"] or cfg.params, full_batch=opts["full_batch"], clip=opts["clip"],
            clip_value=opts["clip_value"], options=tuple(sorted(own.items())),
            needs=("gd",) if opts["clip"] == "match_gd" else ()))
    settings = _ordered(settings)
    eval_cap = cfg.eval_cap if cfg.eval_cap is not None else min(task.eval_cap, protocol.eval_cap)
    plan = CellPlan(
        model=ModelSpec(cfg.model, cfg.revision), task=task, seed=cfg.seed, k=cfg.k, eval_cap=eval_cap,
        protocol=protocol, separator=separator, record_at=cfg.record_at or protocol.record_at,
        label_switch=cfg.label_switch, settings=tuple(settings), control=cfg.control, order=cfg.order,
        data_dir=cfg.data_dir,
        icl_tokenization=cfg.icl_tokenization or protocol.icl_tokenization,
        data_source=cfg.data_source, ranking=bool(cfg.ranking),
        compute=Compute(cfg.device, cfg.dtype, cfg.batch_size, cfg.cache_prefix, cfg.progress),
        out=None if out is None else Path(out), overwrite=overwrite)
    if check_data:
        plan = replace(plan, n_eval=check_cell_data(plan))
    if check_out and plan.out is not None:
        _check_out(plan)
    return plan


def _check_out(plan: CellPlan) -> None:
    from iclgd import outputs
    from iclgd.runfolder import layout

    outputs.check_out(plan.out, "run", plan.overwrite, names=layout(plan.labels))


def _check_int(what: str, value, low: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlanError(f"{what} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise PlanError(f"{what} must be >= {low}, got {value}")


def _check_order(order, k) -> None:
    """Order o must name one of the k! orderings (o = 0 is the selection's own; iclgd.data)."""
    from iclgd.data import n_orderings

    _check_int("order", order, 0)
    if order >= n_orderings(k):  # k is checked before
        raise PlanError(f"order {order} asked, but k = {k} demonstrations have {n_orderings(k)} ordering(s): "
                        f"use an order below {n_orderings(k)}")


def _lr_rule(label: str, own: float | None, cfg: RunConfig, task: Task, protocol: Protocol) -> LrRule:
    if own is not None:
        return LrRule("setting", own)
    if cfg.lr is not None:
        return LrRule("run", float(cfg.lr))
    if task.lr is None:
        raise PlanError(f"task {task.name!r} has no reference learning rate, so {label!r} has none to "
                        "start from: pass --lr, write lr= in the setting, or add lr: to the task's YAML")
    if (cfg.lr_source or protocol.lr_source) == "reference":
        return LrRule("reference", task.lr)
    return LrRule("search", task.lr, tuple(protocol.lr_grid), protocol.lr_search_n)


def _ordered(settings: list[SettingPlan]) -> list[SettingPlan]:
    """ZSL and ICL first, then every setting after the ones it needs, otherwise as given."""
    labels = {s.label for s in settings}
    for s in settings:
        for need in s.needs:
            if need not in labels:
                raise PlanError(f"setting {s.label!r} needs {need!r} in the same cell (clip=match_gd clips "
                                f"to GD's gradient norms); add {need} to --settings")
    done: list[SettingPlan] = [s for s in settings if s.name in BASE_SETTINGS]
    rest = [s for s in settings if s.name not in BASE_SETTINGS]
    while rest:
        ready = next(s for s in rest if all(n in {d.label for d in done} for n in s.needs))
        done.append(ready)
        rest.remove(ready)
    return done


def _check_device(device: str) -> None:
    if device in ("cpu", "auto"):
        return
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        import torch

        if not torch.cuda.is_available():
            raise PlanError(f"--device {device}: no CUDA device is visible to torch here; use --device cpu")
        if ":" in device and int(device[5:]) >= torch.cuda.device_count():
            raise PlanError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        return
    raise PlanError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto")


def _check_model_name(name: str, revision: str | None) -> None:
    from iclgd.models import check_model_name

    check_model_name(name, revision)


def check_cell_data(plan: CellPlan) -> int:
    """Read the cell's data and check what depends on it: k against the demo pool, a non-empty
    eval set, enough held-out rows for every learning-rate search (DataError otherwise). Returns
    the number of eval examples."""
    from iclgd.data import held_out, select_examples

    sel = select_examples(plan.task, plan.seed, plan.k, plan.data_dir, eval_cap=plan.eval_cap,
                          eval_seed=plan.protocol.eval_seed, source=plan.data_source)
    n = max((s.lr.search_n for s in plan.settings if s.lr is not None and s.lr.source == "search"), default=0)
    if n:
        held_out(plan.task, plan.seed, plan.k, n, plan.data_dir, plan.data_source, eval_cap=plan.eval_cap,
                 eval_seed=plan.protocol.eval_seed)
    return len(sel.eval)


# ---------------------------------------------------------------- a sweep's cells


def cell_dir(root: str | Path, cell: CellPlan | RunConfig, *, with_k: bool = False) -> Path:
    """The cell's folder: ROOT/<model stem>/<protocol>/<task stem>_s<seed>[_k<k>][_o<order>][_<control>],
    stable across runs. `with_k` (a sweep over several k) names k; a sweep over one k does not,
    so its folders are those of sweeps made before k lists existed and resume. Order 0 has no
    suffix for the same reason."""
    model_name = cell.model.name if isinstance(cell, CellPlan) else cell.model
    protocol = cell.protocol.name if isinstance(cell, CellPlan) else get_protocol(cell.protocol).name
    task = cell.task.name if isinstance(cell, CellPlan) else get_task(cell.task).name
    model = _safe_name(Path(model_name).stem if model_name.endswith(".gguf") else Path(model_name).name)
    control = f"_{cell.control}" if cell.control else ""
    k = f"_k{cell.k}" if with_k else ""
    order = f"_o{cell.order}" if cell.order else ""
    return (Path(root) / model / _safe_name(protocol)
            / f"{_safe_name(task)}_s{cell.seed}{k}{order}{control}")


def plan_cells(
    tasks: Sequence[str],
    seeds: Sequence[int] | None = None,
    model: str = "smollm2-135m",
    protocol: str = "default",
    k: int | Sequence[int] = 32,
    settings: Sequence[str] | str = ("zsl", "icl"),
    eval_cap: int | None = None,
    data_dir: str | None = None,
    *,
    root: str | Path | None = None,
    check_data: bool = True,
    controls: Sequence[str] = (),
    control_seeds: Sequence[int] | str | None = None,
    orders: int = 1,
    **run_options,
) -> list[CellPlan]:
    """One resolved CellPlan per (task, seed, k, order), tasks in the order given, each followed
    by its untrained controls (`controls`, SPEC §7) for the seeds in `control_seeds` (default:
    every seed; "first": each task's first seed, as the tasks' seeds differ); with `root`, each cell's folder is set (`cell_dir`).

    `k`: one k or a list (a k sweep). A k = 0 cell has no demonstrations, so it runs only the
    sweep's zsl and icl settings (ICL with k = 0 is ZSL; a process has nothing to train on).
    `orders`: N >= 1 demonstration orders per cell: order 0 the selection's own, orders 1..N-1
    seeded permutations of the same demonstrations (`iclgd.data.demo_order`); a k with fewer than
    N orderings (k! < N: k = 0, 1, 2) gets all k! of them. Every order is a whole cell: ZSL is
    rerun (it cannot depend on the order, which the report checks) so each folder stands alone,
    and a learning-rate search, if the plan asks for one, runs on that order's demonstrations
    (--lr or --lr-source reference holds the rate fixed across orders).

    `seeds` None takes each task's reference seeds (`Task.seeds`); a protocol with
    `seeds == "first"` (dai2023) keeps only the first. Explicit seeds apply to every task.
    `run_options` are further RunConfig fields (device, dtype, batch_size, lr, ...).
    """
    from iclgd.data import n_orderings  # numpy only: still no model code

    proto = get_protocol(protocol)
    if isinstance(settings, str):
        settings = split_settings(settings)
    if not tasks:
        raise PlanError("no tasks given; e.g. --tasks sst2,cb")
    ks = _k_list(k)
    if isinstance(orders, bool) or not isinstance(orders, int) or orders < 1:
        raise PlanError(f"orders must be an integer >= 1 (1: the original order only), got {orders!r}")
    zero_k = _zero_k_settings(settings) if 0 in ks else ()
    if isinstance(control_seeds, str) and control_seeds != "first":
        raise PlanError(f"control seeds: a list of seeds or 'first' (each task's first seed), got {control_seeds!r}")
    cells = []
    for name in tasks:
        task = get_task(name)
        task_seeds = list(seeds) if seeds is not None else list(task.seeds)
        if seeds is None and proto.seeds == "first":
            task_seeds = task_seeds[:1]
        if not task_seeds:
            raise PlanError(f"task {task.name!r} has no reference seeds; pass --seeds")
        for s in task_seeds:
            with_controls = (control_seeds is None or (s == task_seeds[0] if control_seeds == "first"
                                                       else s in control_seeds))
            for kk in ks:
                for order in range(min(orders, n_orderings(kk))):
                    for control in (None, *(controls if with_controls else ())):
                        cfg = RunConfig(model=model, task=task, seed=s, k=kk,
                                        settings=tuple(zero_k if kk == 0 else settings), protocol=proto,
                                        eval_cap=eval_cap, data_dir=data_dir, control=control, order=order,
                                        **run_options)
                        out = cell_dir(root, cfg, with_k=len(ks) > 1) if root is not None else None
                        cells.append(resolve_cell(cfg, out=out, check_data=check_data, check_out=False))
    dirs = [c.out for c in cells if c.out is not None]
    dupes = sorted({str(d) for d in dirs if dirs.count(d) > 1})
    if dupes:
        raise PlanError(f"several cells share a folder (same model, protocol, task, seed, k, order): {dupes}")
    return cells


def _k_list(k: int | Sequence[int]) -> list[int]:
    """A sweep's k values, checked: integers >= 0, each once (a repeated k would be one folder twice)."""
    ks = [k] if isinstance(k, int) and not isinstance(k, bool) else list(k)
    if not ks:
        raise PlanError("no k given; e.g. --k 32, or a k sweep --k 0,4,16")
    for x in ks:
        if isinstance(x, bool) or not isinstance(x, int) or x < 0:
            raise PlanError(f"k must be an integer >= 0, got {x!r} (in --k {','.join(map(str, ks))})")
    twice = sorted({x for x in ks if ks.count(x) > 1})
    if twice:
        raise PlanError(f"k {', '.join(map(str, twice))} given twice in --k {','.join(map(str, ks))}; list each k once")
    return ks


def _zero_k_settings(settings: Sequence[str]) -> tuple[str, ...]:
    """The settings a k = 0 cell runs: the sweep's zsl and icl (no demonstrations to train on)."""
    base = tuple(p.label for p, _ in parse_settings(list(settings)) if p.name in BASE_SETTINGS)
    if not base:
        raise PlanError("k = 0 cells run only zsl and icl (no demonstrations to train on), and --settings has "
                        "neither: add zsl,icl or drop k = 0")
    return base


def _safe_name(text: str) -> str:
    from iclgd.runfolder import safe_name

    return safe_name(text)


# ---------------------------------------------------------------- a command's plan


@dataclass(frozen=True)
class Plan:
    """The cells one command runs, where they go, and how."""

    command: str
    cells: tuple[CellPlan, ...]
    out: Path | None = None
    overwrite: bool = False
    backend: str = "local"
    plugins: tuple[str, ...] = ()

    def estimate(self) -> dict:
        """The work the plan asks for, counted in sequences through the model (no model needed)."""
        rows = [estimate_cell(c) for c in self.cells]
        total = {k: sum(r[k] for r in rows) for k in ("forward", "backward", "train_steps")}
        return {"cells": len(self.cells), **total, "per_cell": rows}

    def describe(self) -> str:
        """The plan as a person reads it: every cell, every setting, the work."""
        lines = [f"iclgd {self.command}: {len(self.cells)} cell(s)"
                 + (f" -> {self.out}" if self.out is not None else "")
                 + (f" (backend {self.backend})" if self.command == "reproduce" else "")]
        if self.plugins:
            lines.append(f"plugins: {', '.join(self.plugins)}")
        for c in self.cells:
            rev = f"@{c.model.revision}" if c.model.revision else ""
            n = f"{c.n_eval} eval examples (cap {c.eval_cap})" if c.n_eval is not None else f"eval cap {c.eval_cap}"
            ctrl = f" ({c.control} control)" if c.control else ""
            order = f" · order {c.order}" if c.order else ""
            lines.append(f"- {c.model.name}{rev}{ctrl} · {c.task.name} · seed {c.seed} · k {c.k}{order} · {n} · protocol {c.protocol.name} · separator {c.separator!r} ({c.icl_tokenization}) · "
                         f"record at {c.record_at}{' · label switch' if c.label_switch else ''} · "
                         f"ranking {'on' if c.records_ranking else 'off'} · {c.compute.device}/"
                         f"{c.compute.dtype}" + (f" -> {c.out}" if c.out is not None and self.command == "reproduce"
                                                  else ""))
            for s in c.settings:
                if not s.process:
                    lines.append(f"    {s.label}")
                    continue
                extra = [f"lr {s.lr.describe()}", f"params {s.params}", "full batch" if s.full_batch else "batch 1"]
                if s.clip:
                    extra.append(f"clip {s.clip}" + (f":{s.clip_value:g}" if s.clip_value is not None else ""))
                extra += [f"{k}={v}" for k, v in s.options]
                lines.append(f"    {s.label}: " + ", ".join(extra))
        work = self.estimate()
        lines.append(f"work: {work['forward']} forward and {work['backward']} backward passes of one "
                     f"sequence ({work['train_steps']} training steps) over {work['cells']} cell(s)")
        return "\n".join(lines)


def estimate_cell(c: CellPlan) -> dict:
    """Sequences through the model for one cell: each eval query, each training step's
    demonstrations (a full-batch step counts k), each search candidate's training and scoring."""
    n, k = c.n_eval if c.n_eval is not None else c.eval_cap, c.k
    forward = backward = steps = 0
    for s in c.settings:
        if s.name == "zsl":
            forward += n
        elif s.name == "icl":
            forward += n + 1
        else:
            runs = len(s.lr.candidates)
            cost = 2 if s.name == "lingd" else 1  # a forward-mode pass carries a tangent
            steps += runs * (1 if s.full_batch else k)
            forward += runs * k * cost + cost * n + (runs * s.lr.search_n * cost if runs > 1 else 0)
            backward += runs * k
    return {"task": c.task.name, "seed": c.seed, "forward": forward, "backward": backward, "train_steps": steps}


def env_threads() -> int:
    """Torch threads this process would use (for the plan's record; no torch import)."""
    return int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
