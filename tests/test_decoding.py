"""The one-token decode step (`decoding.py`): the full forward's logits at every length, the
same under `torch.compile` (traced once), and `sample_many` dropping finished rows.

All on randomised weights (`randomized`): the zero-initialised gates come alive, so each
token's logits depend on its whole prefix and a decode step that read the wrong slots, the
wrong positions or another row would show."""

import pytest
import torch
from torch import randint, randn

import transfusion_pytorch.decoding as decoding
from conftest import make_model, randomized
from transfusion_pytorch.decoding import TokenDecoder


def text_model(**kwargs):
    torch.manual_seed(0)
    kwargs.setdefault("dim_latent", 8)
    return randomized(make_model(**kwargs)).eval()


@torch.no_grad()
def test_decode_step_equals_the_full_forward_at_every_length_across_cache_growth():
    model = text_model()
    sequence = randint(0, 16, (2, 12))
    reference = model(sequence, return_loss=False)  # (b, n, l): no cache, every position at once

    cache = model.transformer.new_cache(2, capacity=5)  # grows twice on the way
    decode = TokenDecoder(model)
    embed, _, _ = model.predict([[row] for row in sequence[:, :3]], [], [], torch.zeros(0), cache=cache)
    cache.commit(3)
    for i in range(3, 12):
        positions = torch.full((2,), i)
        logits = decode(cache, sequence[:, i], positions)
        assert torch.allclose(logits, reference[:, i], atol=1e-5), i
    assert cache.length == 12 and cache.capacity >= 12


@torch.no_grad()
def test_decode_step_reads_only_the_slots_a_row_holds():
    # one layer: cached keys / values come from the tokens alone, so a prefix without the
    # hidden token is an exact reference
    model = text_model(transformer=dict(dim=32, depth=1, dim_head=8, heads=4))
    sequence = randint(0, 16, (1, 6))
    cache = model.transformer.new_cache(1, capacity=8)
    model.predict([[sequence[0, :5]]], [], [], torch.zeros(0), cache=cache)
    cache.commit(5)
    snapshot = (cache.keys.clone(), cache.values.clone())
    decode = TokenDecoder(model)
    every = decode(cache, sequence[:, 5], torch.tensor([5]))

    cache.keys, cache.values, cache.length = *snapshot, 5
    hidden = torch.ones(1, 5, dtype=torch.bool)
    hidden[0, 2] = False  # as if the row never held slot 2 (`sample_many`'s `holds`)
    without = decode(cache, sequence[:, 5], torch.tensor([5]), hidden)

    # reference: the same tokens without the third, at the same positions
    rest = torch.cat((sequence[:, :2], sequence[:, 3:5]), dim=1)
    cache = model.transformer.new_cache(1, capacity=8)
    model.predict([[rest[0]]], [], [], torch.zeros(0), cache=cache, position_offset=torch.tensor([[0, 1, 3, 4]]) - torch.arange(4))
    cache.commit(4)
    reference = TokenDecoder(model)(cache, sequence[:, 5], torch.tensor([5]))
    assert torch.allclose(without, reference, atol=1e-5)
    assert not torch.allclose(without, every, atol=1e-3)


def test_compiled_decoding_equals_eager_and_traces_once():
    model = text_model(transformer=dict(dim=16, depth=1, dim_head=8, heads=2))
    prompt = randint(0, 16, (2, 3))
    eager = model.generate_text_only(prompt, 12, temperature=0.0)
    torch._dynamo.reset()
    compiled = model.generate_text_only(prompt, 12, temperature=0.0, compile=True)
    assert torch.equal(compiled, eager)
    step = model._compiled_decode_step
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    again = model.generate_text_only(prompt, 12, temperature=0.0, compile=True)  # every slot, one trace
    assert torch.equal(again, eager) and model._compiled_decode_step is step
    assert torch._dynamo.utils.counters["frames"]["ok"] == frames


@pytest.mark.slow
def test_compiled_samplers_equal_eager():
    model = text_model(transformer=dict(dim=16, depth=1, dim_head=8, heads=2))
    noise = randn(16, 8)
    kwargs = dict(max_length=10, text_temperature=0.0, init_modality_noise=noise, modality_steps=3)
    prompts = [randint(0, 16, (4,)), None]
    assert all(torch.equal(a, b) for a, b in zip(model.sample(prompt=prompts[0], compile=True, **kwargs), model.sample(prompt=prompts[0], **kwargs)))
    for a, b in zip(model.sample_many(prompts, compile=True, **kwargs), model.sample_many(prompts, **kwargs)):
        assert len(a) == len(b) and all(torch.equal(x, y) if torch.is_tensor(x) else torch.allclose(x[1], y[1], atol=1e-5) for x, y in zip(a, b))


def test_sample_many_drops_finished_rows_from_the_decode_step(monkeypatch):
    model = text_model(modality_default_shape=(2, 3))
    ids = model.ids
    fits = torch.tensor([3, *ids.encode_shape((1, 2)), ids.som[0]])  # a 2-token image, then text
    too_big = torch.tensor([3, *ids.encode_shape((3, 3)), ids.som[0]])  # 9 tokens > max_length: ends at once
    batches = []
    step = decoding.decode_one_token
    monkeypatch.setattr(decoding, "decode_one_token", lambda model, keys, *args: batches.append(keys[0].shape[0]) or step(model, keys, *args))
    model.sample_many([fits, too_big, too_big, too_big], max_length=8, text_temperature=0.0, modality_steps=2)
    assert batches and max(batches) == 1  # the three finished rows left the cache before the first decode step


def test_sample_many_stops_after_a_modality_that_spends_the_budget():
    model = text_model(modality_default_shape=(2, 3))
    ids = model.ids
    prompt = torch.tensor([3, *ids.encode_shape((2, 3)), ids.som[0]])
    kwargs = dict(max_length=6, text_temperature=0.0, init_modality_noise=randn(6, 8), modality_steps=3)
    alone, many = model.sample(prompt=prompt, **kwargs), model.sample_many([prompt], **kwargs)[0]
    assert len(alone) == len(many) == 3 and torch.equal(alone[-1], many[-1])  # [..., image, [eom]] and nothing after it
    assert alone[-1].tolist() == [ids.eom[0]]


def test_samplers_run_under_bf16_autocast():
    # the cache is fp32 (the model's dtype) while autocast makes keys / values bf16: every write casts
    model = text_model(modality_default_shape=(2,), dim_latent=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        many = model.sample_many([torch.tensor([1, 2]), (0, randn(3, 4))], max_length=6, modality_steps=2)
        one = model.sample(torch.tensor([1, 2]), max_length=6, modality_steps=2)
        text = model.generate_text_only(torch.tensor([[1, 2]]), 6)
    assert len(many) == 2 and all(torch.is_tensor(sample[0]) for sample in many)
    assert torch.is_tensor(one[0]) and text.shape == (1, 4)


def test_compile_must_be_a_bool():
    model = text_model()
    for call in (
        lambda: model.generate_text_only(randint(0, 16, (1, 2)), 4, compile="yes"),
        lambda: model.sample(randint(0, 16, (2,)), max_length=2, compile=1),
        lambda: model.sample_many([None], max_length=2, compile=None),
    ):
        with pytest.raises(TypeError, match="compile"):
            call()
