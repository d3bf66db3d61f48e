"""Attention masks for one interleaved sequence.

Every rule is a *mask function* with the flex-attention signature
`fn(b, h, q_idx, kv_idx) -> bool`: True where query `q_idx` of row `b` may attend to
key `kv_idx`. Rules are combined with `or_masks` / `and_masks`, and one function
produces both the flex-attention `BlockMask` (CUDA) and the dense boolean mask that
SDPA takes (everywhere else), so the two backends can never disagree on a rule.

The mask functions index per-token tensors (`instance_ids[b, q_idx]`), which works
under flex attention's vmap and, with broadcast index tensors, builds the dense mask
in one vectorised call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._typing import Bool, Int, typecheck
from .attention import AttentionMask
from .layout import Layout

MaskFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def causal(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """Text rule: a token sees itself and every token before it."""
    return q_idx >= kv_idx


def modality_bidirectional(instance_ids: Int["b n"]) -> MaskFn:
    """Modality rule: the tokens of one modality instance see each other in both directions.

    `instance_ids[b, i]` is the index of the modality instance that token `i` of row `b`
    belongs to, or -1 for text and padding. Text tokens gain nothing from this rule.
    """

    def mask(b, h, q_idx, kv_idx):
        q_instance = instance_ids[b, q_idx]
        return (q_instance >= 0) & (q_instance == instance_ids[b, kv_idx])

    return mask


def same_document(document_ids: Int["b n"]) -> MaskFn:
    """Packing rule: a token sees only tokens of its own document (sample) in a packed row."""

    def mask(b, h, q_idx, kv_idx):
        return document_ids[b, q_idx] == document_ids[b, kv_idx]

    return mask


def or_masks(*mask_fns: MaskFn) -> MaskFn:
    def mask(b, h, q_idx, kv_idx):
        out = mask_fns[0](b, h, q_idx, kv_idx)
        for fn in mask_fns[1:]:
            out = out | fn(b, h, q_idx, kv_idx)
        return out

    return mask


def and_masks(*mask_fns: MaskFn) -> MaskFn:
    def mask(b, h, q_idx, kv_idx):
        out = mask_fns[0](b, h, q_idx, kv_idx)
        for fn in mask_fns[1:]:
            out = out & fn(b, h, q_idx, kv_idx)
        return out

    return mask


def classifier_free(base: MaskFn, instance_ids: Int["b n"], unconditional: Tensor, is_null: Tensor) -> MaskFn:
    """Conditioning dropout for classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598).

    `unconditional[m]` marks instance `m` as unconditional: its tokens (a learned null token
    first, then the modality) see only each other — none of the text or modalities before
    it. Every other query follows `base`, but never sees a null token (`is_null[b, j]`),
    so text after an unconditional image sees the image and not its null token.
    """
    same_instance = modality_bidirectional(instance_ids)

    def mask(b, h, q_idx, kv_idx):
        q_instance = instance_ids[b, q_idx]
        q_unconditional = (q_instance >= 0) & unconditional[q_instance.clamp(min=0)]
        return torch.where(q_unconditional, same_instance(b, h, q_idx, kv_idx), base(b, h, q_idx, kv_idx) & ~is_null[b, kv_idx])

    return mask


def transfusion_mask(
    instance_ids: Int["b n"],
    document_ids: Int["b n"] | None = None,
    unconditional: Tensor | None = None,
    is_null: Tensor | None = None,
) -> MaskFn:
    """The Transfusion rule (arXiv 2408.11039, section 3.2): causal everywhere, plus
    bidirectional inside each modality instance; restricted to one document when packed.

    A token of an image therefore sees every text token and earlier modality before the
    image and every token of its own image, and no token after the image.
    Right padding needs no rule of its own: padding sits after every real token, so the
    causal rule already hides it from real queries. With `unconditional` (one bool per
    instance) and `is_null` (per token), unconditional instances follow `classifier_free`.
    """
    mask = or_masks(causal, modality_bidirectional(instance_ids))
    if unconditional is not None:
        mask = classifier_free(mask, instance_ids, unconditional, is_null)
    if document_ids is not None:
        mask = and_masks(mask, same_document(document_ids))
    return mask


@typecheck
def dense_mask(
    mask_fn: MaskFn,
    batch: int,
    q_len: int,
    kv_len: int,
    device: torch.device | str | None = None,
    q_offset: int = 0,
) -> Bool["b 1 i j"]:
    """Evaluate a mask function on the full grid: `(batch, 1, q_len, kv_len)`, broadcast over heads.

    `q_offset` places the queries at positions `q_offset …` (decoding with a KV cache).
    """
    b = torch.arange(batch, device=device).view(batch, 1, 1, 1)
    h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
    q_idx = torch.arange(q_offset, q_offset + q_len, device=device).view(1, 1, q_len, 1)
    kv_idx = torch.arange(kv_len, device=device).view(1, 1, 1, kv_len)
    return mask_fn(b, h, q_idx, kv_idx).expand(batch, 1, q_len, kv_len)


def block_mask(mask_fn: MaskFn, batch: int, q_len: int, kv_len: int, device: torch.device | str, block_size: int = 128):
    """The flex-attention `BlockMask` of the same rule: fully masked blocks (across documents of a
    packed row, after a modality) are skipped, not computed."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mask_fn, B=batch, H=None, Q_LEN=q_len, KV_LEN=kv_len, device=device, BLOCK_SIZE=block_size)


