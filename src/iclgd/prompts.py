"""Formatting demonstrations and queries, and turning them into token ids for a model.

Tokenization choice: every piece (BOS, each demonstration, the separator, each query, each
label word) is tokenized on its own and the pieces are concatenated as ids. Tokenizing the
joined text instead lets BPE merge across piece boundaries, so the query's tokens would
differ between ZSL, ICL and the processes, and the position read for the prediction would
shift. With separate pieces the query is the same ids in every setting; the cost is a prompt
that can differ by a token or two at the boundaries from what tokenizing the joined string
gives.

A demonstration is the ids of its query text followed by the ids of ``" " + label word``,
so the token a process trains on after the ``:`` is exactly the label token the prediction
reads (SPEC §2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from iclgd.data import Example, Selection
from iclgd.errors import PromptError
from iclgd.tasks import Task

_EOS_NAMES = ("eos", "<eos>")


def format_query(task: Task, ex: Example) -> str:
    """The query prompt, ending where the label word follows (``"... Label:"``)."""
    return task.template.format(**ex.fields)


def format_demo(task: Task, ex: Example, label: int) -> str:
    """A demonstration: the query prompt, a space, and the word of ``label``."""
    return f"{format_query(task, ex)} {task.label_words[label]}"


def _encode_many(tokenizer, texts: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Token ids of each distinct text, without special tokens, in one batched call."""
    unique = list(dict.fromkeys(texts))
    if not unique:
        return {}
    ids = tokenizer(unique, add_special_tokens=False)["input_ids"]
    return {t: tuple(i) for t, i in zip(unique, ids)}


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def label_token_ids(tokenizer, task: Task) -> list[int]:
    """The first token id of ``" " + word`` for each label word, in label order.

    Raises PromptError when a word tokenizes to nothing or two words share their first
    token (the prediction could not tell them apart, SPEC §2).
    """
    words = [" " + w for w in task.label_words]
    return _first_tokens(tokenizer, task, _encode_many(tokenizer, words))


def _first_tokens(tokenizer, task: Task, ids: dict[str, tuple[int, ...]]) -> list[int]:
    out: list[int] = []
    seen: dict[int, str] = {}
    for word in task.label_words:
        toks = ids[" " + word]
        if not toks:
            raise PromptError(f"label word {word!r} of task {task.name!r} tokenizes to nothing")
        first = toks[0]
        if first in seen:
            piece = tokenizer.convert_ids_to_tokens(first)
            raise PromptError(
                f"label words {seen[first]!r} and {word!r} of task {task.name!r} share their "
                f"first token {piece!r} (id {first}); the prediction reads only the first token. "
                "Choose label words that start differently for this tokenizer."
            )
        seen[first] = word
        out.append(first)
    return out


