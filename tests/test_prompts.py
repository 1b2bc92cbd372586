"""Prompt formatting and token ids, with the tiny tokenizer (with and without BOS)."""

from __future__ import annotations

import dataclasses

import pytest

from iclgd.data import Example, Selection, switch_labels
from iclgd.errors import PromptError
from iclgd.prompts import (
    build_prompts,
    check_fits,
    demos_that_fit,
    format_demo,
    format_query,
    label_token_ids,
    separator_ids,
    start_token,
    uses_bos,
)
from iclgd.tasks import get_task, task_names

from tiny_tokenizer import tiny_tokenizer

SST2 = get_task("sst2")


def _ex(i, text, label):
    return Example(id=i, fields={"sentence": text}, label=label)


SEL = Selection(
    demos=(_ex(10, "a fine film", 1), _ex(11, "dull and long", 0), _ex(12, "great fun", 1)),
    eval=(_ex(20, "not good", 0), _ex(21, "a moving , funny and wise story of love", 1)),
)


@pytest.fixture(params=[False, True], ids=["no-bos", "bos"])
def tok(request):
    return tiny_tokenizer(add_bos=request.param)


def test_tiny_tokenizer_contract():
    plain, bos = tiny_tokenizer(), tiny_tokenizer(add_bos=True)
    assert len(plain) <= 512
    assert (plain.bos_token_id, plain.eos_token_id, plain.pad_token_id) == (0, 1, 2)
    assert not uses_bos(plain) and uses_bos(bos)
    assert tiny_tokenizer() is plain  # cached


@pytest.mark.parametrize("name", task_names())
def test_label_words_distinct_for_every_task(name):
    ids = label_token_ids(tiny_tokenizer(), get_task(name))
    assert len(set(ids)) == len(ids) == len(get_task(name).label_words)


def test_formatting():
    assert format_query(SST2, SEL.eval[0]) == "Sentence: not good Label:"
    assert format_demo(SST2, SEL.demos[0], 1) == "Sentence: a fine film Label: Positive"
    cb = get_task("cb")
    ex = Example(id=0, fields={"premise": "It rained.", "hypothesis": "it was wet"}, label=0)
    assert format_demo(cb, ex, 2) == (
        "It rained. Question: it was wet. True, False, or Neither? Answer: Neither"
    )


def test_label_collision_names_words():
    # " Positively" is " Positive" + "ly" for the tiny tokenizer: same first token.
    task = dataclasses.replace(SST2, label_words=("Positive", "Positively"))
    with pytest.raises(PromptError, match="'Positive' and 'Positively'.*'ĠPositive'"):
        label_token_ids(tiny_tokenizer(), task)
    with pytest.raises(PromptError, match="share their first token"):
        build_prompts(tiny_tokenizer(), task, SEL)


def test_separator_ids(tok):
    assert separator_ids(tok, "eos") == separator_ids(tok, "<eos>") == [tok.eos_token_id]
    assert separator_ids(tok, "\n") == tok("\n", add_special_tokens=False).input_ids
    assert len(separator_ids(tok, " ")) >= 1
    with pytest.raises(PromptError):
        separator_ids(tok, "")


def test_prompts_concatenate_exactly(tok):
    p = build_prompts(tok, SST2, SEL, separator="\n\n")
    assert p.icl_prefix(0) == list(p.bos)
    assert p.bos == (tok.bos_token_id,)  # the start token: prepended by one, the declared BOS of the other
    for n in range(len(p.demos) + 1):
        prefix = p.icl_prefix(n)
        expected = len(p.bos) + sum(len(d) for d in p.demos[:n]) + n * len(p.separator)
        assert len(prefix) == expected
    assert p.icl_prefix() == p.icl_prefix(3)
    full = p.icl_prefix()
    assert full == [*p.bos, *p.demos[0], *p.separator, *p.demos[1], *p.separator,
                    *p.demos[2], *p.separator]  # fmt: skip
    assert p.training_sequence(1) == [*p.bos, *p.demos[1]]
    with pytest.raises(ValueError):
        p.icl_prefix(4)


def test_query_and_label_tokens(tok):
    p = build_prompts(tok, SST2, SEL)
    plain = tiny_tokenizer()
    for q, ex in zip(p.queries, SEL.eval):
        assert list(q) == plain(format_query(SST2, ex)).input_ids  # no BOS inside pieces
        assert plain.decode(q) == format_query(SST2, ex)
    assert list(p.label_ids) == label_token_ids(tok, SST2)
    for d, ex in zip(p.demos, SEL.demos):
        # a demonstration is its query's ids followed by the label word's ids
        q = plain(format_query(SST2, ex)).input_ids
        assert list(d[: len(q)]) == q and d[len(q)] == p.label_ids[ex.label]
        assert plain.decode(d) == format_demo(SST2, ex, ex.label)


