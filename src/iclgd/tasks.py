"""Task records: a dataset, its splits, a prompt template and label words.

A task is a small declarative record (STYLE.md §2). The six built-in tasks of SPEC.md §5 are
YAML files shipped as package data in ``iclgd/tasks/``; a user adds a seventh by writing one
more YAML file and passing its path wherever a task name is accepted
(``get_task("my_task.yaml")``, ``iclgd run --task my_task.yaml``). No Python is needed.

YAML keys (one mapping per file):

==============  ========  ==============================================================
key             required  meaning
==============  ========  ==============================================================
name            yes       short name used in run folders and reports
template        yes       prompt with dataset columns in braces, ending where the label
                          word follows: ``"Review: {text} Sentiment:"``
label_words     yes       list of at least two distinct words in label-id order; the
                          prompt adds a leading space (``" Positive"``)
hf_path         one of    Hugging Face dataset path (``glue``, ``SetFit/sst5``)
local_dir       these     where the data lives offline. A plain name (``glue-sst2``) is a
                          folder under the data directory holding ``<split>.jsonl`` or
                          ``<split>.csv``. A path (contains ``/``, ends in ``.jsonl`` or
                          ``.csv``, or contains ``{split}``) is read directly and is
                          resolved relative to the YAML file: a folder, one file used
                          for every split, or a pattern such as ``data/{split}.csv``.
                          Default: the Hub name with ``/`` written ``-``.
hf_name         no        Hugging Face config name (``sst2``), default none
label_column    no        column holding the integer label id, default ``label``
demo_split      no        split the demonstrations are drawn from, default ``train``
eval_split      no        split the queries are drawn from, default ``validation``; may
                          equal demo_split (demonstrations are then excluded from eval)
eval_cap        no        maximum number of eval examples, default 2000
lr              no        reference GD learning rate (SPEC §5), default none
seeds           no        list of reference seeds (an int is accepted), default none
==============  ========  ==============================================================

Example ``my_task.yaml``::

    name: spam
    local_dir: spam_data/{split}.csv
    template: "Message: {text} Spam:"
    label_words: ["no", "yes"]
    eval_split: test
"""

from __future__ import annotations

import dataclasses
import functools
import string
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from iclgd.errors import DataError
from iclgd.registry import unknown_name

_FILE_SUFFIXES = (".jsonl", ".csv")


