"""Sampling: text decoding, the text ↔ modality state machine, and modality-only generation.

Kept outside the model as small functions (after gpt-fast's `prefill` / `decode_one_token`).
The prompt and every modality pass go through `Transfusion.predict`, which builds the tokens,
the layout and the mask, so a sampler never rebuilds them; a single text token goes through
`decoding.decode_one_token`, which needs none of that. With a KV cache (`cache_kv=True`) the
prompt is computed once; each text token costs one token's forward; each ODE step of a modality
recomputes only that modality's own tokens against the cached prefix (they are written into
the cache slots after the prefix but not committed), and one last pass at t = 1 commits the
clean modality. Without the cache every step re-runs the whole sequence; both give the same
sample (`tests/test_sampling.py`). Guidance is `flow.guided` around a velocity function whose
conditional and unconditional rows come from `Transfusion.with_unconditional_copy`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from einops import pack, unpack
from torch import Tensor

from . import ode_step
from .attention import KVCache
from .decoding import TokenDecoder, sample_token
from .decoding import min_p_filter as min_p_filter  # re-exported: the package API (`transfusion_pytorch.min_p_filter`)
from .flow import guided, integrate
from .helpers import exists
from .inputs import (
    check_bool,
    check_float,
    check_init_noise,
    check_int,
    check_modality_type,
    check_shape,
    check_shape_form,
    check_text,
    prepare,
    prompt_items,
)
from .modality import to_channel_first

if TYPE_CHECKING:
    from .transfusion import Transfusion


def check_cfg_scale(model: Transfusion, cfg_scale) -> float:
    cfg_scale = check_float("cfg_scale", cfg_scale)
    if cfg_scale != 1 and model.unconditional_prob <= 0:
        raise ValueError(
            f"`cfg_scale`={cfg_scale} needs a model trained with conditioning dropout (`unconditional_prob` > 0); this one has unconditional_prob=0"
        )
    return cfg_scale


# text only


def text_step(model: Transfusion, ids: Tensor, cache: KVCache, position: int) -> Tensor:
    """Feed `(b, l)` text ids after the cached prefix (positions from `position`), commit them;
    logits of the last one `(b, vocab)`."""
    embed, layout, _ = model.predict([[row] for row in ids], [], [], torch.zeros(0, device=ids.device), cache=cache, position_offset=position)
    cache.commit(layout.seq_len)
    return model.to_text_logits(embed[:, -1])


def generate_text(model: Transfusion, prompt: Tensor, seq_len: int, temperature: float = 1.5, min_p: float = 0.1, compile: bool = False) -> Tensor:
    prompt = check_text(prompt, "prompt", model.ids.vocab_size)
    if prompt.ndim != 2 or prompt.shape[0] == 0 or prompt.shape[1] == 0:
        raise ValueError(f"`prompt` must have shape (batch >= 1, prompt_len >= 1), got {tuple(prompt.shape)}")
    seq_len = check_int("seq_len", seq_len)
    temperature = check_float("temperature", temperature, 0.0)
    min_p = check_float("min_p", min_p, 0.0, 1.0)
    decode = TokenDecoder(model, check_bool("compile", compile))

    prompt = prompt.to(model.device)
    batch, prompt_len = prompt.shape
    num_new = max(0, seq_len - prompt_len)  # `seq_len` counts the prompt; a prompt that long already gets nothing new, as in 0.12
    if num_new == 0:
        return prompt[:, :0]

    # every token's slot is known: the cache holds exactly the prompt and the new tokens
    cache = model.transformer.new_cache(batch, capacity=prompt_len + num_new - 1, device=model.device, dtype=model.dtype)
    logits = text_step(model, prompt, cache, position=0)
    allowed = model.text_only_logits_mask
    token = sample_token(logits.masked_fill(~allowed, float("-inf")), temperature, min_p)[:, 0]
    out = [token, *decode.continue_text(cache, token, prompt_len, num_new - 1, allowed, temperature, min_p)]
    return torch.stack(out, dim=1)


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
    modality_type = check_modality_type(model.num_modalities, modality_type)
    cfg_scale = check_float("cfg_scale", cfg_scale)
    if cfg_scale != 1.0:
        raise ValueError(
            f"`cfg_scale`={cfg_scale}: `generate_modality_only` draws unconditional samples, so guidance has nothing to blend; "
            "give a conditioning prompt to `sample` (e.g. text that opens the modality) and guide there"
        )
    batch_size = check_int("batch_size", batch_size, 1)
    modality_steps = check_int("modality_steps", modality_steps, 2)
    check_bool("return_unprocessed_modalities", return_unprocessed_modalities)
    spec = model.spec(modality_type)

    per_item = isinstance(fixed_modality_shape, list)
    if per_item and len(fixed_modality_shape) != batch_size:
        raise ValueError(f"`fixed_modality_shape` lists {len(fixed_modality_shape)} shapes for `batch_size`={batch_size}")
    shapes = fixed_modality_shape if per_item else [fixed_modality_shape if exists(fixed_modality_shape) else spec.default_shape] * batch_size
    shapes = [check_shape(spec, shape, "fixed_modality_shape") for shape in shapes]

    # the ODE state is every item's latent, flattened and packed into one vector (items may
    # differ in shape), so any torchdiffeq solver, adaptive ones too, integrates them together
    rows, types = [[i] for i in range(batch_size)], [modality_type] * batch_size
    noise, packed_shapes = pack([torch.randn((*shape, spec.dim_latent), device=model.device) for shape in shapes], "*")
    layout = None

    def velocity(t: Tensor, state: Tensor) -> Tensor:
        nonlocal layout
        _, layout, v = model.predict(rows, types, unpack(state, packed_shapes, "*"), t.reshape(1).expand(batch_size), layout=layout)
        return pack(v, "*")[0].float()  # the ODE state stays fp32 under autocast

    latents = unpack(integrate(velocity, noise, modality_steps, model.odeint_kwargs), packed_shapes, "*")

    if return_unprocessed_modalities:
        out = [to_channel_first(x, spec.channel_first) for x in latents]
    else:
        out = model.decode(latents, modality_type)
    return out if per_item else torch.stack(out)


# interleaved


class _Stream:
    """The sequence sampled so far: text id tensors and modality instances, plus the KV cache."""

    def __init__(self, model: Transfusion, cache_kv: bool, cfg_scale: float = 1.0, compile: bool = False):
        self.model = model
        self.cfg_scale = cfg_scale
        self.decode = TokenDecoder(model, compile)
        self.segments: list[Tensor | int] = []
        self.types: list[int] = []
        self.latents: list[Tensor] = []
        # with guidance the cache has a second row for the unconditional pass of each ODE step;
        # everything else (prefill, text, committing a modality) uses the conditional row
        guided_rows = 2 if cfg_scale != 1.0 else 1
        self.full_cache: KVCache | None = model.transformer.new_cache(guided_rows, device=model.device, dtype=model.dtype) if cache_kv else None
        self.cache = self.full_cache.rows(slice(0, 1)) if exists(self.full_cache) and guided_rows == 2 else self.full_cache
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
            embed, _, _ = model.predict([self.segments], self.types, self.latents, torch.ones(len(self.types), device=model.device))
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
        if ids.shape[1] == 1:  # one token: the shared decode step on the conditional row
            position = torch.tensor([self.next_position], device=ids.device)
            logits = self.decode(self.full_cache, ids[0], position, rows=slice(0, 1))[0]
        else:
            logits = text_step(model, ids, cache, self.next_position)[0]
        self.next_position += ids.shape[1]
        self.pending = []
        return logits

    def velocity_fn(self, modality_type: int):
        """`velocity(t, x, with_unconditional)` of the modality being generated after the whole
        stream, for `flow.guided`: one forward over the conditional row and, when asked, the
        unconditional one (the new instance sees only its null token and itself). The ODE state
        stays fp32 under autocast."""
        model, count = self.model, len(self.types)
        cached = exists(self.cache)
        layouts: dict[bool, object] = {}  # one layout per kind of pass, reused at every ODE step

        def velocity(t: Tensor, x: Tensor, with_unconditional: bool) -> Tensor:
            if cached:  # only the new instance, after the cached prefix
                rows, types, latents, times = [[0]], [modality_type], [x], t.reshape(1)
            else:
                rows, types, latents = [[*self.segments, count]], [*self.types, modality_type], [*self.latents, x]
                times = torch.ones(count + 1, device=model.device)
                times[-1] = t
            new = len(types) - 1
            unconditional = None
            if with_unconditional:
                rows, types, latents, times, unconditional = model.with_unconditional_copy(rows, types, latents, times, instances=[new])
            cache = (self.full_cache if with_unconditional else self.cache) if cached else None
            _, layouts[with_unconditional], v = model.predict(
                rows,
                types,
                latents,
                times,
                layout=layouts.get(with_unconditional),
                cache=cache,
                unconditional=unconditional,
                position_offset=self.next_position if cached else 0,
            )
            if with_unconditional:
                return torch.stack((v[new], v[-1])).float()
            return v[new].float()

        return velocity

    def commit_modality(self, modality_type: int, latent: Tensor):
        if exists(self.cache):  # the clean modality (t = 1) joins the cache
            _, layout, _ = self.model.predict(
                [[0]], [modality_type], [latent], torch.ones(1, device=latent.device), cache=self.cache, position_offset=self.next_position
            )
            self.cache.commit(layout.seq_len)
            self.next_position += 1
        self.add_instance(modality_type, latent, pending=False)


@dataclass(frozen=True)
class SamplingOptions:
    """The checked arguments `sample` and `sample_many` share."""

    max_length: int
    text_temperature: float
    text_min_p: float
    modality_steps: int
    unprocessed: bool
    cfg_scale: float
    fixed_shape: tuple[int, ...] | None
    init_noise: Tensor | None
    force: tuple[int, tuple[int, ...] | None] | None


def sampling_options(
    model: Transfusion,
    max_length,
    text_temperature,
    text_min_p,
    fixed_modality_shape,
    init_modality_noise,
    modality_steps,
    return_unprocessed_modalities,
    cfg_scale,
    force_modality_at_start=None,
) -> SamplingOptions:
    if exists(fixed_modality_shape):  # one shape for every modality the sample opens (a list is taken as that shape)
        shape = tuple(fixed_modality_shape) if isinstance(fixed_modality_shape, list) else fixed_modality_shape
        fixed_modality_shape = check_shape_form(shape, "fixed_modality_shape")
    force = force_modality_at_start
    if exists(force):
        if isinstance(force, tuple) and len(force) == 2 and not isinstance(force[1], int):
            modality_type = check_modality_type(model.num_modalities, force[0], "force_modality_at_start[0]")
            force = (modality_type, check_shape(model.spec(modality_type), force[1], "force_modality_at_start[1]"))
        else:
            force = (check_modality_type(model.num_modalities, force, "force_modality_at_start"), None)
    return SamplingOptions(
        max_length=check_int("max_length", max_length, 1),
        text_temperature=check_float("text_temperature", text_temperature, 0.0),
        text_min_p=check_float("text_min_p", text_min_p, 0.0, 1.0),
        modality_steps=check_int("modality_steps", modality_steps, 2),
        unprocessed=check_bool("return_unprocessed_modalities", return_unprocessed_modalities),
        cfg_scale=check_cfg_scale(model, cfg_scale),
        fixed_shape=fixed_modality_shape,
        init_noise=check_init_noise(init_modality_noise, model.dtype),
        force=force,
    )


def open_forced_modality(model: Transfusion, stream: _Stream, options: SamplingOptions):
    """`force_modality_at_start`: write `[meta] shape [som_k]` after the prompt, so sampling starts
    with that modality (the shape from the tuple, else `fixed_modality_shape`, else the default)."""
    if options.force is None:
        return
    modality_type, shape = options.force
    if shape is None:
        shape = check_shape(model.spec(modality_type), options.fixed_shape or model.spec(modality_type).default_shape, "modality_default_shape")
    stream.add_text(model.ids.modality_wrapper(modality_type, shape)[0])


def modality_noise(model: Transfusion, modality_type: int, shape: tuple[int, ...], init_noise: Tensor | None) -> Tensor:
    """The ODE's starting point: fresh Gaussian noise, or the leading part of `init_modality_noise`."""
    dim_latent = model.spec(modality_type).dim_latent
    if init_noise is None:
        return torch.randn((*shape, dim_latent), device=model.device)
    num_tokens = math.prod(shape)
    if init_noise.shape[0] < num_tokens or init_noise.shape[1] < dim_latent:
        raise ValueError(f"`init_modality_noise` {tuple(init_noise.shape)} is smaller than ({num_tokens}, {dim_latent}) needed")
    return init_noise[:num_tokens, :dim_latent].reshape(*shape, dim_latent).to(model.device)


