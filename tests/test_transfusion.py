"""The model: 0.12-compatible usage, every modality setting, every loss."""

import pytest
import torch
from torch import nn, randint, randn

from conftest import make_model, tiny_transformer
from transfusion_pytorch import LossBreakdown, Transformer, Transfusion, print_modality_sample


def test_012_readme_one_modality():
    model = Transfusion(num_text_tokens=256, dim_latent=24, modality_default_shape=(4,), transformer=tiny_transformer())
    batch = [
        [randint(0, 256, (16,)), randn(4, 24), randint(0, 256, (8,)), randn(6, 24)],
        [randint(0, 256, (16,)), randn(7, 24), randint(0, 256, (5,)), randn(2, 24), randint(0, 256, (9,))],
    ]
    loss = model(batch)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert model.to_text_logits.weight.grad is not None


def test_012_readme_two_modalities_and_breakdown():
    model = Transfusion(num_text_tokens=256, dim_latent=(24, 12), modality_default_shape=((4,), (2,)), transformer=tiny_transformer())
    batch = [
        [randint(0, 256, (16,)), (0, randn(4, 24)), randint(0, 256, (8,)), (1, randn(6, 12))],
        [randint(0, 256, (16,)), randn(7, 24), randint(0, 256, (5,)), (1, randn(2, 12)), randint(0, 256, (9,))],
    ]
    loss, breakdown = model(batch, return_breakdown=True)
    assert isinstance(breakdown, LossBreakdown)
    assert len(breakdown.flow) == 2 and all(f > 0 for f in breakdown.flow)
    assert breakdown.velocity is None and breakdown.recon is None
    assert torch.equal(breakdown.total, loss)


def test_012_readme_encoder_decoder_channel_first():
    encoder = nn.Conv2d(3, 8, 3, padding=1)
    decoder = nn.Conv2d(8, 3, 3, padding=1)
    model = Transfusion(
        num_text_tokens=12,
        dim_latent=8,
        channel_first_latent=True,
        modality_default_shape=(4, 4),
        modality_encoder=encoder,
        modality_decoder=decoder,
        transformer=tiny_transformer(),
    )
    batch = [
        [randint(0, 12, (16,)), randn(3, 8, 8), randint(0, 12, (8,)), randn(3, 7, 7)],
        [randint(0, 12, (16,)), randn(3, 8, 5), randint(0, 12, (5,)), randn(3, 2, 16), randint(0, 12, (9,))],
    ]
    loss = model(batch)
    loss.backward()
    assert encoder.weight.grad is None  # the encoder is frozen (no grad through it)
    images = model.generate_modality_only(batch_size=2, modality_steps=3)
    assert images.shape == (2, 3, 4, 4)  # decoded back to pixels, channel first
    latents = model.generate_modality_only(batch_size=2, modality_steps=3, return_unprocessed_modalities=True)
    assert latents.shape == (2, 8, 4, 4)


def test_012_text_only_pretraining_and_logits():
    model = make_model(dim_latent=8)
    text = randint(0, 16, (2, 12))
    loss = model(text)
    loss.backward()
    logits = model(text, return_loss=False)
    assert logits.shape == (2, 12, model.ids.vocab_size)
    new = model.generate_text_only(text[:, :1], 6)
    assert new.shape == (2, 5) and (new < 16).all()


def test_text_loss_learns_and_is_causal():
    model = make_model(dim_latent=8)
    text = randint(0, 16, (1, 10))
    model.eval()
    logits = model(text, return_loss=False)
    changed = text.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 16
    assert torch.allclose(model(changed, return_loss=False)[:, :-1], logits[:, :-1], atol=1e-5)


def test_modality_only_forward_and_velocity():
    model = make_model(dim_latent=8, modality_default_shape=(3, 3), add_pos_emb=True)
    x = randn(4, 3, 3, 8)
    loss, breakdown = model(x, return_breakdown=True)
    loss.backward()
    assert breakdown.text == 0 and breakdown.flow[0] > 0
    velocity = model(x, times=torch.rand(4), return_loss=False)
    assert velocity.shape == x.shape


def test_modality_time_conditions_only_modality_tokens():
    model = make_model(dim_latent=8).eval()
    # zero-initialised gates: make them non-zero so time matters
    for p in model.parameters():
        if p.abs().sum() == 0:
            nn.init.normal_(p, std=0.5)
    batch = [[randint(0, 16, (4,)), randn(3, 8), randint(0, 16, (3,))]]
    logits_a = model(batch, times=torch.tensor([[0.1]]), return_loss=False)
    logits_b = model(batch, times=torch.tensor([[0.9]]), return_loss=False)
    # text before the modality (sos-less layout: meta, shape, som included) is unaffected by time
    first_modality_token = 4 + 3  # 4 text + [meta] "3" [som]
    assert torch.allclose(logits_a[:, :first_modality_token], logits_b[:, :first_modality_token], atol=1e-5)
    assert not torch.allclose(logits_a[:, first_modality_token:], logits_b[:, first_modality_token:])


