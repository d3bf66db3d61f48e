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
    step = model._compiled_sample_step
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    again = model.generate_text_only(prompt, 12, temperature=0.0, compile=True)  # every slot, one trace
    assert torch.equal(again, eager) and model._compiled_sample_step is step
    assert torch._dynamo.utils.counters["frames"]["ok"] == frames


def reference_text(model, prompt, num_new, temperature, min_p):
    """`generate_text_only` the long way: the step through `Transformer.forward` and `sample_token`
    (`torch.multinomial`) on its logits, token by token."""
    cache = model.transformer.new_cache(prompt.shape[0], capacity=prompt.shape[1] + num_new)
    embed, _, _ = model.predict([[row] for row in prompt], [], [], torch.zeros(0), cache=cache)
    cache.commit(prompt.shape[1])
    logits, out = model.to_text_logits(embed[:, -1]), []
    for i in range(num_new):
        token = decoding.sample_token(logits.masked_fill(~model.text_only_logits_mask, float("-inf")), temperature, min_p)[:, 0]
        out.append(token)
        visible = torch.zeros(prompt.shape[0], cache.capacity, dtype=torch.bool)
        visible[:, : cache.length + 1] = True
        keys, values = list(cache.keys.unbind(0)), list(cache.values.unbind(0))
        position = torch.full((prompt.shape[0],), prompt.shape[1] + i)
        logits = decoding.decode_one_token(model, keys, values, token, position, torch.tensor([cache.length]), visible)
        cache.commit(1)
    return torch.stack(out, dim=1)


@torch.no_grad()
@pytest.mark.parametrize("compile", [False, True])
def test_text_drawn_inside_the_step_equals_multinomial_with_the_same_seed(compile):
    # the lean step draws the next token itself (argmax of probs / Exp(1) noise drawn outside):
    # the same tokens as `torch.multinomial` on the logits of the step through the transformer
    model = text_model(transformer=dict(dim=16, depth=2, dim_head=8, heads=2))
    prompt = randint(0, 16, (3, 2))
    for temperature, min_p in ((1.0, 0.1), (2.0, 0.0)):
        torch.manual_seed(5)
        reference = reference_text(model, prompt, 10, temperature, min_p)
        torch.manual_seed(5)
        assert torch.equal(model.generate_text_only(prompt, 12, temperature=temperature, min_p=min_p, compile=compile), reference)
    assert len(set(reference.flatten().tolist())) > 3  # really sampled


@torch.no_grad()
def test_several_tokens_per_compiled_call_equal_one_at_a_time(monkeypatch):
    # `STEPS_PER_CALL` tokens per compiled call, then the rest one at a time: the tokens of the
    # eager step with the same seed (the noise of each token drawn in order before the call),
    # and the generator left where the eager run leaves it
    monkeypatch.setattr(decoding, "MANY_STEPS", 1)
    model = text_model(transformer=dict(dim=16, depth=1, dim_head=8, heads=2))
    prompt = randint(0, 16, (2, 3))
    count = 2 * decoding.STEPS_PER_CALL + 2  # tokens after the first; the last two one at a time
    runs = []
    for compile in (False, True):
        torch.manual_seed(7)
        runs.append((model.generate_text_only(prompt, 3 + 1 + count, temperature=1.0, min_p=0.05, compile=compile), torch.rand(3)))
    (eager, after_eager), (compiled, after_compiled) = runs
    assert torch.equal(compiled, eager) and torch.equal(after_compiled, after_eager)
    assert len(set(eager.flatten().tolist())) > 3 and hasattr(model, "_compiled_sample_steps")


