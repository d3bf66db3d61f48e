"""Per-sample shapes on every path, and sequence packing."""

import warnings

import torch
from torch import nn, randint, randn

import transfusion_pytorch.transfusion as transfusion_module
from conftest import randomized, tiny_transformer
from transfusion_pytorch import PackedBatchSampler, Transfusion
from transfusion_pytorch.data import pack_samples
from transfusion_pytorch.layout import DOCUMENT_BREAK, build_layout, pack_rows
from transfusion_pytorch.masks import block_mask, transfusion_mask


def model_2d(**kwargs):
    kwargs.setdefault("dim_latent", 8)
    return Transfusion(num_text_tokens=16, modality_default_shape=(4, 4), add_pos_emb=True, transformer=tiny_transformer(), **kwargs)


def mixed_batch():
    return [
        [randint(0, 16, (5,)), randn(2, 3, 8), randint(0, 16, (3,))],
        [randint(0, 16, (2,))],
        [randn(4, 2, 8), randint(0, 16, (7,)), randn(1, 1, 8)],
        [randint(0, 16, (9,)), randn(3, 3, 8)],
    ]


def test_modality_only_list_of_shapes_matches_one_by_one():
    model = model_2d().eval()
    for p in model.parameters():
        if p.abs().sum() == 0:
            nn.init.normal_(p, std=0.3)
    items = [randn(8, 8, 8), randn(6, 10, 8), randn(12, 4, 8)]
    t = torch.rand(3)
    with torch.no_grad():
        together = model(items, modality_type=0, times=t, return_loss=False)
        alone = [model(x[None], times=t[i : i + 1], return_loss=False)[0] for i, x in enumerate(items)]
    assert [v.shape for v in together] == [x.shape for x in items]
    for a, b in zip(together, alone):
        assert torch.allclose(a, b, atol=1e-5)
    loss = model_2d()(items, modality_type=0)
    loss.backward()
    assert torch.isfinite(loss)


def test_heads_project_every_shape_in_one_call_and_match_per_instance():
    model = model_2d(dim_latent=6)
    heads = model.modality_heads[0]
    for p in heads.parameters():
        nn.init.normal_(p, std=0.3)
    calls = []
    heads.latent_to_model.register_forward_hook(lambda *_: calls.append("in"))
    heads.model_to_latent.register_forward_hook(lambda *_: calls.append("out"))
    latents = [randn(2, 3, 6), randn(5, 1, 6), randn(2, 3, 6), randn(4, 4, 6)]

    tokens, shapes = heads.to_model_tokens(latents)
    assert calls == ["in"] and shapes == [(2, 3), (5, 1), (2, 3), (4, 4)]
    for x, t in zip(latents, tokens):  # reference: one instance at a time, the embedding built for its own shape
        expected = heads.latent_to_model(x).reshape(-1, 32) + heads.pos_emb(tuple(x.shape[:2]), flatten=True)
        assert torch.allclose(t, expected, atol=1e-5)

    calls.clear()
    outputs = heads.to_latents(torch.cat(tokens), shapes)
    assert calls == ["out"]
    for t, shape, out in zip(tokens, shapes, outputs):
        assert torch.allclose(out, heads.model_to_latent(t).reshape(*shape, 6), atol=1e-6)


def test_generate_modality_only_one_shape_per_item():
    calls = []

    class Decoder(nn.Conv2d):
        def forward(self, x):
            calls.append(tuple(x.shape))
            return super().forward(x)

    model = model_2d(channel_first_latent=True, modality_decoder=Decoder(8, 3, 1))
    shapes = [(8, 8), (6, 10), (12, 4), (6, 10)]
    out = model.generate_modality_only(batch_size=4, fixed_modality_shape=shapes, modality_steps=3)
    assert [tuple(x.shape) for x in out] == [(3, 8, 8), (3, 6, 10), (3, 12, 4), (3, 6, 10)]
    assert sorted(calls) == sorted([(1, 8, 8, 8), (2, 8, 6, 10), (1, 8, 12, 4)])  # once per group of equal shapes
    latents = model.generate_modality_only(batch_size=2, fixed_modality_shape=[(2, 2), (3, 1)], modality_steps=3, return_unprocessed_modalities=True)
    assert [tuple(x.shape) for x in latents] == [(8, 2, 2), (8, 3, 1)]


def test_packed_equals_padded_loss_and_gradients():
    torch.manual_seed(0)
    model = randomized(model_2d())  # every weight non-zero: a sample seeing another would change the loss
    batch = mixed_batch()
    times = torch.rand(4, 2)
    grads = []
    losses = []
    for pack in (False, True, 64):
        model.zero_grad()
        torch.manual_seed(1)
        loss, breakdown = model(batch, times=times, pack=pack, return_breakdown=True)
        loss.backward()
        losses.append((loss, breakdown.text, breakdown.flow[0]))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for other, other_grads in zip(losses[1:], grads[1:]):
        for a, b in zip(losses[0], other):
            assert torch.allclose(a, b, atol=1e-5)
        for name, g in grads[0].items():
            assert torch.allclose(g, other_grads[name], atol=1e-5), name


