"""The transformer: blocks of attention + feed-forward, time-conditioned on modality tokens only.

Conditioning (DiT's adaLN-Zero, arXiv 2212.09748, applied per token type as in
Transfusion): text tokens go through a plain pre-norm with a learned gain and a
residual layer-scale; modality tokens get scale / shift from their instance's flow
time and a zero-initialised output gate, so at initialisation every block leaves
modality tokens unchanged.

The time conditioning is computed once per modality *instance* (`instance_cond`,
`(m, dc)`), and each layer builds a small table of scales / shifts / gates with one row
for text and one row per instance; tokens pick their row with one embedding lookup
(`token_instance + 1`). 0.12 instead ran the FiLM projections on every token.

The transformer knows nothing about modalities beyond that per-token instance index,
rotary positions and an `AttentionMask`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import Module, ModuleList
from torch.utils.checkpoint import checkpoint

from ._typing import Float, Int, typecheck
from .attention import Attention, AttentionMask, KVCache, KVCacheRows, RotaryEmbedding
from .helpers import exists


class TimeEmbedding(Module):
    """Flow time `t` in [0, 1] → conditioning vector, through random Fourier features."""

    def __init__(self, dim: int, dim_cond: int):
        super().__init__()
        if dim % 2 != 0:
            raise ValueError(f"`dim` must be even for the time embedding, got {dim}")
        self.register_buffer("freqs", torch.randn(dim // 2))
        self.mlp = nn.Sequential(nn.Linear(dim + 1, dim_cond), nn.SiLU())

    @typecheck
    def forward(self, times: Float["m"]) -> Float["m dc"]:
        angles = times[:, None] * self.freqs * 2 * math.pi
        return self.mlp(torch.cat((times[:, None], angles.sin(), angles.cos()), dim=-1))


class Modulation:
    """Per-token scale, shift and gate, gathered from one row for text and one row per instance."""

    def __init__(self, token_instance: Tensor | None):
        self.index = None if token_instance is None else token_instance + 1  # row 0 is text

    def gather(self, table: Tensor) -> Tensor:
        if self.index is None:  # text only: every token uses row 0
            return table[0]
        return F.embedding(self.index, table)


class AdaptiveNorm(Module):
    """Pre-norm before a sub-layer and the gated residual after it (see module docstring)."""

    def __init__(self, dim: int, dim_cond: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.text_gain = nn.Parameter(torch.zeros(dim))
        self.text_layerscale = nn.Parameter(torch.zeros(dim))
        self.to_scale_shift = nn.Linear(dim_cond, dim * 2)
        self.to_gate = nn.Linear(dim_cond, dim)
        for linear in (self.to_scale_shift, self.to_gate):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def tables(self, instance_cond: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """(scale, shift, gate) tables of shape (1 + m, d): row 0 text, then one row per instance."""
        text_scale = (1.0 + self.text_gain)[None]
        text_shift = torch.zeros_like(text_scale)
        text_gate = (1.0 + self.text_layerscale)[None]
        if not exists(instance_cond) or instance_cond.shape[0] == 0:
            return text_scale, text_shift, text_gate
        scale, shift = self.to_scale_shift(instance_cond).chunk(2, dim=-1)
        gate = self.to_gate(instance_cond)
        return (
            torch.cat((text_scale, 1.0 + scale)),
            torch.cat((text_shift, shift)),
            torch.cat((text_gate, gate)),
        )


class FeedForward(Module):
    """GEGLU feed-forward (arXiv 2002.05202)."""

    def __init__(self, dim: int, expansion_factor: float = 4.0, dropout: float = 0.0):
        super().__init__()
        dim_inner = int(dim * expansion_factor * 2 / 3)
        self.proj_in = nn.Linear(dim, dim_inner * 2)
        self.dropout = nn.Dropout(dropout)
        self.proj_out = nn.Linear(dim_inner, dim)

    def forward(self, x: Tensor) -> Tensor:
        x, gates = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(self.dropout(F.gelu(gates) * x))


class RMSNorm(Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=-1) * self.scale * (self.gamma + 1.0)


class HyperConnection(Module):
    """Dynamic hyper-connections (Zhu et al. 2024, arXiv 2409.19606) around one sub-layer.

    The residual stream is widened to `s` copies, `x: (b, n, s, d)`. The sub-layer reads a
    learned mix of the copies (`read`); the copies also mix among themselves, and each gets
    the sub-layer's output back with a learned weight (`write`). Every weight is a static
    part plus a small token-dependent part, `scale * tanh(norm(x) @ W)`, with `W` zero at
    initialisation. The static part starts as a plain residual: sub-layer `k` reads copy
    `k mod s`, the copies pass through unchanged and all get the output with weight 1.
    """

    def __init__(self, dim: int, num_streams: int, layer_index: int):
        super().__init__()
        read = torch.zeros(num_streams, 1)
        read[layer_index % num_streams] = 1.0
        self.static_alpha = nn.Parameter(torch.cat((read, torch.eye(num_streams)), dim=1))  # (s, 1 + s): read | mix
        self.static_beta = nn.Parameter(torch.ones(num_streams))
        self.norm = RMSNorm(dim)
        self.dynamic_alpha = nn.Parameter(torch.zeros(dim, num_streams + 1))
        self.dynamic_beta = nn.Parameter(torch.zeros(dim))
        self.alpha_scale = nn.Parameter(torch.tensor(1e-2))
        self.beta_scale = nn.Parameter(torch.tensor(1e-2))

    def read(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`x (b, n, s, d)` → the sub-layer's input `(b, n, d)`, the mixed copies `(b, n, s, d)`
        and the write weights `(b, n, s)`.

        The copies *are* the residual stream, so they are mixed in fp32 even under autocast
        (as the plain residual `x + h` stays fp32); the mixing matmuls are tiny."""
        with torch.autocast(x.device.type, enabled=False):
            x32 = x.float()
            normed = self.norm(x32)
            alpha = self.static_alpha + self.alpha_scale * torch.tanh(normed @ self.dynamic_alpha.float())  # (b, n, s, 1 + s)
            beta = self.static_beta + self.beta_scale * torch.tanh(normed @ self.dynamic_beta.float())  # (b, n, s)
            mixed = torch.einsum("b n s t, b n s d -> b n t d", alpha, x32).to(x.dtype)
        return mixed[..., 0, :], mixed[..., 1:, :], beta.to(x.dtype)

    @staticmethod
    def write(output: Tensor, copies: Tensor, beta: Tensor) -> Tensor:
        return copies + beta[..., None] * output[..., None, :]


