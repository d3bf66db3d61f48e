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
  - the new tokens' keys / values are written into the cache's preallocated buffer at slots
    given as a tensor (not committed, as the eager path does), and attention runs over the
    whole buffer with a `(b, capacity)` mask of the slots each row sees, built once per solve;
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
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import KVCache, Rotation, rotate
from .decoding import TextWeights, compiled
from .flow import cfg_blend, data_to_velocity

if TYPE_CHECKING:
    from .transfusion import Transfusion


def supported(model: Transfusion, types: list[int], shapes: list[tuple[int, ...]]) -> bool:
    """One modality type and one shape for every instance, a plain transformer, Linear heads."""
    if len(set(types)) != 1 or len(set(shapes)) != 1 or not TextWeights.supported(model):
        return False
    return not model.modality_heads[types[0]].has_unet


def step_weights(model: Transfusion, modality_type: int) -> tuple:
    """What the step reads, as plain tensors (nested tuples, None for an absent layer): the time
    embedding, the modality's projections in and out, the null token, per block the U-Net skip, both adaptive norms' time projections, attention's and the
    feed-forward's matrices, then the final RMSNorm's gain. Under autocast the matrices and biases
    are cast to its dtype here, once per solve: autocast would cast them inside the compiled step
    at every ODE step (the time projections alone are 6.3 M parameters for the MNIST-sized model)."""
    device_type = model.device.type
    autocast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None

    def linear(layer) -> tuple | None:
        if not isinstance(layer, torch.nn.Linear):
            return None
        weight, bias = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
        if autocast is not None:
            weight, bias = weight.to(autocast), None if bias is None else bias.to(autocast)
        return weight, bias

    def modulation(norm) -> tuple:
        return linear(norm.to_scale_shift), linear(norm.to_gate)

    transformer, heads = model.transformer, model.modality_heads[modality_type]
    layers = tuple(
        (
            linear(block.skip_proj),
            modulation(block.attn_norm),
            linear(block.attn.to_qkv),
            linear(block.attn.to_gates),
            linear(block.attn.to_out),
            modulation(block.ff_norm),
            linear(block.ff.proj_in),
            linear(block.ff.proj_out),
        )
        for block in transformer.blocks
    )
    return (
        (transformer.time_embed.freqs, linear(transformer.time_embed.mlp[0])),
        (linear(heads.latent_to_model), linear(heads.model_to_latent)),
        model.null_embed.detach(),
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
    slots: Tensor,
    visible: Tensor,
    pos_emb: Tensor | None,
    cfg_scale: float | None,
) -> Tensor:
    """Velocities `(b, L, dl)` (fp32) of `b` instances `x (b, L, dl)` at flow time `t`, instance `i`
    in cache row `i` rotated by `rotation[0][i]`, `rotation[1][i]` (cos, sin `(rows, 1, 1, dh)`, one rotary
    position per row, twins included: `rotary_rotation`). Their keys / values go to `slots` of
    `keys` / `values` (per layer `(rows, h, capacity, dh)`); row `r` attends to the slots
    `visible[r]` marks. With `cfg_scale`, rows `b … 2b − 1` are the unconditional twins, every row
    leads with the null token (slot `slots[0]`, hidden from the conditional rows), and the
    guided velocity comes back. `weights`: `step_weights`; `config`: `(heads, dim_head, RMSNorm
    scale, data prediction, the model's dtype)`. The same arithmetic as `Transfusion.predict`."""
    (time_freqs, time_mlp), (to_model, to_latent), null, layers, norm_gamma = weights
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
    mask = visible[:, None, None, :]  # (rows, 1, 1, capacity): every query of a row sees the same slots

    def modulated(h: Tensor, modulation: tuple) -> tuple[Tensor, Tensor]:  # `AdaptiveNorm`: the instance's row of its tables
        scale, shift = F.linear(cond, *modulation[0]).chunk(2, dim=-1)
        return F.layer_norm(h, h.shape[-1:]) * (1.0 + scale) + shift, F.linear(cond, *modulation[1]).sigmoid()

    skips = []
    num_skips = sum(layer[0] is not None for layer in layers)
    for index, (skip, attn_mod, qkv, gates, out_proj, ff_mod, ff_in, ff_out) in enumerate(layers):
        if index < num_skips:
            skips.append(h)
        if skip is not None:
            h = h + F.linear(torch.cat((h, skips.pop()), dim=-1), *skip)

        y, gate = modulated(h, attn_mod)  # attention (`Attention.forward`)
        q, k, v = F.linear(y, *qkv).unflatten(-1, (3, num_heads, dim_head)).permute(2, 0, 3, 1, 4).unbind(0)  # (rows, h, n, dh)
        q, k = rotate(rotation, q), rotate(rotation, k)
        cached_keys, cached_values = keys[index], values[index]
        cached_keys.index_copy_(-2, slots, k.to(cached_keys.dtype))
        cached_values.index_copy_(-2, slots, v.to(cached_values.dtype))
        out = F.scaled_dot_product_attention(q, cached_keys, cached_values, attn_mask=mask)
        if gates is not None:
            out = out * F.linear(y, *gates).transpose(1, 2)[..., None].sigmoid()
        h = h + F.linear(out.transpose(1, 2).flatten(2), *out_proj) * gate

        y, gate = modulated(h, ff_mod)  # feed-forward (`FeedForward`, GEGLU)
        y, gelu_gates = F.linear(y, *ff_in).chunk(2, dim=-1)
        h = h + F.linear(F.gelu(gelu_gates) * y, *ff_out) * gate

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
) -> Callable[[Tensor, Tensor], Tensor]:
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
    keys, values = list(cache.keys[:, rows].unbind(0)), list(cache.values[:, rows].unbind(0))
    batch, device = keys[0].shape[0], offsets.device
    if batch != count * (2 if guided else 1):
        raise ValueError(f"`rows` selects {batch} cache rows for {count} instances (guided: {guided})")

    visible = torch.zeros(batch, cache.capacity, dtype=torch.bool, device=device)
    visible[:count, :length] = True if prefix_valid is None else prefix_valid
    visible[:, length : length + new] = True
    if guided:
        visible[:count, length] = False  # the null token leads only the unconditional twins
    slots = torch.arange(length, length + new, device=device)
    rotation = rotary_rotation(model, offsets.reshape(count).to(device).repeat(2 if guided else 1))
    heads = model.modality_heads[modality_type]
    pos_emb = heads.position_embeddings([tuple(shape)]) if heads.pos_emb is not None else None  # the same at every step
    step = compiled(model, "_compiled_ode_step", ode_velocity_step, typechecked=True) if compile else ode_velocity_step
    weights = step_weights(model, modality_type)
    transformer = model.transformer
    config = (transformer.heads, transformer.dim_head, float(transformer.norm.scale), model.flow_prediction == "data", model.dtype)
    scale = cfg_scale if guided else None

    def velocity(t: Tensor, state: Tensor) -> Tensor:
        x = state.reshape(count, num_tokens, -1)
        if x._base is not None:  # a view (of the solver's state): dynamo would guard on its base's strides, and recompile
            x = x.clone()
        return step(weights, config, keys, values, x, t, rotation, slots, visible, pos_emb, scale).reshape(state.shape)

    return velocity
