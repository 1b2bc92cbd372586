"""Formatting demonstrations and queries, and turning them into token ids for a model.

The start token (SPEC §3). Every sequence the model sees (a ZSL or process query, the ICL prompt,
each training demonstration, the held-out search prompts) begins with one start token, so that
position 0, where models put their attention sink, holds the same kind of token in every setting.
Which token (`start_token`), in order:
1. the family's own rule in its `arch.ArchSpec` (XGLM / fairseq-dense: the tokenizer's `bos_token`,
   fairseq's `<s>`, which the reference code put at position 0);
2. the token the tokenizer itself prepends (Llama and Mistral `<s>`, Gemma `<bos>`, OPT `</s>`);
3. `<|endoftext|>` if the vocabulary has it: the document separator that GPT-2-style byte-level
   BPE models (GPT-2, GPT-Neo, Pythia, Qwen2, SmolLM2) were pretrained with. On SmolLM2-135M it
   takes 0.42 of the last position's attention (mean over layers and heads, 20 SST-2 queries), as
   the first query token does (0.45) when there is no start token, against 0.25 for
   `<|im_start|>`, the BOS its instruct tokenizer declares;
4. the tokenizer's `bos_token`, else its `eos_token`; a tokenizer with none is an error.
The start token is never a recorded key (recording starts after the prefix) and never a loss
target (the loss predicts tokens 1..n of a sequence).

Tokenization of the ICL prompt (`tokenization`). "piecewise": every piece (each demonstration,
the separator, each query, each label word) is tokenized on its own and the ids concatenated.
"natural": the ICL prefix is tokenized as the text the model would read, demonstrations and
separators joined, so a separator such as "\n\n" becomes the tokens it becomes in running text
(one token alone, two before a word in GPT-2-style BPE). In both, the query keeps its own ids
in every setting (checked: natural tokenization of prefix + query must end in the query's ids,
else PromptError), so recorded vectors align across ZSL, ICL and the processes. A demonstration
is the ids of its query text followed by the ids of ``" " + label word``, so the token a process
trains on after the ``:`` is exactly the label token the prediction reads (SPEC §2); natural
tokenization must agree (checked).

Demonstration spans (`Prompts.demo_spans`): where each demonstration's tokens sit in the full ICL
prefix, the token-for-token counterpart of its training sequence (start token dropped), which the
attention ranking of SPEC §4 (iclgd.ranking_record) aligns on. Piecewise, they follow from the
pieces' lengths. Natural, they are read from the character offsets of the prefix's tokens: the
tokens lying inside demonstration i's characters form its span, and the span must hold exactly
demonstration i's own ids. Where a token crosses a demonstration's boundary (text merged with the
separator or the next demonstration: BPE merges across whitespace, a SentencePiece piece spanning
"word\n"), or the tokenizer gives no offsets, the spans are None and `spans_note` says why: the
demonstration's tokens in context are not the tokens it was trained on, so the ranking is
undefined for the cell rather than aligned on mismatched tokens. With SmolLM2's and Gemma-3's
tokenizers and the default "\n\n" separator no boundary merges (the separator becomes its own
tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from iclgd.data import Example, Selection
from iclgd.errors import PromptError
from iclgd.tasks import Task

_EOS_NAMES = ("eos", "<eos>")
TOKENIZATIONS = ("piecewise", "natural")
DOC_SEPARATOR = "<|endoftext|>"


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
    return prepended_token(tokenizer) == bos


def prepended_token(tokenizer) -> int | None:
    """The token the tokenizer puts before every text when special tokens are on, if any."""
    with_special = list(tokenizer("a")["input_ids"])
    plain = _encode(tokenizer, "a")
    if len(with_special) > len(plain) and with_special[-len(plain):] == plain:
        return with_special[0]
    return None


def start_token(tokenizer, family_rule: str | None = None) -> tuple[int, str]:
    """The start token's id and the rule that chose it (module docstring)."""
    if family_rule == "bos" and tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id, "the family's rule: the tokenizer's bos_token"
    first = prepended_token(tokenizer)
    if first is not None:
        return first, "the token the tokenizer prepends"
    vocab = tokenizer.get_vocab()
    if DOC_SEPARATOR in vocab:
        return vocab[DOC_SEPARATOR], f"{DOC_SEPARATOR}, the pretraining document separator"
    if tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id, "the tokenizer's bos_token"
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id, "the tokenizer's eos_token (it has no bos_token)"
    raise PromptError("the tokenizer has no BOS, no EOS and no <|endoftext|> token to start sequences with "
                      "(SPEC §3); add one to the tokenizer")


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
    """Token ids for one run: the start token (`bos`), demonstrations, separator, queries, label
    tokens, and the ICL prefix for every number of demonstrations (`prefixes[n]`)."""

    bos: tuple[int, ...]  # the start token (module docstring), before every sequence
    demos: tuple[tuple[int, ...], ...]
    separator: tuple[int, ...]
    queries: tuple[tuple[int, ...], ...]
    label_ids: tuple[int, ...]
    prefixes: tuple[tuple[int, ...], ...] = ()  # [n] -> start + d1 + sep + ... + dn + sep
    tokenization: str = "piecewise"
    # (start, stop) of each demonstration's tokens in icl_prefix() (all demonstrations), or None
    # where a demonstration's tokens in context differ from its own (module docstring); then why
    demo_spans: tuple[tuple[int, int], ...] | None = None
    spans_note: str = ""

    def icl_prefix(self, n_demos: int | None = None) -> list[int]:
        """start + d1 + sep + ... + dn + sep, the part of an ICL prompt before the query, as the
        run's tokenization gives it. ``n_demos`` None means all demonstrations; 0 gives just the
        start token (ZSL)."""
        n = len(self.demos) if n_demos is None else n_demos
        if not 0 <= n <= len(self.demos):
            raise ValueError(f"n_demos={n} outside 0..{len(self.demos)}")
        if self.prefixes:
            return list(self.prefixes[n])
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
    start: int | None = None,
    tokenization: str = "piecewise",
) -> Prompts:
    """Token ids of the selection's demonstrations and queries (see the module docstring).

    ``demo_labels`` are the labels the demonstrations carry (after label switching);
    default their gold labels. ``start`` is the start token's id (default: `start_token`'s
    choice). Each distinct text is tokenized once.
    """
    if tokenization not in TOKENIZATIONS:
        raise PromptError(f"unknown ICL tokenization {tokenization!r}; use one of {', '.join(TOKENIZATIONS)}")
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
    bos = (start_token(tokenizer)[0] if start is None else start,)
    sep = tuple(separator_ids(tokenizer, separator))
    queries = tuple(ids[q] for q in eval_q)
    if tokenization == "natural" and separator not in _EOS_NAMES:
        demo_texts = [f"{q} {task.label_words[y]}" for q, y in zip(demo_q, labels)]
        prefixes = _natural_prefixes(tokenizer, bos, demo_texts, demos, separator, eval_q, queries)
        probe = eval_q[0] if eval_q else "x"
        spans, note = _natural_spans(tokenizer, len(bos), demo_texts, demos, separator, prefixes[-1], probe)
    else:  # piecewise; with an EOS separator the two are the same (it is a token, not text)
        prefixes = [bos]
        for d in demos:
            prefixes.append(prefixes[-1] + d + sep)
        starts = [len(p) for p in prefixes[:-1]]
        spans, note = tuple((a, a + len(d)) for a, d in zip(starts, demos)), ""
    return Prompts(bos=bos, demos=demos, separator=sep, queries=queries, label_ids=tuple(label_ids),
                   prefixes=tuple(prefixes), tokenization=tokenization, demo_spans=spans, spans_note=note)


