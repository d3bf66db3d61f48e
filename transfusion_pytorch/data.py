"""Data helpers: collate interleaved samples (0.12's `collate_fn` / `create_dataloader`)."""

from __future__ import annotations

from torch.utils.data import DataLoader, Dataset


def collate_fn(data: list) -> list[list]:
    """Keep a batch as a list of samples (each a list of items); nothing is stacked."""
    return [list(sample) for sample in data]


def create_dataloader(dataset: Dataset, **kwargs) -> DataLoader:
    return DataLoader(dataset, collate_fn=collate_fn, **kwargs)
