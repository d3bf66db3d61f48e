"""Tiny helpers shared by every module."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import wraps
from numbers import Integral, Real
from typing import Any, TypeVar

T = TypeVar("T")


def exists(value) -> bool:
    return value is not None


def default(value, fallback):
    return value if value is not None else fallback


def cast_tuple(value, length: int = 1) -> tuple:
    return value if isinstance(value, tuple) else (value,) * length


def per_modality(value, num_modalities: int, name: str) -> tuple:
    """One value for every modality, or a tuple with exactly one value per modality."""
    values = cast_tuple(value, num_modalities)
    if len(values) != num_modalities:
        raise ValueError(f"`{name}` must be one value or a tuple of {num_modalities} values (one per modality), got {len(values)}: {value!r}")
    return values


def eval_mode(fn: Callable[..., T]) -> Callable[..., T]:
    """Run a method with the module in eval mode, restoring the previous mode after."""

    @wraps(fn)
    def inner(self, *args: Any, **kwargs: Any) -> T:
        was_training = self.training
        self.eval()
        try:
            return fn(self, *args, **kwargs)
        finally:
            self.train(was_training)

    return inner


# argument checks: a clear error that names the argument (SPEC §7)


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
