"""Plugins: a module name or a .py file that registers processes (`--plugin`).

A plugin is imported before the plan is resolved, so its process names are valid in
`--settings`. The current folder is importable (the README's example is a file beside the user).
Every failure ends in a `PluginError` that names the plugin and what to do: not found, failed to
import (with the line of the plugin that raised), or registered a name that is taken or a class
that is not a Process (iclgd.processes.register_process says which).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from iclgd.errors import IclgdError

_LOADED: dict[str, object] = {}  # plugin spec (resolved path or module name) -> module


class PluginError(IclgdError):
    """A --plugin that cannot be used; the message says which and why."""


def load_plugins(specs: Sequence[str]) -> list[object]:
    return [load_plugin(s) for s in specs]


def load_plugin(spec: str):
    """Import one plugin: a path to a .py file, or a module name importable from here."""
    import iclgd.processes  # noqa: F401  (built-ins first: a plugin may subclass them)

    spec = str(spec).strip()
    if not spec:
        raise PluginError("--plugin is empty; give a module name or a path to a .py file")
    is_path = spec.endswith(".py") or "/" in spec or "\\" in spec
    key = str(Path(spec).expanduser().resolve()) if is_path else spec
    if key in _LOADED:
        return _LOADED[key]
    if is_path:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise PluginError(f"plugin file {spec!r} does not exist (from {Path.cwd()})")
        name = f"iclgd_plugin_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            _execute(spec, lambda: module_spec.loader.exec_module(module), path)
        except PluginError:
            sys.modules.pop(name, None)
            raise
    else:
        cwd = str(Path.cwd())
        if cwd not in sys.path and "" not in sys.path:
            sys.path.insert(0, cwd)
        try:
            found = importlib.util.find_spec(spec)
        except (ImportError, ValueError):
            found = None
        if found is None:
            raise PluginError(f"plugin {spec!r} not found: no module of that name is importable from {cwd}; give "
                              "a module name on the Python path or the path to a .py file (--plugin ./my_proc.py)")
        module = _execute(spec, lambda: importlib.import_module(spec), Path(found.origin or spec))
    _LOADED[key] = module
    return module


def _execute(spec: str, load, path: Path):
    try:
        return load()
    except IclgdError as err:  # register_process refused: a duplicate name or not a Process
        raise PluginError(f"plugin {spec!r}: {err}") from None
    except Exception as err:  # noqa: BLE001 - any error of the user's code, told in one line
        frames = [f for f in traceback.extract_tb(err.__traceback__) if Path(f.filename).resolve() == path.resolve()]
        where = f" at line {frames[-1].lineno} of {path}" if frames else ""
        raise PluginError(f"plugin {spec!r} failed to import{where}: {type(err).__name__}: {err}") from None
