"""The transformer: blocks of attention + feed-forward, time-conditioned on modality tokens only.

Conditioning (adaptive norms as in DiT, arXiv 2212.09748, applied per token type as in
Transfusion): text tokens go through a plain pre-norm with a learned gain and a
residual layer-scale; modality tokens get scale / shift from their instance's flow
time (zero-initialised, so they start as the plain norm) and an output gate
`sigmoid(Linear(cond))`. DiT's adaLN-Zero gate is a raw linear initialised at zero, so
at initialisation every block leaves modality tokens unchanged and they ignore their
prefix until the gates grow. We follow 0.12's sigmoid gate instead: weight zero, bias
-2, so every block starts with gate sigmoid(-2) ≈ 0.12 and an untrained model already
reads its context into the modality tokens.

The time conditioning is computed once per modality *instance* (`instance_cond`,
`(m, dc)`), and each layer builds a small table of scales / shifts / gates with one row
for text and one row per instance; tokens pick their row with one embedding lookup
(`token_instance + 1`). 0.12 instead ran the FiLM projections on every token.

The transformer knows nothing about modalities beyond that per-token instance index,
rotary positions and an `AttentionMask`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import reduce, repeat
from hyper_connections import HyperConnections
from torch import Tensor, nn
from torch.nn import Module, ModuleList
from torch.utils.checkpoint import checkpoint

from ._typing import Float, Int, typecheck
from .attention import Attention, AttentionMask, KVCache, KVCacheRows, RotaryEmbedding, SlotCache
from .decoding import compiled
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
    """Per-token scale, shift and gate, picked from a table with one row for text and one row per instance.

    Eager, the pick is an embedding lookup. Under `torch.compile` it is a product with each token's one-hot
    row selector `(b, n, 1 + m)`, in the table's dtype outside autocast: as exact (one product by 1, the rest
    by 0), and its backward is a matrix product, where the lookup's is a scatter-add that inductor compiles on
    a CPU into the slowest kernels of a training step (~60 ms of a ~250 ms compiled step of `train_video.py`;
    README "Compiled training steps"). Beyond `MAX_ONE_HOT_ROWS` rows (many instances in one batch) the
    selector would outgrow the activations, and the lookup is used there too.
    """

    MAX_ONE_HOT_ROWS = 128

    def __init__(self, token_instance: Tensor | None, num_instances: int = 0):
        self.index = None if token_instance is None else token_instance + 1  # row 0 is text
        self.select = None
        if exists(self.index) and torch.compiler.is_compiling() and num_instances + 1 <= self.MAX_ONE_HOT_ROWS:
            self.select = F.one_hot(self.index, num_instances + 1)

    def gather(self, table: Tensor) -> Tensor:
        if self.index is None:  # text only: every token uses row 0
            return table[0]
        if self.select is None:
            return F.embedding(self.index, table)
        with torch.autocast(table.device.type, enabled=False):
            return self.select.to(table.dtype) @ table


class AdaptiveNorm(Module):
    """Pre-norm before a sub-layer and the gated residual after it (see module docstring).

    gate_init_bias: the modality gate's initial pre-sigmoid value (0.12's `ada_ln_zero_init_bias`)
    """

    def __init__(self, dim: int, dim_cond: int, gate_init_bias: float = -2.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.text_gain = nn.Parameter(torch.zeros(dim))
        self.text_layerscale = nn.Parameter(torch.zeros(dim))
        self.to_scale_shift = nn.Linear(dim_cond, dim * 2)
        self.to_gate = nn.Linear(dim_cond, dim)
        nn.init.zeros_(self.to_scale_shift.weight)
        nn.init.zeros_(self.to_scale_shift.bias)
        nn.init.zeros_(self.to_gate.weight)
        nn.init.constant_(self.to_gate.bias, gate_init_bias)

    def tables(self, instance_cond: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """(scale, shift, gate) tables of shape (1 + m, d): row 0 text, then one row per instance."""
        text_scale = (1.0 + self.text_gain)[None]
        text_shift = torch.zeros_like(text_scale)
        text_gate = (1.0 + self.text_layerscale)[None]
        if not exists(instance_cond) or instance_cond.shape[0] == 0:
            return text_scale, text_shift, text_gate
        scale, shift = self.to_scale_shift(instance_cond).chunk(2, dim=-1)
        gate = self.to_gate(instance_cond).sigmoid()
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


def hyper_connection(hyper: HyperConnections, x: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """Dynamic hyper-connections (Zhu et al. 2024, arXiv 2409.19606), from `hyper_connections`.

    `x (b s, n, d)` holds `s` copies of the residual stream. Returns the sub-layer's input
    `(b, n, d)`, a learned mix of the copies, and the function that mixes the copies and
    adds the sub-layer's output back to each with a learned weight. The package starts as
    a plain residual: sub-layer `k` reads copy `k mod s` and every copy gets the output.

    Both mixes run outside autocast: the copies *are* the residual stream, so they stay in
    the parameters' dtype (fp32 under bf16 autocast), as the plain residual `x + h` does.
    """
    device_type = x.device.type
    with torch.autocast(device_type, enabled=False):
        branch_input, add_residual = hyper(x)

    def write(branch_output: Tensor) -> Tensor:
        with torch.autocast(device_type, enabled=False):
            return add_residual(branch_output.to(x.dtype))

    return branch_input, write


class Block(Module):
    def __init__(
        self,
        dim: int,
        dim_cond: int,
        attn: Attention,
        ff: FeedForward,
        skip_proj: Module | None,
        hyper: tuple[HyperConnections, HyperConnections] | None = None,
    ):
        super().__init__()
        self.attn_norm = AdaptiveNorm(dim, dim_cond)
        self.attn = attn
        self.ff_norm = AdaptiveNorm(dim, dim_cond)
        self.ff = ff
        self.skip_proj = skip_proj
        self.hyper = ModuleList(hyper) if exists(hyper) else None

    def forward(self, x, instance_cond, modulation: Modulation, rotary, mask: AttentionMask, cache: KVCache | KVCacheRows | SlotCache | None, layer_index: int):
        """x: `(b, n, d)`, or `(b s, n, d)` with `s` hyper-connection copies of the residual."""
        for sub, (norm, fn) in enumerate(((self.attn_norm, "attn"), (self.ff_norm, "ff"))):
            h, write = hyper_connection(self.hyper[sub], x) if exists(self.hyper) else (x, None)
            if modulation.index is None:  # text only (text decoding): the table's text row, without building the tables
                h, gate = norm.norm(h) * (1.0 + norm.text_gain), 1.0 + norm.text_layerscale
            else:
                scale, shift, gate = modulation.gather(torch.cat(norm.tables(instance_cond), dim=-1)).chunk(3, dim=-1)
                h = norm.norm(h) * scale + shift
            h = self.attn(h, rotary, mask, cache, layer_index) if fn == "attn" else self.ff(h)
            x = write(h * gate) if exists(write) else x + h * gate
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
        num_residual_streams: residual copies for hyper-connections (arXiv 2409.19606, the
            `hyper-connections` package); 1 is the plain residual
        num_residual_fracs: kept for 0.12's signature, which ignored it: frac-connections
            (arXiv 2503.14125) stay off, and only 4 (0.12's default) and 1 are accepted

    `compile_training = True` (an attribute, set after construction; checkpoints do not carry
    it) runs every forward pass that builds a graph for backward and has no cache through
    `torch.compile` (`run_blocks`, through `decoding.compiled`), activation checkpointing
    included; sampling, evaluation under `no_grad` and cached decoding stay eager.
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
            raise ValueError(f"`num_residual_fracs` must be 1 or 4 (0.12's default, ignored): frac-connections are not used, got {num_residual_fracs!r}")

        self.dim = dim
        self.depth = depth
        self.dim_head = dim_head
        self.heads = heads
        self.use_flex_attn = use_flex_attn
        self.use_checkpoint = use_checkpoint
        self.num_residual_streams = num_residual_streams
        self._compile_training = False  # a run-time switch, not part of the configuration: see the class docstring

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
            if num_residual_streams > 1:  # frac-connections stay off: num_fracs=1 whatever `num_residual_fracs` says
                hyper = tuple(HyperConnections(num_residual_streams, dim=dim, layer_index=2 * index + sub, num_fracs=1) for sub in range(2))
            self.blocks.append(Block(dim, dim_cond, attn, ff, skip_proj, hyper))

        self.norm = RMSNorm(dim)

    @property
    def compile_training(self) -> bool:
        return self._compile_training

    @compile_training.setter
    def compile_training(self, enabled: bool):
        if not isinstance(enabled, bool):
            raise TypeError(f"`compile_training` must be a bool, got {enabled!r}")
        self._compile_training = enabled

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
        cache: KVCache | KVCacheRows | SlotCache | None = None,
    ) -> Float["b n d"]:
        """
        tokens: (b, n, d) embedded text and modality tokens
        positions: (b, n) rotary positions
        mask: built once by the caller for the whole batch
        token_instance: (b, n) modality instance of each token, -1 for text (None: all text)
        instance_times: (m,) flow time of each instance (conditions only that instance's tokens)
        cache: keys / values of earlier tokens; the new ones are written, not committed
        """
        if self.compile_training and cache is None and torch.is_grad_enabled():
            # compiled on the first training step with dynamic shapes, then reused while the
            # batch's length and size change; `run_blocks` takes the transformer as an argument,
            # so a deep copy (an EMA) that trains runs its own weights through it
            run = compiled(self, "_compiled_run", run_blocks, typechecked=True, dynamic=True)
            return run(self, tokens, positions, mask, token_instance, instance_times, None)
        return run_blocks(self, tokens, positions, mask, token_instance, instance_times, cache)


def run_blocks(
    transformer: Transformer,
    tokens: Tensor,
    positions: Tensor,
    mask: AttentionMask,
    token_instance: Tensor | None,
    instance_times: Tensor | None,
    cache: KVCache | KVCacheRows | SlotCache | None,
) -> Tensor:
    """The transformer's forward pass (`Transformer.forward`), eager or under `torch.compile`."""
    has_instances = exists(instance_times) and instance_times.numel() > 0
    instance_cond = transformer.time_embed(instance_times.to(tokens.dtype)) if has_instances else None  # times come fp32
    modulation = Modulation(token_instance, instance_cond.shape[0]) if exists(instance_cond) else Modulation(None)
    rotary = transformer.rotary(positions)

    use_checkpoint = transformer.use_checkpoint and transformer.training and cache is None and torch.is_grad_enabled()

    streams = transformer.num_residual_streams
    x = tokens if streams == 1 else repeat(tokens, "b n d -> (b s) n d", s=streams)
    skips = []
    num_skips = sum(exists(block.skip_proj) for block in transformer.blocks)

    for index, block in enumerate(transformer.blocks):
        if index < num_skips:
            skips.append(x)
        if exists(block.skip_proj):
            x = x + block.skip_proj(torch.cat((x, skips.pop()), dim=-1))

        if use_checkpoint:
            x = checkpoint(block, x, instance_cond, modulation, rotary, mask, cache, index, use_reentrant=False)
        else:
            x = block(x, instance_cond, modulation, rotary, mask, cache, index)

    return transformer.norm(x if streams == 1 else reduce(x, "(b s) n d -> b n d", "sum", s=streams))
