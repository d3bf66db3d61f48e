"""Classifier-free guidance: conditioning dropout in training, cfg_scale in every sampler."""

import pytest
import torch
from torch import nn, randint, randn

from conftest import randomized, tiny_transformer
from transfusion_pytorch import Transfusion
from transfusion_pytorch.flow import cfg_blend, guided
from transfusion_pytorch.masks import dense_mask, transfusion_mask
from transfusion_pytorch.sampling import _Stream, start_prompt


def guided_model(**kwargs):
    kwargs.setdefault("dim_latent", 8)
    kwargs.setdefault("modality_default_shape", (2, 3))
    model = Transfusion(num_text_tokens=16, unconditional_prob=0.3, add_pos_emb=True, transformer=tiny_transformer(), **kwargs)
    return randomized(model).eval()  # every weight non-zero, so conditioning and time matter


def opened(model, modality_type, shape, text=(3, 4)):
    return torch.tensor([*text, *model.ids.encode_shape(shape), model.som_ids[modality_type]])


def same(a, b, atol=1e-4):
    return len(a) == len(b) and all(torch.allclose(x if torch.is_tensor(x) else x[1], y if torch.is_tensor(y) else y[1], atol=atol) for x, y in zip(a, b))


def test_mask_of_an_unconditional_instance():
    # t t [n i i] t : instance 0 is unconditional, its first token is the null token
    instance_ids = torch.tensor([[-1, -1, 0, 0, 0, -1]])
    is_null = torch.tensor([[False, False, True, False, False, False]])
    fn = transfusion_mask(instance_ids, unconditional=torch.tensor([True]), is_null=is_null)
    mask = dense_mask(fn, 1, 6, 6)[0, 0].int()
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 0, 1, 1, 1, 0],  # the null token and the image see only each other
            [0, 0, 1, 1, 1, 0],
            [0, 0, 1, 1, 1, 0],
            [1, 1, 0, 1, 1, 1],  # text after sees the image, not its null token
        ]
    )
    assert torch.equal(mask, expected)


def test_cfg_scale_one_runs_no_unconditional_pass_and_equals_the_blend_at_one():
    model = guided_model()
    prompt = [randint(0, 16, (5,)), opened(model, 0, (2, 3))]
    calls = []
    predict = model.predict
    model.predict = lambda *args, **kwargs: calls.append(kwargs.get("unconditional")) or predict(*args, **kwargs)
    for cache_kv in (True, False):
        calls.clear()
        model.sample(prompt=prompt, max_length=8, modality_steps=3, cache_kv=cache_kv, cfg_scale=1.0)
        assert calls and all(u is None for u in calls)  # no doubled batch at scale 1
        calls.clear()
        model.sample(prompt=prompt, max_length=8, modality_steps=3, cache_kv=cache_kv, cfg_scale=2.0)
        assert any(u is not None and any(u) for u in calls)
    del model.predict

    # the conditional half of the doubled batch is exactly the unguided velocity, so the blend at
    # scale 1 (taken through the guided path) equals no guidance
    x, t = randn(2, 3, 8), torch.tensor(0.4)
    for cache_kv in (True, False):
        with torch.no_grad():
            stream = _Stream(model, cache_kv=cache_kv, cfg_scale=2.0)
            start_prompt(model, stream, prompt)
            if cache_kv:
                stream.flush()
            velocity_fn = stream.velocity_fn(0)
            v_cond, v_uncond = velocity_fn(t, x, True)
            plain = guided(velocity_fn, 1.0)(t, x)
        assert torch.allclose(cfg_blend(v_cond, v_uncond, 1.0), plain, atol=1e-5)
        assert not torch.allclose(v_cond, v_uncond, atol=1e-3)


def test_batched_guided_velocity_equals_blend_of_separate_passes():
    model = guided_model()
    prompt = [randint(0, 16, (5,)), randn(2, 2, 8), opened(model, 0, (2, 3))]
    x, t, scale = randn(2, 3, 8), torch.tensor(0.4), 3.0
    with torch.no_grad():
        stream = _Stream(model, cache_kv=True, cfg_scale=scale)
        start_prompt(model, stream, prompt)
        stream.flush()
        batched = guided(stream.velocity_fn(0), scale)(t, x)

        reference = _Stream(model, cache_kv=False)
        start_prompt(model, reference, prompt)
        count = len(reference.types)
        times = torch.ones(count + 1)
        times[-1] = t
        _, _, v = model.predict([[*reference.segments, count]], [*reference.types, 0], [*reference.latents, x], times)
        v_cond = v[-1]
        _, _, v = model.predict([[0]], [0], [x], t.reshape(1), unconditional=[True])
        v_uncond = v[0]

        uncached = _Stream(model, cache_kv=False, cfg_scale=scale)
        start_prompt(model, uncached, prompt)
        uncached_velocity = guided(uncached.velocity_fn(0), scale)(t, x)

    assert not torch.allclose(v_cond, v_uncond, atol=1e-3)  # the prefix matters to the conditional pass
    assert torch.allclose(batched, cfg_blend(v_cond, v_uncond, scale), atol=1e-4)
    assert torch.allclose(uncached_velocity, batched, atol=1e-4)