class Block(Module):
    def __init__(
        self, dim: int, dim_cond: int, attn: Attention, ff: FeedForward, skip_proj: Module | None, hyper: tuple[HyperConnection, HyperConnection] | None = None
    ):
        super().__init__()
        self.attn_norm = AdaptiveNorm(dim, dim_cond)
        self.attn = attn
        self.ff_norm = AdaptiveNorm(dim, dim_cond)
        self.ff = ff
        self.skip_proj = skip_proj
        self.hyper = ModuleList(hyper) if exists(hyper) else None

    def forward(self, x, instance_cond, modulation: Modulation, rotary, mask: AttentionMask, cache: KVCache | KVCacheRows | None, layer_index: int):
        """x: `(b, n, d)`, or `(b, n, s, d)` with hyper-connections."""
        for sub, (norm, fn) in enumerate(((self.attn_norm, "attn"), (self.ff_norm, "ff"))):
            scale, shift, gate = (modulation.gather(table) for table in norm.tables(instance_cond))
            h, copies, beta = self.hyper[sub].read(x) if exists(self.hyper) else (x, None, None)
            h = norm.norm(h) * scale + shift
            h = self.attn(h, rotary, mask, cache, layer_index) if fn == "attn" else self.ff(h)
            x = HyperConnection.write(h * gate, copies, beta) if exists(self.hyper) else x + h * gate
        return x


