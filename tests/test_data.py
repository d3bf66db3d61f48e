"""Data helpers: the bucketed and packing batch samplers (coverage, determinism, sharding, budgets, keys), packing and collate."""

import random

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from transfusion_pytorch import BucketBatchSampler, PackedBatchSampler, collate_fn, padding_fraction
from transfusion_pytorch.data import pack_samples


def skewed_lengths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(8, 600) for _ in range(n)]


def flat(batches: list[list[int]]) -> list[int]:
    return [index for batch in batches for index in batch]


SETTINGS = [
    dict(batch_size=7),
    dict(max_tokens=1000),
    dict(batch_size=5, bucket_width=64),
    dict(max_tokens=900, bucket_width=100),
    dict(batch_size=4, shuffle=False),
    dict(max_tokens=800, shuffle=False),
]


@pytest.mark.parametrize("kwargs", SETTINGS)
def test_each_sample_once_and_len_exact(kwargs):
    lengths = skewed_lengths(301)
    sampler = BucketBatchSampler(lengths, **kwargs)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert sorted(flat(batches)) == list(range(len(lengths)))
        assert len(sampler) == len(batches)
        assert all(batches)


@pytest.mark.parametrize("kwargs", SETTINGS[:4])
def test_deterministic_per_seed_and_epoch(kwargs):
    lengths = skewed_lengths(200)
    first, second = BucketBatchSampler(lengths, seed=3, **kwargs), BucketBatchSampler(lengths, seed=3, **kwargs)
    assert list(first) == list(second)
    epoch_0 = list(first)
    first.set_epoch(1)
    assert list(first) != epoch_0
    assert {frozenset(batch) for batch in first} != {frozenset(batch) for batch in epoch_0}  # new batches, not only a new order
    first.set_epoch(0)
    assert list(first) == epoch_0
    assert list(BucketBatchSampler(lengths, seed=4, **kwargs)) != epoch_0


def test_shuffle_false_is_fixed_across_epochs_and_seeds():
    lengths = skewed_lengths(100)
    sampler = BucketBatchSampler(lengths, batch_size=8, shuffle=False)
    epoch_0 = list(sampler)
    sampler.set_epoch(5)
    assert list(sampler) == epoch_0 == list(BucketBatchSampler(lengths, batch_size=8, shuffle=False, seed=9))


@pytest.mark.parametrize("num_replicas", [2, 3, 4])
@pytest.mark.parametrize("kwargs", [dict(batch_size=6), dict(max_tokens=1200)])
def test_rank_sharding(num_replicas, kwargs):
    lengths = skewed_lengths(157)
    for drop_last in (False, True):
        samplers = [BucketBatchSampler(lengths, num_replicas=num_replicas, rank=r, drop_last=drop_last, **kwargs) for r in range(num_replicas)]
        for sampler in samplers:
            sampler.set_epoch(2)
        per_rank = [list(sampler) for sampler in samplers]
        assert len({len(batches) for batches in per_rank}) == 1  # equal step counts
        assert all(len(sampler) == len(batches) for sampler, batches in zip(samplers, per_rank))

        every_batch = [batch for batches in per_rank for batch in batches]
        single = BucketBatchSampler(lengths, drop_last=drop_last, **kwargs)
        single.set_epoch(2)
        total = len(single)
        if drop_last:  # no sample on two ranks, only the last `total % num_replicas` batches dropped
            indices = flat(every_batch)
            assert len(indices) == len(set(indices))
            assert len(every_batch) == total - total % num_replicas
        else:  # every sample at least once; only the documented padding batches repeat
            assert set(flat(every_batch)) == set(range(len(lengths)))
            assert len(every_batch) == total + (-total) % num_replicas
            unique_batches = {tuple(batch) for batch in every_batch}
            assert len(unique_batches) == total


def test_ranks_without_remainder_are_disjoint_and_cover():
    lengths = skewed_lengths(96)
    samplers = [BucketBatchSampler(lengths, batch_size=8, num_replicas=4, rank=r) for r in range(4)]  # 12 batches
    indices = flat([batch for sampler in samplers for batch in sampler])
    assert sorted(indices) == list(range(96))


