"""Sampling: cached vs uncached, text decoding, the modality state machine, shapes."""

import pytest
import torch
from torch import randint, randn

from conftest import make_model, randomized
from transfusion_pytorch import Transfusion
from transfusion_pytorch.sampling import min_p_filter, sample_token


def opened_modality(model, modality_type, shape, text=(3,)):
    """Text ending in `[meta] shape [som]`, so sampling starts with that modality."""
    ids = model.ids
    return torch.tensor([*text, *ids.encode_shape(shape), ids.som[modality_type]])


def two_modality_model(**kwargs):
    """Randomised weights: the time conditioning and gates are non-zero, so what a modality
    token sees (prefix, time) changes its velocity, and a cached / batched shortcut that got
    it wrong would show."""
    return randomized(make_model(dim_latent=(8, 6), modality_default_shape=((2, 2), (3,)), add_pos_emb=(True, False), **kwargs))


def assert_same_sample(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, tuple):
            assert x[0] == y[0] and torch.allclose(x[1], y[1], atol=1e-4)
        else:
            assert torch.equal(x, y)


def test_cached_and_uncached_give_the_same_sample():
    model = two_modality_model()
    prompt = [randint(0, 16, (5,)), (1, randn(3, 6)), opened_modality(model, 0, (2, 3))]
    samples = []
    for cache_kv in (True, False):
        torch.manual_seed(0)
        samples.append(model.sample(prompt=prompt, max_length=40, cache_kv=cache_kv, text_temperature=1.0, text_min_p=0.0, modality_steps=4))
    assert_same_sample(*samples)
    kinds = [x[0] if isinstance(x, tuple) else "text" for x in samples[0]]
    assert kinds[:4] == ["text", 1, "text", 0]
    assert samples[0][3][1].shape == (2, 3, 8)  # the shape written in the prompt


def test_cached_and_uncached_agree_over_many_seeds_with_generated_modalities():
    model = two_modality_model()
    # bias the text head towards som / meta / shape chars so the model opens modalities itself
    bias = torch.zeros(model.ids.vocab_size)
    bias[list(model.ids.som)] = 4.0
    model.to_text_logits.register_forward_hook(lambda module, inputs, out: out + bias)
    opened = 0
    for seed in range(3):
        results = []
        for cache_kv in (True, False):
            torch.manual_seed(seed)
            results.append(model.sample(max_length=30, cache_kv=cache_kv, modality_steps=3))
        assert_same_sample(*results)
        opened += sum(isinstance(x, tuple) for x in results[0])
    assert opened >= 2  # the model opened modalities on its own


def test_sample_defaults_and_structure():
    model = two_modality_model()
    torch.manual_seed(0)
    out = model.sample(prompt=opened_modality(model, 1, (4,)), max_length=12, modality_steps=3)
    assert out[0][0].item() == model.sos_id
    assert isinstance(out[1], tuple) and out[1][0] == 1 and out[1][1].shape == (4, 6)
    assert out[2][0].item() == model.eom_ids[1]


def test_modality_prompt_is_wrapped_and_continued():
    model = two_modality_model()
    image = randn(2, 2, 8)
    out = model.sample(prompt=(0, image), max_length=5, modality_steps=3)
    ids = out[0].tolist()
    assert ids == [model.sos_id, *model.ids.encode_shape((2, 2)), model.som_ids[0]]
    assert torch.equal(out[1][1], image)
    assert out[2][0].item() == model.eom_ids[0]
    # feeding a sample back as a prompt does not wrap the modality twice
    again = model.sample(prompt=out, max_length=3, modality_steps=3, return_unprocessed_modalities=True)
    assert again[0].tolist() == ids and torch.equal(again[1][1], image)


def test_fixed_shape_and_init_noise():
    model = two_modality_model()
    prompt = opened_modality(model, 0, (2, 2))
    noise = randn(64, 8)
    out_a = model.sample(prompt=prompt, max_length=4, fixed_modality_shape=(3, 1), init_modality_noise=noise, modality_steps=3)
    out_b = model.sample(prompt=prompt, max_length=4, fixed_modality_shape=(3, 1), init_modality_noise=noise, modality_steps=3)
    assert out_a[1][1].shape == (3, 1, 8)
    assert torch.allclose(out_a[1][1], out_b[1][1])