def test_demo_labels_switched():
    tok = tiny_tokenizer()
    switched = switch_labels([d.label for d in SEL.demos], 2)
    p = build_prompts(tok, SST2, SEL, demo_labels=switched)
    for d, ex, y in zip(p.demos, SEL.demos, switched):
        assert y != ex.label and tok.decode(d) == format_demo(SST2, ex, y)
    gold = build_prompts(tok, SST2, SEL)
    assert p.queries == gold.queries  # switching touches demonstrations only
    with pytest.raises(PromptError):
        build_prompts(tok, SST2, SEL, demo_labels=[0, 1])


def test_each_text_tokenized_once():
    tok = tiny_tokenizer()
    calls = []

    class Counting:
        def __getattr__(self, name):
            return getattr(tok, name)

        def __call__(self, text, **kw):
            calls.append(text)
            return tok(text, **kw)

    dup = Selection(demos=SEL.demos + SEL.demos[:1], eval=SEL.eval + SEL.eval)
    build_prompts(Counting(), SST2, dup)
    texts = [t for c in calls for t in (c if isinstance(c, list) else [c]) if t != "a"]
    assert len(texts) == len(set(texts))


def test_check_fits():
    tok = tiny_tokenizer()
    p = build_prompts(tok, SST2, SEL)
    ids = [e.id for e in SEL.eval]
    prefix = len(p.icl_prefix())
    longest = max(len(q) for q in p.queries)
    check_fits(p, prefix + longest, eval_ids=ids)
    check_fits(p, prefix + longest + 1, eval_ids=ids, extra=1)
    with pytest.raises(PromptError) as e:
        check_fits(p, prefix + longest - 1, eval_ids=ids)
    msg = str(e.value)
    assert "eval example 21" in msg and f"prefix {prefix}" in msg
    assert f"query {longest}" in msg and f"limit {prefix + longest - 1}" in msg and "--k" in msg
    check_fits(p, len(p.icl_prefix(1)) + longest, eval_ids=ids, n_demos=1)


def test_demos_that_fit_is_maximal(tok):
    p = build_prompts(tok, SST2, SEL, separator="eos")
    longest = max(len(q) for q in p.queries)
    for limit in range(len(p.bos) + longest, len(p.icl_prefix()) + longest + 5):
        for extra in (0, 1):
            if len(p.bos) + longest + extra > limit:
                continue
            n = demos_that_fit(p, limit, extra=extra)
            assert len(p.icl_prefix(n)) + longest + extra <= limit
            if n < len(p.demos):
                assert len(p.icl_prefix(n + 1)) + longest + extra > limit
    assert demos_that_fit(p, 10_000) == 3
    with pytest.raises(PromptError):
        demos_that_fit(p, longest - 1)


class _Tok:
    """A stand-in tokenizer for the start-token rules: what it prepends, its vocab, bos, eos."""

    def __init__(self, prepends=None, vocab=None, bos=None, eos=None):
        self.prepends, self.vocab, self.bos_token_id, self.eos_token_id = prepends, vocab or {}, bos, eos

    def __call__(self, text, add_special_tokens=True):
        ids = [7]
        return {"input_ids": ([self.prepends] if add_special_tokens and self.prepends is not None else []) + ids}

    def get_vocab(self):
        return self.vocab


@pytest.mark.parametrize("tok,rule,want", [
    (_Tok(prepends=4, bos=3), "bos", 3),  # a family's own rule wins (XGLM: fairseq's <s>)
    (_Tok(prepends=4, bos=3, vocab={"<|endoftext|>": 9}), None, 4),  # what the tokenizer prepends
    (_Tok(bos=3, eos=5, vocab={"<|endoftext|>": 9}), None, 9),  # the pretraining document separator
    (_Tok(bos=3, eos=5), None, 3),
    (_Tok(eos=5), None, 5),
], ids=["family rule", "prepended", "endoftext", "bos", "eos"])
def test_start_token_rules(tok, rule, want):
    assert start_token(tok, rule)[0] == want


def test_a_tokenizer_without_any_start_token_is_refused():
    with pytest.raises(PromptError, match="start sequences"):
        start_token(_Tok())


@pytest.mark.parametrize("name", task_names())
def test_natural_prefix_is_the_running_texts_tokenization(name):
    """The natural ICL prefix is what tokenizing the joined text gives, and the query keeps its ids."""
    from iclgd.data import select_examples

    from conftest import SHARED_DATA

    tok = tiny_tokenizer()
    task = get_task(name)
    sel = select_examples(task, 2, 4, SHARED_DATA, eval_cap=5)
    nat = build_prompts(tok, task, sel, separator="\n\n", tokenization="natural")
    piece = build_prompts(tok, task, sel, separator="\n\n", tokenization="piecewise")
    assert nat.queries == piece.queries and nat.demos == piece.demos and nat.bos == piece.bos
    text = "".join(f"{format_demo(task, d, d.label)}\n\n" for d in sel.demos)
    for q_text, q in zip([format_query(task, e) for e in sel.eval], nat.queries):
        joined = tok(text + q_text, add_special_tokens=False)["input_ids"]
        assert [*nat.bos, *joined] == nat.icl_prefix() + list(q)
    assert nat.icl_prefix(0) == piece.icl_prefix(0)