@dataclass(frozen=True)
class Task:
    """One classification task: where its data is and how a prompt is built from a row."""

    name: str
    hf_path: str
    hf_name: str | None
    local_dir: str
    template: str
    label_words: tuple[str, ...]
    label_column: str = "label"
    demo_split: str = "train"
    eval_split: str = "validation"
    eval_cap: int = 2000
    lr: float | None = None
    seeds: tuple[int, ...] = ()

    @property
    def fields(self) -> tuple[str, ...]:
        """The dataset columns the template reads, in order of first appearance."""
        return template_fields(self.template)

    @property
    def n_classes(self) -> int:
        return len(self.label_words)

    def to_dict(self) -> dict:
        """A plain dict (lists, not tuples) for run folders and YAML/JSON round trips."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["label_words"] = list(self.label_words)
        out["seeds"] = list(self.seeds)
        return out


def template_fields(template: str) -> tuple[str, ...]:
    """Named fields of a ``str.format`` template; raises ValueError on a malformed one."""
    names: list[str] = []
    for _, name, spec, conv in string.Formatter().parse(template):
        if name is None:
            continue
        if name == "" or name.isdigit():
            raise ValueError("positional fields like '{}' are not allowed; name the column")
        if spec or conv or not name.isidentifier():
            raise ValueError(f"field {{{name}}} must be a plain column name")
        if name not in names:
            names.append(name)
    return tuple(names)


def default_local_dir(hf_path: str, hf_name: str | None) -> str:
    """The offline folder name of a Hub dataset: ``glue/sst2`` -> ``glue-sst2``."""
    hub = f"{hf_path}/{hf_name}" if hf_name else hf_path
    return hub.replace("/", "-")


def is_path_like(local_dir: str) -> bool:
    """Whether ``local_dir`` names a path to read directly rather than a folder name."""
    return (
        "/" in local_dir
        or "\\" in local_dir
        or "{split}" in local_dir
        or local_dir.endswith(_FILE_SUFFIXES)
        or local_dir.startswith(("~", "."))
    )


_REQUIRED = ("name", "template", "label_words")
_KNOWN = tuple(f.name for f in dataclasses.fields(Task))


def task_from_dict(record: dict, *, source: str = "<dict>", base_dir: Path | None = None) -> Task:
    """Validate a task record (as read from YAML) and build the Task.

    ``source`` names the record in errors; ``base_dir`` resolves a path-like ``local_dir``.
    Raises DataError naming the offending key and what it should be.
    """

    def bad(msg: str) -> DataError:
        return DataError(f"task file {source}: {msg}")

    if not isinstance(record, dict):
        raise bad("expected a mapping of keys (name, template, label_words, ...)")
    unknown = sorted(set(record) - set(_KNOWN))
    if unknown:
        raise bad(f"unknown key(s) {', '.join(unknown)}; known keys: {', '.join(_KNOWN)}")
    missing = [k for k in _REQUIRED if record.get(k) in (None, "", [])]
    if missing:
        raise bad(f"missing required key(s) {', '.join(missing)}")
    if not record.get("hf_path") and not record.get("local_dir"):
        raise bad("give hf_path (a Hugging Face dataset) or local_dir (a folder or file)")

    name, template = record["name"], record["template"]
    if not isinstance(name, str) or not isinstance(template, str):
        raise bad("name and template must be strings")
    try:
        tfields = template_fields(template)
    except ValueError as e:
        raise bad(f"template {template!r}: {e}") from None
    if not tfields:
        raise bad(f"template {template!r} names no column; write e.g. 'Review: {{text}} Label:'")

    words = record["label_words"]
    if not isinstance(words, list) or len(words) < 2:
        raise bad("label_words must be a list of at least two words")
    # YAML reads bare True/False/yes/no as booleans; a user almost always meant the word.
    if any(not isinstance(w, str) for w in words):
        raise bad(f"label_words {words!r}: quote every word (YAML reads True/no/1 as non-text)")
    if any(w != w.strip() or not w for w in words):
        raise bad(f"label_words {words!r}: no empty words or surrounding spaces (one is added)")
    if len(set(words)) != len(words):
        raise bad(f"label_words {words!r} are not distinct")

    hf_path = record.get("hf_path") or ""
    hf_name = record.get("hf_name")
    local_dir = record.get("local_dir") or default_local_dir(hf_path, hf_name)
    if base_dir is not None and is_path_like(local_dir):
        p = Path(local_dir).expanduser()
        local_dir = str(p if p.is_absolute() else (base_dir / p).resolve())

    try:
        eval_cap = int(record.get("eval_cap", 2000))
        lr = record.get("lr")
        lr = None if lr is None else float(lr)  # PyYAML reads "5e-4" as a string
        seeds = record.get("seeds") or ()
        seeds = (int(seeds),) if isinstance(seeds, int) else tuple(int(s) for s in seeds)
    except (TypeError, ValueError) as e:
        raise bad(f"eval_cap must be an int, lr a number, seeds a list of ints ({e})") from None
    if eval_cap < 1:
        raise bad(f"eval_cap must be at least 1, got {eval_cap}")
    if lr is not None and not lr > 0:
        raise bad(f"lr must be positive, got {lr}")

    text_keys = ("label_column", "demo_split", "eval_split")
    kw = {k: record[k] for k in text_keys if record.get(k) is not None}
    if any(not isinstance(v, str) for v in kw.values()):
        raise bad(f"{', '.join(text_keys)} must be strings")
    if kw.get("label_column") in tfields:
        raise bad(f"label_column {kw['label_column']!r} is also a template field")
    return Task(
        name=name,
        hf_path=hf_path,
        hf_name=hf_name,
        local_dir=local_dir,
        template=template,
        label_words=tuple(words),
        eval_cap=eval_cap,
        lr=lr,
        seeds=seeds,
        **kw,
    )


def load_task_file(path: str | Path) -> Task:
    """Read and validate one task YAML file (keys in the module docstring)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"task file {path} does not exist")
    try:
        record = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise DataError(f"task file {path} is not valid YAML: {e}") from None
    return task_from_dict(record, source=str(path), base_dir=path.parent.resolve())


@functools.lru_cache(maxsize=1)
def _builtin() -> dict[str, Task]:
    folder = resources.files("iclgd").joinpath("tasks")
    out: dict[str, Task] = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            record = yaml.safe_load(entry.read_text(encoding="utf-8"))
            task = task_from_dict(record, source=f"iclgd/tasks/{entry.name}")
            out[task.name] = task
    return out


def task_names() -> list[str]:
    """Names of the built-in tasks, sorted."""
    return sorted(_builtin())


def get_task(name_or_path: str | Path | Task) -> Task:
    """A built-in task by name, or a user's task from a YAML file path.

    A Task passes through unchanged. An unknown name raises UnknownNameError with the
    closest built-in names.
    """
    if isinstance(name_or_path, Task):
        return name_or_path
    key = str(name_or_path)
    builtin = _builtin()
    if key in builtin:
        return builtin[key]
    if key.endswith((".yaml", ".yml")) or Path(key).expanduser().is_file():
        return load_task_file(key)
    err = unknown_name("task", key, list(builtin))
    raise type(err)(f"{err} (or pass the path to a task .yaml file)")