def sample_interleaved(model: Transfusion, prompt=None, cache_kv: bool = True, compile: bool = False, **arguments) -> list:
    """One interleaved sample continuing `prompt`; `max_length` counts the new tokens (text and
    modality). A modality whose shape would not fit in the tokens left ends the sample: `[eos]`
    follows its `[som]` and nothing is generated (never a silently different shape)."""
    options = sampling_options(model, **arguments)
    check_bool("cache_kv", cache_kv)

    if model.num_text_tokens == 0:  # nothing to write: one modality, as 0.12
        out = generate_modality(model, batch_size=1, modality_steps=options.modality_steps, return_unprocessed_modalities=options.unprocessed)
        return [(0, out[0])]

    stream = _Stream(model, cache_kv, options.cfg_scale, check_bool("compile", compile))
    start_prompt(model, stream, prompt)
    open_forced_modality(model, stream, options)

    length = 0
    ids = model.ids
    modality_type = som_modality(model, stream)

    while length < options.max_length:
        if modality_type is None:
            logits = stream.flush()
            token = int(sample_token(logits, options.text_temperature, options.text_min_p))
            stream.add_text([token])
            length += 1
            if token == ids.eos:
                break
            modality_type = ids.som.index(token) if token in ids.som else None
            continue

        shape = modality_shape(model, stream, modality_type, options.fixed_shape)
        num_tokens = math.prod(shape)
        if num_tokens > options.max_length - length:  # does not fit: the sample ends here
            stream.add_text([ids.eos])
            break
        noise = modality_noise(model, modality_type, shape, options.init_noise)

        if exists(stream.cache):
            stream.flush()  # the `[meta] shape [som]` tokens join the prefix

        velocity = guided(stream.velocity_fn(modality_type), options.cfg_scale)
        if compile and exists(stream.cache) and ode_step.supported(model, [modality_type], [shape]):  # the compiled ODE step (`ode_step.py`)
            position = torch.tensor([stream.next_position], device=model.device)
            velocity = ode_step.cached_velocity(model, modality_type, shape, stream.full_cache, slice(None), position, None, options.cfg_scale)
        latent = integrate(velocity, noise, options.modality_steps, model.odeint_kwargs)
        stream.commit_modality(modality_type, latent)
        stream.add_text([model.spec(modality_type).eom_id])
        length += num_tokens
        modality_type = None

    return finish(model, stream, options.unprocessed)


