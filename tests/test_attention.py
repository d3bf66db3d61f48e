import copy
import shutil
import warnings

import pytest
import torch
from rotary_embedding_torch import apply_rotary_emb

from conftest import gpu_available, make_model, randomized, tiny_transformer
from transfusion_pytorch.attention import Attention, AttentionMask, KVCache, RotaryEmbedding, Rotation, compiled_flex_attention, rotate
from transfusion_pytorch.masks import block_mask, causal, dense_mask, transfusion_mask


def interleaved_batch(model):
    return [
        [torch.randint(0, 16, (5,)), torch.randn(2, 3, 8), torch.randint(0, 16, (4,))],
        [torch.randint(0, 16, (3,)), torch.randn(3, 3, 8), torch.randint(0, 16, (2,)), torch.randn(1, 2, 8)],
    ]


def reference_rotation(x, positions, theta=10000.0):
    """RoFormer's rotation written out (arXiv 2104.09864): feature pair (2i, 2i+1) of the token
    at position p turns by the angle p * theta^(-2i / dh). x: (b, h, n, dh), positions: (b, n)."""
    dh = x.shape[-1]
    freqs = theta ** -(torch.arange(0, dh, 2, dtype=torch.float64) / dh)
    angles = positions.double()[:, None, :, None] * freqs  # (b, 1, n, dh / 2)
    pairs = torch.view_as_complex(x.double().reshape(*x.shape[:-1], dh // 2, 2).contiguous())
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)).reshape(x.shape)


def test_rotary_matches_the_reference_rotation_at_explicit_positions():
    rotary = RotaryEmbedding(8)
    # an instance of three tokens shares one position; row 1 packs a second sample, whose positions restart
    positions = torch.tensor([[0, 1, 2, 2, 2, 3], [0, 5, 5, 5, 0, 1]])
    x = torch.randn(2, 3, 6, 8)
    x[:, :, 3] = x[:, :, 2]  # the same content at the same position
    rotated = rotate(rotary(positions), x)
    assert torch.allclose(rotated.double(), reference_rotation(x, positions), atol=1e-5)
    assert torch.equal(rotated[:, :, 3], rotated[:, :, 2])
    angles = rotary.embed(positions)[:, None]  # (b, 1, n, dh): the package's own rotation of the same angles
    assert torch.allclose(apply_rotary_emb(angles, x), rotated, atol=1e-6)
    # scores depend on relative positions only: shifting a row's positions changes nothing
    q, k = torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8)
    scores = [rotate(rotary(p), q) @ rotate(rotary(p), k).transpose(-1, -2) for p in (positions, positions + 7)]
    assert torch.allclose(*scores, atol=1e-4)


def test_rotary_frequencies_are_frozen_and_stay_fp32_in_a_bf16_model():
    model = make_model(dim_latent=8)
    freqs = model.transformer.rotary.embed.freqs
    assert not freqs.requires_grad
    assert model.to(torch.bfloat16).transformer.rotary.embed.freqs.dtype == torch.float32
    assert not model.transformer.rotary.embed.freqs.requires_grad
    assert model.to(torch.float64).transformer.rotary.embed.freqs.dtype == torch.float64

    rotary = RotaryEmbedding(64)
    rotary_bf16 = copy.deepcopy(rotary).to(torch.bfloat16)
    positions = torch.arange(1990, 2010)[None]
    x = torch.randn(1, 2, 20, 64).bfloat16()
    rotated = rotate(rotary_bf16(positions), x)
    assert rotated.dtype == torch.bfloat16
    # only the output's bf16 rounding: |x| < 5 rounds by at most 2^-6
    assert torch.allclose(rotated.double(), reference_rotation(x, positions), atol=2e-2, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = rotary(positions), rotary_bf16(positions)
        assert torch.equal(a.cos, b.cos) and torch.equal(a.sin, b.sin)


@pytest.mark.parametrize("attn_kwargs", [{}, dict(softcap_value=5.0)], ids=["plain", "softcap"])
def test_flex_forward_matches_sdpa_on_cpu(attn_kwargs):
    """Flex (eager on CPU, no grad) against SDPA; with soft-capping, flex's `score_mod`
    against the reference path's explicit scores."""
    model = make_model(dim_latent=8, transformer=tiny_transformer(use_flex_attn=True, attn_kwargs=attn_kwargs)).eval()
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
    rotary = Rotation(torch.ones(1, 1, 6, 8), torch.zeros(1, 1, 6, 8))  # angle 0: no rotation
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
    rotary = Rotation(torch.ones(2, 1, 5, 8), torch.zeros(2, 1, 5, 8))  # angle 0: no rotation
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


def test_flex_attention_refuses_to_train_without_its_dropout():
    attn = Attention(dim=16, dim_head=8, heads=2, dropout=0.1)
    x, rotary = torch.randn(1, 6, 16), Rotation(torch.ones(1, 1, 6, 8), torch.zeros(1, 1, 6, 8))
    mask = AttentionMask(block=block_mask(causal, 1, 6, 6, "cpu"))
    with pytest.raises(ValueError, match="flex attention has no dropout"):
        attn(x, rotary, mask)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluated = attn.eval()(x, rotary, mask)  # no dropout at evaluation: flex is fine
    assert torch.allclose(evaluated, attn(x, rotary, AttentionMask(is_causal=True)), atol=1e-5)


@pytest.mark.skipif(not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")), reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_flex_attention_does_not_recompile_for_every_length():
    """Every batch has a new length; a compile per length would run into dynamo's recompile limit."""
    from torch._dynamo.utils import counters

    flex = compiled_flex_attention()
    graphs_before = counters["stats"]["unique_graphs"]
    for n in (37, 51, 80):
        instance_ids = torch.full((2, n), -1)
        instance_ids[:, 5:15] = 0
        mask_fn = transfusion_mask(instance_ids)  # a new mask function per batch, as the model builds it
        q, k, v = torch.randn(3, 2, 4, n, 8).unbind()
        with torch.no_grad():
            out = flex(q, k, v, block_mask=block_mask(mask_fn, 2, n, n, "cpu"))
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(mask_fn, 2, n, n))
        assert torch.allclose(out, expected, atol=1e-5)
    assert counters["stats"]["unique_graphs"] - graphs_before <= 2


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


def test_explicit_scores_match_sdpa_in_fp32_with_a_transfusion_mask():
    """The explicit-scores path (`attend_reference`, what soft-capped logits take) against SDPA on the same mixed causal / bidirectional mask, plus one query that may see no
    key (SDPA gives it zeros): outputs and gradients."""
    torch.manual_seed(0)
    attn = Attention(dim=16, dim_head=8, heads=2)
    instance_ids = torch.tensor([[-1, 0, 0, 0, -1, 1, 1], [-1, -1, 0, 0, 0, 0, -1]])
    dense = dense_mask(transfusion_mask(instance_ids), 2, 7, 7).clone()
    dense[1, :, 6] = False
    mask = AttentionMask(dense=dense)
    q, k, v = (torch.randn(2, 2, 7, 8, requires_grad=True) for _ in range(3))
    explicit = attn.attend_reference(q, k, v, mask, dropout_p=0.0)
    fused = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    assert torch.allclose(explicit, fused, atol=1e-5)
    assert torch.equal(explicit[1, :, 6], torch.zeros(2, 8))
    grads = [torch.autograd.grad(out.square().sum(), (q, k, v)) for out in (explicit, fused)]
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5)
    # the mask matters here: without it the outputs differ (so the comparison above can fail)
    unmasked = attn.attend_reference(q, k, v, AttentionMask(), dropout_p=0.0)
    assert not torch.allclose(unmasked, fused, atol=1e-2)


