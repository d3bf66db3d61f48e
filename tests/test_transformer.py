"""The transformer on its own: hyper-connections (0.12's `num_residual_streams`)."""

import pytest
import torch
from torch import nn, randint, randn

from conftest import make_model, tiny_transformer
from transfusion_pytorch import Transformer
from transfusion_pytorch.attention import AttentionMask


def randomise(module: nn.Module) -> None:
    """Non-zero values everywhere, so zero-initialised gates don't hide a difference."""
    for p in module.parameters():
        nn.init.normal_(p, std=0.2)


def batch():
    return [[randint(0, 16, (5,)), randn(2, 3, 8), randint(0, 16, (3,))], [randn(3, 2, 8), randint(0, 16, (6,))]]


def test_hyper_connections_start_as_the_plain_residual():
    plain = make_model(dim_latent=8, modality_default_shape=(2, 2))
    randomise(plain)
    hyper = make_model(dim_latent=8, modality_default_shape=(2, 2), transformer=tiny_transformer(num_residual_streams=4))
    missing, unexpected = hyper.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".hyper." in name for name in missing)

    data, times = batch(), torch.rand(2, 1)
    expected = plain(data, times=times, return_loss=False)  # text logits (b, n, l)
    assert torch.allclose(hyper(data, times=times, return_loss=False), expected, atol=1e-5)
    torch.manual_seed(1)
    loss = plain(data, times=times)
    torch.manual_seed(1)
    assert torch.allclose(hyper(data, times=times), loss, atol=1e-5)

    # the dynamic part is live: once its weights move, the output does too
    with torch.no_grad():
        hyper.transformer.blocks[0].hyper[0].dynamic_alpha.normal_(std=1.0)
        hyper.transformer.blocks[0].hyper[0].alpha_scale.fill_(1.0)
    assert not torch.allclose(hyper(data, times=times, return_loss=False), expected, atol=1e-2)


def test_hyper_connections_keep_the_residual_in_fp32_under_autocast():
    plain = Transformer(dim=32, depth=6, dim_head=8, heads=4)
    randomise(plain)
    hyper = Transformer(dim=32, depth=6, dim_head=8, heads=4, num_residual_streams=4)
    hyper.load_state_dict(plain.state_dict(), strict=False)
    tokens, positions = randn(2, 12, 32), torch.arange(12).expand(2, 12)
    mask = AttentionMask(is_causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_plain, out_hyper = plain(tokens, positions, mask), hyper(tokens, positions, mask)
    # at initialisation the copies hold the plain residual exactly, so bf16 rounds both alike
    assert torch.allclose(out_hyper.float(), out_plain.float(), atol=1e-5)


def test_hyper_connections_train_and_sample_with_the_cache():
    model = make_model(dim_latent=8, modality_default_shape=(2, 2), transformer=tiny_transformer(num_residual_streams=3))
    loss = model(batch())
    loss.backward()
    for name, p in model.named_parameters():
        if ".hyper." in name and ".static_" in name:  # the dynamic weights start at zero, so only these get gradients at first
            assert p.grad is not None and p.grad.abs().sum() > 0, name

    model.eval()
    randomise(model)
    prompt = [torch.tensor([3, 5, *model.ids.encode_shape((2, 3)), model.ids.som[0]])]  # opens a (2, 3) modality
    samples = []
    for cache_kv in (True, False):
        torch.manual_seed(0)
        samples.append(model.sample(prompt=prompt, max_length=24, cache_kv=cache_kv, text_temperature=1.0, text_min_p=0.0, modality_steps=3))
    assert len(samples[0]) == len(samples[1]) and any(isinstance(x, tuple) for x in samples[0])
    for x, y in zip(*samples):
        if isinstance(x, tuple):
            assert x[0] == y[0] and torch.allclose(x[1], y[1], atol=1e-4)
        else:
            assert torch.equal(x, y)


def test_hyper_connections_with_checkpointing_same_grads():
    a = Transformer(dim=32, depth=3, dim_head=8, heads=4, num_residual_streams=2)
    b = Transformer(dim=32, depth=3, dim_head=8, heads=4, num_residual_streams=2, use_checkpoint=True)
    randomise(a)
    b.load_state_dict(a.state_dict())
    model_a, model_b = make_model(transformer=a), make_model(transformer=b)
    model_b.load_state_dict(model_a.state_dict())
    text = randint(0, 16, (2, 9))
    model_a(text).backward()
    model_b(text).backward()
    for (name, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
        if pa.grad is not None:
            assert torch.allclose(pa.grad, pb.grad, atol=1e-5), name


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_residual_streams=0), "num_residual_streams"),
        (dict(num_residual_streams=2.0), "num_residual_streams"),
        (dict(num_residual_fracs=2), "num_residual_fracs"),
    ],
)
def test_bad_residual_arguments(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        Transformer(dim=32, depth=1, **kwargs)
