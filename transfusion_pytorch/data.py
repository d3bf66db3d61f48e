"""Data helpers: collate interleaved samples (0.12's `collate_fn` / `create_dataloader`), and
two batch samplers that keep padding low when samples differ in length: a length-bucketed
one for padded batches and a packing one for `model(batch, pack=...)`."""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from numbers import Integral

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from .inputs import check_bool, check_int, check_lengths
from .layout import pack_samples  # noqa: F401  (public here since 0.13)


def collate_fn(data: list) -> list[list]:
    """Keep a batch as a list of samples (each a list of items); nothing is stacked."""
    if not isinstance(data, (list, tuple)):
        raise TypeError(f"`data` must be a list of samples, got {type(data).__name__}")
    return [list(sample) for sample in data]


def create_dataloader(dataset: Dataset, **kwargs) -> DataLoader:
    return DataLoader(dataset, collate_fn=collate_fn, **kwargs)


def padding_fraction(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Share of a padded batch that is padding: wasted / total, where a batch of `k` samples
    costs `k * max length in the batch` tokens. 0.0 for no batches or no tokens."""
    lengths = lengths.tolist() if hasattr(lengths, "tolist") else lengths
    total = wasted = 0
    for batch in batches:
        batch = batch.tolist() if hasattr(batch, "tolist") else batch
        for index in batch:
            if not isinstance(index, Integral) or not 0 <= index < len(lengths):
                raise ValueError(f"`batches` hold sample indices in [0, {len(lengths)}) (one length each in `lengths`), got {index!r}")
        batch_lengths = [int(lengths[index]) for index in batch]
        if not batch_lengths:
            continue
        padded = len(batch_lengths) * max(batch_lengths)
        total += padded
        wasted += padded - sum(batch_lengths)
    return wasted / total if total else 0.0


class _EpochBatchSampler(Sampler[list[int]]):
    """What the batch samplers share: seeding per epoch and dealing the epoch's batches out
    to DDP ranks. A subclass builds all batches of an epoch, for all ranks, in `_all_batches`."""

    def _setup(self, lengths, shuffle: bool, seed: int, drop_last: bool, num_replicas: int | None, rank: int | None) -> None:
        check_bool("shuffle", shuffle)
        check_bool("drop_last", drop_last)
        seed = check_int("seed", seed, 0)
        if seed >= 2**63 - 2**32:  # room for `seed + epoch` in a torch generator
            raise ValueError(f"`seed` must be < 2**63 - 2**32, got {seed}")
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        num_replicas = check_int("num_replicas", num_replicas, 1)
        rank = check_int("rank", rank, 0)
        if rank >= num_replicas:
            raise ValueError(f"`rank` must be < `num_replicas` ({num_replicas}), got {rank}")
        self.lengths = torch.tensor(lengths, dtype=torch.long)
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Reseed the shuffles for `epoch`; call before each epoch (all ranks with the same value)."""
        self.epoch = check_int("epoch", epoch, 0)

    def _all_batches(self) -> list[list[int]]:
        raise NotImplementedError

    def _rank_batches(self) -> list[list[int]]:
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        batches = self._all_batches()
        remainder = len(batches) % self.num_replicas
        if self.drop_last and len(batches) < self.num_replicas:
            raise ValueError(f"`drop_last=True` leaves every rank without a batch: {len(batches)} batches this epoch for `num_replicas={self.num_replicas}`")
        if remainder and self.drop_last:
            batches = batches[: len(batches) - remainder]
        elif remainder:  # repeat the first batches (cycling if there are fewer than needed)
            padding = self.num_replicas - remainder
            batches = batches + [batches[i % len(batches)] for i in range(padding)]
        rank_batches = batches[self.rank :: self.num_replicas]
        self._cache = (self.epoch, rank_batches)
        return rank_batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._rank_batches()

    def __len__(self) -> int:
        return len(self._rank_batches())


class BucketBatchSampler(_EpochBatchSampler):
    """Batches of samples with similar token length (and equal `keys`), so little of a batch is padding.

    Use as `DataLoader(dataset, batch_sampler=BucketBatchSampler(lengths, ...), collate_fn=collate_fn)`.

    `lengths[i]` is what sample `i`'s row costs in tokens. Batches are capped either by `batch_size`
    (samples per batch) or by `max_tokens`: `len(batch) * max length in batch <= max_tokens`, the
    padded size of the batch. A sample longer than `max_tokens` on its own gets a batch of its own
    (the only batch that may exceed the budget). Samples whose `keys` differ (e.g. modality shape
    tuples) never share a batch.

    Scheme, each epoch (seeded by `seed + epoch`, so every rank builds the same batches):
      1. split the indices into groups: one per key, or per (key, `length // bucket_width`) when
         `bucket_width` is given; shuffle each group (if `shuffle`).
      2. default (`bucket_width=None`): cut each group into mega-batches of about `megabatch_batches`
         (50) batches' worth of samples (`50 * batch_size` samples, or `50 * max_tokens` tokens of
         lengths), sort each mega-batch by length and cut it into batches. Sorting within shuffled
         mega-batches instead of over the whole dataset keeps padding near the sorted minimum while
         batch membership still changes from epoch to epoch (a global sort would put the same
         samples together every epoch). With `bucket_width`, batches are cut from each fixed-width
         length bucket directly: padding per row is under `bucket_width`, at the cost of more
         part-filled batches (one per bucket and key).
      3. shuffle the order of all batches (if `shuffle`). With `shuffle=False` nothing is random:
         groups come in order of their first sample, batches in the order the steps above cut them.

    `drop_last`:
      - with `batch_size`, each group drops its last `len(group) % batch_size` samples of the
        epoch's (shuffled) order before batching, so every batch is full; with `max_tokens`
        nothing is dropped by this step.
      - with several replicas, the last `num_batches % num_replicas` batches of the epoch's batch
        order are dropped so every rank gets the same number of batches.

    Distributed (`num_replicas > 1`): rank `r` takes batches `r, r + num_replicas, ...` of the
    epoch's order, so ranks never share a batch and, with `drop_last=True`, no sample is seen twice.
    With `drop_last=False` (the default, as in `DistributedSampler`) the batch list is first padded
    by repeating its first batches until its length divides `num_replicas`: the samples of those
    repeated batches (at most `num_replicas - 1` batches) then appear TWICE in the epoch, on
    different ranks (more often only if there are fewer batches than replicas). Call `set_epoch(epoch)` before each epoch, as with `DistributedSampler`.
    """

    megabatch_batches = 50

    def __init__(
        self,
        lengths: Sequence[int],
        *,
        batch_size: int | None = None,
        max_tokens: int | None = None,
        keys: Sequence[Hashable] | None = None,
        bucket_width: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        lengths = check_lengths(lengths)
        if (batch_size is None) == (max_tokens is None):
            raise ValueError("give exactly one of `batch_size` and `max_tokens`")
        batch_size, max_tokens, bucket_width = (
            None if value is None else check_int(name, value, 1)
            for name, value in (("batch_size", batch_size), ("max_tokens", max_tokens), ("bucket_width", bucket_width))
        )

        if keys is not None:
            keys = keys.tolist() if hasattr(keys, "tolist") else keys
            if not isinstance(keys, Sequence) or isinstance(keys, str):
                raise TypeError(f"`keys` must be a sequence with one key per sample, got {type(keys).__name__}")
            if len(keys) != len(lengths):
                raise ValueError(f"`keys` must have one key per sample: {len(lengths)} lengths but {len(keys)} keys")
            for key in keys:
                try:
                    hash(key)
                except TypeError:
                    raise TypeError(f"`keys` must be hashable (e.g. tuples, not lists), got {type(key).__name__}: {key!r}") from None

        self._setup(lengths, shuffle, seed, drop_last, num_replicas, rank)
        self.batch_size, self.max_tokens, self.bucket_width = batch_size, max_tokens, bucket_width

        # groups of sample indices that may share a batch, in order of first appearance
        groups: dict[Hashable, list[int]] = {}
        for index, length in enumerate(self.lengths.tolist()):
            key = keys[index] if keys is not None else None
            group = (key, length // bucket_width) if bucket_width is not None else key
            groups.setdefault(group, []).append(index)
        self.groups = [torch.tensor(indices, dtype=torch.long) for indices in groups.values()]

    def _cut(self, indices: Tensor) -> list[list[int]]:
        """Cut indices (already in the order to batch them) into batches under the cap."""
        if self.batch_size is not None:
            return [chunk.tolist() for chunk in indices.split(self.batch_size)]
        batches, batch, longest = [], [], 0
        for index, length in zip(indices.tolist(), self.lengths[indices].tolist()):
            if batch and (len(batch) + 1) * max(longest, length) > self.max_tokens:
                batches.append(batch)
                batch, longest = [], 0
            batch.append(index)
            longest = max(longest, length)
        return batches + [batch] if batch else batches

    def _megabatches(self, group: Tensor) -> list[Tensor]:
        """Consecutive slices of `group` of about `megabatch_batches` batches' worth each."""
        if self.batch_size is not None:
            return list(group.split(self.megabatch_batches * self.batch_size))
        lengths = self.lengths[group]
        megabatch_ids = (lengths.cumsum(0) - lengths) // (self.megabatch_batches * self.max_tokens)
        _, sizes = megabatch_ids.unique_consecutive(return_counts=True)
        return list(group.split(sizes.tolist()))

    def _all_batches(self) -> list[list[int]]:
        """Every batch of this epoch, for all ranks together, in the order they are dealt out."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        batches: list[list[int]] = []
        for group in self.groups:
            if self.shuffle:
                group = group[torch.randperm(len(group), generator=generator)]
            if self.drop_last and self.batch_size is not None:
                group = group[: len(group) - len(group) % self.batch_size]
            if len(group) == 0:
                continue
            if self.bucket_width is not None:
                batches += self._cut(group)
                continue
            for megabatch in self._megabatches(group):
                batches += self._cut(megabatch[self.lengths[megabatch].argsort(stable=True)])
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return batches


class PackedBatchSampler(_EpochBatchSampler):
    """Batches for sequence packing: the samples of a batch fill `rows` rows of `pack_length`
    tokens each with little left over. Train with `model(batch, pack=pack_length)`.

    Use as `DataLoader(dataset, batch_sampler=PackedBatchSampler(lengths, pack_length=..., rows=...), collate_fn=collate_fn)`.

    `lengths[i]` is what sample `i` costs in tokens (`Transfusion.token_lengths` counts it).
    Packing within a random batch leaves gaps that nothing in the batch fits; packing over
    many samples at once fills them (Krell et al. 2021, arXiv 2107.02027, pack a whole data
    set offline; here it is redone over windows each epoch, so rows change between epochs).
    Each epoch (seeded by `seed + epoch`, so every rank builds the same batches):
      1. shuffle the samples (if `shuffle`) and cut them into windows of about
         `window_batches` (50) batches' worth of tokens;
      2. pack each window by first-fit decreasing into rows of at most `pack_length` tokens (a
         sample longer than that gets a row of its own, and its batch is as long as it);
      3. deal the rows, window after window in the order they were opened, into batches of
         `rows` rows (only the epoch's last batch may have fewer) and list each batch's
         samples row by row; the model's packer (`pack_samples`) then finds these same
         rows, or another packing into no more rows;
      4. shuffle the order of all batches (if `shuffle`).

    `drop_last=True` drops that last batch when it has fewer than `rows` rows, and then, with
    several replicas, the last `num_batches % num_replicas` batches, as `BucketBatchSampler`
    does. Distributed sharding (`num_replicas`, `rank`, `set_epoch`) is the same too.
    """

    window_batches = 50

    def __init__(
        self,
        lengths: Sequence[int],
        *,
        pack_length: int,
        rows: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        lengths = check_lengths(lengths)
        self.pack_length, self.rows = check_int("pack_length", pack_length, 1), check_int("rows", rows, 1)
        self._setup(lengths, shuffle, seed, drop_last, num_replicas, rank)

    def _all_batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator) if self.shuffle else torch.arange(len(self.lengths))
        lengths = self.lengths[order]
        window_ids = (lengths.cumsum(0) - lengths) // (self.window_batches * self.rows * self.pack_length)
        _, sizes = window_ids.unique_consecutive(return_counts=True)

        planned: list[list[int]] = []  # rows of sample indices, window after window
        for window in order.split(sizes.tolist()):
            indices = window.tolist()
            planned += [[indices[i] for i in row] for row in pack_samples(self.lengths[window].tolist(), self.pack_length, keep_order=False)]
        batches = [[index for row in planned[first : first + self.rows] for index in row] for first in range(0, len(planned), self.rows)]
        if self.drop_last and len(planned) % self.rows:
            batches.pop()  # the one batch with fewer than `rows` rows
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return batches