@torch.no_grad()
@pytest.mark.parametrize(
    "transformer",
    [
        dict(dim=32, depth=3, dim_head=8, heads=4),  # an odd depth: a block without a U-Net skip in the middle
        dict(dim=32, depth=2, dim_head=8, heads=4, unet_skips=False, attn_kwargs=dict(gate_values=False)),
        dict(dim=32, depth=2, dim_head=8, heads=4, num_residual_streams=2),  # not lean: the step through the transformer
        dict(dim=32, depth=2, dim_head=8, heads=4, attn_kwargs=dict(softcap_value=5.0)),  # not lean either
    ],
)
def test_lean_step_equals_the_step_through_the_transformer(transformer):
    model = text_model(transformer=transformer)
    lean = decoding.TextWeights.supported(model)
    assert lean == (transformer.get("num_residual_streams", 1) == 1 and "softcap_value" not in transformer.get("attn_kwargs", {}))
    sequence = randint(0, 16, (2, 9))
    reference = model(sequence, return_loss=False)
    cache = model.transformer.new_cache(2, capacity=4)
    model.predict([[row] for row in sequence[:, :3]], [], [], torch.zeros(0), cache=cache)
    cache.commit(3)
    decode = TokenDecoder(model)
    assert decode.lean == lean
    for i in range(3, 9):
        assert torch.allclose(decode(cache, sequence[:, i], torch.full((2,), i)), reference[:, i], atol=1e-5), i
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 matmuls, fp32 cache: close to the fp32 logits
        logits = decode(cache, sequence[:, 8], torch.full((2,), 9))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


@torch.no_grad()
def test_weight_snapshot_follows_the_parameters():
    # the lean step reads transposed copies of the weights: a change of the parameters (an optimizer
    # step, `load_state_dict`) must reach it
    model = text_model()
    prompt = randint(0, 16, (1, 3))
    before = model.generate_text_only(prompt, 10, temperature=0.0)
    snapshot = decoding.TextWeights.of(model)
    assert decoding.TextWeights.of(model) is snapshot  # unchanged parameters: the same snapshot
    other = randomized(text_model(), std=1.0)
    model.load_state_dict(other.state_dict())
    after = model.generate_text_only(prompt, 10, temperature=0.0)
    assert torch.equal(after, other.generate_text_only(prompt, 10, temperature=0.0)) and not torch.equal(after, before)
    assert decoding.TextWeights.of(model) is not snapshot


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
    step = decoding.text_decode_step
    monkeypatch.setattr(decoding, "text_decode_step", lambda weights, shape, keys, *args: batches.append(keys[0].shape[0]) or step(weights, shape, keys, *args))
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


@torch.no_grad()
def test_a_forward_hook_sends_decoding_through_the_modules():
    # the lean step calls no module: with a hook on one, decoding takes the step through the transformer
    model = text_model()
    prompt = randint(0, 16, (2, 3))
    assert TokenDecoder(model).lean
    bias = torch.zeros(model.ids.vocab_size)
    bias[7] = 1e4
    handle = model.to_text_logits.register_forward_hook(lambda module, inputs, out: out + bias)
    assert not TokenDecoder(model).lean
    assert (model.generate_text_only(prompt, 8, temperature=1.0) == 7).all()
    handle.remove()
    assert TokenDecoder(model).lean and not (model.generate_text_only(prompt, 8, temperature=0.0) == 7).all()


@torch.no_grad()
def test_under_autocast_the_lean_step_reads_matrices_cast_once_with_the_same_logits():
    # autocast casts a matmul's operands; the snapshot casts the matrices once instead. The
    # norms' rows and the biases are no matmul operands: cast, they would change the logits
    model = randomized(text_model(), std=0.5)
    snapshot = decoding.TextWeights.of(model)
    cast = snapshot.tensors(torch.bfloat16)
    assert snapshot.tensors(torch.bfloat16) is cast and cast[-1].dtype == torch.bfloat16
    assert cast[2][0][2].dtype == torch.bfloat16 and cast[2][0][0].dtype == cast[2][0][7].dtype == torch.float32
    cache = model.transformer.new_cache(2, capacity=8)
    sequence = randint(0, 16, (2, 5))
    model.predict([[row] for row in sequence[:, :4]], [], [], torch.zeros(0), cache=cache)
    cache.commit(4)
    shape = (snapshot.heads, snapshot.dim_head, float(model.transformer.norm.scale))
    args = (list(cache.keys.unbind(0)), list(cache.values.unbind(0)), sequence[:, 4], torch.full((2,), 4), torch.tensor([4]), None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = decoding.text_decode_step(snapshot.tensors(), shape, *args)
        assert torch.equal(decoding.text_decode_step(cast, shape, *args), reference)
        with_bias_cast = tuple(tuple(x.bfloat16() if i == 7 else x for i, x in enumerate(layer)) for layer in cast[2])
        assert not torch.equal(decoding.text_decode_step((*cast[:2], with_bias_cast, *cast[3:]), shape, *args), reference)
