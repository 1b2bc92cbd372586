"""Task records: the six built-ins match SPEC §5, and a user's YAML task is validated."""

from __future__ import annotations

import pytest

from iclgd.errors import DataError, IclgdError, UnknownNameError
from iclgd.tasks import Task, get_task, load_task_file, task_names

# SPEC §5, copied by hand so a drift in the YAML files is caught.
SPEC = {
    "sst2": ("glue", "sst2", "train", "validation", "Sentence: {sentence} Label:",
             ("Negative", "Positive"), 5e-4, (2, 3, 4)),
    "sst5": ("SetFit/sst5", None, "train", "validation", "Sentence: {text} Label:",
             ("terrible", "bad", "neutral", "good", "great"), 1.6e-4, (5, 6, 7)),
    "mr": ("rotten_tomatoes", None, "train", "validation", "Review: {text} Sentiment:",
           ("Negative", "Positive"), 3e-3, (5, 6, 7)),
    "subj": ("SetFit/subj", None, "train", "test", "Input: {text} Type:",
             ("objective", "subjective"), 3e-3, (4, 5, 6)),
    "agnews": ("ag_news", None, "train", "test",
               ("Classify the news articles into the categories of World, Sports, Business, "
                "and Technology. Article: {text} Answer:"),
               ("World", "Sports", "Business", "Technology"), 0.2, (3, 4, 5)),
    "cb": ("super_glue", "cb", "train", "validation",
           "{premise} Question: {hypothesis}. True, False, or Neither? Answer:",
           ("True", "False", "Neither"), 0.08, (3, 4, 5)),
}  # fmt: skip


def test_builtin_names():
    assert task_names() == sorted(SPEC)


@pytest.mark.parametrize("name", sorted(SPEC))
def test_builtin_matches_spec(name):
    hf_path, hf_name, demo, ev, template, words, lr, seeds = SPEC[name]
    t = get_task(name)
    assert (t.hf_path, t.hf_name, t.demo_split, t.eval_split) == (hf_path, hf_name, demo, ev)
    assert t.template == template and t.label_words == words
    assert t.lr == pytest.approx(lr) and t.seeds == seeds and t.eval_cap == 2000
    assert t.local_dir == (f"{hf_path}/{hf_name}" if hf_name else hf_path).replace("/", "-")
    assert t.label_column == "label"


def test_fields():
    assert get_task("cb").fields == ("premise", "hypothesis")
    assert get_task("sst2").fields == ("sentence",)


def test_unknown_name_did_you_mean():
    with pytest.raises(UnknownNameError, match="did you mean 'sst2'"):
        get_task("sst22")


def test_task_passes_through():
    t = get_task("mr")
    assert get_task(t) is t


def _write(tmp_path, text, name="t.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_user_yaml(tmp_path):
    p = _write(
        tmp_path,
        'name: spam\nlocal_dir: my/{split}.csv\ntemplate: "Msg: {body} Spam:"\n'
        'label_words: ["no", "yes"]\nlr: 1e-3\nseeds: 7\n',
    )
    t = get_task(str(p))
    assert isinstance(t, Task) and t.name == "spam" and t.fields == ("body",)
    assert t.label_words == ("no", "yes") and t.lr == 1e-3 and t.seeds == (7,)
    # a path-like local_dir is resolved against the YAML file's folder
    assert t.local_dir == str(tmp_path.resolve() / "my" / "{split}.csv")
    assert t.hf_path == "" and t.eval_split == "validation"


@pytest.mark.parametrize(
    "body, match",
    [
        ("name: x\ntemplate: 'a {t}'\n", "missing required key.*label_words"),
        ("name: x\ntemplate: 'a {t}'\nlabel_words: [a, b]\n", "hf_path.*local_dir"),
        ("name: x\nlocal_dir: d\ntemplate: 'a {t}'\nlabel_words: [a, b]\ncolour: red\n",
         "unknown key.*colour"),
        ("name: x\nlocal_dir: d\ntemplate: 'no fields'\nlabel_words: [a, b]\n", "names no column"),
        ("name: x\nlocal_dir: d\ntemplate: 'a {}'\nlabel_words: [a, b]\n", "positional"),
        ("name: x\nlocal_dir: d\ntemplate: 'a {t'\nlabel_words: [a, b]\n", "template"),
        ("name: x\nlocal_dir: d\ntemplate: 'a {t}'\nlabel_words: [a]\n", "at least two"),
        ("name: x\nlocal_dir: d\ntemplate: 'a {t}'\nlabel_words: [a, a]\n", "not distinct"),
        ("name: x\nlocal_dir: d\ntemplate: 'a {t}'\nlabel_words: [True, False]\n", "quote"),
        ("name: x\nlocal_dir: d\ntemplate: 'a {t}'\nlabel_words: [' a', b]\n", "spaces"),
        ("name: x\nlocal_dir: d\ntemplate: 'a {t}'\nlabel_words: [a, b]\neval_cap: 0\n",
         "eval_cap"),
        ("- a\n- b\n", "mapping"),
        ("name: [unclosed\n", "not valid YAML"),
    ],
)  # fmt: skip
def test_invalid_yaml(tmp_path, body, match):
    p = _write(tmp_path, body)
    with pytest.raises(DataError, match=match) as e:
        load_task_file(p)
    assert str(p) in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(IclgdError, match="does not exist"):
        get_task(str(tmp_path / "nope.yaml"))
