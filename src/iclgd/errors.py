"""User-facing errors: each names the problem and the fix, never a deep traceback."""


class IclgdError(Exception):
    """Base class for every error iclgd raises on bad input or failed numerics."""


class UnknownNameError(IclgdError, KeyError):
    """A name (task, model, process, setting, metric, protocol) is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0] if self.args else ""


class DataError(IclgdError):
    """A data folder or file is missing, malformed, or yields no examples."""


class PromptError(IclgdError):
    """A prompt or label word cannot be used as asked (collisions, too long for the context)."""


class NonFiniteError(IclgdError, FloatingPointError):
    """A loss or gradient became NaN or infinite during an optimization process."""
