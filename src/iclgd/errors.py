"""User-facing errors: each names the problem and the fix, never a deep traceback.

`exit_code` is what the command line returns: 2 for a request that cannot run as given (fix the
command, the data or the files), 1 for a failure while computing (numbers that diverged, cells
that failed in a sweep).
"""


class IclgdError(Exception):
    """Base class for every error iclgd raises on bad input or failed numerics."""

    exit_code = 2


class UnknownNameError(IclgdError, KeyError):
    """A name (task, model, process, setting, metric, protocol) is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0] if self.args else ""


class DataError(IclgdError):
    """A data folder or file is missing, malformed, or yields no examples."""


class PromptError(IclgdError):
    """A prompt or label word cannot be used as asked (collisions, too long for the context)."""


class OutputError(IclgdError):
    """An output path that iclgd will not write to (a file, not writable, or holding files iclgd
    did not make)."""


class NonFiniteError(IclgdError, FloatingPointError):
    """A loss or gradient became NaN or infinite during an optimization process."""

    exit_code = 1
