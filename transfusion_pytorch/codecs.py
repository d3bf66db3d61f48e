"""Parameter-free modality encoders / decoders that checkpoints can rebuild (`get_config`)."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor
from torch.nn import Module


def _check_patch_size(patch_size) -> int:
    if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size <= 0:
        raise ValueError(f"`patch_size` must be a positive int, got {patch_size!r}")
    return patch_size


def _check_image_batch(x, name: str) -> tuple[Tensor, bool]:
    """`(b, c, h, w)`, or one `(c, h, w)` (with `modality_encoder_decoder_requires_batch_dim=False`)."""
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise TypeError(f"`{name}` must be a float tensor, got {x.dtype if torch.is_tensor(x) else type(x).__name__}")
    if x.ndim not in (3, 4):
        raise ValueError(f"`{name}` must have shape (batch, channels, height, width) or (channels, height, width), got {tuple(x.shape)}")
    return (x, True) if x.ndim == 4 else (x[None], False)


class Patchify(Module):
    """Image `(b, c, h, w)` → channel-first latent `(b, c·p·p, h/p, w/p)`: each p×p patch one token.

    A lossless, parameter-free "encoder" (as in ViT / DiT patch embedding, without the
    projection, which the model's `latent_to_model` provides).
    """

    def __init__(self, patch_size: int):
        super().__init__()
        self.patch_size = _check_patch_size(patch_size)

    def get_config(self) -> dict:
        return {"patch_size": self.patch_size}

    def forward(self, images: Tensor) -> Tensor:
        p = self.patch_size
        images, batched = _check_image_batch(images, "images")
        if images.shape[-1] % p or images.shape[-2] % p:
            raise ValueError(f"`images` sides {tuple(images.shape[-2:])} must be multiples of `patch_size` {p}")
        latents = rearrange(images, "b c (h p1) (w p2) -> b (c p1 p2) h w", p1=p, p2=p)
        return latents if batched else latents[0]


class Unpatchify(Module):
    """The inverse of `Patchify`: `(b, c·p·p, h, w)` → `(b, c, h·p, w·p)`."""

    def __init__(self, patch_size: int):
        super().__init__()
        self.patch_size = _check_patch_size(patch_size)

    def get_config(self) -> dict:
        return {"patch_size": self.patch_size}

    def forward(self, latents: Tensor) -> Tensor:
        p = self.patch_size
        latents, batched = _check_image_batch(latents, "latents")
        if latents.shape[1] % (p * p):
            raise ValueError(f"`latents` channels {latents.shape[1]} (axis 1 of {tuple(latents.shape)}) must be a multiple of `patch_size`² = {p * p}")
        images = rearrange(latents, "b (c p1 p2) h w -> b c (h p1) (w p2)", p1=p, p2=p)
        return images if batched else images[0]