def test_shape_fallback_rules():
    model = two_modality_model()
    unreadable = torch.tensor([model.meta_id, model.ids.char_offset + ord("x"), model.som_ids[0]])
    out = model.sample(prompt=unreadable, max_length=4, modality_steps=2)
    assert out[1][1].shape == (2, 2, 8)  # the default shape

    wrong_axes = opened_modality(model, 0, (5,))
    with pytest.raises(ValueError, match="fallback_to_default_shape_if_invalid"):
        model.sample(prompt=wrong_axes, max_length=20, modality_steps=2)
    model.fallback_to_default_shape_if_invalid = True
    assert model.sample(prompt=wrong_axes, max_length=20, modality_steps=2)[1][1].shape == (2, 2, 8)


def test_a_shape_past_max_length_ends_the_sample():
    model = two_modality_model()
    prompt = opened_modality(model, 0, (99, 99))
    out = model.sample(prompt=prompt, max_length=20, modality_steps=2)
    assert len(out) == 1 and torch.equal(out[0], torch.cat((torch.tensor([model.sos_id]), prompt, torch.tensor([model.eos_id]))))
    # the same rule for a fixed shape and the default shape: 4 tokens do not fit in 3, but do in 4
    for kwargs in (dict(fixed_modality_shape=(2, 2)), dict()):
        assert len(model.sample(prompt=opened_modality(model, 0, (2, 2)), max_length=3, modality_steps=2, **kwargs)) == 1
        assert model.sample(prompt=opened_modality(model, 0, (2, 2)), max_length=4, modality_steps=2, **kwargs)[1][1].shape == (2, 2, 8)
    unreadable = torch.tensor([model.meta_id, model.ids.char_offset + ord("x"), model.som_ids[0]])  # falls back to the default (2, 2)
    assert model.sample(prompt=unreadable, max_length=3, modality_steps=2)[-1][-1] == model.eos_id


def test_generate_text_only_equals_uncached_reference():
    model = make_model(dim_latent=8)
    prompt = randint(0, 16, (3, 4))
    torch.manual_seed(5)
    cached = model.generate_text_only(prompt, 12, temperature=1.0)

    torch.manual_seed(5)
    out = prompt.clone()
    model.eval()
    with torch.no_grad():
        for _ in range(8):
            logits = model(out, return_loss=False)[:, -1]
            logits = logits.masked_fill(~model.text_only_logits_mask, float("-inf"))
            out = torch.cat((out, sample_token(logits, 1.0, 0.1)), dim=1)
    assert torch.equal(cached, out[:, 4:])


def test_greedy_text_and_max_length():
    model = make_model(dim_latent=8)
    a = model.generate_text_only(randint(0, 16, (1, 3)), 10, temperature=0.0)
    assert a.shape == (1, 7)
    out = model.sample(max_length=5, text_temperature=0.0)
    total = sum(x.numel() for x in out if torch.is_tensor(x))
    assert total <= 1 + 5


def test_eos_stops_sampling():
    model = make_model(dim_latent=8)
    with torch.no_grad():
        model.to_text_logits.weight.zero_()
        model.to_text_logits.weight[model.eos_id] = 0  # all logits equal
    logits_bias = torch.full((model.ids.vocab_size,), -1e4)
    logits_bias[model.eos_id] = 0
    model.to_text_logits.register_forward_hook(lambda m, i, o: o + logits_bias)
    out = model.sample(max_length=50)
    assert out[0].tolist() == [model.sos_id, model.eos_id]


def test_batched_modality_velocity_equals_one_by_one():
    model = randomized(make_model(dim_latent=8, modality_default_shape=(2, 3), add_pos_emb=True)).eval()
    x, t = randn(3, 2, 3, 8), torch.rand(3)
    with torch.no_grad():
        batched = model(x, times=t, return_loss=False)
        single = torch.cat([model(x[i : i + 1], times=t[i : i + 1], return_loss=False) for i in range(3)])
    assert torch.allclose(batched, single, atol=1e-5)


