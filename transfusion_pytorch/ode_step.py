"""The ODE step of a modality after a KV cache, written for `torch.compile` (`compile=True`).

Every ODE step of a sampler runs the new modality's tokens against the cached prefix. The
eager path goes through `Transfusion.predict` (instance tokens, a layout, a mask, a token
table of modulations, the module forwards), which is general and mostly Python. This is the
same computation for the case every sampler meets, written as one function of tensors so
that `torch.compile` traces it once and runs it at every step: a batch of instances of one
modality type and shape, one per row, each after its own cached prefix, with a plain
transformer (`decoding.TextWeights.supported`) and Linear modality heads (no U-Net blocks).

What makes it one graph for a whole solve (and for every solve of the same batch, shape
and cache capacity):
  - attention runs over a window of the cache of `capacity - new` slots (the prefix, then empty
    slots) followed by the new tokens' keys / values, with a `(b, capacity)` mask of the slots
    each row sees, built once per solve: the shapes depend on the capacity, never on the
    prefix's length, and the cache is not written until the commit pass at t = 1 (writing a
    graph input at every step made inductor copy each layer's whole buffer twice);
  - under autocast the window is cast once per solve (attention would cast it at every step);
  - the time conditioning is computed once for the step (one flow time for every row) and
    broadcast, where the eager path builds a table per instance and gathers it per token;
  - all tokens of an instance share one rotary position, so the rotation is `(b, 1, 1, dh)`,
    computed once per solve;
  - the axial position embedding of the shape is computed once per solve, outside;
  - with classifier-free guidance (Ho & Salimans, arXiv 2207.12598) the unconditional twins
    are the second half of the rows, each led by the null token (in the conditional rows that
    slot is hidden), and the blend `v_u + s · (v_c − v_u)` runs inside the graph.
It gives what `predict` gives up to float rounding (`tests/test_sample_many.py`); the eager
samplers (`compile=False`) keep the `predict` path unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import KVCache, Rotation, rotate
from .decoding import TextWeights, compiled
from .flow import cfg_blend, data_to_velocity
from .helpers import autocast_dtype

if TYPE_CHECKING:
    from .transfusion import Transfusion


def supported(model: Transfusion, types: list[int], shapes: list[tuple[int, ...]]) -> bool:
    """One modality type and one shape for every instance, a plain transformer, Linear heads."""
    if len(set(types)) != 1 or len(set(shapes)) != 1 or not TextWeights.supported(model):
        return False
    return not model.modality_heads[types[0]].has_unet


def step_weights(model: Transfusion, modality_type: int) -> tuple:
    """What the step reads, as plain tensors (nested tuples, None for an absent layer): the time
    embedding, the modality's projections in and out, the null token, every adaptive norm's time
    projections (one matrix), per block the U-Net skip, attention's and the feed-forward's
    matrices, then the final RMSNorm's gain. Under autocast the matrices and biases
    are cast to its dtype here, once per solve: autocast would cast them inside the compiled step
    at every ODE step (the time projections alone are 6.3 M parameters for the MNIST-sized model)."""
    autocast = autocast_dtype(model.device.type)

    def linear(layer) -> tuple | None:
        if not isinstance(layer, torch.nn.Linear):
            return None
        weight, bias = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
        if autocast is not None:
            weight, bias = weight.to(autocast), None if bias is None else bias.to(autocast)
        return weight, bias

    transformer, heads = model.transformer, model.modality_heads[modality_type]
    # every adaptive norm's time projections as one matrix: one read of the weights per step
    # (a matrix-vector product is bound by memory), split per block into attention's scale, shift
    # and gate, then the feed-forward's
    projections = [linear(layer) for block in transformer.blocks for norm in (block.attn_norm, block.ff_norm) for layer in (norm.to_scale_shift, norm.to_gate)]
    modulations = torch.cat([weight for weight, _ in projections]), torch.cat([bias for _, bias in projections])
    layers = tuple(
        (
            linear(block.skip_proj),
            linear(block.attn.to_qkv),
            linear(block.attn.to_gates),
            linear(block.attn.to_out),
            linear(block.ff.proj_in),
            linear(block.ff.proj_out),
        )
        for block in transformer.blocks
    )
    return (
        (transformer.time_embed.freqs, linear(transformer.time_embed.mlp[0])),
        (linear(heads.latent_to_model), linear(heads.model_to_latent)),
        model.null_embed.detach(),
        modulations,
        layers,
        transformer.norm.gamma.detach(),
    )


def ode_velocity_step(
    weights: tuple,
    config: tuple,
    keys: list[Tensor],
    values: list[Tensor],
    x: Tensor,
    t: Tensor,
    rotation: tuple[Tensor, Tensor],
    visible: Tensor,
    pos_emb: Tensor | None,
    cfg_scale: float | None,
    written: tuple[list[Tensor], list[Tensor], Tensor] | None = None,
) -> Tensor:
    """Velocities `(b, L, dl)` (fp32) of `b` instances `x (b, L, dl)` at flow time `t`, instance `i`
    in cache row `i` rotated by `rotation[0][i]`, `rotation[1][i]` (cos, sin `(rows, 1, 1, dh)`, one rotary
    position per row, twins included: `rotary_rotation`). `keys` / `values`: per layer a window
    of the cached prefix, `(rows, h, p, dh)`, its keys rotated back by the row's position
    (`relative_window`); the new tokens' keys / values follow it, and row `r` attends to the
    `p + n` slots `visible[r]` marks. With `cfg_scale`, rows `b … 2b − 1` are the unconditional
    twins, every row leads with the null token (slot `p`, hidden from the conditional rows), and
    the guided velocity comes back. `written = (keys, values, slots)`: the commit pass, which
    writes the new tokens' keys / values into those cache buffers at `slots` and returns an
    empty tensor once the last layer's are written. `weights`: `step_weights`; `config`:
    `(heads, dim_head, RMSNorm scale, data prediction, the model's dtype)`. The same arithmetic
    as `Transfusion.predict`."""
    (time_freqs, time_mlp), (to_model, to_latent), null, modulations, layers, norm_gamma = weights
    num_heads, dim_head, norm_scale, data_prediction, dtype = config
    tokens = x.to(dtype) if to_model is None else F.linear(x.to(dtype), *to_model)  # as `Transfusion.instance_tokens`
    if pos_emb is not None:
        tokens = tokens + pos_emb.to(tokens.dtype)
    if cfg_scale is not None:
        tokens = torch.cat((tokens, tokens))
        tokens = torch.cat((null.to(tokens.dtype).expand(tokens.shape[0], 1, -1), tokens), dim=1)
    h = tokens.to(dtype)  # (rows, n, d): `predict` puts the tokens into the embedding, in the model's dtype

    times = t.reshape(1).to(dtype)  # one time for every instance: the conditioning is computed once, `(1, dc)`
    angles = times[:, None] * time_freqs * 2 * math.pi  # `TimeEmbedding`
    cond = F.silu(F.linear(torch.cat((times[:, None], angles.sin(), angles.cos()), dim=-1), *time_mlp))[:, None]  # (1, 1, dc)

    rotation = Rotation(*rotation)
    # (rows, 1, 1, p + n), added to the scores: every query of a row sees the same slots
    mask = torch.zeros(visible.shape, device=visible.device).masked_fill(~visible, float("-inf"))[:, None, None, :]

    tables = F.linear(cond, *modulations).split(h.shape[-1], dim=-1)  # 6 per block, `(1, 1, d)` each

    def modulated(h: Tensor, first: int) -> tuple[Tensor, Tensor]:  # `AdaptiveNorm`: the instance's row of its tables
        scale, shift, gate = tables[first : first + 3]
        return F.layer_norm(h, h.shape[-1:]) * (1.0 + scale) + shift, gate.sigmoid()

    skips = []
    num_skips = sum(layer[0] is not None for layer in layers)
    for index, (skip, qkv, gates, out_proj, ff_in, ff_out) in enumerate(layers):
        if index < num_skips:
            skips.append(h)
        if skip is not None:
            h = h + F.linear(torch.cat((h, skips.pop()), dim=-1), *skip)

        y, gate = modulated(h, 6 * index)  # attention (`Attention.forward`)
        q, k, v = F.linear(y, *qkv).unflatten(-1, (3, num_heads, dim_head)).permute(2, 0, 3, 1, 4).unbind(0)  # (rows, h, n, dh)
        # no rotation: every new token sits at its row's one position p, so rotary angles cancel
        # between them, and the window's keys come rotated back by p (RoPE, Su et al. 2021, arXiv
        # 2104.09864: a query at p and a key at p' see only p' − p)
        if written is not None:
            written[0][index].index_copy_(-2, written[2], rotate(rotation, k).to(written[0][index].dtype))
            written[1][index].index_copy_(-2, written[2], v.to(written[1][index].dtype))
            if index == len(layers) - 1:  # the commit pass needs nothing after the last keys / values
                return x.new_empty(0)
        # the prefix window, then the new tokens: no write into a graph input at every step
        # (inductor would copy each layer's whole buffer twice to apply it)
        all_keys = torch.cat((keys[index], k.to(keys[index].dtype)), dim=-2)
        all_values = torch.cat((values[index], v.to(values[index].dtype)), dim=-2)
        # attention as two matmuls around an fp32 softmax: at these sizes (49 queries, 64 slots) twice
        # as fast under bf16 as SDPA's CPU kernel, which computes the same thing
        scores = (q @ all_keys.transpose(-1, -2)).float() * dim_head**-0.5 + mask
        out = scores.softmax(dim=-1).to(all_values.dtype) @ all_values
        if gates is not None:
            out = out * F.linear(y, *gates).transpose(1, 2)[..., None].sigmoid()
        h = h + F.linear(out.transpose(1, 2).flatten(2), *out_proj) * gate

        y, gate = modulated(h, 6 * index + 3)  # feed-forward (`FeedForward`, GEGLU)
        y = F.linear(y, ff_in[0])  # biases added apart, fused with the next kernel (addmm copies them out first)
        y, gelu_gates = (y if ff_in[1] is None else y + ff_in[1]).chunk(2, dim=-1)
        y = F.linear(F.gelu(gelu_gates) * y, ff_out[0])
        h = h + (y if ff_out[1] is None else y + ff_out[1]) * gate

    h = F.normalize(h, dim=-1) * norm_scale * (norm_gamma + 1.0)  # `RMSNorm`
    if cfg_scale is not None:
        h = h[:, 1:]  # drop the null token's slot
        x = torch.cat((x, x))
    velocity = F.linear(h, *to_latent)
    if data_prediction:
        velocity = data_to_velocity(velocity, x, t)
    velocity = velocity.float()
    if cfg_scale is None:
        return velocity
    return cfg_blend(*velocity.chunk(2), cfg_scale)


def rotary_rotation(model: Transfusion, positions: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin `(rows, 1, 1, dh)` of one rotary position per row (the model's
    `RotaryEmbedding`, fp32); computed once per solve, outside the compiled step (inside,
    inductor recomputed them for every element of the queries and keys at every step)."""
    rotation = model.transformer.rotary(positions.long()[:, None])
    return rotation.cos, rotation.sin