def test_bf16_attention_paths_are_as_precise_as_the_bf16_kernel():
    """Against an fp64 reference on the same bf16 inputs, sharp logits: explicit scores (fp32
    scores and softmax, as inside SDPA's fused kernel) stay within 2× the bf16 kernel's error (bf16
    scores would carry ~5× it), and the path bf16 training on CPU takes — SDPA on fp32 copies of
    q, k, v — is below it (only the output's rounding to bf16 is left)."""
    torch.manual_seed(0)
    attn = Attention(dim=128, dim_head=32, heads=4)
    q, k, v = (torch.randn(8, 4, 84, 32) * scale for scale in (2.0, 2.0, 1.0))
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    dense = (torch.rand(8, 1, 84, 84) > 0.3) | torch.eye(84, dtype=torch.bool)
    exact = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=dense)

    def error(out):
        return float((out.double() - exact).norm() / exact.norm())

    fused = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    explicit = attn.attend_reference(q, k, v, AttentionMask(dense=dense), dropout_p=0.0)
    q.requires_grad_()  # the upcast path is taken for training
    upcast = attn.attend(q, k, v, AttentionMask(dense=dense))
    assert explicit.dtype == upcast.dtype == torch.bfloat16
    assert error(explicit) < 2 * error(fused)
    assert error(upcast) < error(fused)


def test_bf16_training_on_cpu_upcasts_attention_and_matches_the_bf16_kernel(monkeypatch):
    """Training under bf16 autocast on CPU runs SDPA on fp32 copies of q, k, v (faster there for
    rows of up to `UPCAST_MAX_KEYS` keys); its loss and gradients match the bf16 kernel's to bf16
    precision, on random weights (the gates open, so every token's context matters). In fp32, or
    without gradients, SDPA runs on q, k, v as they are."""
    from transfusion_pytorch import attention

    torch.manual_seed(0)
    model = randomized(make_model(dim_latent=8))
    batch = interleaved_batch(model)
    times = torch.rand(2, 2)
    dtypes = []
    sdpa = attention.F.scaled_dot_product_attention

    def recording_sdpa(q, *args, **kwargs):
        dtypes.append(q.dtype)
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", recording_sdpa)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(batch, times=times)
        loss.backward()
        return loss.detach().float(), torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])

    loss_upcast, grads_upcast = loss_and_grads()
    assert dtypes == [torch.float32] * len(model.transformer.blocks)
    upcast_is_faster = attention.upcast_is_faster
    monkeypatch.setattr(attention, "upcast_is_faster", lambda q, k: False)
    dtypes.clear()
    loss_bf16, grads_bf16 = loss_and_grads()
    assert dtypes == [torch.bfloat16] * len(model.transformer.blocks)
    monkeypatch.setattr(attention, "upcast_is_faster", upcast_is_faster)
    assert torch.allclose(loss_upcast, loss_bf16, rtol=2e-2)
    assert (grads_upcast - grads_bf16).norm() < 0.05 * grads_bf16.norm()

    # without gradients SDPA runs in bf16; in fp32 it runs in fp32, as without the rule
    dtypes.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(batch, times=times)
    model(batch, times=times)
    assert dtypes == [torch.bfloat16] * len(model.transformer.blocks) + [torch.float32] * len(model.transformer.blocks)
