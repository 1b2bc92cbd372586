"""What differs between the transformers versions iclgd supports (pyproject's tested range).

transformers 5.x renamed the key/value cache argument of `forward` from `past_key_values` to
`cache` (the old name warns, and goes away in 5.40), and the output field with it. iclgd passes
and reads caches only through these two functions, so every supported version gets the name it
expects and no deprecation warning reaches the user.
"""

from __future__ import annotations

import functools
import inspect


@functools.cache
def _cache_arg(forward_owner: type) -> str:
    params = inspect.signature(forward_owner.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """The keyword arguments that hand `cache` (a transformers Cache) to `model`'s forward."""
    return {_cache_arg(type(model)): cache}


def output_cache(output):
    """The Cache a forward call with `use_cache=True` returned, under either field name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