def test_times_and_times_fn():
    model = make_model(dim_latent=8)
    batch = [[randint(0, 16, (4,)), randn(2, 8), randn(3, 8)], [randint(0, 16, (2,)), randn(2, 8)]]
    seen = {}

    def times_fn(num_modalities):
        seen["num"] = num_modalities.tolist()
        return torch.full((2, 2), 0.5)

    model(batch, num_modalities_to_times_fn=times_fn)
    assert seen["num"] == [2, 1]
    # t = 1 everywhere: the network reads the data itself (no noise at all); t = 0: pure noise
    seen_latents = []
    predict = model.predict
    model.predict = lambda rows, types, latents, times, **kwargs: seen_latents.append((latents, times)) or predict(rows, types, latents, times, **kwargs)
    model(batch, times=torch.ones(2, 2))
    latents, times = seen_latents[-1]
    assert torch.equal(times, torch.ones(3))
    assert all(torch.equal(x, y) for x, y in zip(latents, [batch[0][1], batch[0][2], batch[1][1]]))
    torch.manual_seed(5)
    model(batch, times=torch.zeros(2, 2))
    torch.manual_seed(5)
    noise = [torch.randn_like(x) for x in (batch[0][1], batch[0][2], batch[1][1])]
    assert all(torch.equal(x, y) for x, y in zip(seen_latents[-1][0], noise))


def test_zero_one_two_three_dim_modalities_with_pos_emb():
    model = Transfusion(
        num_text_tokens=16,
        dim_latent=(8, 6, 4, 5),
        modality_default_shape=((), (3,), (2, 3), (2, 2, 2)),
        add_pos_emb=(False, True, True, True),
        transformer=tiny_transformer(),
    )
    batch = [
        [randint(0, 16, (3,)), (0, randn(8)), (1, randn(3, 6)), randint(0, 16, (2,)), (2, randn(2, 3, 4)), (3, randn(2, 2, 2, 5))],
        [(3, randn(1, 2, 3, 5)), randint(0, 16, (2,)), (2, randn(4, 1, 4))],
    ]
    loss, breakdown = model(batch, return_breakdown=True)
    loss.backward()
    assert len(breakdown.flow) == 4 and all(torch.isfinite(f) for f in breakdown.flow)
    video = model.generate_modality_only(modality_type=3, batch_size=2, modality_steps=3)
    assert video.shape == (2, 2, 2, 2, 5)
    vector = model.generate_modality_only(modality_type=0, batch_size=3, modality_steps=3)
    assert vector.shape == (3, 8)


def test_pre_post_unet_blocks_change_token_count():
    down = nn.Sequential(nn.Conv2d(4, 32, 2, stride=2))  # (b, 4, 4, 4) → (b, 32, 2, 2): 4 tokens
    up = nn.Sequential(nn.ConvTranspose2d(32, 4, 2, stride=2))
    model = make_model(dim_latent=4, channel_first_latent=True, modality_default_shape=(4, 4), pre_post_transformer_enc_dec=(down, up))
    batch = [[randint(0, 16, (3,)), randn(4, 4, 4)], [randn(4, 4, 4), randint(0, 16, (2,))]]
    loss = model(batch)
    loss.backward()
    assert down[0].weight.grad is not None and up[0].weight.grad is not None
    out = model.generate_modality_only(batch_size=2, modality_steps=3)
    assert out.shape == (2, 4, 4, 4)


def test_encoder_without_batch_dim():
    calls = []

    class PerSample(nn.Module):
        def forward(self, x):
            calls.append(x.ndim)
            return x.transpose(0, 1) if x.ndim == 2 else x

    model = make_model(dim_latent=8, modality_encoder=PerSample(), modality_encoder_decoder_requires_batch_dim=False)
    model([[randint(0, 16, (2,)), randn(8, 3)]])
    assert calls == [2]


def test_encoder_runs_once_per_shape_group():
    calls = []

    class Count(nn.Linear):
        def forward(self, x):
            calls.append(x.shape[0])
            return super().forward(x)

    model = make_model(dim_latent=8, modality_encoder=Count(5, 8))
    batch = [[randn(3, 5), randn(3, 5)], [randn(3, 5), randn(4, 5)]]
    model(batch)
    assert sorted(calls) == [1, 3]


def test_velocity_consistency_with_ema():
    model = make_model(dim_latent=8)
    ema = model.create_ema(beta=0.9)
    batch = [[randint(0, 16, (4,)), randn(3, 8)], [randn(2, 8), randint(0, 16, (2,))]]
    loss, breakdown = model(batch, velocity_consistency_ema_model=ema, return_breakdown=True)
    loss.backward()
    assert breakdown.velocity is not None and torch.isfinite(breakdown.velocity[0])
    # identical weights and the same path: the EMA's velocity a tiny step later is close to ours
    assert breakdown.velocity[0] < 1e-3
    loss_plain = make_model(dim_latent=8)(batch)
    assert torch.isfinite(loss_plain)
    ema.update()
    out = ema.generate_modality_only(batch_size=1, fixed_modality_shape=(2,), modality_steps=3)
    assert out.shape == (1, 2, 8)


