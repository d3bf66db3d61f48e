"""Many prompts sampled together: `Transfusion.sample_many`.

Each prompt keeps its own sequence (a `sampling._Stream` without a cache of its own, for the
bookkeeping) and its own token budget; the samples share one KV cache, one row each (and a
second, unconditional row each with guidance). The cache advances by the same number of
slots for every row, so a row that was not part of a step, or wrote fewer tokens than the
longest, leaves slots it does not hold; `holds (b, slots)` records which slots are real, and
every step hides the others (`Transfusion.predict(prefix_valid=...)` in the ODE, the decode
step's `holds` for text). Each round:

  1. every sample that has just opened a modality (its `[som]` is in the cache) takes part in
     one batched ODE solve, each with its own modality type and shape (the packed state of
     `generate_modality_only`), then one pass at t = 1 commits the clean modalities;
  2. every sample writing text draws its next token from its logits (one batched draw);
  3. one decode step (`decoding.TokenDecoder`) feeds every sample's one new token (a drawn
     token, or the `[eom]` after a modality) and gives its next logits.

A finished sample (`[eos]` or its budget spent) takes part in nothing more: once half the
cache's rows are finished ones, they are dropped (`Rows.drop_finished`). With greedy
decoding and the same `init_modality_noise`, `sample_many([p])` gives what `sample(p)` gives.

`compile=True` compiles the decode step (`decoding.py`) and the ODE step (`ode_step.py`): the
opened modalities are then solved one group per modality type and shape, each group's step
one graph for all its ODE steps (traced again only for a new batch, shape or cache capacity).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from einops import pack, unpack
from torch import Tensor

from . import ode_step
from .decoding import TokenDecoder
from .flow import guided, integrate
from .inputs import check_bool, check_init_noise
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


def sample_many(model: Transfusion, prompts, init_modality_noise=None, compile: bool = False, **arguments) -> list[list]:
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise ValueError(f"`prompts` must be a non-empty list with one prompt per sample (None for none), got {type(prompts).__name__}")
    count = len(prompts)
    per_prompt_noise = isinstance(init_modality_noise, (list, tuple))
    if per_prompt_noise and len(init_modality_noise) != count:
        raise ValueError(f"`init_modality_noise` lists {len(init_modality_noise)} tensors for {count} prompts")
    options = sampling_options(model, init_modality_noise=None if per_prompt_noise else init_modality_noise, **arguments)
    noises = [check_init_noise(n, model.dtype) for n in init_modality_noise] if per_prompt_noise else [options.init_noise] * count
    decode = TokenDecoder(model, check_bool("compile", compile))

    if model.num_text_tokens == 0:  # nothing to write: one modality each, as `sample`
        return [sample_interleaved(model, None, compile=compile, **arguments) for _ in prompts]

    ids, device = model.ids, model.device
    streams = [_Stream(model, cache_kv=False) for _ in prompts]
    for stream, prompt in zip(streams, prompts):
        start_prompt(model, stream, prompt)
        open_forced_modality(model, stream, options)

    state = Rows(model, count, guided=options.cfg_scale != 1.0)
    written = [0] * count  # new tokens of each sample (its budget is `max_length`)
    done = [False] * count
    logits: dict[int, Tensor] = {}  # next-token logits of each sample

    # prefill: every prompt at once, right-padded (causal masking hides the padding from real tokens)
    instances: list[tuple[int, Tensor]] = []
    rows = []
    for stream in streams:
        offset = len(instances)
        instances += [(t, x) for t, x in zip(stream.types, stream.latents)]
        rows.append([s + offset if isinstance(s, int) else s for s in stream.segments])
    embed, layout, _ = model.predict(
        rows, [t for t, _ in instances], [x for _, x in instances], torch.ones(len(instances), device=device), cache=state.cache.rows(slice(0, count))
    )
    lengths = layout.lengths.tolist()
    state.advance(list(range(count)), lengths, layout.seq_len)
    for sample, length in enumerate(lengths):
        state.positions[sample] = layout.positions[sample, length - 1] + 1
        logits[sample] = model.to_text_logits(embed[sample, length - 1])

    while not all(done):
        state.drop_finished(done)

        # 1. modalities: every sample whose stream ends in an open [som]
        opening = []
        for row, sample in enumerate(state.live):
            modality_type = som_modality(model, streams[sample])
            if modality_type is None:
                continue
            shape = modality_shape(model, streams[sample], modality_type, options.fixed_shape)
            if math.prod(shape) > options.max_length - written[sample]:  # does not fit: the sample ends here
                streams[sample].add_text([ids.eos])
                done[sample] = True
                continue
            opening.append((row, modality_type, shape, modality_noise(model, modality_type, shape, noises[sample])))
        if opening:
            generate_modalities(model, [streams[state.live[row]] for row, *_ in opening], opening, state, options, compile)
            feeding = {}
            for row, modality_type, shape, _ in opening:
                sample = state.live[row]
                written[sample] += math.prod(shape)
                state.positions[row] += 1
                streams[sample].add_text([model.spec(modality_type).eom_id])
                if written[sample] >= options.max_length:  # the modality spent the budget: the sample ends after its [eom], as in `sample`
                    done[sample] = True
                else:
                    feeding[sample] = model.spec(modality_type).eom_id
        else:
            # 2. text: one token for every sample writing text
            feeding = {}
            writing = [row for row, sample in enumerate(state.live) if not done[sample]]
            if not writing:  # the last ones ended on a modality that did not fit
                break
            tokens = sample_token(torch.stack([logits[state.live[row]] for row in writing]), options.text_temperature, options.text_min_p)[:, 0].tolist()
            for row, token in zip(writing, tokens):
                sample = state.live[row]
                streams[sample].add_text([token])
                written[sample] += 1
                if token == ids.eos or written[sample] >= options.max_length:
                    done[sample] = True
                else:
                    feeding[sample] = token

        # 3. one decode step feeds every sample's one new token (a drawn token, or the `[eom]`
        # after a modality) and gives its next logits; the other rows' slots stay hidden
        if feeding:
            state.drop_finished(done)
            row_of = {sample: row for row, sample in enumerate(state.live)}
            for row, row_logits in state.feed(decode, {row_of[sample]: token for sample, token in feeding.items()}).items():
                logits[state.live[row]] = row_logits

    return [finish(model, stream, options.unprocessed) for stream in streams]


class Rows:
    """The shared cache and what each of its rows holds.

    Row `r` of the cache is sample `live[r]` (with guidance, its unconditional twin is row
    `len(live) + r`). The cache advances by the same number of slots for every row; `holds
    (rows, slots)` marks the slots a row really holds, `positions (rows,)` its next rotary
    position. Once half the rows belong to finished samples, they are dropped (one copy of
    the cache), so finished samples stop costing compute.
    """

    def __init__(self, model: Transfusion, count: int, guided: bool):
        device = model.device
        self.guided = guided
        self.live = list(range(count))
        # small to start: a decode step attends over the whole capacity; the cache doubles when full
        self.cache = model.transformer.new_cache(count * (2 if guided else 1), capacity=64, device=device, dtype=model.dtype)
        self.holds = torch.zeros(count, 0, dtype=torch.bool, device=device)
        self.positions = torch.zeros(count, dtype=torch.long, device=device)

    def advance(self, rows: list[int], lengths: list[int], step: int):
        """Commit `step` slots for every row; row `rows[i]` holds the first `lengths[i]` of them."""
        new = torch.zeros(len(self.live), step, dtype=torch.bool, device=self.holds.device)
        for row, length in zip(rows, lengths):
            new[row, :length] = True
        self.holds = torch.cat((self.holds, new), dim=1)
        self.cache.commit(step)

    def feed(self, decode: TokenDecoder, tokens: dict[int, int]) -> dict[int, Tensor]:
        """One decode step over the conditional rows; rows in `tokens` write their token, the
        others' slot stays hidden. Returns the logits of the rows that wrote."""
        rows = len(self.live)
        fed = torch.zeros(rows, dtype=torch.bool, device=self.holds.device)
        fed[list(tokens)] = True
        ids = torch.zeros(rows, dtype=torch.long, device=self.holds.device)
        ids[list(tokens)] = torch.tensor(list(tokens.values()), device=self.holds.device)
        logits = decode(self.cache, ids, self.positions, self.holds, rows=slice(0, rows))
        self.holds = torch.cat((self.holds, fed[:, None]), dim=1)
        self.positions += fed
        return {row: logits[row] for row in tokens}

    def drop_finished(self, done: list[bool]):
        finished = sum(done[sample] for sample in self.live)
        if finished == 0 or 2 * finished < len(self.live):
            return
        keep = torch.tensor([row for row, sample in enumerate(self.live) if not done[sample]], dtype=torch.long, device=self.holds.device)
        cache_rows = torch.cat((keep, keep + len(self.live))) if self.guided else keep
        self.cache.keys, self.cache.values = self.cache.keys[:, cache_rows], self.cache.values[:, cache_rows]
        self.holds, self.positions = self.holds[keep], self.positions[keep]
        self.live = [self.live[row] for row in keep.tolist()]