def uses_bos(tokenizer) -> bool:
    """Whether the tokenizer prepends a BOS token when special tokens are on."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = list(tokenizer("a")["input_ids"])
    plain = _encode(tokenizer, "a")
    return len(with_special) > len(plain) and with_special[0] == bos


def separator_ids(tokenizer, separator: str) -> list[int]:
    """Ids of the separator between demonstrations.

    ``"eos"``/``"<eos>"`` is the tokenizer's end-of-sequence token (the reference's choice,
    SPEC §5); any other string (``"\\n"``, ``"\\n\\n"``, ``" "``) is tokenized without special
    tokens. An empty separator raises PromptError.
    """
    if separator in _EOS_NAMES:
        if tokenizer.eos_token_id is None:
            raise PromptError("separator 'eos' asked, but the tokenizer has no EOS token")
        return [tokenizer.eos_token_id]
    ids = _encode(tokenizer, separator) if separator else []
    if not ids:
        raise PromptError(f"separator {separator!r} tokenizes to nothing; use e.g. '\\n' or eos")
    return ids


@dataclass(frozen=True)
class Prompts:
    """Token ids for one run: BOS, demonstrations, separator, queries, label tokens."""

    bos: tuple[int, ...]
    demos: tuple[tuple[int, ...], ...]
    separator: tuple[int, ...]
    queries: tuple[tuple[int, ...], ...]
    label_ids: tuple[int, ...]

    def icl_prefix(self, n_demos: int | None = None) -> list[int]:
        """bos + d1 + sep + ... + dn + sep, the part of an ICL prompt before the query.

        ``n_demos`` None means all demonstrations; 0 gives just the BOS (ZSL).
        """
        n = len(self.demos) if n_demos is None else n_demos
        if not 0 <= n <= len(self.demos):
            raise ValueError(f"n_demos={n} outside 0..{len(self.demos)}")
        out = list(self.bos)
        for d in self.demos[:n]:
            out += d
            out += self.separator
        return out

    def training_sequence(self, i: int) -> list[int]:
        """bos + demonstration i: one sequence an optimization process trains on."""
        return [*self.bos, *self.demos[i]]


def build_prompts(
    tokenizer,
    task: Task,
    selection: Selection,
    *,
    separator: str = "\n",
    demo_labels: Sequence[int] | None = None,
) -> Prompts:
    """Token ids of the selection's demonstrations and queries (see the module docstring).

    ``demo_labels`` are the labels the demonstrations carry (after label switching);
    default their gold labels. Each distinct text is tokenized once.
    """
    labels = [d.label for d in selection.demos] if demo_labels is None else list(demo_labels)
    if len(labels) != len(selection.demos):
        raise PromptError(f"{len(labels)} demo labels given for {len(selection.demos)} demos")
    if any(not 0 <= y < len(task.label_words) for y in labels):
        raise PromptError(f"demo labels {labels} out of range for {list(task.label_words)}")
    demo_q = [format_query(task, d) for d in selection.demos]
    eval_q = [format_query(task, e) for e in selection.eval]
    words = [" " + w for w in task.label_words]
    ids = _encode_many(tokenizer, [*demo_q, *eval_q, *words])
    label_ids = _first_tokens(tokenizer, task, ids)
    demos = tuple(ids[q] + ids[words[y]] for q, y in zip(demo_q, labels))
    bos = (tokenizer.bos_token_id,) if uses_bos(tokenizer) else ()
    return Prompts(
        bos=bos,
        demos=demos,
        separator=tuple(separator_ids(tokenizer, separator)),
        queries=tuple(ids[q] for q in eval_q),
        label_ids=tuple(label_ids),
    )


def check_fits(
    prompts: Prompts,
    max_length: int,
    *,
    eval_ids: Sequence[int],
    n_demos: int | None = None,
    extra: int = 0,
) -> None:
    """Raise PromptError if ICL prefix + some query + ``extra`` exceeds ``max_length``.

    ``eval_ids`` are the eval examples' ids, in the order of ``prompts.queries``; the error
    names the first one that does not fit.
    """
    if len(eval_ids) != len(prompts.queries):
        raise ValueError(f"{len(eval_ids)} eval ids for {len(prompts.queries)} queries")
    prefix = len(prompts.icl_prefix(n_demos))
    for ex_id, q in zip(eval_ids, prompts.queries):
        total = prefix + len(q) + extra
        if total > max_length:
            n = len(prompts.demos) if n_demos is None else n_demos
            raise PromptError(
                f"eval example {ex_id} does not fit the context: prefix {prefix} tokens "
                f"({n} demonstrations) + query {len(q)} + extra {extra} = {total} > limit "
                f"{max_length}. Use fewer demonstrations (--k), a shorter separator, or a "
                "model with a longer context."
            )


def demos_that_fit(prompts: Prompts, max_length: int, extra: int = 0) -> int:
    """The reference (dai2023) rule: the largest n with icl_prefix(n) + longest query fitting.

    Used to drop demonstrations from ICL only (SPEC §6.1 records why this is a flaw). Raises
    PromptError when even the query alone does not fit.
    """
    longest = max((len(q) for q in prompts.queries), default=0)
    length = len(prompts.bos)
    if length + longest + extra > max_length:
        raise PromptError(
            f"the longest query ({longest} tokens + {len(prompts.bos)} BOS + extra {extra}) "
            f"exceeds the limit {max_length} even with no demonstrations"
        )
    n = 0
    for d in prompts.demos:
        length += len(d) + len(prompts.separator)
        if length + longest + extra > max_length:
            break
        n += 1
    return n