@pytest.mark.parametrize("bucket_width", [None, 50])
def test_max_tokens_budget_respected(bucket_width):
    lengths = skewed_lengths(300) + [1500, 2000]  # two samples over the budget
    sampler = BucketBatchSampler(lengths, max_tokens=1024, bucket_width=bucket_width, seed=1)
    batches = list(sampler)
    for batch in batches:
        padded = len(batch) * max(lengths[i] for i in batch)
        assert padded <= 1024 or len(batch) == 1  # the one exception: an oversized sample alone
    assert [300] in batches and [301] in batches


@pytest.mark.parametrize("kwargs", [dict(batch_size=4), dict(max_tokens=2000), dict(batch_size=3, bucket_width=100)])
def test_keys_never_mixed(kwargs):
    lengths = skewed_lengths(200)
    rng = random.Random(1)
    keys = [rng.choice([(8, 8), (16, 16), (4, 4, 4), None]) for _ in lengths]
    batches = list(BucketBatchSampler(lengths, keys=keys, **kwargs))
    assert sorted(flat(batches)) == list(range(200))
    assert all(len({keys[i] for i in batch}) == 1 for batch in batches)


def test_drop_last_batch_size_drops_only_the_remainder_per_key():
    lengths = skewed_lengths(103)
    keys = ["a" if i < 50 else "b" for i in range(103)]  # 50 % 8 = 2 and 53 % 8 = 5 dropped
    batches = list(BucketBatchSampler(lengths, batch_size=8, keys=keys, drop_last=True))
    assert all(len(batch) == 8 for batch in batches)
    assert len(set(flat(batches))) == len(flat(batches)) == 103 - 2 - 5


def test_bucketing_pads_far_less_than_random_batching():
    lengths = skewed_lengths(4000)
    order = list(range(4000))
    random.Random(0).shuffle(order)
    random_batches = [order[i : i + 16] for i in range(0, 4000, 16)]
    random_padding = padding_fraction(random_batches, lengths)
    for kwargs in (dict(batch_size=16), dict(max_tokens=16 * 600), dict(batch_size=16, bucket_width=16)):
        bucketed = padding_fraction(list(BucketBatchSampler(lengths, **kwargs)), lengths)
        assert bucketed < 0.1 and bucketed < random_padding / 3, (kwargs, bucketed, random_padding)


def test_padding_fraction_and_packing_take_tensors():
    lengths = torch.tensor([2, 4, 3, 5])
    assert padding_fraction(list(torch.arange(4).split(2)), lengths) == padding_fraction([[0, 1], [2, 3]], [2, 4, 3, 5])
    assert pack_samples(torch.tensor([3, 4, 2]), 8) == pack_samples([3, 4, 2], 8)


def test_padding_fraction():
    assert padding_fraction([[0, 1], [2]], [2, 4, 3]) == pytest.approx(2 / 11)
    assert padding_fraction([], [1]) == 0.0


class ListDataset(Dataset):
    def __init__(self, lengths):
        self.samples = [[torch.randint(0, 10, (n,)), torch.randn(2, 3)] for n in lengths]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[index]


