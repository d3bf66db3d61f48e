"""A learned video codec: a small 3D-convolutional autoencoder whose halves are a modality's
encoder and decoder, and `fit_autoencoder`, which trains it before the transformer does.

`VideoPatchify` hands the transformer every pixel of a tube (8 frames × 4 × 4 = 128 values a
token): lossless, but a moving digit then smears across many tokens, each holding its own slice
of the motion, and a small model at a CPU budget learns where the digit goes long before what it
looks like. `VideoEncoder` maps the same tube grid to `latent_channels` values a token (16 by
default) with convolutions that see the neighbouring tubes, so a clip reaches the transformer
the way an image does through a VAE in latent diffusion (Rombach et al. 2022, arXiv 2112.10752):
fewer values per token, and a decoder that turns an imperfect latent into a plausible clip.
The design follows the tubelet encoders of video latent models (Blattmann et al. 2023;
Yu et al. 2023, MAGVIT) at toy scale: two stride-2 convolutions in space (4× per side), one in
time, then one that folds the rest of a tube's frames into channels; the decoder mirrors it
with transposed convolutions. It is not causal in time: a token's latent sees all its tube's frames.
With `patch_size=8` (16, 32) the last, linear layer also folds 2 × 2 (4 × 4, 8 × 8) of those
4 × 4-pixel cells into one token — DiT's latent patches (Peebles & Xie 2023, arXiv 2212.09748),
learnt with the codec — so a clip has a quarter of the tokens, each holding four cells (give it
4× the `latent_channels` to keep the reconstruction). In `train_video.py` that makes training
steps 1.8× as fast but reads the prompted digit in 44–45 % of generated clips, not 85–94 % (README "Video").

Trained with mean-squared reconstruction error, a little Gaussian noise on the latents (the
decoder has to cope with the transformer's imperfect latents; 0.1 of their standard deviation)
and a tiny L2 pull on them. `fit_autoencoder` ends by storing the latents' standard deviation in
both halves (`scale`, a buffer, so it is saved and restored with the model), so the
transformer's flow sees latents of unit scale, as latent diffusion's scale factor does.
Both halves have `get_config`, so `Transfusion.from_checkpoint` rebuilds them; the weights come
with the model's state. The model runs the encoder frozen (`Transfusion` detaches its output).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import Module

from ._typing import Float
from .codecs import _check_patch_size, _check_video_batch

PATCH_SIZE = 4  # pixels of a token's side by default: two stride-2 convolutions


def _check_spatial_patch_size(patch_size) -> int:
    patch_size = _check_patch_size(patch_size, "patch_size")
    if patch_size < 4 or patch_size & (patch_size - 1):
        raise ValueError(f"`patch_size` must be a power of two >= 4 (one stride-2 convolution per halving), got {patch_size}")
    return patch_size


def _check_frame_patch_size(frame_patch_size) -> int:
    frame_patch_size = _check_patch_size(frame_patch_size, "frame_patch_size")
    if frame_patch_size % 2:
        raise ValueError(f"`frame_patch_size` must be even (one stride-2 convolution in time, then the rest), got {frame_patch_size}")
    return frame_patch_size


class _Half(Module):
    """What `VideoEncoder` and `VideoDecoder` share: their settings and the latent `scale`."""

    def __init__(self, channels: int = 1, latent_channels: int = 16, width: int = 32, frame_patch_size: int = 8, patch_size: int = PATCH_SIZE):
        super().__init__()
        self.channels = _check_patch_size(channels, "channels")
        self.latent_channels = _check_patch_size(latent_channels, "latent_channels")
        self.width = _check_patch_size(width, "width")
        if width % 2:
            raise ValueError(f"`width` must be even, got {width}")
        self.frame_patch_size = _check_frame_patch_size(frame_patch_size)
        self.patch_size = _check_spatial_patch_size(patch_size)
        self.fold = self.patch_size // PATCH_SIZE  # cells of the 4 × 4-pixel grid a token holds per side
        self.register_buffer("scale", torch.ones(()))  # the latents' standard deviation, set by fit_autoencoder

    def get_config(self) -> dict:
        config = {"channels": self.channels, "latent_channels": self.latent_channels, "width": self.width, "frame_patch_size": self.frame_patch_size}
        return config | ({"patch_size": self.patch_size} if self.patch_size != PATCH_SIZE else {})  # earlier checkpoints: no key, 4


class VideoEncoder(_Half):
    """Video `(b, c, f, h, w)` → channel-first latent `(b, latent_channels, f/pf, h/p, w/p)`, one token
    per tube of `frame_patch_size` frames × p × p pixels (the grid of `VideoPatchify(p, pf)`; p = `patch_size`, 4 by default)."""

    def __init__(self, channels: int = 1, latent_channels: int = 16, width: int = 32, frame_patch_size: int = 8, patch_size: int = PATCH_SIZE):
        super().__init__(channels, latent_channels, width, frame_patch_size, patch_size)
        rest = self.frame_patch_size // 2
        self.layers = nn.Sequential(
            nn.Conv3d(channels, width // 2, (3, 4, 4), stride=(1, 2, 2), padding=1),  # (w/2, f, h/2, w/2)
            nn.SiLU(),
            nn.Conv3d(width // 2, width, 4, stride=2, padding=1),  # (w, f/2, h/4, w/4)
            nn.SiLU(),
            nn.Conv3d(width, width, (rest, 3, 3), stride=(rest, 1, 1), padding=(0, 1, 1)),  # (w, f/pf, h/4, w/4)
            nn.SiLU(),
            nn.Conv3d(width, latent_channels, (1, self.fold, self.fold), stride=(1, self.fold, self.fold)),  # (l, f/pf, h/p, w/p)
        )

    def forward(self, videos: Float["b c f h w"]) -> Float["b l t y x"]:
        videos, batched = _check_video_batch(videos, "videos")
        if videos.shape[1] != self.channels:
            raise ValueError(f"`videos` must have {self.channels} channels (axis 1), got {tuple(videos.shape)}")
        if videos.shape[-1] % self.patch_size or videos.shape[-2] % self.patch_size:
            raise ValueError(f"`videos` sides {tuple(videos.shape[-2:])} must be multiples of `patch_size` {self.patch_size}")
        if videos.shape[-3] % self.frame_patch_size:
            raise ValueError(
                f"`videos` frames ({videos.shape[-3]}, axis 2 of {tuple(videos.shape)}) must be a multiple of `frame_patch_size` {self.frame_patch_size}"
            )
        latents = self.layers(videos) / self.scale
        return latents if batched else latents[0]


class VideoDecoder(_Half):
    """The way back: latent `(b, latent_channels, t, y, x)` → video `(b, c, t·pf, p·y, p·x)`."""

    def __init__(self, channels: int = 1, latent_channels: int = 16, width: int = 32, frame_patch_size: int = 8, patch_size: int = PATCH_SIZE):
        super().__init__(channels, latent_channels, width, frame_patch_size, patch_size)
        rest = self.frame_patch_size // 2
        self.layers = nn.Sequential(
            # patch_size 4: a 1 × 1 convolution (the layer of checkpoints from before `patch_size`); 8: unfold each token's 2 × 2 cells
            nn.Conv3d(latent_channels, width, 1)
            if self.fold == 1
            else nn.ConvTranspose3d(latent_channels, width, (1, self.fold, self.fold), stride=(1, self.fold, self.fold)),
            nn.SiLU(),
            nn.ConvTranspose3d(width, width, (rest, 3, 3), stride=(rest, 1, 1), padding=(0, 1, 1)),  # (w, f/2, h/4, w/4)
            nn.SiLU(),
            nn.ConvTranspose3d(width, width // 2, 4, stride=2, padding=1),  # (w/2, f, h/2, w/2)
            nn.SiLU(),
            nn.ConvTranspose3d(width // 2, channels, (3, 4, 4), stride=(1, 2, 2), padding=1),  # (c, f, h, w)
        )

    def forward(self, latents: Float["b l t y x"]) -> Float["b c f h w"]:
        latents, batched = _check_video_batch(latents, "latents")
        if latents.shape[1] != self.latent_channels:
            raise ValueError(f"`latents` must have {self.latent_channels} channels (axis 1), got {tuple(latents.shape)}")
        videos = self.layers(latents * self.scale.to(latents.dtype))
        return videos if batched else videos[0]


class VideoAutoencoder(Module):
    """`encoder` (a `VideoEncoder`) and `decoder` (a `VideoDecoder`) of one configuration; give them
    to `Transfusion(modality_encoder=..., modality_decoder=...)` with `dim_latent=latent_channels`
    and `channel_first_latent=True`. Calling it reconstructs a batch of videos."""

    def __init__(self, channels: int = 1, latent_channels: int = 16, width: int = 32, frame_patch_size: int = 8, patch_size: int = PATCH_SIZE):
        super().__init__()
        self.encoder = VideoEncoder(channels, latent_channels, width, frame_patch_size, patch_size)
        self.decoder = VideoDecoder(channels, latent_channels, width, frame_patch_size, patch_size)

    def forward(self, videos: Float["b c f h w"]) -> Float["b c f h w"]:
        return self.decoder(self.encoder(videos))


def fit_autoencoder(
    encoder: VideoEncoder,
    decoder: VideoDecoder,
    batches: Iterator[Tensor],
    steps: int = 600,
    lr: float = 2e-3,
    latent_noise: float = 0.1,
    warmup: int = 50,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    log: Callable[[str], None] | None = print,
    log_every: int = 100,
) -> dict:
    """Train `encoder` and `decoder` (one configuration: a `VideoAutoencoder`'s halves, or the
    modality encoder / decoder of a model built with them) for `steps` batches `(b, c, f, h, w)`
    drawn from `batches` (AdamW, linear warm-up then a cosine to a tenth of `lr`, gradients clipped
    at 1), then set both halves' `scale` to the latents' standard deviation over one more batch,
    freeze them and put them in eval mode. `autocast`: a context factory for the forward passes
    (e.g. `Precision.autocast`). Returns `{"loss": the last reconstruction MSE, "latent_std", "seconds"}`."""
    if not isinstance(encoder, VideoEncoder) or not isinstance(decoder, VideoDecoder):
        raise TypeError(f"`encoder` and `decoder` must be a VideoEncoder and a VideoDecoder, got {type(encoder).__name__} and {type(decoder).__name__}")
    if encoder.get_config() != decoder.get_config():
        raise ValueError(f"`encoder` and `decoder` must share one configuration, got {encoder.get_config()} and {decoder.get_config()}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"`steps` must be an int >= 0, got {steps!r}")
    for name, value, low in (("lr", lr, 0.0), ("latent_noise", latent_noise, 0.0), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low or (name == "lr" and value == 0):
            raise ValueError(f"`{name}` must be a number {'> 0' if name == 'lr' else '>= 0'}, got {value!r}")
    parameters = [*encoder.parameters(), *decoder.parameters()]
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)

    def factor(step: int) -> float:  # warm-up, then a cosine from 1 to 0.1
        progress = min(1.0, step / max(1, steps))
        return min(1.0, (step + 1) / max(1, warmup)) * (0.1 + 0.45 * (1.0 + math.cos(math.pi * progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    encoder.train()
    decoder.train()
    start, loss = time.time(), torch.tensor(float("nan"))
    for step in range(steps):
        videos = next(batches)
        if not torch.is_tensor(videos) or videos.ndim != 5:
            raise TypeError(
                f"`batches` must yield video batches (b, c, f, h, w), got {tuple(videos.shape) if torch.is_tensor(videos) else type(videos).__name__}"
            )
        with autocast():
            latents = encoder.layers(videos)  # unscaled: `scale` is set at the end
            noisy = latents + latent_noise * latents.detach().float().std() * torch.randn_like(latents)
            reconstruction = decoder.layers(noisy)
        loss = F.mse_loss(reconstruction.float(), videos.float())
        optimizer.zero_grad(set_to_none=True)
        (loss + 1e-4 * latents.float().pow(2).mean()).backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        if log is not None and ((step + 1) % log_every == 0 or step + 1 == steps):
            log(f"autoencoder step {step + 1}/{steps}: reconstruction MSE {loss.item():.4f} ({time.time() - start:.0f}s)")

    optimizer.zero_grad(set_to_none=True)  # no stale gradients left on the frozen halves
    encoder.eval()
    decoder.eval()
    with torch.no_grad(), autocast():
        std = encoder.layers(next(batches)).float().std().clamp_min(1e-6)
    encoder.scale.fill_(std)
    decoder.scale.fill_(std)
    for parameter in parameters:
        parameter.requires_grad_(False)
    return {"loss": loss.item(), "latent_std": std.item(), "seconds": time.time() - start}
