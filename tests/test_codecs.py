import pytest
import torch

from transfusion_pytorch.codecs import Patchify, Unpatchify


def test_patchify_round_trip_and_layout():
    images = torch.randn(2, 3, 8, 12)
    latents = Patchify(4)(images)
    assert latents.shape == (2, 3 * 16, 2, 3)
    assert torch.equal(latents[0, :16, 0, 0], images[0, 0, :4, :4].reshape(-1))  # one patch = one token
    assert torch.equal(Unpatchify(4)(latents), images)


def test_bad_patch_arguments():
    for bad in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match="patch_size"):
            Patchify(bad)
        with pytest.raises(ValueError, match="patch_size"):
            Unpatchify(bad)
    with pytest.raises(ValueError, match="patch_size"):
        Patchify(4)(torch.randn(1, 1, 6, 8))
    with pytest.raises(ValueError, match="patch_size"):
        Unpatchify(4)(torch.randn(1, 15, 2, 2))


def test_one_unbatched_image_and_bad_ranks():
    image = torch.randn(3, 4, 4)
    latent = Patchify(2)(image)  # as a per-sample encoder (`modality_encoder_decoder_requires_batch_dim=False`)
    assert latent.shape == (12, 2, 2) and torch.equal(Unpatchify(2)(latent), image)
    for bad in (torch.randn(4, 4), torch.randn(1, 1, 3, 4, 4), torch.randn(8)):
        with pytest.raises(ValueError, match="`images`"):
            Patchify(2)(bad)
    with pytest.raises(TypeError, match="`images`"):
        Patchify(2)([image])
    with pytest.raises(TypeError, match="`latents`"):
        Unpatchify(2)(torch.ones(1, 4, 2, 2, dtype=torch.long))
