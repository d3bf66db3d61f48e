import warnings

import pytest
import torch

from conftest import gpu_available, make_model, tiny_transformer
from transfusion_pytorch.attention import Attention, AttentionMask, KVCache
from transfusion_pytorch.masks import dense_mask, transfusion_mask


def interleaved_batch(model):
    return [
        [torch.randint(0, 16, (5,)), torch.randn(2, 3, 8), torch.randint(0, 16, (4,))],
        [torch.randint(0, 16, (3,)), torch.randn(3, 3, 8), torch.randint(0, 16, (2,)), torch.randn(1, 2, 8)],
    ]


@pytest.mark.parametrize("use_flex_attn", [False, True])
def test_flex_forward_matches_sdpa_on_cpu(use_flex_attn):
    model = make_model(dim_latent=8, transformer=tiny_transformer(use_flex_attn=use_flex_attn)).eval()
    batch = interleaved_batch(model)
    times = torch.rand(2, 2)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.attention_backend = "sdpa"
        torch.manual_seed(1)
        loss_sdpa = model(batch, times=times)
        logits_sdpa = model(batch, return_loss=False)
        model.attention_backend = "flex"
        torch.manual_seed(1)
        loss_flex = model(batch, times=times)
        logits_flex = model(batch, return_loss=False)
    assert torch.allclose(loss_sdpa, loss_flex, atol=1e-5)
    assert torch.allclose(logits_sdpa, logits_flex, atol=1e-4)


def test_softcap_reference_path_runs_and_masks():
    attn = Attention(dim=16, dim_head=8, heads=2, softcap_value=50.0).eval()
    x = torch.randn(1, 6, 16)
    rotary = (torch.ones(1, 1, 6, 8), torch.zeros(1, 1, 6, 8))
    instance_ids = torch.tensor([[-1, 0, 0, 0, -1, -1]])
    mask = AttentionMask(dense=dense_mask(transfusion_mask(instance_ids), 1, 6, 6))
    out = attn(x, rotary, mask)
    # changing a later text token must not change earlier outputs (causal), but changing a
    # later image token changes the earlier image token (bidirectional)
    x2 = x.clone()
    x2[:, 5] += 1
    assert torch.allclose(attn(x2, rotary, mask)[:, :5], out[:, :5], atol=1e-6)
    x3 = x.clone()
    x3[:, 3] += 1
    assert not torch.allclose(attn(x3, rotary, mask)[:, 1], out[:, 1])
    assert torch.allclose(attn(x3, rotary, mask)[:, 0], out[:, 0], atol=1e-6)


def test_softcap_with_large_cap_matches_sdpa():
    x = torch.randn(2, 5, 16)
    rotary = (torch.ones(1, 1, 5, 8), torch.zeros(1, 1, 5, 8))
    plain = Attention(dim=16, dim_head=8, heads=2).eval()
    capped = Attention(dim=16, dim_head=8, heads=2, softcap_value=1e6).eval()
    capped.load_state_dict(plain.state_dict())
    mask = AttentionMask(is_causal=True)
    assert torch.allclose(plain(x, rotary, mask), capped(x, rotary, mask), atol=1e-5)


def test_kv_cache_decoding_equals_full_forward():
    model = make_model(dim_latent=8).eval()
    transformer = model.transformer
    ids = torch.randint(0, 16, (2, 9))
    positions = torch.arange(9).expand(2, 9)
    with torch.no_grad():
        full = transformer(model.text_embed(ids), positions, AttentionMask(is_causal=True))
        cache = transformer.new_cache(2, capacity=2)  # forces growth
        first = transformer(model.text_embed(ids[:, :4]), positions[:, :4], AttentionMask(is_causal=True), cache=cache)
        cache.commit(4)
        steps = [first]
        for i in range(4, 9):
            steps.append(transformer(model.text_embed(ids[:, i : i + 1]), positions[:, i : i + 1], AttentionMask(), cache=cache))
            cache.commit(1)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    assert cache.length == 9


def test_kv_cache_uncommitted_writes_are_overwritten():
    cache = KVCache(num_layers=1, batch=1, heads=1, dim_head=2, capacity=4)
    k = torch.ones(1, 1, 2, 2)
    cache.update(0, k, k)
    cache.commit(2)
    keys, _ = cache.update(0, 2 * k, 2 * k)  # not committed
    assert keys.shape[-2] == 4
    keys, _ = cache.update(0, 3 * k[:, :, :1], 3 * k[:, :, :1])
    assert keys.shape[-2] == 3 and keys[0, 0, 2, 0] == 3


def test_laser_attention_runs_and_backprops():
    model = make_model(dim_latent=8, transformer=tiny_transformer(attn_laser=True))
    loss = model(interleaved_batch(model))
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs CUDA")
def test_flex_training_on_cuda_matches_sdpa():
    model = make_model(dim_latent=8, transformer=tiny_transformer(use_flex_attn=True)).cuda()
    batch = [[t.cuda() for t in sample] for sample in interleaved_batch(model)]
    times = torch.rand(2, 2, device="cuda")
    torch.manual_seed(1)
    loss_flex = model(batch, times=times)
    loss_flex.backward()
    model.attention_backend = "sdpa"
    torch.manual_seed(1)
    loss_sdpa = model(batch, times=times)
    assert torch.allclose(loss_flex, loss_sdpa, atol=1e-4)
