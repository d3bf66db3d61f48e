"""Property-based fuzzing of the public entry points (hypothesis).

Valid interleaved batches (0-3 axes, four modalities, channel first and last, any lengths,
packing on and off, conditioning dropout) must train: a finite loss and finite gradients.
Invalid ones (one thing broken in a valid batch, or a bad sampler argument) must raise a
`ValueError` / `TypeError` whose message names the argument: never an `IndexError` or a
`RuntimeError` from deep inside. The default profile is small enough for CI; `pytest -m slow`
runs the long one.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import tiny_transformer
from transfusion_pytorch import Transfusion

NUM_TEXT = 16
DIMS = (4, 6, 5, 3)
AXES = (0, 1, 2, 3)
CHANNEL_FIRST = (False, True, False, True)
POS_EMB = (False, True, True, False)

QUICK = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LONG = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_models = {}


def model_for(unconditional_prob: float) -> Transfusion:
    if unconditional_prob not in _models:
        torch.manual_seed(0)
        _models[unconditional_prob] = Transfusion(
            num_text_tokens=NUM_TEXT,
            dim_latent=DIMS,
            modality_default_shape=((), (3,), (2, 2), (2, 2, 2)),
            channel_first_latent=CHANNEL_FIRST,
            add_pos_emb=POS_EMB,
            unconditional_prob=unconditional_prob,
            transformer=tiny_transformer(),
        )
    return _models[unconditional_prob]


# ------------------------------------------------------------------ valid batches


@st.composite
def modality_items(draw):
    k = draw(st.integers(0, 3))
    spatial = tuple(draw(st.lists(st.integers(1, 3), min_size=AXES[k], max_size=AXES[k])))
    shape = (DIMS[k], *spatial) if CHANNEL_FIRST[k] else (*spatial, DIMS[k])
    tensor = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**31))))
    return tensor if k == 0 and draw(st.booleans()) else (k, tensor)


text_items = st.lists(st.integers(0, NUM_TEXT - 1), min_size=1, max_size=6).map(lambda ids: torch.tensor(ids))
samples = st.lists(st.one_of(text_items, modality_items()), min_size=0, max_size=4)
batches = st.lists(samples, min_size=1, max_size=3)


@st.composite
def valid_cases(draw):
    batch = draw(batches)
    pack = draw(st.sampled_from([False, True, 8, 40]))
    unconditional_prob = draw(st.sampled_from([0.0, 0.5]))
    return batch, pack, unconditional_prob


def check_valid(case):
    batch, pack, unconditional_prob = case
    model = model_for(unconditional_prob).train()
    model.zero_grad()
    loss, breakdown = model(batch, pack=pack, return_breakdown=True)
    assert torch.isfinite(loss), breakdown
    loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


@QUICK
@given(valid_cases())
def test_valid_batches_train(case):
    check_valid(case)


@pytest.mark.slow
@LONG
@given(valid_cases())
def test_valid_batches_train_long(case):
    check_valid(case)


# ------------------------------------------------------------------ invalid batches


def first_modality(batch):
    for b, sample in enumerate(batch):
        for j, item in enumerate(sample):
            if torch.is_tensor(item) and item.is_floating_point():
                return b, j, 0, item
            if isinstance(item, tuple):
                return b, j, item[0], item[1]
    return None


def break_batch(batch, how: str, rng: int):
    """One thing wrong in a valid batch; returns the broken batch, the forward's extra keywords
    and the argument name the error must mention."""
    batch = [list(sample) for sample in batch]
    found = first_modality(batch)
    if how == "empty batch":
        return [], {}, "modalities"
    if how == "sample not a list":
        batch[0] = torch.tensor([1, 2])
        return batch, {}, "modalities[0]"
    if how == "text id too large":
        batch[0].append(torch.tensor([1, 10_000]))
        return batch, {}, "modalities[0]"
    if how == "negative text id":
        batch[0].append(torch.tensor([-5]))
        return batch, {}, "modalities[0]"
    if how == "shape character in text":
        batch[0].append(torch.tensor([2, model_for(0.0).ids.char_offset + ord("5")]))
        return batch, {}, "modalities[0]"
    if how == "bool tensor":
        batch[0].append(torch.tensor([True, False]))
        return batch, {}, "modalities[0]"
    if how == "unknown modality type":
        batch[0].append((4 + rng % 3, torch.randn(2, 4)))
        return batch, {}, "modalities[0]"
    if how == "negative modality type":
        batch[0].append((-1, torch.randn(2, 4)))
        return batch, {}, "modalities[0]"
    if how == "int modality":
        batch[0].append((1, torch.ones(3, 6, dtype=torch.long)))
        return batch, {}, "modalities[0]"
    if how == "bad tuple":
        batch[0].append((1, torch.randn(3, 6), "extra"))
        return batch, {}, "modalities[0]"
    if how == "wrong width":
        batch[0].append((2, torch.randn(2, 2, DIMS[2] + 1)))
        return batch, {}, "modalities"
    if how == "wrong axes (position embedding needs them)":
        batch[0].append((2, torch.randn(2, 2, 2, DIMS[2])))
        return batch, {}, "modalities"
    if how == "empty axis":
        batch[0].append((1, torch.randn(DIMS[1], 0)))
        return batch, {}, "modalities"
    if how == "times of the wrong shape":
        count = max(sum(not (torch.is_tensor(i) and not i.is_floating_point()) for i in s) for s in batch)
        return batch, {"times": torch.rand(len(batch) + 1, max(count, 1))}, "times"
    if how == "times out of range":
        if found is None:
            batch[0].append((0, torch.randn(DIMS[0])))
        count = max(sum(not (torch.is_tensor(i) and not i.is_floating_point()) for i in s) for s in batch)
        return batch, {"times": torch.full((len(batch), count), 1.5)}, "times"
    if how == "pack of zero":
        return batch, {"pack": 0}, "pack"
    raise AssertionError(how)


BREAKS = [
    "empty batch",
    "sample not a list",
    "text id too large",
    "negative text id",
    "shape character in text",
    "bool tensor",
    "unknown modality type",
    "negative modality type",
    "int modality",
    "bad tuple",
    "wrong width",
    "wrong axes (position embedding needs them)",
    "empty axis",
    "times of the wrong shape",
    "times out of range",
    "pack of zero",
]


def check_invalid(batch, how, rng):
    broken, kwargs, argument = break_batch(batch, how, rng)
    model = model_for(0.0).train()
    with pytest.raises((ValueError, TypeError)) as caught:
        model(broken, **kwargs)
    assert f"`{argument}" in str(caught.value), (how, str(caught.value))


@QUICK
@given(batches, st.sampled_from(BREAKS), st.integers(0, 100))
def test_invalid_batches_name_the_argument(batch, how, rng):
    check_invalid(batch, how, rng)


@pytest.mark.slow
@LONG
@given(batches, st.sampled_from(BREAKS), st.integers(0, 100))
def test_invalid_batches_name_the_argument_long(batch, how, rng):
    check_invalid(batch, how, rng)


# ------------------------------------------------------------------ sampler arguments

BAD_SAMPLER_ARGUMENTS = [
    ("sample", dict(max_length=0), "max_length"),
    ("sample", dict(max_length=2.5), "max_length"),
    ("sample", dict(modality_steps=1), "modality_steps"),
    ("sample", dict(text_temperature=-1.0), "text_temperature"),
    ("sample", dict(text_temperature=math.nan), "text_temperature"),
    ("sample", dict(text_min_p=1.5), "text_min_p"),
    ("sample", dict(cfg_scale=math.inf), "cfg_scale"),
    ("sample", dict(cfg_scale=2.0), "cfg_scale"),  # the model has no conditioning dropout
    ("sample", dict(fixed_modality_shape=(0, 2)), "fixed_modality_shape"),
    ("sample", dict(init_modality_noise=torch.randn(3)), "init_modality_noise"),
    ("sample", dict(prompt=torch.randint(0, 16, (2, 3))), "prompt"),
    ("sample", dict(prompt="a cat"), "prompt"),
    ("sample", dict(cache_kv="yes"), "cache_kv"),
    ("generate_modality_only", dict(modality_type=0, batch_size=0), "batch_size"),
    ("generate_modality_only", dict(), "modality_type"),  # four modalities: which one?
    ("generate_modality_only", dict(modality_type=7), "modality_type"),
    ("generate_modality_only", dict(modality_type=2, fixed_modality_shape=(2,)), "fixed_modality_shape"),
    ("generate_modality_only", dict(modality_type=1, fixed_modality_shape=[(2,), (3,)]), "fixed_modality_shape"),  # two shapes, one item
    ("generate_text_only", dict(prompt=torch.randn(1, 3), seq_len=5), "prompt"),
    ("generate_text_only", dict(prompt=torch.randint(0, 16, (1, 3)), seq_len="5"), "seq_len"),
    ("generate_text_only", dict(prompt=torch.randint(0, 16, (1, 3)), seq_len=5, min_p=-0.1), "min_p"),
]


@QUICK
@given(st.sampled_from(BAD_SAMPLER_ARGUMENTS))
def test_bad_sampler_arguments_name_the_argument(case):
    method, kwargs, argument = case
    model = model_for(0.0)
    with pytest.raises((ValueError, TypeError)) as caught:
        getattr(model, method)(**kwargs)
    assert f"`{argument}" in str(caught.value), (method, kwargs, str(caught.value))
