"""Modalities of different numbers of axes in one model and one sequence (the 0.12 wish list)."""

import torch
from torch import randint, randn

from conftest import tiny_transformer
from transfusion_pytorch import Transfusion


def opened(model, modality_type, shape):
    return torch.tensor([*model.ids.encode_shape(shape), model.som_ids[modality_type]])


def test_mixed_0d_2d_train_and_sample():
    model = Transfusion(
        num_text_tokens=256,
        dim_latent=(24, 24),
        modality_default_shape=((), (4, 4)),
        modality_num_dim=(0, 2),
        add_pos_emb=(False, True),
        transformer=tiny_transformer(),
    )
    batch = [[randint(0, 256, (16,)), (0, randn(24)), (1, randn(4, 4, 24))], [(1, randn(2, 3, 24)), randint(0, 256, (3,))]]
    loss, breakdown = model(batch, return_breakdown=True)
    loss.backward()
    assert all(torch.isfinite(f) and f > 0 for f in breakdown.flow)
    assert model.modality_heads[1].pos_emb is not None and model.modality_heads[0].pos_emb is None

    embedding = model.sample(prompt=[randint(0, 256, (3,)), opened(model, 0, ())], max_length=8, modality_steps=3)
    assert embedding[1][0] == 0 and embedding[1][1].shape == (24,)
    image = model.sample(prompt=[(0, randn(24)), opened(model, 1, (2, 2))], max_length=8, modality_steps=3)
    kinds = [item[0] for item in image if isinstance(item, tuple)]
    assert kinds[:2] == [0, 1] and image[3][1].shape == (2, 2, 24)


def test_1d_2d_3d_train_and_sample_with_cache_equivalence():
    model = Transfusion(
        num_text_tokens=32,
        dim_latent=(6, 4, 5),
        modality_default_shape=((5,), (2, 3), (2, 2, 2)),
        add_pos_emb=(True, False, True),
        transformer=tiny_transformer(),
    )
    batch = [
        [randint(0, 32, (4,)), (0, randn(5, 6)), (1, randn(2, 3, 4)), randint(0, 32, (2,)), (2, randn(2, 2, 2, 5))],
        [(2, randn(3, 1, 2, 5)), randint(0, 32, (2,)), (0, randn(2, 6))],
    ]
    model(batch).backward()
    prompt = [(0, randn(3, 6)), (1, randn(1, 2, 4)), opened(model, 2, (2, 1, 2))]
    outs = []
    for cache_kv in (True, False):
        torch.manual_seed(0)
        outs.append(model.sample(prompt=prompt, max_length=10, modality_steps=3, cache_kv=cache_kv))
    video = [item[1] for item in outs[0] if isinstance(item, tuple) and item[0] == 2][0]
    assert video.shape == (2, 1, 2, 5)
    for a, b in zip(*outs):
        assert torch.allclose(a if torch.is_tensor(a) else a[1], b if torch.is_tensor(b) else b[1], atol=1e-4)


def test_add_pos_emb_makes_spatial_order_matter():
    model = Transfusion(num_text_tokens=8, dim_latent=4, modality_default_shape=(2, 2), add_pos_emb=True, transformer=tiny_transformer()).eval()
    no_pos = Transfusion(num_text_tokens=8, dim_latent=4, modality_default_shape=(2, 2), add_pos_emb=False, transformer=tiny_transformer()).eval()
    x = randn(1, 2, 2, 4)
    flipped = x.flip(1)
    t = torch.tensor([0.5])
    with torch.no_grad():
        # without positions the modality is a set: permuting tokens permutes the output
        assert torch.allclose(no_pos(flipped, times=t, return_loss=False), no_pos(x, times=t, return_loss=False).flip(1), atol=1e-5)
        assert not torch.allclose(model(flipped, times=t, return_loss=False), model(x, times=t, return_loss=False).flip(1), atol=1e-5)