def test_packing_really_packs_and_restarts_positions():
    rows = [[torch.tensor([1, 2]), 0], [torch.tensor([3])]]
    assert len(pack_rows(rows, [2], pack_length=0)) == 2  # rows as long as the longest sample (4): no room
    packed = pack_rows(rows, [2], pack_length=5)
    assert len(packed) == 1 and DOCUMENT_BREAK in packed[0]
    layout = build_layout(packed, [2])
    assert layout.positions[0].tolist() == [0, 1, 2, 2, 0]
    assert layout.document_ids[0].tolist() == [0, 0, 0, 0, 1]


def test_pack_samples_first_fit_decreasing():
    rows = pack_samples([5, 3, 4, 2, 6], 8)
    assert sorted(i for row in rows for i in row) == [0, 1, 2, 3, 4]
    assert all(sum([5, 3, 4, 2, 6][i] for i in row) <= 8 for row in rows)
    assert len(rows) == 3
    assert pack_samples([10, 1], 4) == [[0], [1]]  # too long: a row of its own


def test_packed_flex_forward_matches_sdpa_and_skips_cross_document_blocks():
    model = randomized(model_2d()).eval()
    batch = mixed_batch()
    times = torch.rand(4, 2)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)
        sdpa = model(batch, times=times, pack=True)
        model.attention_backend = "flex"
        torch.manual_seed(1)
        flex = model(batch, times=times, pack=True)
    assert torch.allclose(sdpa, flex, atol=1e-5)

    rows = [[torch.zeros(64, dtype=torch.long), DOCUMENT_BREAK, torch.zeros(64, dtype=torch.long)]]
    layout = build_layout(rows, [])
    with_documents = block_mask(transfusion_mask(layout.token_instance, layout.document_ids), 1, 128, 128, "cpu", block_size=32)
    causal_only = block_mask(transfusion_mask(layout.token_instance), 1, 128, 128, "cpu", block_size=32)
    blocks = lambda bm: int(bm.kv_num_blocks.sum() + (bm.full_kv_num_blocks.sum() if bm.full_kv_num_blocks is not None else 0))  # noqa: E731
    assert blocks(causal_only) == 10  # lower triangle of 4 × 4 blocks
    assert blocks(with_documents) == 6  # two 2 × 2 triangles: the cross-document blocks are skipped


def test_packing_with_ema_and_guidance():
    model = model_2d(unconditional_prob=0.5)
    ema = model.create_ema()
    loss = model(mixed_batch(), pack=True, velocity_consistency_ema_model=ema)
    loss.backward()
    assert torch.isfinite(loss)


def capture_layouts(monkeypatch) -> list:
    layouts = []

    def recording(*args, **kwargs):
        layouts.append(build_layout(*args, **kwargs))
        return layouts[-1]

    monkeypatch.setattr(transfusion_module, "build_layout", recording)
    return layouts


def test_token_lengths_are_the_rows_the_model_builds(monkeypatch):
    down = nn.Conv2d(8, 32, 2, stride=2)  # U-Net blocks change the token count: (4, 6) latent → 2 × 3 tokens
    up = nn.ConvTranspose2d(32, 8, 2, stride=2)
    for model, batch in (
        (model_2d(), mixed_batch()),
        (
            model_2d(channel_first_latent=True, pre_post_transformer_enc_dec=(down, up)),
            [[randint(0, 16, (3,)), randn(8, 4, 6)], [randn(8, 2, 2), randint(0, 16, (5,))]],
        ),
    ):
        lengths = model.token_lengths(batch)
        layouts = capture_layouts(monkeypatch)
        model(batch)
        assert layouts[0].lengths.tolist() == lengths
    # [sos] text, [meta] "4,6" [som] (5 ids), 2 × 3 tokens, [eom], [eos]; then [sos], "2,2" wrapped, 1 token, [eom], text, [eos]
    assert lengths == [1 + 3 + 5 + 6 + 1 + 1, 1 + 5 + 1 + 1 + 5 + 1]


def test_token_lengths_of_a_modality_only_batch(monkeypatch):
    model = model_2d()
    items = [randn(4, 6, 8), randn(2, 2, 8), randn(1, 5, 8)]
    lengths = model.token_lengths(items)
    assert lengths == [24, 4, 5]
    layouts = capture_layouts(monkeypatch)
    model(items, modality_type=0)
    assert layouts[0].lengths.tolist() == lengths


def test_packed_sampler_batches_become_the_planned_rows(monkeypatch):
    torch.manual_seed(0)
    model = model_2d(unconditional_prob=1.0)  # every instance gets a null token: they must not break the planned rows
    samples = [[randint(0, 16, (int(n),)), randn(int(h), int(w), 8)] for n, h, w in zip(randint(1, 12, (40,)), randint(1, 5, (40,)), randint(1, 5, (40,)))]
    lengths = model.token_lengths(samples)
    pack_length = max(lengths) + 4
    layouts = capture_layouts(monkeypatch)
    for batch in PackedBatchSampler(lengths, pack_length=pack_length, rows=2, seed=0):
        layouts.clear()
        loss = model([samples[i] for i in batch], pack=pack_length)
        assert torch.isfinite(loss)
        (layout,) = layouts
        assert layout.batch <= 2
        assert layout.lengths.sum() == sum(lengths[i] for i in batch) + len(batch)  # one null token per sample's image
        samples_per_row = 1 if layout.document_ids is None else layout.document_ids.amax(dim=1) + 1
        assert (layout.lengths <= pack_length + samples_per_row).all()  # over the length by its null tokens at most
