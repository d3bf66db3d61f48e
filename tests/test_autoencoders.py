"""The learned video codec (`autoencoders.py`): shapes, bad input, fitting, and the model around it."""

import pytest
import torch
from torch import randn

from conftest import tiny_transformer
from transfusion_pytorch import Transfusion
from transfusion_pytorch.autoencoders import VideoAutoencoder, VideoDecoder, VideoEncoder, fit_autoencoder
from transfusion_pytorch.training import save_checkpoint


def moving_squares(count: int, frames: int = 8, generator: torch.Generator | None = None) -> torch.Tensor:
    """`(count, 1, frames, 16, 16)` clips in [-1, 1]: a 5×5 square moving right by one pixel a frame."""
    generator = generator or torch.Generator().manual_seed(0)
    clips = -torch.ones(count, 1, frames, 16, 16)
    rows = torch.randint(0, 11, (count,), generator=generator)
    columns = torch.randint(0, 16 - 5 - frames + 1, (count,), generator=generator)
    for i in range(count):
        for f in range(frames):
            clips[i, 0, f, rows[i] : rows[i] + 5, columns[i] + f : columns[i] + f + 5] = 1.0
    return clips


def batches_of(count: int = 16, frames: int = 8):
    generator = torch.Generator().manual_seed(1)
    while True:
        yield moving_squares(count, frames, generator)


def test_shapes_one_token_per_tube_and_unbatched_clips():
    autoencoder = VideoAutoencoder(channels=2, latent_channels=6, width=8, frame_patch_size=4)
    videos = randn(3, 2, 8, 16, 12)
    latents = autoencoder.encoder(videos)
    assert latents.shape == (3, 6, 2, 4, 3)  # (b, latent channels, frames / 4, h / 4, w / 4): VideoPatchify(4, 4)'s grid
    assert autoencoder.decoder(latents).shape == videos.shape
    assert autoencoder(videos).shape == videos.shape
    assert autoencoder.encoder(videos[0]).shape == (6, 2, 4, 3)  # one clip (modality_encoder_decoder_requires_batch_dim=False)
    assert torch.allclose(autoencoder.encoder(videos[0]), latents[0], atol=1e-5)
    assert autoencoder.encoder.patch_size == 4 and autoencoder.decoder.frame_patch_size == 4


def test_patch_size_8_folds_2x2_cells_into_a_token_and_patch_size_4_keeps_the_old_layers():
    autoencoder = VideoAutoencoder(latent_channels=24, width=8, frame_patch_size=4, patch_size=8)
    videos = randn(2, 1, 8, 16, 24)
    latents = autoencoder.encoder(videos)
    assert latents.shape == (2, 24, 2, 2, 3)  # VideoPatchify(8, 4)'s grid: a quarter of the tokens of patch_size 4
    assert autoencoder(videos).shape == videos.shape
    assert autoencoder.encoder.get_config()["patch_size"] == 8 == autoencoder.decoder.patch_size
    # the last layer folds only a token's own 2 × 2 cells, the convolutions before it see neighbours:
    # changing one 8 × 8 tube changes its token, and tokens two tubes away stay as they were
    changed = videos.clone()
    changed[:, :, :4, :8, :8] += 1.0
    moved = (autoencoder.encoder(changed) - latents).abs().amax(dim=1)  # (b, t, y, x)
    assert moved[:, 0, 0, 0].min() > 0 and moved[:, :, :, 2].max() == 0
    # patch_size 4 (the default) builds the layers checkpoints were written with: same names and shapes, no config key
    old = VideoAutoencoder(latent_channels=6, width=8, frame_patch_size=4)
    assert "patch_size" not in old.encoder.get_config()
    assert old.encoder.layers[-1].weight.shape == (6, 8, 1, 1, 1) and old.decoder.layers[0].weight.shape == (8, 6, 1, 1, 1)
    assert isinstance(old.decoder.layers[0], torch.nn.Conv3d)
    assert VideoEncoder(**old.encoder.get_config()).load_state_dict(old.encoder.state_dict()) is not None


