"""Multi-head attention with rotary positions, a KV cache and two backends.

Backends: flex attention with a `BlockMask` on CUDA (`use_flex_attn=True`), and
`F.scaled_dot_product_attention` with a dense boolean mask everywhere else (flex
attention has no backward on CPU in torch 2.13, and its eager path materialises the
whole score matrix anyway). Both take the mask from the same mask function
(`masks.py`), so they compute the same thing; `tests/test_attention.py` checks it.
Flex attention has no dropout: a `BlockMask` while training with attention dropout
raises rather than silently training without it (the model routes such steps to SDPA).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import rotary_embedding_torch
import torch
import torch.nn.functional as F
from einops import rearrange
from rotary_embedding_torch.rotary_embedding_torch import rotate_half
from torch import Tensor, nn
from torch.nn import Module

from ._typing import Float, Int, typecheck
from .helpers import exists

# rotary positions (RoFormer, arXiv 2104.09864), from `rotary_embedding_torch`


class RotaryEmbedding(Module):
    """Rotation angles for explicit per-token positions, `(b, n)` → `(b, 1, n, dh)`.

    Positions are not `arange(n)`: every token of a modality instance shares one position,
    packed rows restart at 0, and tokens decoded against a KV cache continue after it. So
    the package's `RotaryEmbedding` is called on the positions themselves. Their cosines and
    sines are taken once per forward (`Rotation`) and shared by every layer's queries and
    keys (`rotate`); the package's `apply_rotary_emb` would take them again for each.

    The package keeps its frequencies as a frozen parameter (`requires_grad=False`). They
    stay fp32 when the model is cast to bf16 / fp16 (`_apply`): the package casts positions
    to the frequencies' dtype, and in bf16 positions near 2000 round to multiples of 8 and
    frequencies by up to 0.4 %, which turns angles at position 2000 by up to 7 radians.
    """

    def __init__(self, dim_head: int, theta: float = 10000.0):
        super().__init__()
        self.embed = rotary_embedding_torch.RotaryEmbedding(dim_head, theta=theta, cache_if_possible=False)

    @typecheck
    def forward(self, positions: Int["b n"]) -> Rotation:
        with torch.autocast(positions.device.type, enabled=False):
            angles = self.embed(positions)  # (b, n, dh): position × frequency, each frequency for one pair of features
        angles = rearrange(angles, "b n dh -> b 1 n dh")
        return Rotation(angles.cos(), angles.sin())

    def _apply(self, fn, recurse=True):
        freqs = self.embed.freqs

        def keep_fp32_freqs(tensor):
            applied = fn(tensor)
            if tensor is freqs and applied.is_floating_point() and torch.finfo(applied.dtype).bits < 32:
                return tensor.detach().to(applied.device, copy=True)  # the new device, not the new dtype
            return applied

        return super()._apply(keep_fp32_freqs, recurse)


@dataclass
class Rotation:
    """cos and sin of the rotary angles, `(b, 1, n, dh)` each, fp32."""

    cos: Tensor
    sin: Tensor


def rotate(rotation: Rotation, t: Tensor) -> Tensor:
    """`(b, h, n, dh)` queries or keys rotated by their positions' angles, computed at >= fp32 and
    cast back (`apply_rotary_emb`'s rotation, with the cosines and sines taken once per forward)."""
    return (t * rotation.cos + rotate_half(t) * rotation.sin).type(t.dtype)


# the mask handed down to every layer, built once per forward


@dataclass
class AttentionMask:
    """What each attention layer needs to know of the mask.

    dense: `(b, 1, i, j)` boolean mask for SDPA, or None
    block: flex-attention `BlockMask` for the same rule (CUDA only), or None
    is_causal: plain causal mask with queries and keys aligned (text only), no tensor needed
    Everything None / False means full attention (a modality attending to itself, or one
    new token attending to its whole cache).
    """

    dense: Tensor | None = None
    block: Any = None
    is_causal: bool = False


# KV cache, preallocated and indexed by position (as in gpt-fast), grown by doubling


class KVCache:
    """Keys and values of every layer for the tokens decoded so far.

    `update` writes the keys / values of the new tokens at `[length, length + n)` and
    returns everything up to there; only `commit(n)` moves `length` on. Flow-matching
    steps therefore write the modality's tokens into the same slots at every ODE step
    without committing them, and the prefix before them is never recomputed.
    """

    def __init__(self, num_layers: int, batch: int, heads: int, dim_head: int, capacity: int = 256, *, device=None, dtype=torch.float32):
        shape = (num_layers, batch, heads, max(capacity, 1), dim_head)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys.shape[-2]

    def grow(self, needed: int):
        """Room for at least `needed` slots: the capacity doubles (or jumps to `needed`), the filled part is kept."""
        new_capacity = max(needed, 2 * self.capacity)
        pad = new_capacity - self.capacity
        self.keys = F.pad(self.keys, (0, 0, 0, pad))
        self.values = F.pad(self.values, (0, 0, 0, pad))

    def update(self, layer: int, keys: Tensor, values: Tensor, rows: slice = slice(None)) -> tuple[Tensor, Tensor]:
        start = self.length
        end = start + keys.shape[-2]
        if end > self.capacity:
            self.grow(end)
        self.keys[layer, rows, :, start:end] = keys.to(self.keys.dtype)  # under autocast the new keys may be bf16
        self.values[layer, rows, :, start:end] = values.to(self.values.dtype)
        return self.keys[layer, rows, :, :end], self.values[layer, rows, :, :end]

    def commit(self, num_tokens: int):
        self.length += num_tokens

    def rows(self, rows: slice) -> KVCacheRows:
        """A view on some batch rows (e.g. the conditional row of a CFG cache), sharing storage and length."""
        return KVCacheRows(self, rows)


class KVCacheRows:
    def __init__(self, cache: KVCache, rows: slice):
        self.cache = cache
        self.selected = rows

    @property
    def length(self) -> int:
        return self.cache.length

    def update(self, layer: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        return self.cache.update(layer, keys, values, rows=self.selected)

    def commit(self, num_tokens: int):
        self.cache.commit(num_tokens)


class SlotCache:
    """Some rows of a `KVCache`'s whole preallocated buffer, where one decode step writes each row's
    new token at `slot`, a `(1,)` tensor (gpt-fast's position-indexed write).

    `update` returns the whole buffer, not the filled part: the shapes of a decode step depend on
    the capacity only, never on the length, so `torch.compile` traces it once per capacity and
    the caller's mask (`(b, 1, 1, capacity)`) hides the empty slots and the slots a row does not hold.
    """

    def __init__(self, keys: list[Tensor], values: list[Tensor], slot: Tensor):
        self.keys = keys  # per layer (b, h, capacity, dh), views of the cache's storage
        self.values = values
        self.slot = slot

    def update(self, layer: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        cached_keys, cached_values = self.keys[layer], self.values[layer]
        cached_keys.index_copy_(-2, self.slot, keys.to(cached_keys.dtype))
        cached_values.index_copy_(-2, self.slot, values.to(cached_values.dtype))
        return cached_keys, cached_values


# flex attention, compiled once per process on first use on CUDA


@functools.cache
def compiled_flex_attention():
    """`flex_attention` under `torch.compile` with automatic dynamic shapes (`dynamic=None`).

    Batches change length every step. `dynamic=False` compiled a new kernel for every length
    until dynamo's recompile limit; here the first call compiles for its shapes and the first
    change of a size recompiles once with that size symbolic, so later lengths reuse the
    kernel (`tests/test_attention.py` counts the graphs). `dynamic=True` is not used: with it
    torch 2.13's CPU flex template emits C++ that does not compile.
    """
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=None)


def flex_attention(q, k, v, block_mask, score_mod=None):
    if q.is_cuda:
        return compiled_flex_attention()(q, k, v, block_mask=block_mask, score_mod=score_mod)
    from torch.nn.attention.flex_attention import flex_attention as eager_flex_attention

    return eager_flex_attention(q, k, v, block_mask=block_mask, score_mod=score_mod)


# SDPA's fused CPU kernel trains bf16 inputs slowly: for rows of up to 128 keys, forward +
# backward take 2-4x as long as the same kernel on fp32 copies of q, k, v (the output cast back
# to bf16), which is also faster than explicit fp32 scores and more precise than both (scores,
# softmax and the weighted sum all in fp32). Torch 2.13, 2 threads, (b, h, n, dh) =
# (32, 4, 84, 32): 7.6 ms upcast, 13.6 explicit, 32.1 bf16 fused; (64, 4, 60, 64): 11.8 / 17.6 /
# 51.6; (8, 4, 256, 64): 13.6 / 24.7 / 14.5; from 512 keys on the bf16 kernel wins
# (`benchmarks/bench_attention.py`, its json). Without gradients the kernels are about equal,
# so inference keeps bf16; fp16 on CPU was not measured and keeps SDPA as it is.
UPCAST_MAX_KEYS = 256


def upcast_is_faster(q: Tensor, k: Tensor) -> bool:
    """Whether `Attention` runs SDPA on fp32 copies of q, k, v instead of on them: CPU, bf16,
    queries that need a gradient, at most `UPCAST_MAX_KEYS` keys."""
    return q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.requires_grad and k.shape[-2] <= UPCAST_MAX_KEYS


def softcap_score_mod(softcap: float):
    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / softcap) * softcap

    return score_mod


class Attention(Module):
    def __init__(
        self,
        dim: int,
        dim_head: int = 64,
        heads: int = 8,
        dropout: float = 0.0,
        softcap_value: float = 0.0,
        use_flex_attn: bool = False,
        gate_values: bool = True,
        laser: bool = False,
        laser_softclamp_value: float = 15.0,
    ):
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head**-0.5
        self.dropout = dropout
        self.softcap_value = softcap_value
        self.use_flex_attn = use_flex_attn
        self.laser = laser
        self.laser_softclamp_value = laser_softclamp_value

        dim_inner = dim_head * heads
        self.to_qkv = nn.Linear(dim, dim_inner * 3, bias=False)
        # per-head output gates (0.12's `gate_values`)
        self.to_gates = nn.Linear(dim, heads, bias=False) if gate_values else None
        self.to_out = nn.Linear(dim_inner, dim, bias=False)

    @typecheck
    def forward(
        self,
        x: Float["b n d"],
        rotary: Rotation,
        mask: AttentionMask,
        cache: KVCache | KVCacheRows | SlotCache | None = None,
        layer_index: int = 0,
    ) -> Float["b n d"]:
        q, k, v = rearrange(self.to_qkv(x), "b n (qkv h dh) -> qkv b h n dh", qkv=3, h=self.heads)
        q, k = rotate(rotary, q), rotate(rotary, k)  # (b, h, n, dh)

        if exists(cache):
            k, v = cache.update(layer_index, k, v)

        if self.laser:
            # LASER (arXiv 2411.03493): attend over exp(v), then take the log
            v = torch.tanh(v / self.laser_softclamp_value) * self.laser_softclamp_value
            v_max = v.amax(dim=-2, keepdim=True).detach()
            v = (v - v_max).exp()

        out = self.attend(q, k, v, mask)

        if self.laser:
            out = out.clamp(min=1e-20).log() + v_max

        if exists(self.to_gates):
            gates = rearrange(self.to_gates(x), "b n h -> b h n 1")
            out = out * gates.sigmoid()

        return self.to_out(rearrange(out, "b h n dh -> b n (h dh)"))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
        dropout_p = self.dropout if self.training else 0.0

        if exists(mask.block):
            if dropout_p > 0:
                raise ValueError(
                    f"flex attention has no dropout, but this layer trains with `dropout={self.dropout}`: "
                    "pass a dense mask (SDPA) while training, or set dropout to 0"
                )
            score_mod = softcap_score_mod(self.softcap_value) if self.softcap_value > 0 else None
            return flex_attention(q, k, v, block_mask=mask.block, score_mod=score_mod)

        if self.softcap_value > 0:
            return self.attend_reference(q, k, v, mask, dropout_p)

        is_causal = mask.is_causal and q.shape[-2] > 1
        if upcast_is_faster(q, k):
            with torch.autocast(q.device.type, enabled=False):
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask.dense, dropout_p=dropout_p, is_causal=is_causal)
            return out.to(v.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, dropout_p=dropout_p, is_causal=is_causal)

    def attend_reference(self, q, k, v, mask: AttentionMask, dropout_p: float) -> Tensor:
        """The plain masked path: explicit scores, for logit soft-capping (Gemma 2). Scores and
        softmax are fp32, as inside SDPA's fused kernel (bf16 scores would carry ~5× its error);
        the weighted sum of values runs in their dtype. A query that may see no key at all gets zeros, as from SDPA.
        (`is_causal` aligns queries with the last keys; the model only sets it with as many
        queries as keys, where SDPA's alignment is the same.)"""
        with torch.autocast(q.device.type, enabled=False):
            sim = (q.float() @ k.float().transpose(-1, -2)) * self.scale
        if self.softcap_value > 0:
            sim = torch.tanh(sim / self.softcap_value) * self.softcap_value

        allowed = mask.dense
        if mask.is_causal and not exists(allowed):
            i, j = sim.shape[-2:]
            allowed = torch.ones(i, j, dtype=torch.bool, device=sim.device).tril(j - i)

        attn = sim.masked_fill(~allowed, torch.finfo(sim.dtype).min).softmax(dim=-1) if exists(allowed) else sim.softmax(dim=-1)
        if exists(allowed) and exists(mask.dense):
            attn = attn * allowed.any(dim=-1, keepdim=True)  # rows that see nothing: zeros, not a uniform mean
        attn = F.dropout(attn.to(v.dtype), p=dropout_p)
        return attn @ v