def _natural_spans(tokenizer, n_bos: int, demo_texts, demos, separator, prefix, probe) -> tuple[tuple | None, str]:
    """Each demonstration's (start, stop) in the natural prefix, read from character offsets
    (module docstring), or (None, why) where some demonstration's tokens in context are not its own.

    The offsets come from the same text the prefix was read off: prefix text + a query (`probe`).
    The prefix text alone can end in other tokens (SmolLM2: a final "\n\n" is one token alone,
    two before a word)."""
    if not demos:
        return (), ""
    text = "".join(t + separator for t in demo_texts)
    try:
        enc = tokenizer(text + probe, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError) as err:  # a slow tokenizer has no offsets
        return None, f"the tokenizer gives no character offsets ({type(err).__name__}), so demonstration tokens cannot be located"
    n = len(prefix) - n_bos
    ids, offsets = list(enc["input_ids"])[:n], list(enc["offset_mapping"])[:n]
    if tuple(ids) != tuple(prefix[n_bos:]):  # the prefix was read off text + a query: it must agree
        return None, "the ICL prefix's tokens differ from the prefix text's own tokenization"
    spans, a = [], 0
    for i, (t, own) in enumerate(zip(demo_texts, demos)):
        b = a + len(t)
        inside = [j for j, (s, e) in enumerate(offsets) if a <= s and e <= b and e > s]
        got = tuple(ids[j] for j in inside)
        if got != tuple(own) or (inside and inside[-1] - inside[0] + 1 != len(inside)):
            cross = [tokenizer.convert_ids_to_tokens(ids[j]) for j, (s, e) in enumerate(offsets) if s < b < e or s < a < e]
            return None, (f"natural tokenization merges demonstration {i}'s boundary with its neighbour"
                          + (f" (token(s) {cross} cross it)" if cross else "")
                          + ": its tokens in context are not the ones it is trained on")
        spans.append((n_bos + inside[0], n_bos + inside[-1] + 1))
        a = b + len(separator)
    return tuple(spans), ""