def test_bad_arguments_name_themselves():
    for name, kwargs in [
        ("frame_patch_size", dict(frame_patch_size=3)),
        ("frame_patch_size", dict(frame_patch_size=0)),
        ("width", dict(width=7)),
        ("latent_channels", dict(latent_channels=0)),
        ("channels", dict(channels=1.5)),
        ("patch_size", dict(patch_size=6)),
        ("patch_size", dict(patch_size=2)),
        ("patch_size", dict(patch_size=0)),
    ]:
        with pytest.raises(ValueError, match=f"`{name}`"):
            VideoEncoder(**kwargs)
    encoder, decoder = VideoEncoder(frame_patch_size=2), VideoDecoder(frame_patch_size=2)
    with pytest.raises(ValueError, match="frame_patch_size"):
        encoder(randn(1, 1, 3, 8, 8))  # 3 frames into tubes of 2
    with pytest.raises(ValueError, match="multiples of `patch_size` 4"):
        encoder(randn(1, 1, 2, 6, 8))
    with pytest.raises(ValueError, match="multiples of `patch_size` 8"):
        VideoEncoder(frame_patch_size=2, patch_size=8)(randn(1, 1, 2, 12, 16))
    with pytest.raises(ValueError, match="channels"):
        encoder(randn(1, 3, 2, 8, 8))
    with pytest.raises(ValueError, match="`latents`"):
        decoder(randn(1, 5, 1, 2, 2))
    with pytest.raises(TypeError, match="`videos`"):
        encoder(torch.zeros(1, 1, 2, 8, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="`encoder` and `decoder`"):
        fit_autoencoder(encoder, encoder, batches_of(), steps=1)
    with pytest.raises(ValueError, match="one configuration"):
        fit_autoencoder(encoder, VideoDecoder(frame_patch_size=4), batches_of(), steps=1)
    with pytest.raises(ValueError, match="`steps`"):
        fit_autoencoder(encoder, decoder, batches_of(), steps=-1)
    for name, bad in (("lr", 0.0), ("latent_noise", -0.1), ("warmup", -1), ("lr", "fast")):
        with pytest.raises(ValueError, match=f"`{name}`"):
            fit_autoencoder(encoder, decoder, batches_of(), steps=1, **{name: bad})
    with pytest.raises(TypeError, match="`batches`"):
        fit_autoencoder(encoder, decoder, iter([torch.zeros(1, 2, 8, 8)]), steps=1, log=None)


@pytest.mark.parametrize("patch_size, latent_channels", [(4, 8), (8, 32)])
def test_fitting_learns_to_reconstruct_sets_the_scale_and_freezes(patch_size, latent_channels):
    torch.manual_seed(0)
    autoencoder = VideoAutoencoder(latent_channels=latent_channels, width=16, frame_patch_size=8, patch_size=patch_size)
    held_out = moving_squares(32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        before = (autoencoder(held_out) - held_out).pow(2).mean().item()
    report = fit_autoencoder(autoencoder.encoder, autoencoder.decoder, batches_of(), steps=150, lr=3e-3, log=None)
    with torch.no_grad():
        after = (autoencoder(held_out) - held_out).pow(2).mean().item()
        latents = autoencoder.encoder(held_out)
    assert after < 0.25 * before, (before, after)  # squares it never saw, reconstructed
    assert report["loss"] < 0.5 * before
    # the scale makes the model see latents of unit scale; both halves carry it, so the round trip is unchanged
    assert torch.equal(autoencoder.encoder.scale, autoencoder.decoder.scale)
    assert abs(autoencoder.encoder.scale.item() - report["latent_std"]) < 1e-6 and report["latent_std"] != 1.0
    assert 0.7 < latents.std().item() < 1.4
    assert not any(p.requires_grad for p in autoencoder.parameters()) and not autoencoder.encoder.training and not autoencoder.decoder.training


@pytest.mark.parametrize("patch_size", [4, 8])
def test_in_the_model_the_codec_stays_frozen_and_checkpoints_rebuild_it(tmp_path, patch_size):
    torch.manual_seed(0)
    autoencoder = VideoAutoencoder(latent_channels=4, width=8, frame_patch_size=2, patch_size=patch_size)
    fit_autoencoder(autoencoder.encoder, autoencoder.decoder, batches_of(4, frames=4), steps=3, log=None)
    model = Transfusion(
        num_text_tokens=12,
        dim_latent=4,
        channel_first_latent=True,
        modality_default_shape=(2, 16 // patch_size, 16 // patch_size),
        modality_encoder=autoencoder.encoder,
        modality_decoder=autoencoder.decoder,
        add_pos_emb=True,
        transformer=tiny_transformer(),
    )
    clip = moving_squares(1, frames=4)[0]
    model([[torch.randint(0, 12, (5,)), clip], [clip, torch.randint(0, 12, (3,))]]).backward()
    assert all(p.grad is None for p in autoencoder.parameters())  # frozen: only the transformer learns
    assert model.transformer.blocks[0].attn.to_qkv.weight.grad is not None

    path = save_checkpoint(tmp_path / "video.pt", model)
    rebuilt = Transfusion.from_checkpoint(path)
    encoder = rebuilt.modality_heads[0].encoder
    assert isinstance(encoder, VideoEncoder) and isinstance(rebuilt.modality_heads[0].decoder, VideoDecoder)
    assert encoder.patch_size == patch_size
    assert encoder.scale.item() == autoencoder.encoder.scale.item() != 1.0  # the fitted scale came back with the weights
    with torch.no_grad():
        assert torch.equal(encoder(clip[None]), autoencoder.encoder(clip[None]))
    sample = rebuilt.generate_modality_only(batch_size=1, modality_steps=2)
    assert sample.shape == (1, 1, 4, 16, 16)  # decoded by the autoencoder: a clip of 4 frames