def test_generate_modality_only_batches():
    model = make_model(dim_latent=8, modality_default_shape=(2, 3))
    out = model.generate_modality_only(batch_size=4, modality_steps=3)
    assert out.shape == (4, 2, 3, 8) and torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])


def test_min_p_filter():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.04, 0.16]))
    filtered = min_p_filter(logits, 0.1)
    assert torch.isinf(filtered[2]) and torch.isfinite(filtered[[0, 1, 3]]).all()


def test_no_text_tokens_samples_a_modality():
    model = Transfusion(num_text_tokens=0, dim_latent=8, modality_default_shape=(2,), transformer=dict(dim=32, depth=1, dim_head=8, heads=2))
    out = model.sample(modality_steps=3)
    assert out[0][0] == 0 and out[0][1].shape == (2, 8)


def test_ema_samples():
    model = two_modality_model()
    ema = model.create_ema()
    out = ema.sample(prompt=opened_modality(model, 1, (2,)), max_length=4, modality_steps=2)
    assert out[1][1].shape == (2, 6)


def test_kv_cache_feeds_each_token_once_and_only_the_modality_per_ode_step():
    model = two_modality_model()
    prompt = [randint(0, 16, (6,)), opened_modality(model, 0, (2, 3))]
    prompt_len = 1 + 6 + len(opened_modality(model, 0, (2, 3)))  # sos + text + [meta] "2,3" [som] (+3 leading text)
    fed = []
    handle = model.transformer.register_forward_pre_hook(lambda module, args, kwargs: fed.append(args[0].shape[1]), with_kwargs=True)
    torch.manual_seed(0)
    out = model.sample(prompt=prompt, max_length=12, modality_steps=5, text_temperature=1.0)
    handle.remove()
    # prefill once, then: 2·4 midpoint evaluations of the 6 image tokens + 1 commit at t = 1,
    # then one token per text step ([eom] first)
    assert fed[0] == prompt_len
    assert fed[1:10] == [6] * 9
    assert all(n == 1 for n in fed[10:])
    generated_text = sum(x.numel() for x in out if torch.is_tensor(x)) - prompt_len
    # one forward per text token after the image ([eom] and every sampled token but the last)
    assert len(fed) - 10 == generated_text - 1


def test_generated_modality_depends_on_the_prompt_cached_and_uncached():
    """Unguided ODE sampling on the KV cache: the same noise after two different prompts gives two
    different images (the prefix reaches the modality), and cached equals uncached for each."""
    model = two_modality_model()
    noise = randn(4, 8)
    images = []
    for text in ((3, 4), (9, 1, 2)):
        prompt = opened_modality(model, 0, (2, 2), text=text)
        pair = [model.sample(prompt=prompt, max_length=4, init_modality_noise=noise, modality_steps=4, cache_kv=cache_kv)[1][1] for cache_kv in (True, False)]
        assert torch.allclose(pair[0], pair[1], atol=1e-4)
        images.append(pair[0])
    assert not torch.allclose(images[0], images[1], atol=1e-3)


def test_adaptive_solver_over_the_flattened_multi_item_state():
    """dopri5 integrates every item of a multi-resolution batch as one flattened ODE state; each
    item must come out as if integrated alone (to the solver's tolerance)."""
    model = randomized(make_model(dim_latent=4, modality_default_shape=(2, 2), add_pos_emb=True, odeint_kwargs=dict(method="dopri5", atol=1e-6, rtol=1e-6)))
    shapes = [(2, 2), (3, 1), (1, 2)]
    torch.manual_seed(0)
    together = model.generate_modality_only(batch_size=3, fixed_modality_shape=shapes, modality_steps=2)
    torch.manual_seed(0)
    noises = [randn(*shape, 4) for shape in shapes]  # the same draws, in the same order
    alone = [_integrate_one(model, noise) for noise in noises]
    for a, b in zip(together, alone):
        assert torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(together[0], noises[0], atol=1e-2)  # the flow moved the noise


def _integrate_one(model, noise):
    from transfusion_pytorch.flow import integrate

    def velocity(t, x):  # adaptive steps may look just past t = 1
        return model.predict([[0]], [0], [x], t.reshape(1))[2][0].float()

    with torch.no_grad():
        return integrate(velocity, noise, 2, model.odeint_kwargs)