def generate_modalities(model: Transfusion, streams, opening, state: Rows, options, compile: bool = False):
    """One ODE solve for every opened modality (each its own type and shape, after its own cached
    prefix), guided when `cfg_scale != 1`; then the clean modalities are committed to the cache.
    With `compile=True`, one solve per modality type and shape on the compiled step of `ode_step.py`."""
    rows = [row for row, *_ in opening]
    types = [modality_type for _, modality_type, _, _ in opening]
    shapes = [shape for _, _, shape, _ in opening]
    count, instances = len(state.live), [[i] for i in range(len(opening))]
    packed, packed_shapes = pack([noise for *_, noise in opening], "*")
    cached_rows = torch.tensor(rows, device=state.holds.device)
    offsets, prefix_valid = state.positions[rows, None], state.holds[rows]
    cache = state.cache
    # with guidance the unconditional twins live in rows count … 2·count − 1 of the cache. When every
    # row takes part (all prompts open their modality together), slices: the cache's rows are then
    # read as views, where a tensor of rows would gather a copy of the whole cache at every layer and step
    every = rows == list(range(count))
    both_rows = slice(0, 2 * count) if every else torch.cat((cached_rows, cached_rows + count))
    once_rows = slice(0, count) if every else cached_rows
    twice = (cache.rows(both_rows), torch.cat((offsets, offsets)), torch.cat((prefix_valid, prefix_valid)))
    once = (cache.rows(once_rows), offsets, prefix_valid)
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

    groups: dict[tuple, list[int]] = {}  # the instances of each modality type and shape
    for index, key in enumerate(zip(types, shapes)):
        groups.setdefault(key, []).append(index)
    committed = False
    if compile and all(ode_step.supported(model, [k], [shape]) for k, shape in groups):
        # the compiled step (`ode_step.py`, guided inside): one solve per type and shape, each
        # row's ODE independent of the others' (a fixed-step solver gives each the same steps)
        latents: list = [None] * len(opening)
        whole = every and len(groups) == 1  # one group of every row, in order: the cache's rows as views
        for (modality_type, shape), indices in groups.items():
            if whole:
                selected = slice(0, 2 * count if state.guided else count)
            else:
                group_rows = torch.tensor([rows[i] for i in indices], device=state.holds.device)
                selected = torch.cat((group_rows, group_rows + count)) if state.guided else group_rows
            noise, noise_shapes = pack([opening[i][3] for i in indices], "*")
            velocity = ode_step.cached_velocity(model, modality_type, shape, cache, selected, offsets[indices, 0], prefix_valid[indices], options.cfg_scale)
            solved = integrate(velocity, noise, options.modality_steps, model.odeint_kwargs)
            for i, latent in zip(indices, unpack(solved, noise_shapes, "*")):
                latents[i] = latent
            if whole and not state.guided:  # the cache's own rows: the step at t = 1 is the commit pass
                velocity.commit(solved)  # the step at t = 1 writes the clean tokens' keys / values
                committed = True
    else:
        latents = unpack(integrate(guided(velocity_fn, options.cfg_scale), packed, options.modality_steps, model.odeint_kwargs), packed_shapes, "*")

    if committed:
        state.advance(rows, [math.prod(shape) for shape in shapes], math.prod(shapes[0]))
    else:
        _, layout, _ = model.predict(
            instances, types, latents, torch.ones(len(rows), device=state.holds.device), cache=once[0], position_offset=offsets, prefix_valid=prefix_valid
        )
        state.advance(rows, [math.prod(shape) for shape in shapes], layout.seq_len)
    for stream, (_, modality_type, _, _), latent in zip(streams, opening, latents):
        stream.add_instance(modality_type, latent, pending=False)