def test_with_dataloader():
    torch.manual_seed(0)
    lengths = skewed_lengths(40)
    dataset = ListDataset(lengths)
    sampler = BucketBatchSampler(lengths, max_tokens=1500)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn)
    batches = list(loader)
    assert len(batches) == len(loader) == len(sampler)
    assert sum(len(batch) for batch in batches) == 40
    for batch in batches:
        assert isinstance(batch, list) and all(isinstance(sample, list) and len(sample) == 2 for sample in batch)
        assert len(batch) * max(sample[0].shape[0] for sample in batch) <= 1500


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(lengths=[3, -1], batch_size=2), ValueError, "lengths"),
        (dict(lengths=[3, 2.5], batch_size=2), TypeError, "lengths"),
        (dict(lengths=[], batch_size=2), ValueError, "lengths"),
        (dict(lengths=5, batch_size=2), TypeError, "lengths"),
        (dict(lengths=[3, 4]), ValueError, "batch_size"),
        (dict(lengths=[3, 4], batch_size=2, max_tokens=10), ValueError, "max_tokens"),
        (dict(lengths=[3, 4], batch_size=0), ValueError, "batch_size"),
        (dict(lengths=[3, 4], batch_size=-2), ValueError, "batch_size"),
        (dict(lengths=[3, 4], batch_size=2.0), TypeError, "batch_size"),
        (dict(lengths=[3, 4], max_tokens=0), ValueError, "max_tokens"),
        (dict(lengths=[3, 4], batch_size=2, keys=["a"]), ValueError, "keys"),
        (dict(lengths=[3, 4], batch_size=2, keys=[[1], [2]]), TypeError, "keys"),
        (dict(lengths=[3, 4], batch_size=2, bucket_width=0), ValueError, "bucket_width"),
        (dict(lengths=[3, 4], batch_size=2, shuffle=1), TypeError, "shuffle"),
        (dict(lengths=[3, 4], batch_size=2, drop_last="no"), TypeError, "drop_last"),
        (dict(lengths=[3, 4], batch_size=2, seed=-1), ValueError, "seed"),
        (dict(lengths=[3, 4], batch_size=2, num_replicas=0), ValueError, "num_replicas"),
        (dict(lengths=[3, 4], batch_size=2, num_replicas=2, rank=2), ValueError, "rank"),
        (dict(lengths=[3, 4], batch_size=2, rank=-1), ValueError, "rank"),
    ],
)
def test_bad_arguments(kwargs, error, name):
    with pytest.raises(error, match=f"`{name}`"):
        BucketBatchSampler(**kwargs)


def test_bad_epoch():
    sampler = BucketBatchSampler([3, 4], batch_size=2)
    with pytest.raises(ValueError, match="`epoch`"):
        sampler.set_epoch(-1)
    with pytest.raises(TypeError, match="`epoch`"):
        sampler.set_epoch("1")


def test_accepts_tensor_lengths_and_keys():
    lengths = torch.tensor([5, 9, 5, 9])
    batches = list(BucketBatchSampler(lengths, batch_size=2, keys=torch.tensor([0, 1, 0, 1]), shuffle=False))
    assert sorted(map(sorted, batches)) == [[0, 2], [1, 3]]


# PackedBatchSampler: batches whose samples fill a few rows of `pack_length` tokens

PACKED_SETTINGS = [dict(pack_length=600, rows=1), dict(pack_length=1200, rows=3), dict(pack_length=700, rows=2, shuffle=False)]


def packed_slots(batches, lengths, pack_length):
    """Token slots the model's packer uses: rows of each batch, padded to the longest row."""
    slots = 0
    for batch in batches:
        sub = [lengths[i] for i in batch]
        rows = pack_samples(sub, pack_length)
        slots += len(rows) * max(sum(sub[i] for i in row) for row in rows)
    return slots


@pytest.mark.parametrize("kwargs", PACKED_SETTINGS)
def test_packed_each_sample_once_and_batches_pack_into_their_rows(kwargs):
    lengths = skewed_lengths(401) + [900, 1300]  # two samples over some pack lengths
    sampler = PackedBatchSampler(lengths, **kwargs)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert sorted(flat(batches)) == list(range(len(lengths)))
        assert len(sampler) == len(batches)
        for batch in batches:  # the model's packer needs no more rows than planned, none over the length
            rows = pack_samples([lengths[i] for i in batch], kwargs["pack_length"])
            assert len(rows) <= kwargs["rows"]
            assert all(sum(lengths[batch[i]] for i in row) <= kwargs["pack_length"] or len(row) == 1 for row in rows)


