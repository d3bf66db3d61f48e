"""transfusion-pytorch 0.12.0's own test calls, against our public API.

0.12.0's `tests/test_transfusion.py` makes these calls (same constructors, sizes, batches and
sampling arguments); each test here makes them again, written anew. Not carried over: the
tests of 0.12's private helpers (`stack_same_shape_tensors_with_inverse`,
`filter_with_inverse`, `apply_fn_modality_type`), and the flex-attention variants, which
0.12 itself skips without CUDA (`tests/test_attention.py` checks flex against SDPA here).
"""

from copy import deepcopy

import pytest
import torch
from einops import rearrange
from torch import nn, randint, randn, tensor

from transfusion_pytorch import Transfusion


def ids(high, n):
    return randint(0, high, (n,))


@pytest.mark.parametrize("cache_kv", (False, True))
@pytest.mark.parametrize("num_residual_streams", (1, 4))
@pytest.mark.parametrize("reconstruction_loss_weight", (0.0, 0.1))
def test_two_modalities_train_and_sample(cache_kv, num_residual_streams, reconstruction_loss_weight):
    model = Transfusion(
        num_text_tokens=8,
        dim_latent=(384, 192),
        modality_default_shape=((32,), (64,)),
        reconstruction_loss_weight=reconstruction_loss_weight,
        transformer=dict(dim=64, depth=2, use_flex_attn=False, num_residual_streams=num_residual_streams),
    )
    batch = [
        [ids(8, 16), (0, randn(4, 384)), ids(8, 8), (1, randn(6, 192))],
        [ids(8, 16), randn(7, 384), ids(8, 5), (1, randn(2, 192)), ids(8, 9)],
    ]
    model(batch).backward()
    sample = model.sample([tensor(model.som_ids[0])], max_length=128, cache_kv=cache_kv)  # a 0-d text tensor as the prompt
    assert any(isinstance(item, tuple) and item[0] == 0 for item in sample)  # the som opened modality 0


def test_channel_first_latents():
    model = Transfusion(num_text_tokens=8, dim_latent=384, channel_first_latent=True, modality_default_shape=(2, 2), transformer=dict(dim=64, depth=2))
    batch = [
        [ids(8, 16), randn(384, 2, 2), ids(8, 8), randn(384, 2, 2)],
        [ids(8, 16), randn(384, 2, 2), ids(8, 5), randn(384, 2, 2), ids(8, 9)],
    ]
    model(batch).backward()
    model.sample([tensor(model.som_ids[0])], max_length=128)


@pytest.mark.parametrize("return_loss", (False, True))
def test_text_only(return_loss):
    model = Transfusion(num_text_tokens=256, dim_latent=384, channel_first_latent=True, modality_default_shape=(32,), transformer=dict(dim=64, depth=2))
    out = model(randint(0, 256, (2, 1024)), return_loss=return_loss)
    assert out.shape == (() if return_loss else (2, 1024, model.ids.vocab_size))


@pytest.mark.parametrize("channel_first", (False, True))
def test_modality_only_with_other_axes_than_the_default_shape(channel_first):
    model = Transfusion(
        num_text_tokens=256, dim_latent=(384, 192), channel_first_latent=channel_first, modality_default_shape=(32,), transformer=dict(dim=64, depth=2)
    )
    images = randn(2, 8, 8, 192)  # two axes, while the default shape (32,) has one: 0.12 took it
    if channel_first:
        images = rearrange(images, "b ... d -> b d ...")
    with pytest.warns(UserWarning, match="modality_num_dim"):
        model(images, return_loss=True, modality_type=1).backward()
    model.generate_modality_only(modality_type=1)


@pytest.mark.parametrize("custom_time_fn", (False, True))
def test_text_image_end_to_end(custom_time_fn):
    model = Transfusion(
        num_text_tokens=4,
        dim_latent=384,
        channel_first_latent=True,
        modality_default_shape=((4, 4),),
        modality_encoder=nn.Conv2d(3, 384, 3, padding=1),
        modality_decoder=nn.Conv2d(384, 3, 3, padding=1),
        transformer=dict(dim=64, depth=2),
    )
    batch = [
        [ids(4, 16), randn(3, 8, 8), ids(4, 8), randn(3, 7, 7)],
        [ids(4, 16), randn(3, 8, 5), ids(4, 5), randn(3, 2, 16), ids(4, 9)],
    ]

    def all_clean(num_modalities):
        return torch.ones((num_modalities.shape[0], int(num_modalities.amax())), device=num_modalities.device)

    model(batch, num_modalities_to_times_fn=all_clean if custom_time_fn else None).backward()
    model.sample(max_length=128)


def test_velocity_consistency_with_a_deep_copy_as_ema():
    model = Transfusion(
        num_text_tokens=12,
        dim_latent=384,
        channel_first_latent=True,
        modality_default_shape=(4, 4),
        modality_encoder=nn.Conv2d(3, 384, 3, padding=1),
        modality_decoder=nn.Conv2d(384, 3, 3, padding=1),
        transformer=dict(dim=64, depth=1),
    )
    batch = [
        [ids(12, 16), randn(3, 8, 8), ids(12, 8), randn(3, 7, 7)],
        [ids(12, 16), randn(3, 8, 5), ids(12, 5), randn(3, 2, 16), ids(12, 9)],
    ]
    loss, breakdown = model(batch, velocity_consistency_ema_model=deepcopy(model), return_breakdown=True)
    loss.backward()
    assert breakdown.velocity is not None


def test_axial_position_embedding():
    model = Transfusion(
        num_text_tokens=256,
        dim_latent=(384, 192),
        modality_default_shape=((2, 2), (2,)),
        fallback_to_default_shape_if_invalid=True,
        add_pos_emb=True,
        modality_num_dim=(2, 1),
        transformer=dict(dim=64, depth=8),
    )
    batch = [
        [ids(256, 16), (0, randn(2, 3, 384)), ids(256, 8), (1, randn(6, 192))],
        [ids(256, 16), randn(1, 4, 384), ids(256, 5), (1, randn(2, 192)), ids(256, 9)],
    ]
    model(batch).backward()
    model.sample(max_length=128)


def test_modality_only_with_unet_blocks():
    model = Transfusion(
        num_text_tokens=10,
        dim_latent=4,
        modality_default_shape=(14, 14),
        pre_post_transformer_enc_dec=(nn.Conv2d(4, 64, 3, 2, 1), nn.ConvTranspose2d(64, 4, 3, 2, 1, output_padding=1)),
        channel_first_latent=True,
        add_pos_emb=True,
        modality_num_dim=2,
        velocity_consistency_loss_weight=0.1,
        transformer=dict(dim=64, depth=1, dim_head=32, heads=8),
    )
    model(torch.randn(1, 4, 14, 14)).backward()
    assert model.generate_modality_only().shape == (1, 4, 14, 14)


def test_zero_dimensional_modality():
    model = Transfusion(num_text_tokens=256, dim_latent=384, modality_default_shape=(), transformer=dict(dim=512, depth=8, num_residual_streams=1))
    batch = [
        [ids(256, 16), randn(384), ids(256, 8), randn(384)],
        [ids(256, 16), randn(384), ids(256, 5), randn(384), ids(256, 9)],
    ]
    model(batch).backward()
    sample = model.sample(prompt=randn(384))
    assert isinstance(sample[1], tuple) and sample[1][1].shape == (384,)
