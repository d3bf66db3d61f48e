"""`stems.ConvStem` / `ConvHead`: conv blocks around the patch grid (`pre_post_transformer_enc_dec`)."""

import pytest
import torch
from torch import randint, randn

from conftest import make_model, randomized
from transfusion_pytorch import Transfusion
from transfusion_pytorch.codecs import Patchify, Unpatchify, VideoPatchify
from transfusion_pytorch.stems import ConvHead, ConvStem, conv_stem_and_head
from transfusion_pytorch.training import save_checkpoint


def image_model(**kwargs):
    return make_model(
        dim_latent=16,
        channel_first_latent=True,
        modality_default_shape=(3, 3),
        modality_encoder=Patchify(4),
        modality_decoder=Unpatchify(4),
        add_pos_emb=True,
        pre_post_transformer_enc_dec=conv_stem_and_head(32, 4, width=8),
        **kwargs,
    )


def test_the_stem_and_head_keep_the_patch_grid():
    stem, head = conv_stem_and_head(24, 4, channels=3, width=8)
    latents = Patchify(4)(randn(2, 3, 12, 20))  # (2, 48, 3, 5)
    tokens = stem(latents)
    assert tokens.shape == (2, 24, 3, 5)
    assert head(tokens).shape == latents.shape

    stem, head = conv_stem_and_head(24, 4, width=8, frame_patch_size=2)
    latents = VideoPatchify(4, 2)(randn(2, 1, 6, 8, 12))  # (2, 32, 3, 2, 3)
    tokens = stem(latents)
    assert tokens.shape == (2, 24, 3, 2, 3)
    assert head(tokens).shape == latents.shape


def test_untrained_they_are_the_linear_patch_projections():
    """The conv branches start at zero: at init the stem is a Linear layer on each patch's values,
    the head a Linear layer back, as `latent_to_model` / `model_to_latent` of linear patches."""
    torch.manual_seed(0)
    stem, head = conv_stem_and_head(24, 4, channels=2, width=8)
    latents = randn(3, 32, 2, 5)
    as_linear = stem.linear.weight.reshape(24, 32)  # (dim, c·p·p), in Patchify's (c p1 p2) order
    expected = torch.einsum("b k h w, d k -> b d h w", latents, as_linear) + stem.linear.bias[:, None, None]
    torch.testing.assert_close(stem(latents), expected, atol=1e-5, rtol=1e-5)
    tokens = randn(3, 24, 2, 5)
    back = head.linear.weight.reshape(24, 32)  # (dim, c·p·p)
    expected = torch.einsum("b d h w, d k -> b k h w", tokens, back)
    torch.testing.assert_close(head(tokens), expected, atol=1e-5, rtol=1e-5)
    linear = torch.nn.Linear(24, 32, bias=False)  # and drawn like that Linear layer: U(±1/√dim)
    assert back.abs().max() <= 24**-0.5 and back.std() > 0.8 * linear.weight.std()
    randomized(stem)
    assert not torch.allclose(
        stem(latents), torch.einsum("b k h w, d k -> b d h w", latents, stem.linear.weight.reshape(24, 32)) + stem.linear.bias[:, None, None], atol=1e-3
    )


