"""Per-modality settings and heads: latent ↔ model projections, channel order,
axial position embedding for 1–3 axes, and the encoder / decoder hooks.

Inside the package every latent is channel-last, `(*spatial, dim_latent)`; a modality
declared `channel_first_latent=True` is moved at the boundary (user input, user
encoder / decoder and U-Net blocks, sampler output).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from axial_positional_embedding import ContinuousAxialPositionalEmbedding
from einops import rearrange
from torch import Tensor, nn
from torch.nn import Module

from .helpers import exists


@dataclass(frozen=True)
class ModalitySpec:
    modality_type: int
    dim_latent: int
    channel_first: bool
    num_dim: int | None
    default_shape: tuple[int, ...] | None
    to_shape_fn: Callable[[str], tuple[int, ...]]
    som_id: int
    eom_id: int
    # False when `num_dim` was only read off `modality_default_shape` and no position embedding
    # needs it: latents with another number of axes are then accepted, as 0.12 did
    strict_num_dim: bool = True


def to_channel_last(x: Tensor, channel_first: bool, batched: bool = False) -> Tensor:
    return x.movedim(1 if batched else 0, -1) if channel_first else x


def to_channel_first(x: Tensor, channel_first: bool, batched: bool = False) -> Tensor:
    return x.movedim(-1, 1 if batched else 0) if channel_first else x


def group_by_shape(tensors: list[Tensor]) -> list[tuple[list[int], Tensor]]:
    """Stack tensors of equal shape: [(indices into `tensors`, stacked batch), …]."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, t in enumerate(tensors):
        groups.setdefault(tuple(t.shape), []).append(index)
    return [(indices, torch.stack([tensors[i] for i in indices])) for indices in groups.values()]


def map_grouped(fn: Callable[[Tensor], Tensor], tensors: list[Tensor], batched: bool = True) -> list[Tensor]:
    """Apply a batched function once per group of equal shapes; results in input order.

    With `batched=False` the function is called on each tensor alone (0.12's
    `modality_encoder_decoder_requires_batch_dim=False`).
    """
    if not batched:
        return [fn(t) for t in tensors]
    out: list[Tensor | None] = [None] * len(tensors)
    for indices, stacked in group_by_shape(tensors):
        for i, result in zip(indices, fn(stacked).unbind(0)):
            out[i] = result
    return out  # type: ignore[return-value]


class ModalityHeads(Module):
    """Everything one modality owns: the projections into and out of the transformer
    (Linear by default, or the paper's U-Net down / up blocks), the optional axial
    position embedding, and the user's encoder / decoder (a frozen VAE, say)."""

    def __init__(
        self,
        spec: ModalitySpec,
        dim: int,
        add_pos_emb: bool,
        encoder: Module | None,
        decoder: Module | None,
        pre_post: tuple[Module, Module] | None,
    ):
        super().__init__()
        self.spec = spec
        self.encoder = encoder
        self.decoder = decoder
        self.has_unet = exists(pre_post)

        if exists(pre_post):
            self.latent_to_model, self.model_to_latent = pre_post
        else:
            self.latent_to_model = nn.Linear(spec.dim_latent, dim) if spec.dim_latent != dim else nn.Identity()
            self.model_to_latent = nn.Linear(dim, spec.dim_latent, bias=False)

        self.pos_emb = ContinuousAxialPositionalEmbedding(dim=dim, num_axial_dims=spec.num_dim) if add_pos_emb else None

    def to_model_tokens(self, latents: list[Tensor]) -> tuple[list[Tensor], list[tuple[int, ...]]]:
        """Channel-last latents `(*spatial, dl)` → model tokens `(L, d)` and their spatial shapes.

        The Linear projection acts on each token alone, so the instances of every shape go
        through it in one call (a multi-resolution batch costs one matmul, not one per
        shape); U-Net blocks see one stacked batch per group of equal shapes.
        """
        if not latents:
            return [], []
        if self.has_unet:
            return self._unet_to_model_tokens(latents)
        shapes = [tuple(latent.shape[:-1]) for latent in latents]
        flat = self.latent_to_model(torch.cat([rearrange(latent, "... d -> (...) d") for latent in latents]))
        if exists(self.pos_emb):
            flat = flat + self.position_embeddings(shapes).to(flat.dtype)
        return list(flat.split([math.prod(shape) for shape in shapes])), shapes

    def _unet_to_model_tokens(self, latents: list[Tensor]) -> tuple[list[Tensor], list[tuple[int, ...]]]:
        tokens: list[Tensor | None] = [None] * len(latents)
        shapes: list[tuple[int, ...] | None] = [None] * len(latents)
        channel_first = self.spec.channel_first
        for indices, batch in group_by_shape(latents):
            x = to_channel_last(self.latent_to_model(to_channel_first(batch, channel_first, True)), channel_first, True)
            token_shape = tuple(x.shape[1:-1])
            x = rearrange(x, "b ... d -> b (...) d")
            if exists(self.pos_emb):
                x = x + self.position_embeddings([token_shape])[None].to(x.dtype)
            for i, t in zip(indices, x.unbind(0)):
                tokens[i], shapes[i] = t, token_shape
        return tokens, shapes  # type: ignore[return-value]

    def position_embeddings(self, shapes: list[tuple[int, ...]]) -> Tensor:
        """Axial position embeddings of instances of these token shapes, flattened and
        concatenated `(sum L, d)`. Each axis's MLP runs once, over the longest extent asked
        for on that axis; every shape then takes the leading positions of each axis (the
        embedding of a position does not depend on the shape around it)."""
        assert exists(self.pos_emb)
        longest = tuple(max(extents) for extents in zip(*shapes))
        per_axis = self.pos_emb(longest, return_factorized=True)
        per_shape = {shape: self.pos_emb.combine_factorized(per_axis, shape, flatten=True) for shape in dict.fromkeys(shapes)}
        return torch.cat([per_shape[shape] for shape in shapes])

    def to_latents(self, tokens: Tensor, token_shapes: list[tuple[int, ...]]) -> list[Tensor]:
        """Model outputs of the instances, concatenated `(sum L, d)` → channel-last latents."""
        lengths = [math.prod(s) for s in token_shapes]
        if not self.has_unet:  # token-wise Linear: one call for every shape
            return [p.reshape(*s, -1) for p, s in zip(self.model_to_latent(tokens).split(lengths), token_shapes)]

        pieces = [p.reshape(*s, -1) for p, s in zip(tokens.split(lengths), token_shapes)]
        channel_first = self.spec.channel_first

        def project(batch: Tensor) -> Tensor:
            return to_channel_last(self.model_to_latent(to_channel_first(batch, channel_first, True)), channel_first, True)

        return map_grouped(project, pieces)