def start_prompt(model: Transfusion, stream: _Stream, prompt):
    """Lay the prompt into the stream: `[sos]`, its text, and its modalities wrapped in
    `[meta] shape [som] … [eom]` unless the text before them already opens them."""
    items = prompt_items(prompt)
    prepared = prepare(model, [items], name="prompt", training=False) if items else None
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


def modality_shape(model: Transfusion, stream: _Stream, modality_type: int, fixed_shape) -> tuple[int, ...]:
    """The shape to generate: `fixed_shape`, else the one the model wrote after `[meta]`,
    else the modality's default (0.12's rules: an unreadable shape falls back to the
    default; a readable one with the wrong number of axes only with
    `fallback_to_default_shape_if_invalid`)."""
    spec = model.spec(modality_type)
    if exists(fixed_shape):
        return check_shape(spec, fixed_shape, "fixed_modality_shape")

    ids = stream.last_text_ids()[:-1]  # without the som
    shape = None
    if model.meta_id in ids:
        meta_at = len(ids) - 1 - ids[::-1].index(model.meta_id)
        text = model.ids.decode_chars(ids[meta_at + 1 :])
        try:
            parsed = tuple(spec.to_shape_fn(text))
            if all(isinstance(s, int) and s > 0 for s in parsed):
                shape = parsed
        except (ValueError, TypeError):
            shape = None

    if shape is None:
        return check_shape(spec, spec.default_shape, "modality_default_shape")

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
