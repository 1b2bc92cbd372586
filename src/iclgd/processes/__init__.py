"""Optimization processes, one module each; importing this package registers the built-ins.

To add a process, write a module with a `Process` subclass decorated by
`@register_process("name")` and import it (or pass `--plugin module.path` on the command line).
"""

from iclgd.processes import gd, lcgd, lingd  # noqa: F401  (registration)
from iclgd.processes.base import (
    CLIP_MODES,
    PROCESSES,
    Process,
    ProcessConfig,
    TrainContext,
    TrainResult,
    register_process,
)

__all__ = ["CLIP_MODES", "PROCESSES", "Process", "ProcessConfig", "TrainContext", "TrainResult", "register_process"]
