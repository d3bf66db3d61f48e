"""Parameter-free modality encoders / decoders that checkpoints can rebuild (`get_config`)."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor
from torch.nn import Module


def _check_patch_size(patch_size, name: str = "patch_size") -> int:
    if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size <= 0:
        raise ValueError(f"`{name}` must be a positive int, got {patch_size!r}")
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


# ------------------------------------------------------------------ video


def _check_video_batch(x, name: str) -> tuple[Tensor, bool]:
    """`(b, c, f, h, w)`, or one `(c, f, h, w)` (with `modality_encoder_decoder_requires_batch_dim=False`)."""
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise TypeError(f"`{name}` must be a float tensor, got {x.dtype if torch.is_tensor(x) else type(x).__name__}")
    if x.ndim not in (4, 5):
        raise ValueError(f"`{name}` must have shape (batch, channels, frames, height, width) or (channels, frames, height, width), got {tuple(x.shape)}")
    return (x, True) if x.ndim == 5 else (x[None], False)


class _Tubes(Module):
    """The settings `VideoPatchify` and `VideoUnpatchify` share: a tube of `frame_patch_size`
    frames of a `patch_size`² patch."""

    def __init__(self, patch_size: int, frame_patch_size: int = 1):
        super().__init__()
        self.patch_size = _check_patch_size(patch_size)
        self.frame_patch_size = _check_patch_size(frame_patch_size, "frame_patch_size")

    def get_config(self) -> dict:
        return {"patch_size": self.patch_size, "frame_patch_size": self.frame_patch_size}


class VideoPatchify(_Tubes):
    """Video `(b, c, f, h, w)` → channel-first latent `(b, c·pf·p·p, f/pf, h/p, w/p)`: each
    pf×p×p tube (`frame_patch_size` frames of a p×p patch) one token.

    The spatio-temporal "tubelet" patches of ViViT (Arnab et al. 2021, arXiv 2103.15691) and
    of video DiTs, without the projection, which the model's `latent_to_model` provides:
    lossless and parameter-free. 8 frames of 32×32 with 2×4×4 tubes are 4×8×8 = 256 tokens of
    `c·32` values. `frame_patch_size=1` patches every frame on its own (`Patchify` per frame).
    """

    def forward(self, videos: Tensor) -> Tensor:
        p, pf = self.patch_size, self.frame_patch_size
        videos, batched = _check_video_batch(videos, "videos")
        if videos.shape[-1] % p or videos.shape[-2] % p:
            raise ValueError(f"`videos` sides {tuple(videos.shape[-2:])} must be multiples of `patch_size` {p}")
        if videos.shape[-3] % pf:
            raise ValueError(f"`videos` frames ({videos.shape[-3]}, axis 2 of {tuple(videos.shape)}) must be a multiple of `frame_patch_size` {pf}")
        latents = rearrange(videos, "b c (f pf) (h p1) (w p2) -> b (c pf p1 p2) f h w", pf=pf, p1=p, p2=p)
        return latents if batched else latents[0]


class VideoUnpatchify(_Tubes):
    """The inverse of `VideoPatchify`: `(b, c·pf·p·p, f, h, w)` → `(b, c, f·pf, h·p, w·p)`."""

    def forward(self, latents: Tensor) -> Tensor:
        p, pf = self.patch_size, self.frame_patch_size
        latents, batched = _check_video_batch(latents, "latents")
        if latents.shape[1] % (pf * p * p):
            raise ValueError(
                f"`latents` channels {latents.shape[1]} (axis 1 of {tuple(latents.shape)}) must be a multiple of "
                f"`frame_patch_size` · `patch_size`² = {pf * p * p}"
            )
        videos = rearrange(latents, "b (c pf p1 p2) f h w -> b c (f pf) (h p1) (w p2)", pf=pf, p1=p, p2=p)
        return videos if batched else videos[0]
