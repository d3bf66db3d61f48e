"""Classifier-free guidance: conditioning dropout in training, cfg_scale in every sampler."""

import pytest
import torch
from torch import nn, randint, randn

from conftest import tiny_transformer
from transfusion_pytorch import Transfusion
from transfusion_pytorch.flow import cfg_blend
from transfusion_pytorch.masks import dense_mask, transfusion_mask
from transfusion_pytorch.sampling import _Stream, start_prompt


def guided_model(**kwargs):
    kwargs.setdefault("dim_latent", 8)
    kwargs.setdefault("modality_default_shape", (2, 3))
    model = Transfusion(num_text_tokens=16, unconditional_prob=0.3, add_pos_emb=True, transformer=tiny_transformer(), **kwargs)
    with torch.no_grad():  # wake the zero-initialised gates so conditioning matters
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(std=0.3)
    return model.eval()


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


def test_cfg_scale_one_is_the_unguided_sample():
    model = guided_model()
    prompt = opened(model, 0, (2, 2))
    for cache_kv in (True, False):
        torch.manual_seed(0)
        plain = model.sample(prompt=prompt, max_length=12, modality_steps=3, cache_kv=cache_kv)
        torch.manual_seed(0)
        guided = model.sample(prompt=prompt, max_length=12, modality_steps=3, cache_kv=cache_kv, cfg_scale=1.0)
        assert same(plain, guided, atol=0)
    torch.manual_seed(0)
    a = model.generate_modality_only(batch_size=2, modality_steps=3)
    torch.manual_seed(0)
    b = model.generate_modality_only(batch_size=2, modality_steps=3, cfg_scale=1.0)
    assert torch.equal(a, b)


def test_batched_guided_velocity_equals_blend_of_separate_passes():
    model = guided_model()
    prompt = [randint(0, 16, (5,)), randn(2, 2, 8), opened(model, 0, (2, 3))]
    x, t, scale = randn(2, 3, 8), torch.tensor(0.4), 3.0
    with torch.no_grad():
        stream = _Stream(model, cache_kv=True, cfg_scale=scale)
        start_prompt(model, stream, prompt)
        stream.flush()
        batched = stream.modality_velocity(0, x, t)

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
        uncached_velocity = uncached.modality_velocity(0, x, t)

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
    images = model.generate_modality_only(modality_type=1, batch_size=3, modality_steps=3, cfg_scale=2.0)
    assert images.shape == (3, 3, 2, 2)


def test_cached_and_uncached_guided_samples_agree():
    model = guided_model()
    prompt = [randint(0, 16, (4,)), opened(model, 0, (2, 2))]
    samples = []
    for cache_kv in (True, False):
        torch.manual_seed(0)
        samples.append(model.sample(prompt=prompt, max_length=14, modality_steps=4, cfg_scale=2.5, cache_kv=cache_kv))
    assert same(*samples)


def test_guided_generate_modality_only_equals_blend():
    model = guided_model()
    x, t = randn(2, 2, 3, 8), torch.rand(())
    with torch.no_grad():
        _, _, v = model.predict([[0], [1], [2], [3]], [0] * 4, [*x, *x], t.expand(4), unconditional=[False, False, True, True])
        expected = cfg_blend(torch.stack(v[:2]), torch.stack(v[2:]), 4.0)
        cond = model(x, times=t.expand(2), return_loss=False)
    assert torch.allclose(torch.stack(v[:2]), cond, atol=1e-5)  # padding next to longer rows changes nothing
    assert not torch.allclose(expected, cond)


def test_bad_guidance_arguments():
    plain = Transfusion(num_text_tokens=4, dim_latent=4, modality_default_shape=(2,), transformer=tiny_transformer())
    with pytest.raises(ValueError, match="cfg_scale.*unconditional_prob"):
        plain.sample(cfg_scale=3.0)
    with pytest.raises(ValueError, match="cfg_scale.*unconditional_prob"):
        plain.generate_modality_only(cfg_scale=2.0)
    with pytest.raises(TypeError, match="cfg_scale"):
        guided_model().generate_modality_only(cfg_scale="high")
    with pytest.raises(ValueError, match="unconditional_prob"):
        Transfusion(num_text_tokens=4, dim_latent=4, unconditional_prob=1.5, transformer=tiny_transformer())
