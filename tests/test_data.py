"""Loading splits and seeded selection, against the offline copies in shared/data."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import datasets
import numpy as np
import pytest

from iclgd import data
from iclgd.data import held_out, load_split, select_examples, shuffle_order, switch_labels
from iclgd.errors import DataError
from iclgd.tasks import get_task, load_task_file

_HERE = Path(__file__).resolve().parents[2] / "shared" / "data"
DATA = _HERE if _HERE.is_dir() else Path(os.environ.get("ICLGD_DATA_DIR", _HERE))
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data not found at {DATA}")

SIZES = {  # shared/data/README.md
    "sst2": (6920, 872),
    "sst5": (8544, 1101),
    "mr": (8530, 1066),
    "subj": (8000, 2000),
    "agnews": (5600, 2000),
    "cb": (250, 56),
}


@pytest.fixture(autouse=True)
def _fresh_probe():
    """Each test decides Hub reachability afresh and leaves no cached answer behind."""
    data.hub_reachable.cache_clear()
    yield
    data.hub_reachable.cache_clear()


@needs_data
@pytest.mark.parametrize("name", sorted(SIZES))
def test_builtin_tasks_load_locally(name):
    task = get_task(name)
    demo = load_split(task, task.demo_split, DATA, source="local")
    ev = load_split(task, task.eval_split, DATA, source="local")
    assert (len(demo), len(ev)) == SIZES[name]
    assert [e.id for e in demo] == list(range(len(demo)))
    for ex in demo[:50] + ev[:50]:
        assert set(ex.fields) == set(task.fields)  # the template's fields and only those
        assert all(isinstance(v, str) for v in ex.fields.values())
        assert 0 <= ex.label < len(task.label_words)
    assert {e.label for e in demo} == set(range(len(task.label_words)))


@needs_data
def test_default_data_dir_from_env(monkeypatch):
    monkeypatch.setenv("ICLGD_DATA_DIR", str(DATA))
    assert len(load_split("cb", "validation", source="local")) == 56


def test_missing_folder_names_paths_and_fix(tmp_path):
    with pytest.raises(DataError, match="ICLGD_DATA_DIR") as e:
        load_split("sst2", "train", tmp_path, source="local")
    assert str(tmp_path / "glue-sst2") in str(e.value) and "--data-dir" in str(e.value)


@needs_data
def test_missing_split_lists_present():
    task = dataclasses.replace(get_task("subj"), eval_split="validation")
    with pytest.raises(DataError, match="splits present: test, train"):
        load_split(task, "validation", DATA, source="local")


@needs_data
def test_selection_reproducible_and_seeded():
    a = select_examples("sst2", seed=2, k=32, data_dir=DATA, source="local")
    b = select_examples("sst2", seed=2, k=32, data_dir=DATA, source="local")
    c = select_examples("sst2", seed=3, k=32, data_dir=DATA, source="local")
    assert a == b
    assert [d.id for d in a.demos] != [d.id for d in c.demos]
    assert [e.id for e in a.eval] == [e.id for e in c.eval]  # eval depends on eval_seed only
    assert len(a.demos) == 32 and len(a.eval) == 872
    assert len({e.id for e in a.eval}) == 872


@needs_data
def test_selection_equals_datasets_shuffle():
    """SPEC §5 through datasets itself: the same demo and eval ids as Dataset.shuffle."""
    rows = [json.loads(x) for x in (DATA / "super_glue-cb" / "train.jsonl").open()]
    hf = datasets.Dataset.from_list(rows).shuffle(seed=3).select(range(8))
    sel = select_examples("cb", seed=3, k=8, data_dir=DATA, source="local")
    assert [d.id for d in sel.demos] == hf["idx"]
    assert [d.label for d in sel.demos] == hf["label"]
    ev = [json.loads(x) for x in (DATA / "super_glue-cb" / "validation.jsonl").open()]
    hf_ev = datasets.Dataset.from_list(ev).shuffle(seed=1)
    assert [e.id for e in sel.eval] == hf_ev["idx"]


@pytest.mark.parametrize("n, seed", [(1, 0), (7, 1), (50, 5), (300, 123)])
def test_shuffle_order_matches_datasets(n, seed):
    ds = datasets.Dataset.from_list([{"i": i} for i in range(n)]).shuffle(seed=seed)
    assert shuffle_order(n, seed).tolist() == ds["i"]


@needs_data
def test_eval_cap_and_disjoint_when_same_split():
    task = dataclasses.replace(get_task("cb"), eval_split="train")
    sel = select_examples(task, seed=4, k=32, data_dir=DATA, eval_cap=100, source="local")
    demo_ids = {d.id for d in sel.demos}
    assert len(sel.eval) == 100 and not demo_ids & {e.id for e in sel.eval}
    full = select_examples(task, seed=4, k=32, data_dir=DATA, source="local")
    assert len(full.eval) == 250 - 32 and not demo_ids & {e.id for e in full.eval}
    # dropping demos keeps the rest of the seed-1 order
    order = [int(i) for i in shuffle_order(250, 1) if int(i) not in demo_ids]
    assert [e.id for e in full.eval] == order


@needs_data
def test_eval_never_a_demo_and_empty_eval_errors():
    task = dataclasses.replace(get_task("cb"), eval_split="train")
    with pytest.raises(DataError, match="eval set is empty"):
        select_examples(task, seed=3, k=250, data_dir=DATA, source="local")
    with pytest.raises(DataError, match="k=251"):
        select_examples("cb", seed=3, k=251, data_dir=DATA, source="local")


@needs_data
def test_held_out_disjoint_from_demos_and_eval():
    sel = select_examples("sst2", seed=2, k=16, data_dir=DATA, source="local")
    ho = held_out("sst2", seed=2, k=16, n=64, data_dir=DATA, source="local")
    order = shuffle_order(6920, 2)
    assert [e.id for e in ho] == order[16:80].tolist()
    assert not {e.id for e in ho} & {d.id for d in sel.demos}
    same = dataclasses.replace(get_task("cb"), eval_split="train")
    sel = select_examples(same, seed=3, k=8, data_dir=DATA, eval_cap=200, source="local")
    ho = held_out(same, seed=3, k=8, n=20, data_dir=DATA, source="local", eval_cap=200)
    used = {d.id for d in sel.demos} | {e.id for e in sel.eval}
    assert len(ho) == 20 and not {e.id for e in ho} & used
    with pytest.raises(DataError, match="held-out"):
        held_out(same, seed=3, k=8, n=100, data_dir=DATA, source="local", eval_cap=200)


def test_switch_labels_is_derangement():
    assert switch_labels([0, 1, 1, 0], 2) == [1, 0, 0, 1]
    rng = np.random.default_rng(0)
    for c in range(2, 7):
        labels = rng.integers(0, c, size=100).tolist()
        switched = switch_labels(labels, c)
        assert all(a != b and 0 <= b < c for a, b in zip(labels, switched))
        assert switch_labels(labels, c) == switched  # fixed, not random
    with pytest.raises(ValueError):
        switch_labels([0], 1)
    with pytest.raises(ValueError):
        switch_labels([2], 2)


def _user_task(tmp_path, local_dir, eval_split="test"):
    p = tmp_path / "spam.yaml"
    p.write_text(
        f"name: spam\nlocal_dir: {local_dir}\ntemplate: 'Msg: {{body}} Spam:'\n"
        f"label_words: ['no', 'yes']\ndemo_split: train\neval_split: {eval_split}\n"
    )
    return load_task_file(p)


def _rows(n, offset=0):
    return [{"body": f"message {i + offset}", "label": i % 2, "extra": "x"} for i in range(n)]


def test_user_yaml_task_jsonl(tmp_path):
    folder = tmp_path / "spamdata"
    folder.mkdir()
    for split, n in (("train", 20), ("test", 10)):
        text = "\n".join(json.dumps(r) for r in _rows(n, 100 if split == "test" else 0))
        (folder / f"{split}.jsonl").write_text(text + "\n")
    task = _user_task(tmp_path, "./spamdata")
    sel = select_examples(task, seed=1, k=4, source="auto")  # own files: no Hub attempt
    assert len(sel.demos) == 4 and len(sel.eval) == 10
    assert sel.eval[0].fields == {"body": sel.eval[0].fields["body"]}
    assert sel.eval[0].fields["body"].startswith("message 1")


def test_user_yaml_task_csv_pattern(tmp_path):
    for split, n in (("train", 12), ("test", 6)):
        lines = ["body,label"] + [f'"{r["body"]}, ok",{r["label"]}' for r in _rows(n)]
        (tmp_path / f"{split}.csv").write_text("\n".join(lines) + "\n")
    task = _user_task(tmp_path, "./{split}.csv")
    sel = select_examples(task, seed=2, k=3)
    assert len(sel.demos) == 3 and len(sel.eval) == 6
    assert sel.demos[0].fields["body"].endswith(", ok")


def test_single_file_for_every_split(tmp_path):
    lines = ["body,label"] + [f"m{i},{['no', 'yes'][i % 2]}" for i in range(30)]
    (tmp_path / "all.csv").write_text("\n".join(lines) + "\n")
    task = _user_task(tmp_path, "all.csv", eval_split="train")
    sel = select_examples(task, seed=0, k=5)
    assert len(sel.eval) == 25 and not {d.id for d in sel.demos} & {e.id for e in sel.eval}
    assert [e.label for e in load_split(task, "train")][:4] == [0, 1, 0, 1]  # words -> ids


def test_malformed_json_names_file_and_line(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text('{"body": "a", "label": 0}\n{"body": "b", "label": \n')
    task = _user_task(tmp_path, "./train.jsonl")
    with pytest.raises(DataError, match=r"train\.jsonl, line 2, column 25: malformed JSON .*the line reads: "):
        load_split(task, "train")


def test_malformed_csv_names_file_and_line(tmp_path):
    (tmp_path / "train.csv").write_text("body,label\na,0\nb,1,extra\n")
    task = _user_task(tmp_path, "./train.csv")
    with pytest.raises(DataError, match=r"train\.csv, line 3"):
        load_split(task, "train")


def test_missing_column_named(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": 0}\n')
    task = _user_task(tmp_path, "./train.jsonl")
    with pytest.raises(DataError, match="'body'.*columns present: text, label"):
        load_split(task, "train")


@pytest.mark.parametrize("label", ["2", "-1", '"maybe"'])
def test_bad_label(tmp_path, label):
    rows = ['{"body": "a", "label": 0}', f'{{"body": "b", "label": {label}}}']
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    task = _user_task(tmp_path, "./train.jsonl")
    with pytest.raises(DataError, match="line 2: label"):
        load_split(task, "train")


def test_empty_split(tmp_path):
    (tmp_path / "train.jsonl").write_text("\n")
    task = _user_task(tmp_path, "./train.jsonl")
    with pytest.raises(DataError, match="empty"):
        load_split(task, "train")


@needs_data
def test_auto_falls_back_fast_without_hub(monkeypatch):
    """No network: auto must notice within seconds and read the local copy."""
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # A non-routable address: the probe must time out (or be refused) rather than hang.
    monkeypatch.setenv("HF_ENDPOINT", "http://10.255.255.1:81")
    monkeypatch.setenv("ICLGD_DATA_DIR", str(DATA))
    t0 = time.perf_counter()
    examples = load_split("cb", "validation", source="auto")
    assert time.perf_counter() - t0 < 10
    assert len(examples) == 56 and not data.hub_reachable()


def test_offline_flag_skips_probe(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(data.urllib.request, "urlopen", pytest.fail)
    assert data.hub_reachable() is False


@pytest.mark.parametrize("status, expected", [(200, True), (404, False)])
def test_probe_needs_a_good_http_answer(monkeypatch, status, expected):
    """A proxy that answers every address with 404 must not count as the Hub."""
    import urllib.error

    def fake_urlopen(request, timeout):
        assert timeout <= 3
        if status >= 400:
            raise urllib.error.HTTPError(request.full_url, status, "x", {}, None)
        return _Response(status)

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr(data.urllib.request, "urlopen", fake_urlopen)
    assert data.hub_reachable() is expected


class _Response:
    def __init__(self, status):
        self.status = status

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@needs_data
def test_hub_rows_are_checked_and_failures_fall_back(monkeypatch):
    monkeypatch.setattr(data, "hub_reachable", lambda: True)
    rows = [{"sentence": "good", "label": 1, "idx": 0}, {"sentence": "bad", "label": 0, "idx": 1}]
    monkeypatch.setattr(data, "_hub_rows", lambda task, split: (rows, "hub:glue/sst2"))
    monkeypatch.setenv("ICLGD_DATA_DIR", str(DATA))
    got = load_split("sst2", "validation")
    assert [(e.fields, e.label) for e in got] == [
        ({"sentence": "good"}, 1),
        ({"sentence": "bad"}, 0),
    ]

    def boom(task, split):
        raise ConnectionError("no route")

    monkeypatch.setattr(data, "_hub_rows", boom)
    assert len(load_split("sst2", "validation")) == 872  # auto: falls back to local
    with pytest.raises(DataError, match="no route"):
        load_split("sst2", "validation", source="hub")
