"""Tiny helpers shared by every module, and the sample printer."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import torch

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


def describe_modality_sample(sample: list) -> list[tuple[str, tuple[int, ...]]]:
    """`[(kind, shape), …]` for a sample: `("text", (n,))` or `("modality:k", shape)`."""
    out = []
    for item in sample:
        if isinstance(item, tuple):
            modality_type, tensor = item
            out.append((f"modality:{modality_type}", tuple(tensor.shape)))
        elif torch.is_tensor(item) and not item.is_floating_point():
            out.append(("text", tuple(item.shape)))
        elif torch.is_tensor(item):
            out.append(("modality:0", tuple(item.shape)))
        else:
            raise TypeError(f"`sample` items must be tensors or (type, tensor) tuples, got {type(item).__name__}")
    return out


def print_modality_sample(sample: list) -> None:
    """Print one line per item of an interleaved sample: its kind and shape."""
    for kind, shape in describe_modality_sample(sample):
        print(f"{kind:<12} {shape}")


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts matmul operands to on `device_type`, or None when it is off."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
