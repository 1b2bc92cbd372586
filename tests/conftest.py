"""Shared test set-up: tests import helpers (tiny models, tiny tokenizer) from this folder."""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED_DATA = Path(os.environ.get("ICLGD_DATA_DIR", Path(__file__).parents[2] / "shared" / "data"))


@pytest.fixture
def registry(tmp_path_factory):
    """Plugins register processes and are imported once per process: give the registry, the
    plugin cache and the imported modules back as they were."""
    from iclgd import plugins
    from iclgd.processes import PROCESSES

    items, loaded, modules = dict(PROCESSES._items), dict(plugins._LOADED), set(sys.modules)
    yield
    PROCESSES._items.clear()
    PROCESSES._items.update(items)
    plugins._LOADED.clear()
    plugins._LOADED.update(loaded)
    tmp = str(tmp_path_factory.getbasetemp().resolve())
    for name in set(sys.modules) - modules:  # the plugin modules the test wrote, nothing else
        if str(getattr(sys.modules[name], "__file__", "") or "").startswith(tmp):
            del sys.modules[name]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny Llama saved as a model folder: the CLI loads it as a user's local model."""
    from tiny import tiny_model
    from tiny_tokenizer import tiny_tokenizer

    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if a model loads: for inputs that must be refused before any model does."""
    from iclgd import models

    def refuse(*a, **kw):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(models, "load_model", refuse)


@pytest.fixture(scope="module")
def one_thread():
    """For modules that run many 2-layer steps, each far too small for a second thread to pay for
    its wake-up (on a shared 2-core machine, milliseconds per op); the values compared come from
    the same thread count on both sides."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