def test_packed_only_the_last_batch_is_short_and_drop_last_drops_it():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(5000)]  # about 30 windows: rows carry over between them
    for drop_last in (False, True):
        batches = list(PackedBatchSampler(lengths, pack_length=100, rows=8, drop_last=drop_last))
        short = [batch for batch in batches if len(pack_samples([lengths[i] for i in batch], 100)) < 8]
        assert len(short) == (0 if drop_last else 1)
        dropped = len(lengths) - len(flat(batches))
        assert (dropped > 0) == drop_last and len(flat(batches)) == len(set(flat(batches)))


def test_drop_last_that_leaves_no_batch_raises():
    for sampler in (
        PackedBatchSampler([1, 2, 3], pack_length=10, num_replicas=4, rank=0, drop_last=True),
        BucketBatchSampler([1, 2, 3], batch_size=4, drop_last=True),
    ):
        with pytest.raises(ValueError, match="`drop_last=True`"):
            list(sampler)


def test_packing_over_a_stream_beats_packing_within_random_batches():
    lengths = skewed_lengths(3000)
    order = list(range(3000))
    random.Random(0).shuffle(order)
    random_batches = [order[i : i + 8] for i in range(0, 3000, 8)]
    within = 1 - sum(lengths) / packed_slots(random_batches, lengths, 600)
    stream = 1 - sum(lengths) / packed_slots(list(PackedBatchSampler(lengths, pack_length=600, rows=4)), lengths, 600)
    assert stream < 0.05 and stream < within / 4, (stream, within)


def test_packed_deterministic_per_seed_and_epoch():
    lengths = skewed_lengths(300)
    first, second = PackedBatchSampler(lengths, pack_length=900, rows=2, seed=3), PackedBatchSampler(lengths, pack_length=900, rows=2, seed=3)
    epoch_0 = list(first)
    assert epoch_0 == list(second)
    first.set_epoch(1)
    assert {frozenset(batch) for batch in first} != {frozenset(batch) for batch in epoch_0}
    first.set_epoch(0)
    assert list(first) == epoch_0
    assert list(PackedBatchSampler(lengths, pack_length=900, rows=2, seed=4)) != epoch_0
    fixed = PackedBatchSampler(lengths, pack_length=900, rows=2, shuffle=False)
    before = list(fixed)
    fixed.set_epoch(3)
    assert list(fixed) == before


@pytest.mark.parametrize("num_replicas", [2, 3])
def test_packed_rank_sharding(num_replicas):
    lengths = skewed_lengths(157)
    for drop_last in (False, True):
        per_rank = [
            list(PackedBatchSampler(lengths, pack_length=800, rows=2, num_replicas=num_replicas, rank=r, drop_last=drop_last)) for r in range(num_replicas)
        ]
        assert len({len(batches) for batches in per_rank}) == 1
        indices = flat([batch for batches in per_rank for batch in batches])
        if drop_last:
            assert len(indices) == len(set(indices))
        else:
            assert set(indices) == set(range(len(lengths)))


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(lengths=[3, -1], pack_length=8), ValueError, "lengths"),
        (dict(lengths=[3, 4], pack_length=0), ValueError, "pack_length"),
        (dict(lengths=[3, 4], pack_length=8.0), TypeError, "pack_length"),
        (dict(lengths=[3, 4], pack_length=8, rows=0), ValueError, "rows"),
        (dict(lengths=[3, 4], pack_length=8, seed=-1), ValueError, "seed"),
        (dict(lengths=[3, 4], pack_length=8, num_replicas=2, rank=2), ValueError, "rank"),
    ],
)
def test_packed_bad_arguments(kwargs, error, name):
    with pytest.raises(error, match=f"`{name}`"):
        PackedBatchSampler(**kwargs)


def test_pack_samples_keeps_a_planned_order_when_it_is_tighter():
    lengths = [5, 3, 2, 4, 4, 2]  # first-fit decreasing needs 3 rows of 10; the order given packs into 2
    assert pack_samples(lengths, 10) == [[0, 1, 2], [3, 4, 5]]
    assert len(pack_samples(lengths, 10, keep_order=False)) == 3
    assert pack_samples([2, 9, 2, 9], 10) == [[1], [3], [0, 2]]  # next-fit in order needs 4 rows: first-fit decreasing is kept