def relative_window(cache: KVCache, rows: slice | Tensor, window: int, rotation: tuple[Tensor, Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Per layer the first `window` slots of the cache's `rows`, the keys rotated back by each
    row's position (cos, sin `rotation`), and under autocast cast to its dtype: once per solve,
    where attention would cast them at every layer and step."""
    keys, values = cache.keys[:, rows, :, :window], cache.values[:, rows, :, :window]
    cos, sin = rotation
    keys = rotate(Rotation(cos, -sin), keys)  # R(−p): the rotation by p undone, for every layer at once
    dtype = autocast_dtype(keys.device.type)
    if dtype is not None:
        keys, values = keys.to(dtype), values.to(dtype)
    return list(keys.unbind(0)), list(values.unbind(0))


@dataclass(frozen=True)
class CachedVelocity:
    """The guided velocity `v(t, state)` of a solve on the compiled step, and `commit(state)`,
    which writes the clean instances' keys / values into the cache (the step at t = 1)."""

    velocity: Callable[[Tensor, Tensor], Tensor]
    commit: Callable[[Tensor], None]

    def __call__(self, t: Tensor, state: Tensor) -> Tensor:
        return self.velocity(t, state)


def cached_velocity(
    model: Transfusion,
    modality_type: int,
    shape: tuple[int, ...],
    cache: KVCache,
    rows: slice | Tensor,
    offsets: Tensor,
    prefix_valid: Tensor | None,
    cfg_scale: float,
    compile: bool = True,
) -> CachedVelocity:
    """The guided velocity function `v(t, state)` of `len(offsets)` instances of `shape` (the
    ODE state: their latents, flattened and concatenated) after the prefixes in cache `rows`
    (with guidance, the conditional rows then their unconditional twins), instance `i` at rotary
    position `offsets[i]`, its row holding the cached slots `prefix_valid[i]` (None: all).
    `compile=False` runs the same function eagerly (the tests compare both with `predict`)."""
    count, guided = offsets.shape[0], cfg_scale != 1.0
    num_tokens = math.prod(shape)
    new, length = num_tokens + int(guided), cache.length
    if length + new > cache.capacity:  # before the buffer is taken: growing replaces it
        cache.grow(length + new)
    # each step attends over a window of the cache before the new tokens, of a size that depends on
    # the capacity only (`p = capacity - new` slots, the prefix and masked empty ones), then the new
    # tokens: one graph for every solve of this batch, shape and capacity
    window = cache.capacity - new
    rotation = rotary_rotation(model, offsets.reshape(count).repeat(2 if guided else 1))
    keys, values = relative_window(cache, rows, window, rotation)
    batch, device = keys[0].shape[0], offsets.device
    if batch != count * (2 if guided else 1):
        raise ValueError(f"`rows` selects {batch} cache rows for {count} instances (guided: {guided})")

    visible = torch.zeros(batch, window + new, dtype=torch.bool, device=device)
    visible[:count, :length] = True if prefix_valid is None else prefix_valid
    visible[:, window:] = True
    if guided:
        visible[:count, window] = False  # the null token leads only the unconditional twins
    heads = model.modality_heads[modality_type]
    pos_emb = heads.position_embeddings([tuple(shape)]) if heads.pos_emb is not None else None  # the same at every step
    step = compiled(model, "_compiled_ode_step", ode_velocity_step, typechecked=True) if compile else ode_velocity_step
    weights = step_weights(model, modality_type)
    transformer = model.transformer
    config = (transformer.heads, transformer.dim_head, float(transformer.norm.scale), model.flow_prediction == "data", model.dtype)
    scale = cfg_scale if guided else None

    def instances(state: Tensor) -> Tensor:
        x = state.reshape(count, num_tokens, -1)
        # a view (of the solver's state): dynamo would guard on its base's strides, and recompile
        return x.clone() if x._base is not None else x

    def velocity(t: Tensor, state: Tensor) -> Tensor:
        return step(weights, config, keys, values, instances(state), t, rotation, visible, pos_emb, scale).reshape(state.shape)

    def commit(state: Tensor):
        slots = torch.arange(length, length + new, device=device)
        keys_rows, values_rows = cache.keys[:, rows], cache.values[:, rows]  # views for a slice of rows
        written = (list(keys_rows.unbind(0)), list(values_rows.unbind(0)), slots)
        step(weights, config, keys, values, instances(state), torch.ones((), device=device), rotation, visible, pos_emb, scale, written)
        if not isinstance(rows, slice):  # a tensor of rows gathered copies
            cache.keys[:, rows], cache.values[:, rows] = keys_rows, values_rows

    return CachedVelocity(velocity, commit)
