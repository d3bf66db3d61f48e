"""Tiny helpers shared by every module."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
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
