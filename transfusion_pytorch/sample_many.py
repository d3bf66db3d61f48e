"""Many prompts sampled together: `Transfusion.sample_many`.

Each prompt keeps its own sequence (a `sampling._Stream` without a cache of its own, for the
bookkeeping) and its own token budget; the samples share one KV cache, one row each (and a
second, unconditional row each with guidance). The cache advances by the same number of
slots for every row, so a row that was not part of a step, or wrote fewer tokens than the
longest, leaves slots it does not hold; `holds (b, slots)` records which slots are real, and
every forward hides the others (`Transfusion.predict(prefix_valid=...)`). Each round:

  1. every sample that has just opened a modality (its `[som]` is in the cache) takes part in
     one batched ODE solve, each with its own modality type and shape (the packed state of
     `generate_modality_only`), then one pass at t = 1 commits the clean modalities;
  2. every sample writing text draws its next token from its logits (one batched draw);
  3. one forward feeds every sample's one new token (a drawn token, or the `[eom]` after a
     modality) and gives its next logits.

A finished sample (`[eos]` or its budget spent) takes part in nothing more. With greedy
decoding and the same `init_modality_noise`, `sample_many([p])` gives what `sample(p)` gives.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from einops import pack, unpack
from torch import Tensor

from .attention import KVCacheRows
from .flow import guided, integrate
from .inputs import check_init_noise
from .sampling import (
    _Stream,
    finish,
    modality_noise,
    modality_shape,
    open_forced_modality,
    sample_interleaved,
    sample_token,
    sampling_options,
    som_modality,
    start_prompt,
)

if TYPE_CHECKING:
    from .transfusion import Transfusion


def sample_many(model: Transfusion, prompts, init_modality_noise=None, **arguments) -> list[list]:
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise ValueError(f"`prompts` must be a non-empty list with one prompt per sample (None for none), got {type(prompts).__name__}")
    count = len(prompts)
    per_prompt_noise = isinstance(init_modality_noise, (list, tuple))
    if per_prompt_noise and len(init_modality_noise) != count:
        raise ValueError(f"`init_modality_noise` lists {len(init_modality_noise)} tensors for {count} prompts")
    options = sampling_options(model, init_modality_noise=None if per_prompt_noise else init_modality_noise, **arguments)
    noises = [check_init_noise(n, model.dtype) for n in init_modality_noise] if per_prompt_noise else [options.init_noise] * count

    if model.num_text_tokens == 0:  # nothing to write: one modality each, as `sample`
        return [sample_interleaved(model, None, **arguments) for _ in prompts]

    ids, device = model.ids, model.device
    guided_rows = options.cfg_scale != 1.0
    streams = [_Stream(model, cache_kv=False) for _ in prompts]
    for stream, prompt in zip(streams, prompts):
        start_prompt(model, stream, prompt)
        open_forced_modality(model, stream, options)

    cache = model.transformer.new_cache(count * (2 if guided_rows else 1), capacity=256, device=device, dtype=model.dtype)
    holds = torch.zeros(count, 0, dtype=torch.bool, device=device)  # the cache slots each row really holds
    positions = torch.zeros(count, dtype=torch.long, device=device)  # the next rotary position of each row
    written = [0] * count  # new tokens of each sample (its budget is `max_length`)
    done = [False] * count
    logits: dict[int, Tensor] = {}

    def advance(rows: list[int], lengths: list[int], step: int):
        """Commit `step` slots for every row; row `rows[i]` holds the first `lengths[i]` of them."""
        nonlocal holds
        new = torch.zeros(count, step, dtype=torch.bool, device=device)
        for row, length in zip(rows, lengths):
            new[row, :length] = True
        holds = torch.cat((holds, new), dim=1)
        cache.commit(step)

    def view(rows: list[int]) -> KVCacheRows:
        return cache.rows(torch.tensor(rows, device=device))

    # prefill: every prompt at once, right-padded (causal masking hides the padding from real tokens)
    instances: list[tuple[int, Tensor]] = []
    rows = []
    for stream in streams:
        offset = len(instances)
        instances += [(t, x) for t, x in zip(stream.types, stream.latents)]
        rows.append([s + offset if isinstance(s, int) else s for s in stream.segments])
    embed, layout, _ = model.predict(
        rows, [t for t, _ in instances], [x for _, x in instances], torch.ones(len(instances), device=device), cache=view(list(range(count)))
    )
    lengths = layout.lengths.tolist()
    advance(list(range(count)), lengths, layout.seq_len)
    for row, length in enumerate(lengths):
        positions[row] = layout.positions[row, length - 1] + 1
        logits[row] = model.to_text_logits(embed[row, length - 1])

    while not all(done):
        # 1. modalities: every sample whose stream ends in an open [som]
        opening = []
        for row, stream in enumerate(streams):
            modality_type = None if done[row] else som_modality(model, stream)
            if modality_type is None:
                continue
            shape = modality_shape(model, stream, modality_type, options.fixed_shape)
            if math.prod(shape) > options.max_length - written[row]:  # does not fit: the sample ends here
                stream.add_text([ids.eos])
                done[row] = True
                continue
            opening.append((row, modality_type, shape, modality_noise(model, modality_type, shape, noises[row])))
        if opening:
            generate_modalities(model, streams, opening, cache, holds, positions, options, advance)
            for row, modality_type, shape, _ in opening:
                written[row] += math.prod(shape)
                positions[row] += 1
                streams[row].add_text([model.spec(modality_type).eom_id])
            feeding = [row for row, *_ in opening]
        else:
            # 2. text: one token for every sample writing text
            feeding = []
            writing = [row for row in range(count) if not done[row]]
            if not writing:  # the last ones ended on a modality that did not fit
                break
            tokens = sample_token(torch.stack([logits[row] for row in writing]), options.text_temperature, options.text_min_p)[:, 0].tolist()
            for row, token in zip(writing, tokens):
                streams[row].add_text([token])
                written[row] += 1
                if token == ids.eos or written[row] >= options.max_length:
                    done[row] = True
                else:
                    feeding.append(row)

        # 3. feed every sample's one new token, for its next logits
        if feeding:
            new_tokens = [streams[row].segments[-1][-1:] for row in feeding]
            embed, _, _ = model.predict(
                [[token] for token in new_tokens],
                [],
                [],
                torch.zeros(0, device=device),
                cache=view(feeding),
                position_offset=positions[feeding, None],
                prefix_valid=holds[feeding],
            )
            advance(feeding, [1] * len(feeding), 1)
            for i, row in enumerate(feeding):
                positions[row] += 1
                logits[row] = model.to_text_logits(embed[i, -1])

    return [finish(model, stream, options.unprocessed) for stream in streams]


def generate_modalities(model: Transfusion, streams, opening, cache, holds: Tensor, positions: Tensor, options, advance):
    """One ODE solve for every opened modality (each its own type and shape, after its own cached
    prefix), guided when `cfg_scale != 1`; then the clean modalities are committed to the cache."""
    rows = [row for row, *_ in opening]
    types = [modality_type for _, modality_type, _, _ in opening]
    count, instances = len(streams), [[i] for i in range(len(opening))]
    state, packed_shapes = pack([noise for *_, noise in opening], "*")
    cached_rows = torch.tensor(rows, device=holds.device)
    offsets, prefix_valid = positions[rows, None], holds[rows]
    # with guidance the unconditional twins live in rows count … 2·count − 1 of the cache
    twice = (cache.rows(torch.cat((cached_rows, cached_rows + count))), torch.cat((offsets, offsets)), torch.cat((prefix_valid, prefix_valid)))
    once = (cache.rows(cached_rows), offsets, prefix_valid)
    layouts: dict[bool, object] = {}

    def velocity_fn(t: Tensor, x: Tensor, with_unconditional: bool) -> Tensor:
        batch = (instances, types, unpack(x, packed_shapes, "*"), t.reshape(1).expand(len(rows)), None)
        if with_unconditional:
            batch = model.with_unconditional_copy(*batch[:4], instances=list(range(len(rows))))
        rows_cache, offset, valid = twice if with_unconditional else once
        _, layouts[with_unconditional], v = model.predict(
            *batch[:4], layout=layouts.get(with_unconditional), cache=rows_cache, unconditional=batch[4], position_offset=offset, prefix_valid=valid
        )
        if with_unconditional:
            half = len(rows)
            return torch.stack((pack(v[:half], "*")[0], pack(v[half:], "*")[0])).float()
        return pack(v, "*")[0].float()

    latents = unpack(integrate(guided(velocity_fn, options.cfg_scale), state, options.modality_steps, model.odeint_kwargs), packed_shapes, "*")

    _, layout, _ = model.predict(
        instances, types, latents, torch.ones(len(rows), device=holds.device), cache=once[0], position_offset=offsets, prefix_valid=prefix_valid
    )
    advance(rows, [math.prod(shape) for _, _, shape, _ in opening], layout.seq_len)
    for (row, modality_type, _, _), latent in zip(opening, latents):
        streams[row].add_instance(modality_type, latent, pending=False)