def _natural_prefixes(tokenizer, bos, demo_texts, demos, separator, eval_q, queries) -> list[tuple[int, ...]]:
    """The ICL prefix for every n, tokenized as running text before a query (module docstring).

    Each prefix is read off the tokenization of prefix text + a query: the query's own ids must
    close it, for every eval query (else the query would change between settings)."""
    for text, ids in zip(demo_texts, demos):
        if tuple(_encode(tokenizer, text)) != ids:
            raise PromptError(f"natural tokenization of the demonstration {text[:60]!r}... differs from its "
                              "query ids followed by the label word's: the trained label token would move; "
                              "use the piecewise tokenization")
    texts = [""]
    for t in demo_texts:
        texts.append(texts[-1] + t + separator)
    probe = eval_q[0] if eval_q else "x"
    prefixes = []
    for n, text in enumerate(texts):
        if n == 0:
            prefixes.append(bos)
            continue
        full = _encode(tokenizer, text + probe)
        q_ids = _encode(tokenizer, probe)
        if full[len(full) - len(q_ids):] != q_ids:
            raise PromptError("natural tokenization merges the last separator into the query's first token; "
                              "use the piecewise tokenization or another separator")
        prefixes.append(bos + tuple(full[: len(full) - len(q_ids)]))
    # the query closes the whole prefix the same way for every eval query
    whole = texts[-1]
    fulls = tokenizer([whole + q for q in eval_q], add_special_tokens=False)["input_ids"]
    for q_text, q_ids, full in zip(eval_q, queries, fulls):
        if tuple(full[len(full) - len(q_ids):]) != q_ids or tuple(full[: len(full) - len(q_ids)]) != prefixes[-1][1:]:
            raise PromptError(f"natural tokenization of the ICL prompt changes the query {q_text[:60]!r}...; use "
                              "the piecewise tokenization")
    return prefixes


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
    if len(prompts.bos) + longest + extra > max_length:
        raise PromptError(
            f"the longest query ({longest} tokens + {len(prompts.bos)} start token + extra {extra}) "
            f"exceeds the limit {max_length} even with no demonstrations"
        )
    n = 0
    for m in range(1, len(prompts.demos) + 1):
        if len(prompts.icl_prefix(m)) + longest + extra > max_length:
            break
        n = m
    return n