def layout_mask(
    layout: Layout, unconditional: list[bool] | None = None, prefix: int = 0, use_flex: bool = False, prefix_valid: Tensor | None = None
) -> AttentionMask:
    """The mask of a `Layout` for the transformer: `transfusion_mask` over its rows, after `prefix`
    cached tokens (text that every conditional query sees), with `unconditional` instances (CFG).
    `prefix_valid (b, prefix)` marks the cached slots each row really holds (rows of a batch of
    prompts fill the cache unevenly); the others are hidden.

    Cheap special cases need no tensor: one instance per row and nothing else (full attention),
    text alone (causal), one new text token after a cache (full). A flex `BlockMask` is built
    when `use_flex` and there is no cache; SDPA's dense boolean mask otherwise.
    """
    any_unconditional = unconditional is not None and any(unconditional)
    if prefix_valid is not None and bool(prefix_valid.all()):
        prefix_valid = None
    if prefix_valid is None and layout.one_instance_per_row and not (prefix > 0 and any_unconditional):
        return AttentionMask()
    if prefix_valid is None and not layout.has_modalities and layout.document_ids is None:
        if prefix == 0:
            return AttentionMask(is_causal=True)
        if layout.seq_len == 1:
            return AttentionMask()
    if prefix > 0 and layout.document_ids is not None:
        raise ValueError("a packed batch cannot follow a KV cache")
    device = layout.token_ids.device

    def after_prefix(per_token: Tensor, value) -> Tensor:  # the cached tokens count as text, earlier in every row
        return torch.cat((torch.full((layout.batch, prefix), value, dtype=per_token.dtype, device=device), per_token), dim=1)

    instance_ids = after_prefix(layout.token_instance, -1)
    flags = is_null = None
    if any_unconditional:
        is_null = torch.zeros(layout.batch * layout.seq_len, dtype=torch.bool, device=device)
        is_null[[row * layout.seq_len + offset for (row, offset, _), u in zip(layout.instance_offsets, unconditional) if u]] = True
        is_null = after_prefix(is_null.reshape(layout.batch, layout.seq_len), False)
        flags = torch.tensor(unconditional, dtype=torch.bool, device=device)
    mask_fn = transfusion_mask(instance_ids, layout.document_ids, unconditional=flags, is_null=is_null)
    if prefix_valid is not None:
        holds = torch.cat((prefix_valid.to(device), torch.ones(layout.batch, layout.seq_len, dtype=torch.bool, device=device)), dim=1)
        mask_fn = and_masks(mask_fn, lambda b, h, q_idx, kv_idx: holds[b, kv_idx])

    kv_len = prefix + layout.seq_len
    if use_flex and prefix == 0:
        return AttentionMask(block=block_mask(mask_fn, layout.batch, layout.seq_len, kv_len, device))
    return AttentionMask(dense=dense_mask(mask_fn, layout.batch, layout.seq_len, kv_len, device, q_offset=prefix))