def test_unconditional_training_ignores_the_prefix():
    model = guided_model()
    model.unconditional_prob = 1.0
    model.train()
    image = randn(2, 3, 8)
    losses = []
    for prefix in (randint(0, 16, (3,)), randint(0, 16, (11,))):
        torch.manual_seed(0)
        _, breakdown = model([[prefix, image]], times=torch.tensor([[0.3]]), return_breakdown=True)
        losses.append(breakdown.flow[0])
    assert torch.allclose(losses[0], losses[1], atol=1e-6)

    model.unconditional_prob = 0.0  # control: with conditioning the prefix changes the flow loss
    losses = []
    for prefix in (randint(0, 16, (3,)), randint(0, 16, (11,))):
        torch.manual_seed(0)
        _, breakdown = model([[prefix, image]], times=torch.tensor([[0.3]]), return_breakdown=True)
        losses.append(breakdown.flow[0])
    assert not torch.allclose(losses[0], losses[1], atol=1e-6)


def test_training_with_dropout_backprops_into_the_null_token():
    model = guided_model()
    model.unconditional_prob = 1.0
    model.train()
    model([[randint(0, 16, (3,)), randn(2, 3, 8)], [randn(1, 2, 8)]]).backward()
    assert model.null_embed.grad is not None and model.null_embed.grad.abs().sum() > 0
    model.zero_grad()
    model(randn(3, 2, 3, 8)).backward()  # modality-only batches drop out too
    assert model.null_embed.grad.abs().sum() > 0


@pytest.mark.parametrize("cache_kv", [True, False])
def test_guided_sampling_with_1d_2d_3d_and_encoder_decoder(cache_kv):
    model = guided_model(
        dim_latent=(6, 8, 5),
        modality_default_shape=((4,), (2, 2), (2, 2, 2)),
        channel_first_latent=(False, True, False),
        modality_encoder=(None, nn.Conv2d(3, 8, 1), None),
        modality_decoder=(None, nn.Conv2d(8, 3, 1), None),
    )
    model.train()
    batch = [[randint(0, 16, (3,)), (0, randn(4, 6)), (1, randn(3, 2, 2)), (2, randn(2, 2, 2, 5))]]
    model(batch).backward()
    model.eval()
    for modality_type, shape in ((0, (3,)), (1, (2, 3)), (2, (1, 2, 2))):
        torch.manual_seed(0)
        out = model.sample(prompt=opened(model, modality_type, shape), max_length=8, modality_steps=3, cfg_scale=3.0, cache_kv=cache_kv)
        generated = out[1][1]
        expected = {0: (3, 6), 1: (3, 2, 3), 2: (1, 2, 2, 5)}[modality_type]  # type 1 is decoded to 3 channels
        assert generated.shape == expected and torch.isfinite(generated).all()
        torch.manual_seed(0)
        unguided = model.sample(prompt=opened(model, modality_type, shape), max_length=8, modality_steps=3, cache_kv=cache_kv)
        assert not torch.allclose(unguided[1][1], generated)
    images = model.generate_modality_only(modality_type=1, batch_size=3, modality_steps=3)
    assert images.shape == (3, 3, 2, 2)


def test_cached_and_uncached_guided_samples_agree():
    model = guided_model()
    prompt = [randint(0, 16, (4,)), opened(model, 0, (2, 2))]
    samples = []
    for cache_kv in (True, False):
        torch.manual_seed(0)
        samples.append(model.sample(prompt=prompt, max_length=14, modality_steps=4, cfg_scale=2.5, cache_kv=cache_kv))
    assert same(*samples)


def test_unconditional_copy_leaves_the_conditional_rows_unchanged():
    model = guided_model()
    x, t = randn(2, 2, 3, 8), torch.rand(())
    with torch.no_grad():
        batch = model.with_unconditional_copy([[0], [1]], [0, 0], list(x), t.expand(2), instances=[0, 1])
        assert batch[4] == [False, False, True, True]
        _, _, v = model.predict(*batch[:4], unconditional=batch[4])
        cond = model(x, times=t.expand(2), return_loss=False)
    assert torch.allclose(torch.stack(v[:2]), cond, atol=1e-5)  # padding next to the longer unconditional rows changes nothing
    assert not torch.allclose(torch.stack(v[2:]), cond, atol=1e-3)


def test_bad_guidance_arguments():
    plain = Transfusion(num_text_tokens=4, dim_latent=4, modality_default_shape=(2,), transformer=tiny_transformer())
    with pytest.raises(ValueError, match="cfg_scale.*unconditional_prob"):
        plain.sample(cfg_scale=3.0)
    for model in (plain, guided_model()):  # unconditional generation: nothing to guide towards
        with pytest.raises(ValueError, match="cfg_scale.*generate_modality_only.*sample"):
            model.generate_modality_only(cfg_scale=2.0)
    with pytest.raises(TypeError, match="cfg_scale"):
        guided_model().generate_modality_only(cfg_scale="high")
    with pytest.raises(ValueError, match="unconditional_prob"):
        Transfusion(num_text_tokens=4, dim_latent=4, unconditional_prob=1.5, transformer=tiny_transformer())