class Transformer(Module):
    """
    Args (the 0.12 keywords are kept):
        dim, depth, dim_head, heads: sizes
        dropout: attention and feed-forward dropout
        ff_expansion_factor: feed-forward width multiple
        attn_kwargs / ff_kwargs: extra keywords for `Attention` / `FeedForward`
            (`softcap_value`, `gate_values`, …)
        attn_laser: LASER attention (arXiv 2411.03493)
        unet_skips: long skip connections from the first half of the blocks to the second
            (U-ViT, arXiv 2209.12152)
        use_flex_attn: flex attention on CUDA (SDPA is used elsewhere regardless)
        use_checkpoint: activation checkpointing of each block while training
        num_residual_streams: residual copies for hyper-connections (arXiv 2409.19606);
            1 is the plain residual
        num_residual_fracs: kept for 0.12's signature; frac-connections are not implemented,
            so only 4 (0.12's default, ignored) and 1 are accepted
    """

    def __init__(
        self,
        dim: int,
        *,
        depth: int,
        dim_head: int = 64,
        heads: int = 8,
        dropout: float = 0.0,
        ff_expansion_factor: float = 4.0,
        attn_kwargs: dict | None = None,
        ff_kwargs: dict | None = None,
        attn_laser: bool = False,
        unet_skips: bool = True,
        use_flex_attn: bool = False,
        use_checkpoint: bool = False,
        num_residual_streams: int = 1,
        num_residual_fracs: int = 4,
    ):
        # the constructor's arguments, for checkpoints (`training.py`)
        config = {name: value for name, value in locals().items() if name not in ("self", "__class__")}
        super().__init__()
        self.config = config
        for name, value in (("dim", dim), ("depth", depth), ("dim_head", dim_head), ("heads", heads)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}")
        if dim_head % 2 != 0:
            raise ValueError(f"`dim_head` must be even for rotary embeddings, got {dim_head}")
        if not isinstance(num_residual_streams, int) or isinstance(num_residual_streams, bool) or num_residual_streams <= 0:
            raise ValueError(f"`num_residual_streams` must be a positive int, got {num_residual_streams!r}")
        if num_residual_fracs not in (1, 4):
            raise ValueError(f"`num_residual_fracs` must be 1 or 4 (0.12's default): frac-connections are not implemented, got {num_residual_fracs!r}")

        self.dim = dim
        self.depth = depth
        self.dim_head = dim_head
        self.heads = heads
        self.use_flex_attn = use_flex_attn
        self.use_checkpoint = use_checkpoint
        self.num_residual_streams = num_residual_streams

        dim_cond = dim * 4
        self.time_embed = TimeEmbedding(dim, dim_cond)
        self.rotary = RotaryEmbedding(dim_head)

        attn_kwargs = dict(attn_kwargs or {})
        ff_kwargs = dict(ff_kwargs or {})

        self.blocks = ModuleList([])
        for index in range(depth):
            is_second_half = index >= depth - depth // 2
            skip_proj = nn.Linear(dim * 2, dim, bias=False) if unet_skips and is_second_half else None
            attn = Attention(dim, dim_head=dim_head, heads=heads, dropout=dropout, use_flex_attn=use_flex_attn, laser=attn_laser, **attn_kwargs)
            ff = FeedForward(dim, expansion_factor=ff_expansion_factor, dropout=dropout, **ff_kwargs)
            hyper = None
            if num_residual_streams > 1:
                hyper = (HyperConnection(dim, num_residual_streams, 2 * index), HyperConnection(dim, num_residual_streams, 2 * index + 1))
            self.blocks.append(Block(dim, dim_cond, attn, ff, skip_proj, hyper))

        self.norm = RMSNorm(dim)

    def new_cache(self, batch: int, capacity: int = 256, *, device=None, dtype=torch.float32) -> KVCache:
        return KVCache(self.depth, batch, self.heads, self.dim_head, capacity, device=device, dtype=dtype)

    @typecheck
    def forward(
        self,
        tokens: Float["b n d"],
        positions: Int["b n"],
        mask: AttentionMask,
        token_instance: Int["b n"] | None = None,
        instance_times: Float["m"] | None = None,
        cache: KVCache | KVCacheRows | None = None,
    ) -> Float["b n d"]:
        """
        tokens: (b, n, d) embedded text and modality tokens
        positions: (b, n) rotary positions
        mask: built once by the caller for the whole batch
        token_instance: (b, n) modality instance of each token, -1 for text (None: all text)
        instance_times: (m,) flow time of each instance (conditions only that instance's tokens)
        cache: keys / values of earlier tokens; the new ones are written, not committed
        """
        has_instances = exists(instance_times) and instance_times.numel() > 0
        instance_cond = self.time_embed(instance_times.to(tokens.dtype)) if has_instances else None  # times come fp32
        modulation = Modulation(token_instance if exists(instance_cond) else None)
        rotary = self.rotary(positions)

        use_checkpoint = self.use_checkpoint and self.training and cache is None and torch.is_grad_enabled()

        streams = self.num_residual_streams
        x = tokens if streams == 1 else tokens[..., None, :].expand(*tokens.shape[:-1], streams, tokens.shape[-1])  # (b, n, s, d)
        skips = []
        num_skips = sum(exists(block.skip_proj) for block in self.blocks)

        for index, block in enumerate(self.blocks):
            if index < num_skips:
                skips.append(x)
            if exists(block.skip_proj):
                x = x + block.skip_proj(torch.cat((x, skips.pop()), dim=-1))

            if use_checkpoint:
                x = checkpoint(block, x, instance_cond, modulation, rotary, mask, cache, index, use_reentrant=False)
            else:
                x = block(x, instance_cond, modulation, rotary, mask, cache, index)

        return self.norm(x if streams == 1 else x.sum(dim=-2))