def test_the_stem_convolves_pixels_so_a_shift_by_one_patch_shifts_its_tokens():
    torch.manual_seed(0)
    stem = randomized(ConvStem(16, 4, width=8))  # the conv branch alive
    image = torch.zeros(1, 1, 28, 28)
    image[..., 8:16, 8:12] = randn(8, 4)
    shifted = torch.roll(image, shifts=4, dims=-1)  # one patch to the right, away from the borders
    a, b = stem(Patchify(4)(image)), stem(Patchify(4)(shifted))
    torch.testing.assert_close(b[..., 1:6, 3:6], a[..., 1:6, 2:5], atol=1e-5, rtol=1e-5)
    # and a pixel in one patch reaches the neighbouring token (3×3 convs at pixel level): a Linear patch embedding could not
    poke = torch.zeros(1, 1, 28, 28)
    poke[..., 12, 11] = 1.0  # the last column of token (3, 2)
    delta = stem(Patchify(4)(poke)) - stem(Patchify(4)(torch.zeros(1, 1, 28, 28)))
    assert delta[..., 3, 3].abs().max() > 0 and delta[..., 3, 4].abs().max() == 0

    video_stem = randomized(ConvStem(16, 4, width=8, frame_patch_size=2))
    clip = torch.zeros(1, 1, 4, 16, 16)
    clip[:, :, 2, 5, 5] = 1.0  # frame 2 belongs to the second tube; per-frame convs never mix it into the first
    delta = video_stem(VideoPatchify(4, 2)(clip)) - video_stem(VideoPatchify(4, 2)(torch.zeros_like(clip)))
    assert delta[:, :, 0].abs().max() == 0 and delta[:, :, 1].abs().max() > 0


def test_a_model_with_the_conv_stem_trains_samples_and_keeps_49_tokens_per_7x7_image():
    torch.manual_seed(0)
    model = image_model(unconditional_prob=0.2)
    images = randn(2, 1, 12, 12)
    text = randint(0, 16, (4,))
    loss = model([[text, images[0]], [images[1], text]])
    loss.backward()
    for block in (model.modality_heads[0].latent_to_model, model.modality_heads[0].model_to_latent):
        assert block.linear.weight.grad.abs().sum() > 0
        assert block.convs[-1].weight.grad.abs().sum() > 0  # the zero-initialised layer learns from the first step

    model = randomized(model).eval()
    noise = randn(9, 16)
    kwargs = dict(max_length=30, text_temperature=0.0, init_modality_noise=noise, modality_steps=3, force_modality_at_start=0, cfg_scale=2.0)
    alone = model.sample(prompt=text, **kwargs)
    images = [x[1] for x in alone if isinstance(x, tuple)]
    assert images[0].shape == (1, 12, 12)  # decoded through Unpatchify after the head
    many = model.sample_many([text, text[:2]], **kwargs)
    torch.testing.assert_close(many[0][1][1], alone[1][1], atol=1e-4, rtol=1e-4)  # batched equals alone through the stem
    assert not torch.allclose(many[1][1][1], alone[1][1], atol=1e-2)  # the prompt reaches the image


def test_a_checkpoint_rebuilds_the_stem_and_head(tmp_path):
    torch.manual_seed(0)
    model = randomized(image_model()).eval()
    save_checkpoint(tmp_path / "stem.pt", model, step=1)
    rebuilt = Transfusion.from_checkpoint(tmp_path / "stem.pt").eval()
    stem, head = rebuilt.modality_heads[0].latent_to_model, rebuilt.modality_heads[0].model_to_latent
    assert isinstance(stem, ConvStem) and isinstance(head, ConvHead) and stem.width == 8
    batch = [[randint(0, 16, (4,)), randn(1, 12, 12)]]
    torch.manual_seed(1)
    expected = model(batch, return_loss=True)
    torch.manual_seed(1)
    torch.testing.assert_close(rebuilt(batch, return_loss=True), expected)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(dim=0, patch_size=4), "dim"),
        (dict(dim=8, patch_size=2.5), "patch_size"),
        (dict(dim=8, patch_size=4, width=-1), "width"),
        (dict(dim=8, patch_size=4, channels=True), "channels"),
        (dict(dim=8, patch_size=4, frame_patch_size=0), "frame_patch_size"),
    ],
)
def test_bad_settings_name_the_argument(kwargs, name):
    for cls in (ConvStem, ConvHead):
        with pytest.raises(ValueError, match=f"`{name}`"):
            cls(**kwargs)


def test_a_video_latent_of_the_wrong_tube_is_refused():
    stem = ConvStem(16, 4, width=8, frame_patch_size=2)
    with pytest.raises(ValueError, match="latents"):
        stem(randn(1, 20, 1, 2, 2))  # 20 values a token: not a 2×4×4 tube
