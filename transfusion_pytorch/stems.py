"""Learned convolutional stem and head around the patch grid, for `pre_post_transformer_enc_dec`.

The Transfusion paper (arXiv 2408.11039, §4.3 and table 7) replaces the linear patch embedding
with U-Net down blocks before the transformer and up blocks after it, and reports better images
and captions at every size: convolutions bring the locality a plain linear patch lacks. These
two modules are that idea at the scale of this package's examples, with one twist: they keep
the token grid of `Patchify` / `VideoPatchify`. Their input is the patch latent itself — a
`(c·p·p, h, w)` image latent or a `(c·pf·p·p, f, h, w)` video latent — so the model still
writes the shape `"h,w"`, a sample still holds `h·w` tokens, and every sampler, cache and
checkpoint treats the model like one with linear patches.

Each is the linear patch projection plus a convolutional branch at pixel level whose last layer
starts at zero (as DiT zero-initialises its residual gates), so an untrained model with the
stem is exactly the model with linear patches, and the convolutions only add what training
finds useful:

    stem:  latent → pixels ─┬─ conv p×p, stride p (the linear patch embedding) ──────────────────┬─ + → tokens
                            └─ conv 3×3 → GELU → conv 3×3 → GELU → conv p×p, stride p (zero at init) ┘
    head:  tokens ─┬─ transposed conv p×p, stride p (the linear projection back) ─────────────────┬─ + → pixels → latent
                   └─ transposed conv p×p, stride p → GELU → conv 3×3 → GELU → conv 3×3 (zero at init) ┘

For video (`frame_patch_size` set) the 3×3 convolutions run on every frame alone (kernel
1×3×3) and the strided ones span a whole tube (pf×p×p). The flow time is not an input: the
transformer's adaptive norms carry it, as with linear patches.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import Module

from .codecs import Patchify, Unpatchify, VideoPatchify, VideoUnpatchify, _check_patch_size


class _ConvSettings(Module):
    """What `ConvStem` and `ConvHead` share: the grid, the pixel channels and the conv width."""

    def __init__(self, dim: int, patch_size: int, channels: int = 1, width: int = 32, frame_patch_size: int | None = None):
        super().__init__()
        self.dim = _check_patch_size(dim, "dim")
        self.patch_size = _check_patch_size(patch_size)
        self.channels = _check_patch_size(channels, "channels")
        self.width = _check_patch_size(width, "width")
        self.frame_patch_size = None if frame_patch_size is None else _check_patch_size(frame_patch_size, "frame_patch_size")
        if self.frame_patch_size is None:
            self.to_pixels: Module = Unpatchify(patch_size)
            self.to_latent: Module = Patchify(patch_size)
            self.conv, self.transposed = nn.Conv2d, nn.ConvTranspose2d
            self.kernel, self.padding, self.patch = 3, 1, (patch_size, patch_size)
        else:
            self.to_pixels = VideoUnpatchify(patch_size, frame_patch_size)
            self.to_latent = VideoPatchify(patch_size, frame_patch_size)
            self.conv, self.transposed = nn.Conv3d, nn.ConvTranspose3d
            self.kernel, self.padding, self.patch = (1, 3, 3), (0, 1, 1), (frame_patch_size, patch_size, patch_size)

    def get_config(self) -> dict:
        return {"dim": self.dim, "patch_size": self.patch_size, "channels": self.channels, "width": self.width, "frame_patch_size": self.frame_patch_size}


def _zero(layer: Module) -> Module:
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class ConvStem(_ConvSettings):
    """Patch latent `(b, c·p·p, h, w)` (or video `(b, c·pf·p·p, f, h, w)`) → model tokens on the
    same grid, channel first: `(b, dim, h, w)` (or `(b, dim, f, h, w)`)."""

    def __init__(self, dim: int, patch_size: int, channels: int = 1, width: int = 32, frame_patch_size: int | None = None):
        super().__init__(dim, patch_size, channels, width, frame_patch_size)
        conv = self.conv
        self.linear = conv(self.channels, self.dim, self.patch, stride=self.patch)
        self.convs = nn.Sequential(
            conv(self.channels, self.width, self.kernel, padding=self.padding),
            nn.GELU(),
            conv(self.width, self.width, self.kernel, padding=self.padding),
            nn.GELU(),
            _zero(conv(self.width, self.dim, self.patch, stride=self.patch)),
        )

    def forward(self, latents: Tensor) -> Tensor:
        pixels = self.to_pixels(latents)
        return self.linear(pixels) + self.convs(pixels)


class ConvHead(_ConvSettings):
    """The way back: model outputs `(b, dim, h, w)` (or `(b, dim, f, h, w)`) → a patch latent of
    the grid `ConvStem` read, `(b, c·p·p, h, w)` (or `(b, c·pf·p·p, f, h, w)`)."""

    def __init__(self, dim: int, patch_size: int, channels: int = 1, width: int = 32, frame_patch_size: int | None = None):
        super().__init__(dim, patch_size, channels, width, frame_patch_size)
        conv = self.conv
        # the projection back, initialised as `nn.Linear(dim, c·p·p, bias=False)` (`model_to_latent` of linear patches):
        # a transposed convolution's default init would count its fan-in as c·p·p, not dim
        self.linear = self.transposed(self.dim, self.channels, self.patch, stride=self.patch, bias=False)
        nn.init.uniform_(self.linear.weight, -(self.dim**-0.5), self.dim**-0.5)
        self.convs = nn.Sequential(
            self.transposed(self.dim, self.width, self.patch, stride=self.patch),
            nn.GELU(),
            conv(self.width, self.width, self.kernel, padding=self.padding),
            nn.GELU(),
            _zero(conv(self.width, self.channels, self.kernel, padding=self.padding)),
        )

    def forward(self, tokens: Tensor) -> Tensor:
        return self.to_latent(self.linear(tokens) + self.convs(tokens))


def conv_stem_and_head(dim: int, patch_size: int, channels: int = 1, width: int = 32, frame_patch_size: int | None = None) -> tuple[ConvStem, ConvHead]:
    """The pair `Transfusion(pre_post_transformer_enc_dec=...)` takes, for a model of width `dim`
    whose modality latents are `Patchify(patch_size)` (or `VideoPatchify(patch_size,
    frame_patch_size)`) of `channels`-channel pixels."""
    return ConvStem(dim, patch_size, channels, width, frame_patch_size), ConvHead(dim, patch_size, channels, width, frame_patch_size)