def test_velocity_consistency_modality_only():
    model = make_model(dim_latent=8, modality_default_shape=(2,))
    ema = model.create_ema()
    loss, breakdown = model(randn(2, 2, 8), velocity_consistency_ema_model=ema, return_breakdown=True)
    assert torch.isfinite(loss) and breakdown.velocity is not None


def test_reconstruction_loss_reaches_model():
    decoder = nn.Linear(8, 5)
    model = make_model(dim_latent=8, modality_encoder=nn.Linear(5, 8), modality_decoder=decoder, reconstruction_loss_weight=1.0)
    loss, breakdown = model([[randint(0, 16, (3,)), randn(4, 5)]], return_breakdown=True)
    loss.backward()
    assert breakdown.recon is not None and breakdown.recon[0] > 0
    assert model.modality_heads[0].model_to_latent.weight.grad.abs().sum() > 0
    trainable = model.parameters_without_encoder_decoder()
    assert isinstance(trainable, list)  # a fixed order (an optimizer state resumes onto the right tensors)
    assert not any(p is decoder.weight or p is decoder.bias for p in trainable)
    assert any(p is model.modality_heads[0].model_to_latent.weight for p in trainable)


def test_public_ids_and_old_import_path():
    from transfusion_pytorch.transfusion import Transfusion as OldImport

    model = make_model(dim_latent=(8, 4))
    assert OldImport is Transfusion
    assert (model.sos_id, model.eos_id) == (16, 17)
    assert model.som_ids == [18, 19] and model.eom_ids == [20, 21] and model.meta_id == 22


def test_transformer_instance_and_checkpointing_same_grads():
    torch.manual_seed(0)
    a = make_model(dim_latent=8, transformer=Transformer(dim=32, depth=3, dim_head=8, heads=4))
    b = make_model(dim_latent=8, transformer=Transformer(dim=32, depth=3, dim_head=8, heads=4, use_checkpoint=True))
    b.load_state_dict(a.state_dict())
    batch = [[randint(0, 16, (4,)), randn(3, 8)], [randn(2, 8), randint(0, 16, (5,))]]
    times = torch.rand(2, 1)
    torch.manual_seed(3)
    loss_a = a(batch, times=times)
    loss_a.backward()
    torch.manual_seed(3)
    loss_b = b(batch, times=times)
    loss_b.backward()
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is not None:
            assert torch.allclose(pa.grad, pb.grad, atol=1e-5), name


def test_print_modality_sample(capsys):
    print_modality_sample([torch.tensor([1, 2]), (0, torch.randn(2, 3)), torch.randn(4)])
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[0] == "text" and "modality:0" in out[1] and "(2, 3)" in out[1]


def test_training_reduces_loss_on_a_learnable_task():
    torch.manual_seed(0)
    model = make_model(dim_latent=4, modality_default_shape=(2,))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def batch():
        labels = randint(0, 2, (8,))
        return [[torch.tensor([int(c)]), torch.full((2, 4), 1.0 if c else -1.0)] for c in labels]

    first = [model(batch()).item() for _ in range(3)]
    for _ in range(60):
        loss = model(batch())
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = [model(batch()).item() for _ in range(3)]
    assert sum(last) < 0.5 * sum(first)


@pytest.mark.parametrize("cf", [False, True])
def test_channel_first_round_trip_of_latents(cf):
    model = make_model(dim_latent=6, channel_first_latent=cf, modality_default_shape=(2, 3))
    x = randn(6, 2, 3) if cf else randn(2, 3, 6)
    model([[x]]).backward()
    out = model.generate_modality_only(batch_size=1, modality_steps=2)
    assert out.shape == ((1, 6, 2, 3) if cf else (1, 2, 3, 6))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_model_in_another_dtype_trains_and_samples(dtype):
    model = make_model(dim_latent=8, modality_default_shape=(2, 2), add_pos_emb=True, unconditional_prob=0.2).to(dtype)
    ema = model.create_ema()
    batch = [[randint(0, 16, (4,)), randn(2, 2, 8)], [randn(3, 1, 8), randint(0, 16, (3,))]]  # fp32 latents: cast
    model(batch, velocity_consistency_ema_model=ema).backward()
    model(randn(2, 2, 2, 8), modality_type=0).backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    prompt = torch.tensor([3, *model.ids.encode_shape((2, 2)), model.ids.som[0]])
    for cache_kv in (True, False):
        sample = model.sample(prompt=prompt, max_length=10, modality_steps=3, cfg_scale=2.0, cache_kv=cache_kv)
        assert sample[1][1].shape == (2, 2, 8) and torch.isfinite(sample[1][1]).all()
    assert model.generate_modality_only(batch_size=2, modality_steps=3).shape == (2, 2, 2, 8)
    assert model.generate_text_only(randint(0, 16, (2, 3)), 6).shape == (2, 3)
