"""Small user-facing utilities."""

from __future__ import annotations

import torch


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
