"""Validation of everything a user hands the library (SPEC §7): one place for it.

Every public entry point calls these; each raises a `ValueError` / `TypeError` whose
message names the argument, what was expected and what came.
"""

from __future__ import annotations

import math
from numbers import Integral, Real


def _scalar(value):
    """A 0-d tensor or numpy array (a value from a sweep, say) → its Python number; anything else as is."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item") and not isinstance(value, (Integral, Real)):
        dtype = str(getattr(value, "dtype", ""))
        if "bool" not in dtype:
            return value.item()
    return value


def check_int(name: str, value, minimum: int | None = None) -> int:
    """An int (numpy ints and 0-d integer tensors too, never a bool) of at least `minimum`, as a Python int."""
    value = _scalar(value)
    if not isinstance(value, Integral) or isinstance(value, bool):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}: {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}")
    return int(value)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool, got {type(value).__name__}: {value!r}")
    return value


def check_float(name: str, value, minimum: float | None = None, maximum: float | None = None) -> float:
    """A finite real number (0-d tensors too) within `[minimum, maximum]`, returned as a Python float."""
    value = _scalar(value)
    if not isinstance(value, Real) or isinstance(value, bool):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__}: {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite, got {value}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        low = "-inf" if minimum is None else minimum
        high = "inf" if maximum is None else maximum
        raise ValueError(f"`{name}` must lie in [{low}, {high}], got {value}")
    return value
