"""Sampling: text decoding, the text ↔ modality state machine, and modality-only generation.

Kept outside the model as small functions (after gpt-fast's `prefill` / `decode_one_token`).
With a KV cache (`cache_kv=True`), the prompt is computed once; each text token costs
one token's forward; each ODE step of a modality recomputes only that modality's own
tokens against the cached prefix (they are written into the cache slots after the
prefix but not committed), and one last pass at t = 1 commits the clean modality.
Without the cache every step re-runs the whole sequence; both give the same sample
(`tests/test_sampling.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Integral
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .attention import AttentionMask, KVCache
from .flow import cfg_blend, integrate
from .helpers import exists
from .inputs import check_bool, check_float, check_int
from .masks import causal, dense_mask
from .modality import to_channel_first

if TYPE_CHECKING:
    from .transfusion import Transfusion

# logit filters, by name


def min_p_filter(logits: Tensor, min_p: float = 0.1) -> Tensor:
    """Min-p sampling (Nguyen et al. 2024, arXiv 2407.01082): drop tokens whose probability is
    below `min_p` times the most likely token's."""
    probs = logits.softmax(dim=-1)
    limit = min_p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < limit, float("-inf"))


def top_k_filter(logits: Tensor, k: int = 50) -> Tensor:
    kth = logits.topk(min(k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


LOGIT_FILTERS: dict[str, Callable[..., Tensor]] = {"min_p": min_p_filter, "top_k": top_k_filter}


def sample_token(logits: Tensor, temperature: float, min_p: float) -> Tensor:
    """`(..., l)` logits → `(..., 1)` token ids; temperature 0 is greedy."""
    if temperature < 0:
        raise ValueError(f"`temperature` must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    if min_p > 0:
        logits = min_p_filter(logits, min_p)
    probs = (logits.float() / temperature).softmax(dim=-1)
    return torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).reshape(*probs.shape[:-1], 1)


# text only


def text_step(model: Transfusion, ids: Tensor, positions: Tensor, cache: KVCache) -> Tensor:
    """Feed `(b, l)` text ids after the cached prefix, commit them; logits of the last one `(b, vocab)`."""
    b, length = ids.shape
    mask = AttentionMask()
    if length > 1:
        mask = AttentionMask(dense=dense_mask(causal, b, length, cache.length + length, ids.device, q_offset=cache.length))
        if cache.length == 0:
            mask = AttentionMask(is_causal=True)
    embed = model.transformer(model.text_embed(ids), positions, mask, cache=cache)
    cache.commit(length)
    return model.to_text_logits(embed[:, -1])


def generate_text(model: Transfusion, prompt: Tensor, seq_len: int, temperature: float = 1.5, min_p: float = 0.1) -> Tensor:
    prompt = model.check_text(prompt, "prompt")
    if prompt.ndim != 2 or prompt.shape[0] == 0 or prompt.shape[1] == 0:
        raise ValueError(f"`prompt` must have shape (batch >= 1, prompt_len >= 1), got {tuple(prompt.shape)}")
    seq_len = check_int("seq_len", seq_len)
    temperature = check_float("temperature", temperature, 0.0)
    min_p = check_float("min_p", min_p, 0.0, 1.0)

    prompt = prompt.to(model.device)
    batch, prompt_len = prompt.shape
    num_new = max(0, seq_len - prompt_len)  # `seq_len` counts the prompt; a prompt that long already gets nothing new, as in 0.12
    if num_new == 0:
        return prompt[:, :0]

    cache = model.transformer.new_cache(batch, capacity=prompt_len + num_new, device=model.device, dtype=model.dtype)
    positions = torch.arange(prompt_len, device=model.device).expand(batch, prompt_len)
    logits = text_step(model, prompt, positions, cache)

    out = []
    for step in range(num_new):
        logits = logits.masked_fill(~model.text_only_logits_mask, float("-inf"))
        token = sample_token(logits, temperature, min_p)
        out.append(token)
        if step == num_new - 1:
            break
        position = torch.full((batch, 1), prompt_len + step, device=model.device)
        logits = text_step(model, token, position, cache)

    return torch.cat(out, dim=1)


# modality only


def generate_modality(
    model: Transfusion,
    batch_size: int = 1,
    modality_type: int | None = None,
    fixed_modality_shape: tuple[int, ...] | list[tuple[int, ...]] | None = None,
    modality_steps: int = 16,
    return_unprocessed_modalities: bool = False,
    cfg_scale: float = 1.0,
) -> Tensor | list[Tensor]:
    """A batch of one modality from noise. `fixed_modality_shape` may be one shape, or a list
    with one shape per item (multi-resolution): then a list of tensors comes back."""
    modality_type = model.check_modality_type(modality_type)
    cfg_scale = model.check_cfg_scale(cfg_scale)
    batch_size = check_int("batch_size", batch_size, 1)
    modality_steps = check_int("modality_steps", modality_steps, 2)
    check_bool("return_unprocessed_modalities", return_unprocessed_modalities)
    spec = model.spec(modality_type)

    per_item = isinstance(fixed_modality_shape, list)
    if per_item and len(fixed_modality_shape) != batch_size:
        raise ValueError(f"`fixed_modality_shape` lists {len(fixed_modality_shape)} shapes for `batch_size`={batch_size}")
    shapes = fixed_modality_shape if per_item else [fixed_modality_shape if exists(fixed_modality_shape) else spec.default_shape] * batch_size
    shapes = [check_shape(model, modality_type, shape, "fixed_modality_shape") for shape in shapes]

    # the ODE state is every item's latent, flattened and concatenated (items may differ in shape)
    guided = cfg_scale != 1.0
    copies = 2 if guided else 1  # conditional rows, then unconditional rows (null token + modality), one batch
    rows = [[i] for i in range(batch_size * copies)]
    types = [modality_type] * batch_size * copies
    unconditional = [False] * batch_size + [True] * batch_size if guided else None
    full_attention = not guided and len(set(shapes)) == 1  # one instance per row, no padding: no mask
    sizes = [math.prod(shape) * spec.dim_latent for shape in shapes]
    layout = None

    def unflatten(flat: Tensor) -> list[Tensor]:
        return [piece.view(*shape, spec.dim_latent) for piece, shape in zip(flat.split(sizes), shapes)]

    def velocity(t: Tensor, flat: Tensor) -> Tensor:
        nonlocal layout
        times = t.reshape(1).expand(batch_size * copies)
        _, layout, v = model.predict(rows, types, unflatten(flat) * copies, times, layout=layout, full_attention=full_attention, unconditional=unconditional)
        v = torch.cat([x.reshape(-1) for x in v]).float()  # the ODE state stays fp32 under autocast
        if guided:
            half = v.shape[0] // 2
            v = cfg_blend(v[:half], v[half:], cfg_scale)
        return v

    noise = torch.cat([torch.randn((*shape, spec.dim_latent), device=model.device).reshape(-1) for shape in shapes])
    latents = unflatten(integrate(velocity, noise, modality_steps, model.odeint_kwargs))

    if return_unprocessed_modalities:
        out = [to_channel_first(x, spec.channel_first) for x in latents]
    else:
        out = model.decode(latents, modality_type)
    return out if per_item else torch.stack(out)


def check_shape_form(shape, name: str) -> tuple[int, ...]:
    """A tuple (or `torch.Size`) of positive ints, numpy ints included, as a tuple of Python ints."""
    if not isinstance(shape, tuple) or not all(isinstance(s, Integral) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ValueError(f"`{name}` must be a tuple of positive ints, got {shape!r}")
    return tuple(int(s) for s in shape)


def check_shape(model: Transfusion, modality_type: int, shape, name: str) -> tuple[int, ...]:
    spec = model.spec(modality_type)
    if shape is None:
        raise ValueError(f"`{name}` is needed for modality {modality_type}: it has no `modality_default_shape`")
    shape = check_shape_form(shape, name)
    if exists(spec.num_dim) and len(shape) != spec.num_dim:
        raise ValueError(f"`{name}` {shape} has {len(shape)} axes, modality {modality_type} has {spec.num_dim}")
    return shape


# interleaved


class _Stream:
    """The sequence sampled so far: text id tensors and modality instances, plus the KV cache."""

    def __init__(self, model: Transfusion, cache_kv: bool, cfg_scale: float = 1.0):
        self.model = model
        self.cfg_scale = cfg_scale
        self.segments: list[Tensor | int] = []
        self.types: list[int] = []
        self.latents: list[Tensor] = []
        # with guidance the cache has a second row for the unconditional pass of each ODE step;
        # everything else (prefill, text, committing a modality) uses the conditional row
        guided = cfg_scale != 1.0
        self.full_cache: KVCache | None = model.transformer.new_cache(2 if guided else 1, device=model.device, dtype=model.dtype) if cache_kv else None
        self.cache = self.full_cache.rows(slice(0, 1)) if guided and cache_kv else self.full_cache
        self.pending: list[Tensor | int] = []  # segments not yet in the cache
        self.next_position = 0

    def add_text(self, ids: list[int] | Tensor):
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.model.device).reshape(-1)
        self.segments.append(ids)
        self.pending.append(ids)

    def add_instance(self, modality_type: int, latent: Tensor, pending: bool = True):
        self.segments.append(len(self.types))
        if pending:
            self.pending.append(len(self.types))
        self.types.append(modality_type)
        self.latents.append(latent)

    def last_text_ids(self) -> list[int]:
        """Text ids since the last modality instance."""
        ids: list[int] = []
        for segment in reversed(self.segments):
            if isinstance(segment, int):
                break
            ids = segment.tolist() + ids
        return ids

    def flush(self) -> Tensor:
        """Bring the cache up to date with the pending segments; logits of the last token."""
        model, cache = self.model, self.cache
        if cache is None:  # no cache: the whole sequence, every time
            times = torch.ones(len(self.types), device=model.device)
            embed, _, _ = model.predict([self.segments], self.types, self.latents, times)
            return model.to_text_logits(embed[0, -1])

        if cache.length == 0:  # prefill: the prompt, the only place a modality can be pending
            indices = sorted({s for s in self.pending if isinstance(s, int)})
            remap = {old: new for new, old in enumerate(indices)}
            rows = [[remap[s] if isinstance(s, int) else s for s in self.pending]]
            times = torch.ones(len(indices), device=model.device)
            embed, layout, _ = model.predict(rows, [self.types[i] for i in indices], [self.latents[i] for i in indices], times, cache=cache)
            cache.commit(layout.seq_len)
            self.next_position = int(layout.positions[0, -1]) + 1
            self.pending = []
            return model.to_text_logits(embed[0, -1])
        ids = torch.cat(self.pending)[None]
        positions = torch.arange(self.next_position, self.next_position + ids.shape[1], device=model.device)[None]
        self.next_position += ids.shape[1]
        self.pending = []
        return text_step(model, ids, positions, cache)[0]

    def modality_velocity(self, modality_type: int, latent: Tensor, t: Tensor) -> Tensor:
        """Velocity of the modality being generated, `latent` at time `t`, after the whole stream
        (guided by `cfg_scale` when it is not 1). The ODE state stays fp32 under autocast."""
        if exists(self.cache):
            if self.cfg_scale == 1.0:
                return self._cached_modality_pass(modality_type, latent, t, commit=False).float()
            return self._cached_guided_pass(modality_type, latent, t)

        # no cache: the whole sequence; with guidance a second row holds the same sequence with
        # the new instance unconditional (it sees only its null token and itself)
        model, count = self.model, len(self.types)
        guided = self.cfg_scale != 1.0
        rows = [[*self.segments, count]]
        types, latents = [*self.types, modality_type], [*self.latents, latent]
        times = torch.ones(count + 1, device=model.device)
        times[-1] = t
        unconditional = None
        if guided:
            shift = count + 1
            rows.append([s + shift if isinstance(s, int) else s for s in self.segments] + [2 * count + 1])
            types, latents, times = types * 2, latents * 2, torch.cat((times, times))
            unconditional = [False] * (2 * count + 1) + [True]
        _, _, velocities = model.predict(rows, types, latents, times, unconditional=unconditional)
        if not guided:
            return velocities[-1].float()
        return cfg_blend(velocities[count].float(), velocities[-1].float(), self.cfg_scale)

    def commit_modality(self, modality_type: int, latent: Tensor):
        if exists(self.cache):
            self._cached_modality_pass(modality_type, latent, torch.ones((), device=latent.device), commit=True)
            self.next_position += 1
        self.add_instance(modality_type, latent, pending=False)

    def _cached_guided_pass(self, modality_type: int, latent: Tensor, t: Tensor) -> Tensor:
        """Conditional and unconditional velocity in one batched forward of two rows.

        Row 0 (conditional) sees the cached prefix and the modality; row 1 (unconditional)
        sees only the null token and the modality, as in training. Both rows carry a leading
        null token so their lengths match; in row 0 it is masked out (it sees only itself,
        nothing sees it).
        """
        model, cache = self.model, self.full_cache
        heads = model.modality_heads[modality_type]
        (row,), (token_shape,) = model.instance_tokens([modality_type], [latent], unconditional=[True])  # null token + modality
        length, prefix = row.shape[0], cache.length
        device = model.device

        new = torch.ones(2, length, length, dtype=torch.bool, device=device)
        new[0, :, 0] = False  # nobody in the conditional row sees its placeholder …
        new[0, 0, 0] = True  # … which sees only itself
        seen_prefix = torch.zeros(2, length, prefix, dtype=torch.bool, device=device)
        seen_prefix[0] = True
        mask = torch.cat((seen_prefix, new), dim=-1)[:, None]

        embed = model.transformer(
            torch.stack((row, row)),
            torch.full((2, length), self.next_position, device=device),
            AttentionMask(dense=mask),
            token_instance=torch.zeros((2, length), dtype=torch.long, device=device),
            instance_times=t.reshape(1).float(),
            cache=cache,
        )
        v_cond, v_uncond = (heads.to_latents(embed[i, 1:], [token_shape])[0].float() for i in range(2))
        return cfg_blend(v_cond, v_uncond, self.cfg_scale)

    def _cached_modality_pass(self, modality_type: int, latent: Tensor, t: Tensor, commit: bool) -> Tensor:
        model, cache = self.model, self.cache
        heads = model.modality_heads[modality_type]
        (tokens,), (token_shape,) = model.instance_tokens([modality_type], [latent])
        length = tokens.shape[0]
        embed = model.transformer(
            tokens[None],
            torch.full((1, length), self.next_position, device=model.device),
            AttentionMask(),
            token_instance=torch.zeros((1, length), dtype=torch.long, device=model.device),
            instance_times=t.reshape(1).float(),
            cache=cache,
        )
        if commit:
            cache.commit(length)
        return heads.to_latents(embed[0], [token_shape])[0]


def sample_interleaved(
    model: Transfusion,
    prompt=None,
    max_length: int = 2048,
    text_temperature: float = 1.5,
    text_min_p: float = 0.1,
    cache_kv: bool = True,
    fixed_modality_shape: tuple[int, ...] | None = None,
    init_modality_noise: Tensor | None = None,
    modality_steps: int = 16,
    return_unprocessed_modalities: bool = False,
    cfg_scale: float = 1.0,
) -> list:
    cfg_scale = model.check_cfg_scale(cfg_scale)
    max_length = check_int("max_length", max_length, 1)
    text_temperature = check_float("text_temperature", text_temperature, 0.0)
    text_min_p = check_float("text_min_p", text_min_p, 0.0, 1.0)
    modality_steps = check_int("modality_steps", modality_steps, 2)
    check_bool("cache_kv", cache_kv)
    check_bool("return_unprocessed_modalities", return_unprocessed_modalities)
    if exists(fixed_modality_shape):  # one shape for every modality the sample opens (a list is taken as that shape)
        shape = tuple(fixed_modality_shape) if isinstance(fixed_modality_shape, list) else fixed_modality_shape
        fixed_modality_shape = check_shape_form(shape, "fixed_modality_shape")
    if exists(init_modality_noise):
        if not torch.is_tensor(init_modality_noise) or not init_modality_noise.is_floating_point() or init_modality_noise.ndim != 2:
            raise ValueError("`init_modality_noise` must be a float tensor of shape (tokens, dim_latent)")
        if not bool(init_modality_noise.isfinite().all()):
            raise ValueError("`init_modality_noise` must be finite (no NaN or inf)")
        init_modality_noise = init_modality_noise.to(model.dtype)

    if model.num_text_tokens == 0:  # nothing to write: one modality, as 0.12
        out = model.generate_modality_only(
            batch_size=1, modality_steps=modality_steps, return_unprocessed_modalities=return_unprocessed_modalities, cfg_scale=cfg_scale
        )
        return [(0, out[0])]

    stream = _Stream(model, cache_kv, cfg_scale)
    start_prompt(model, stream, prompt)

    length = 0
    ids = model.ids
    modality_type = som_modality(model, stream)

    while length < max_length:
        if modality_type is None:
            logits = stream.flush()
            token = int(sample_token(logits, text_temperature, text_min_p))
            stream.add_text([token])
            length += 1
            if token == ids.eos:
                break
            modality_type = ids.som.index(token) if token in ids.som else None
            continue

        spec = model.spec(modality_type)
        shape = modality_shape(model, stream, modality_type, fixed_modality_shape, budget=max_length - length)
        num_tokens = math.prod(shape)
        if exists(init_modality_noise):
            if init_modality_noise.shape[0] < num_tokens or init_modality_noise.shape[1] < spec.dim_latent:
                raise ValueError(f"`init_modality_noise` {tuple(init_modality_noise.shape)} is smaller than ({num_tokens}, {spec.dim_latent}) needed")
            noise = init_modality_noise[:num_tokens, : spec.dim_latent].reshape(*shape, spec.dim_latent).to(model.device)
        else:
            noise = torch.randn((*shape, spec.dim_latent), device=model.device)

        if exists(stream.cache):
            stream.flush()  # the `[meta] shape [som]` tokens join the prefix

        mt = modality_type
        latent = integrate(lambda t, x: stream.modality_velocity(mt, x, t), noise, modality_steps, model.odeint_kwargs)
        stream.commit_modality(modality_type, latent)
        stream.add_text([spec.eom_id])
        length += num_tokens
        modality_type = None

    return finish(model, stream, return_unprocessed_modalities)


def start_prompt(model: Transfusion, stream: _Stream, prompt):
    """Lay the prompt into the stream: `[sos]`, its text, and its modalities wrapped in
    `[meta] shape [som] … [eom]` unless the text before them already opens them."""
    if prompt is None:
        items = []
    elif torch.is_tensor(prompt) and not prompt.is_floating_point():
        if prompt.ndim > 1 and prompt.shape[0] != 1:
            raise ValueError(f"`prompt` text must be one sequence, shape (n,) or (1, n), got {tuple(prompt.shape)}: `sample` writes one sample")
        items = [prompt.reshape(-1)]
    elif torch.is_tensor(prompt) or isinstance(prompt, tuple):
        items = [prompt]
    elif isinstance(prompt, list):
        items = prompt
    else:
        raise TypeError(f"`prompt` must be a text tensor, a modality tensor, a (type, tensor) tuple or a list, got {type(prompt).__name__}")

    prepared = model.prepare([items], name="prompt") if items else None
    segments = prepared.rows[0] if prepared else []

    first_is_sos = bool(segments) and not isinstance(segments[0], int) and segments[0].numel() > 0 and int(segments[0][0]) == model.sos_id
    if not first_is_sos:
        stream.add_text([model.sos_id])

    for segment in segments:
        if not isinstance(segment, int):
            stream.add_text(segment)
            continue
        modality_type, latent = prepared.types[segment], prepared.latents[segment]
        before, after = model.ids.modality_wrapper(modality_type, tuple(latent.shape[:-1]))
        last = stream.last_text_ids()
        if not (last and last[-1] == before[-1]):
            stream.add_text(before)
        stream.add_instance(modality_type, latent)
        stream.add_text(after)


def som_modality(model: Transfusion, stream: _Stream) -> int | None:
    last = stream.last_text_ids()
    if last and last[-1] in model.ids.som and stream.segments and not isinstance(stream.segments[-1], int):
        return model.ids.som.index(last[-1])
    return None


def modality_shape(model: Transfusion, stream: _Stream, modality_type: int, fixed_shape, budget: int) -> tuple[int, ...]:
    """The shape to generate: `fixed_shape`, else the one the model wrote after `[meta]`,
    else the modality's default (0.12's rules: an unreadable shape falls back to the
    default; a readable one with the wrong number of axes only with
    `fallback_to_default_shape_if_invalid`)."""
    spec = model.spec(modality_type)
    if exists(fixed_shape):
        return check_shape(model, modality_type, fixed_shape, "fixed_modality_shape")

    ids = stream.last_text_ids()[:-1]  # without the som
    shape = None
    if model.meta_id in ids:
        meta_at = len(ids) - 1 - ids[::-1].index(model.meta_id)
        text = model.ids.decode_chars(ids[meta_at + 1 :])
        try:
            parsed = tuple(spec.to_shape_fn(text))
            if all(isinstance(s, int) and s > 0 for s in parsed) and math.prod(parsed) <= budget:
                shape = parsed
        except (ValueError, TypeError):
            shape = None

    if shape is None:
        return check_shape(model, modality_type, spec.default_shape, "modality_default_shape")

    if exists(spec.num_dim) and len(shape) != spec.num_dim:
        if model.fallback_to_default_shape_if_invalid and exists(spec.default_shape):
            return spec.default_shape
        raise ValueError(
            f"the model wrote shape {shape} for modality {modality_type}, which has {spec.num_dim} axes; "
            "set `fallback_to_default_shape_if_invalid=True` with a `modality_default_shape`, or pass `fixed_modality_shape`"
        )
    return shape


def finish(model: Transfusion, stream: _Stream, unprocessed: bool) -> list:
    """Segments → `[text, (type, modality), text, …]`, adjacent text merged, modalities decoded."""
    outputs: dict[int, Tensor] = {}
    for k in set(stream.types):
        indices = [i for i, t in enumerate(stream.types) if t == k]
        latents = [stream.latents[i] for i in indices]
        if unprocessed:
            decoded = [to_channel_first(x, model.spec(k).channel_first) for x in latents]
        else:
            decoded = model.decode(latents, k)
        outputs.update(zip(indices, decoded))

    sample: list = []
    for segment in stream.segments:
        if isinstance(segment, int):
            sample.append((stream.types[segment], outputs[segment]))
        elif sample and torch.is_tensor(sample[-1]):
            sample[-1] = torch.cat((sample[-1], segment))
        else:
            sample.append(segment)
    return sample
