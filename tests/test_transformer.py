"""The transformer on its own: the time-conditioned gate, hyper-connections (0.12's `num_residual_streams`)."""

import math

import pytest
import torch
from hyper_connections import HyperConnections
from torch import nn, randint, randn

from conftest import make_model, tiny_transformer
from transfusion_pytorch import Transformer
from transfusion_pytorch.attention import AttentionMask
from transfusion_pytorch.masks import dense_mask, transfusion_mask
from transfusion_pytorch.transformer import Modulation


def randomise(module: nn.Module) -> None:
    """Non-zero values in every trained weight, so zero-initialised gates don't hide a difference
    (the rotary frequencies are frozen, not trained)."""
    for p in module.parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=0.2)


def test_modality_gate_starts_at_sigmoid_of_minus_two():
    transformer = Transformer(dim=32, depth=2, dim_head=8, heads=4)
    instance_cond = transformer.time_embed(torch.rand(3))
    for block in transformer.blocks:
        for norm in (block.attn_norm, block.ff_norm):
            scale, shift, gate = norm.tables(instance_cond)  # row 0 text, then one row per instance
            assert torch.allclose(gate[1:], torch.full_like(gate[1:], 1 / (1 + math.exp(2))))  # 0.119
            assert torch.equal(gate[0], torch.ones(32))  # text: plain residual
            assert torch.equal(scale, torch.ones_like(scale)) and torch.equal(shift, torch.zeros_like(shift))


def test_an_untrained_model_reads_the_prefix_into_modality_tokens():
    """Two sequences that differ only in their text prefix: the modality tokens' outputs differ
    (with adaLN-Zero's zero gate they would not, until training opened the gates)."""
    transformer = Transformer(dim=32, depth=2, dim_head=8, heads=4).eval()
    instance_ids = torch.tensor([[-1, -1, -1, 0, 0, 0, 0]])
    positions = torch.tensor([[0, 1, 2, 3, 3, 3, 3]])
    mask = AttentionMask(dense=dense_mask(transfusion_mask(instance_ids), 1, 7, 7))
    tokens = randn(1, 7, 32)
    other_prefix = tokens.clone()
    other_prefix[:, :3] = randn(1, 3, 32)
    times = torch.tensor([0.5])

    def modality_outputs(x):
        return transformer(x, positions, mask, token_instance=instance_ids, instance_times=times)[:, 3:]

    with torch.no_grad():
        assert not torch.allclose(modality_outputs(tokens), modality_outputs(other_prefix), atol=1e-3)
        for block in transformer.blocks:  # close the gates, as adaLN-Zero starts: the prefix no longer matters
            for norm in (block.attn_norm, block.ff_norm):
                norm.to_gate.bias.fill_(-float("inf"))
        assert torch.allclose(modality_outputs(tokens), modality_outputs(other_prefix), atol=1e-6)


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
        hyper.transformer.blocks[0].hyper[0].dynamic_alpha_fn.normal_(std=1.0)
        hyper.transformer.blocks[0].hyper[0].dynamic_alpha_scale.fill_(1.0)
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


@pytest.mark.parametrize("fracs", [1, 4])
def test_hyper_connections_come_from_the_package_without_fracs(fracs):
    transformer = Transformer(dim=32, depth=2, dim_head=8, heads=4, num_residual_streams=2, num_residual_fracs=fracs)
    hyper = [h for block in transformer.blocks for h in block.hyper]
    assert len(hyper) == 4 and all(isinstance(h, HyperConnections) and h.num_fracs == 1 for h in hyper)
    # sub-layer k reads copy k mod s at initialisation
    assert [int(h.static_alpha[:, 0].argmax()) for h in hyper] == [0, 1, 0, 1]
    assert not any(isinstance(m, HyperConnections) for m in Transformer(dim=32, depth=1, num_residual_fracs=fracs).modules())  # plain residual


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


def test_compiled_training_matches_eager_and_leaves_sampling_eager():
    """`compile_training`: the loss and every gradient of a randomised model match the eager
    pass on interleaved batches of two lengths (one trace with dynamic shapes, no graph break),
    and with activation checkpointing; a pass without grad (sampling, evaluation) does not
    touch the compiled function."""
    from torch._dynamo.utils import counters

    from conftest import randomized

    torch._dynamo.reset()
    counters.clear()
    model = randomized(make_model(dim_latent=8, modality_default_shape=(2, 2), unconditional_prob=0.0))
    batches = [batch(), [[randint(0, 16, (9,)), randn(2, 2, 8)], [randn(3, 3, 8), randint(0, 16, (2,))]]]

    def loss_and_grads(b):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the flow noise and times are drawn inside the forward pass
        loss = model(b)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    eager = [loss_and_grads(b) for b in batches]
    model.transformer.compile_training = True
    compiled = [loss_and_grads(b) for b in batches]
    assert "_compiled_run" in model.transformer.__dict__
    for (loss, grads), (loss_c, grads_c) in zip(eager, compiled):
        assert torch.allclose(loss, loss_c, rtol=1e-5, atol=1e-6)
        assert len(grads) == len(grads_c)
        for g, g_c in zip(grads, grads_c):
            assert torch.allclose(g, g_c, rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]

    model.transformer.use_checkpoint = True  # activation checkpointing inside the compiled graph: one more trace
    loss_c, grads_c = loss_and_grads(batches[0])
    assert torch.allclose(eager[0][0], loss_c, rtol=1e-5, atol=1e-6)
    assert all(torch.allclose(g, g_c, rtol=1e-4, atol=1e-5) for g, g_c in zip(eager[0][1], grads_c, strict=True))
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]
    model.transformer.use_checkpoint = False

    with pytest.raises(TypeError, match="compile_training"):
        model.transformer.compile_training = 1

    calls = counters["stats"]["calls_captured"]
    with torch.no_grad():
        model.eval().sample(max_length=12)
    assert counters["stats"]["calls_captured"] == calls


@pytest.mark.parametrize("num_instances", [3, Modulation.MAX_ONE_HOT_ROWS])
def test_modulation_picks_rows_exactly_eager_and_compiled(num_instances):
    """The per-token pick of scale / shift / gate rows: an embedding lookup eager, a product with one-hot
    row selectors under `torch.compile` (up to `MAX_ONE_HOT_ROWS` rows; the lookup beyond). Both give
    every token its row exactly, and the same gradient for the table."""
    torch.manual_seed(0)
    token_instance = randint(-1, num_instances, (3, 10))  # -1: text
    table = randn(num_instances + 1, 12, requires_grad=True)
    weights = randn(3, 10, 12)

    def pick(index, table):
        modulation = Modulation(index, num_instances)
        return modulation.gather(table), modulation.select is not None

    eager, eager_one_hot = pick(token_instance, table)
    assert not eager_one_hot and torch.equal(eager, table[token_instance + 1])
    (grad,) = torch.autograd.grad((eager * weights).sum(), table)

    torch._dynamo.reset()
    compiled, one_hot = torch.compile(pick, backend="eager", fullgraph=True)(token_instance, table)
    assert one_hot == (num_instances + 1 <= Modulation.MAX_ONE_HOT_ROWS)
    assert torch.equal(compiled, eager)
    (grad_compiled,) = torch.autograd.grad((compiled * weights).sum(), table)
    assert torch.allclose(grad_compiled, grad, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the product stays in the table's dtype under autocast
        assert torch.equal(torch.compile(pick, backend="eager", fullgraph=True)(token_instance, table)[0], eager)
