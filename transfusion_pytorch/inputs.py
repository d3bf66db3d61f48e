"""Validation of everything a user hands the library (SPEC §7): one place for it.

Every public entry point calls these; each raises a `ValueError` / `TypeError` whose
message names the argument, what was expected and what came.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from numbers import Integral, Real
from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn import Module

from .helpers import default, per_modality
from .modality import ModalitySpec, to_channel_last


def _scalar(value):
    """A 0-d tensor or numpy array (a value from a sweep, say) → its Python number; anything else as is."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item") and not isinstance(value, (Integral, Real)):
        dtype = str(getattr(value, "dtype", ""))
        if "bool" not in dtype:
            return value.item()
    return value


def check_int(name: str, value, minimum: int | None = None) -> int:
    """An int (numpy ints and 0-d integer tensors too, never a bool) of at least `minimum`, as a Python int."""
    value = _scalar(value)
    if not isinstance(value, Integral) or isinstance(value, bool):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}: {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}")
    return int(value)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool, got {type(value).__name__}: {value!r}")
    return value


def check_choice(name: str, value, choices: tuple) -> object:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}")
    return value


def check_float(name: str, value, minimum: float | None = None, maximum: float | None = None) -> float:
    """A finite real number (0-d tensors too) within `[minimum, maximum]`, returned as a Python float."""
    value = _scalar(value)
    if not isinstance(value, Real) or isinstance(value, bool):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__}: {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite, got {value}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        low = "-inf" if minimum is None else minimum
        high = "inf" if maximum is None else maximum
        raise ValueError(f"`{name}` must lie in [{low}, {high}], got {value}")
    return value


def check_lengths(lengths, allow_empty: bool = False) -> list[int]:
    lengths = lengths.tolist() if hasattr(lengths, "tolist") else lengths  # tensors, numpy arrays
    if not isinstance(lengths, Sequence) or isinstance(lengths, str):
        raise TypeError(f"`lengths` must be a sequence of ints, got {type(lengths).__name__}")
    if len(lengths) == 0 and not allow_empty:
        raise ValueError("`lengths` is empty: there is nothing to sample")
    for length in lengths:
        if not isinstance(length, Integral) or isinstance(length, bool):
            raise TypeError(f"`lengths` must hold ints, got {type(length).__name__}: {length!r}")
        if not 0 <= length < 2**62:
            raise ValueError(f"`lengths` must be >= 0 and < 2**62, got {length}")
    return [int(length) for length in lengths]


# ------------------------------------------------------------------ tensors


def is_int_tensor(value) -> bool:
    return torch.is_tensor(value) and not value.is_floating_point() and not value.is_complex() and value.dtype != torch.bool


def is_float_tensor(value) -> bool:
    return torch.is_tensor(value) and value.is_floating_point()


def is_shape(value) -> bool:
    return isinstance(value, tuple) and all(isinstance(s, int) and not isinstance(s, bool) for s in value)


def describe(value) -> str:
    """What came, for an error message: a tensor's dtype and shape, or the type's name."""
    if torch.is_tensor(value):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def check_times(times: Tensor, name: str = "times") -> Tensor:
    """Flow times lie in [0, 1] (0 is noise, 1 is data); NaN is refused too."""
    if not bool(((times >= 0) & (times <= 1)).all()):
        raise ValueError(f"`{name}` must lie in [0, 1] (0 is noise, 1 is data), without NaN")
    return times


def check_shape_form(shape, name: str) -> tuple[int, ...]:
    """A tuple (or `torch.Size`) of positive ints, numpy ints included, as a tuple of Python ints."""
    if not isinstance(shape, tuple) or not all(isinstance(s, Integral) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ValueError(f"`{name}` must be a tuple of positive ints, got {shape!r}")
    return tuple(int(s) for s in shape)


def _lenient_axes(spec: ModalitySpec, axes: int) -> bool:
    """0.12 took latents with another number of axes than `modality_default_shape` has, when the
    user never set `modality_num_dim` and no position embedding needs it: so do we, with a warning."""
    if spec.strict_num_dim:
        return False
    warnings.warn(
        f"modality {spec.modality_type} got {axes} spatial axes while its `modality_default_shape` {spec.default_shape} has {spec.num_dim}; "
        "accepted as 0.12 did (set `modality_num_dim` to refuse it)",
        stacklevel=4,
    )
    return True


def check_shape(spec: ModalitySpec, shape, name: str) -> tuple[int, ...]:
    """A modality shape for `spec`: a tuple of positive ints with the modality's number of axes."""
    if shape is None:
        raise ValueError(f"`{name}` is needed for modality {spec.modality_type}: it has no `modality_default_shape`")
    shape = check_shape_form(shape, name)
    if spec.num_dim is not None and len(shape) != spec.num_dim and not _lenient_axes(spec, len(shape)):
        raise ValueError(f"`{name}` {shape} has {len(shape)} axes, modality {spec.modality_type} has {spec.num_dim}")
    return shape


def check_modality_type(num_modalities: int, modality_type, name: str = "modality_type") -> int:
    if modality_type is None:
        if num_modalities > 1:
            raise ValueError(f"`{name}` must be given when the model has {num_modalities} modalities")
        return 0
    modality_type = check_int(name, modality_type)
    if not 0 <= modality_type < num_modalities:
        raise ValueError(f"`{name}` must be in [0, {num_modalities}), got {modality_type}")
    return modality_type


def check_text(ids, name: str, limit: int, ignore_index: int | None = None) -> Tensor:
    """Text ids in `[0, limit)` (or `ignore_index`, where labels may be ignored), as a long tensor."""
    if not is_int_tensor(ids):
        kind = f"{ids.dtype} tensor" if torch.is_tensor(ids) else type(ids).__name__
        raise TypeError(f"`{name}` must be an integer (long) tensor of text ids, got a {kind}")
    valid = (ids >= 0) & (ids < limit)
    if ignore_index is not None:
        valid |= ids == ignore_index
    if not bool(valid.all()):
        bad = ids[~valid][0].item()
        raise ValueError(f"`{name}` has text id {bad} out of range: ids must be in [0, {limit})")
    return ids.long()


def check_text_ids(ids: Tensor, name: str, special) -> Tensor:
    """Text of a training sample: user text ids (`< num_text_tokens`), the special ids a user may
    write (`sos`, `eos`, `som_k`, `eom_k`, `meta`), and shape characters only in the shape string
    right after a `[meta]` (`[meta] "4,4" [som]`). Anything else would train silently into ids
    the model keeps for itself. (A prompt may hold any id of the vocabulary: a sample the model
    wrote can be fed back.)"""
    ids = check_text(ids, name, special.vocab_size)
    in_shape = False
    for position, value in enumerate(ids.tolist()):
        if value >= special.char_offset and not in_shape:
            raise ValueError(
                f"`{name}` has id {value} at position {position}, a shape-character id outside a `[meta]` shape string; "
                f"text ids must be < num_text_tokens={special.num_text_tokens} "
                f"or one of sos={special.sos}, eos={special.eos}, som={list(special.som)}, eom={list(special.eom)}, meta={special.meta}"
            )
        in_shape = value == special.meta or (in_shape and value >= special.char_offset)
    return ids


def to_latent(spec: ModalitySpec, tensor: Tensor, name: str, dtype: torch.dtype) -> Tensor:
    """Validate an encoded modality tensor and move it to channel-last, in the model's dtype."""
    if not is_float_tensor(tensor):
        raise TypeError(f"`{name}` must be a float tensor, got {describe(tensor)}")
    channel_axis = 0 if spec.channel_first else -1
    if tensor.ndim == 0 or tensor.shape[channel_axis] != spec.dim_latent:
        order = "first" if spec.channel_first else "last"
        raise ValueError(
            f"`{name}` of modality {spec.modality_type} has shape {tuple(tensor.shape)}: expected {spec.dim_latent} "
            f"channels on the {order} axis (dim_latent={spec.dim_latent}, channel_first_latent={spec.channel_first})"
        )
    if spec.num_dim is not None and tensor.ndim - 1 != spec.num_dim and not _lenient_axes(spec, tensor.ndim - 1):
        raise ValueError(
            f"`{name}` of modality {spec.modality_type} has {tensor.ndim - 1} spatial axes (shape {tuple(tensor.shape)}), "
            f"expected {spec.num_dim} (modality_num_dim)"
        )
    if tensor.numel() == 0:
        raise ValueError(f"`{name}` of modality {spec.modality_type} has an empty axis: shape {tuple(tensor.shape)}")
    return to_channel_last(tensor, spec.channel_first).to(dtype)


# ------------------------------------------------------------------ batches


class Prepared(NamedTuple):
    """A validated batch: rows of segments (text id tensors / instance indices) and the instances."""

    rows: list[list[Tensor | int]]
    types: list[int]
    latents: list[Tensor]  # channel-last, encoded, in the model's dtype
    raw: list[Tensor]  # as given (before the encoder), for the reconstruction loss
    row_of: list[int]  # the row (sample) of each instance

    def indices_of(self, modality_type: int) -> list[int]:
        return [i for i, t in enumerate(self.types) if t == modality_type]


def prepare(model, batch, name: str = "modalities", encode: bool = True, training: bool = True) -> Prepared:
    """Validate an interleaved batch, split it into rows of segments and instances, encode
    (unless `encode=False`: the modalities are latents already). Training text is held to
    `check_text_ids`; a prompt (`training=False`) may hold any id of the vocabulary.

    An item is a LongTensor of text ids, a float tensor (modality 0) or `(modality_type, tensor)`.
    """
    if not isinstance(batch, (list, tuple)) or len(batch) == 0:
        raise ValueError(f"`{name}` must be a non-empty list of samples, got {batch!r}")

    rows, types, raw, row_of = [], [], [], []
    for b, sample in enumerate(batch):
        if not isinstance(sample, (list, tuple)):
            raise TypeError(f"`{name}[{b}]` must be a list of text tensors and modalities, got {type(sample).__name__}")
        row = []
        for j, item in enumerate(sample):
            where = f"{name}[{b}][{j}]"
            if isinstance(item, tuple):
                if len(item) != 2 or not torch.is_tensor(item[1]):
                    raise TypeError(f"`{where}` must be a (modality_type, tensor) tuple, got {item!r}")
                modality_type = check_modality_type(model.num_modalities, item[0], f"{where}[0]")
                tensor = item[1]
                if not is_float_tensor(tensor):
                    raise TypeError(f"`{where}[1]` must be a float modality tensor, got {describe(tensor)}")
            elif is_float_tensor(item):
                modality_type, tensor = 0, item
            elif is_int_tensor(item):
                if item.ndim > 1:
                    raise ValueError(f"`{where}` text must be a 1-D tensor of ids, got shape {tuple(item.shape)}")
                text = item.reshape(-1)
                text = check_text_ids(text, where, model.ids) if training else check_text(text, where, model.ids.vocab_size)
                row.append(text.to(model.device))
                continue
            else:
                raise TypeError(f"`{where}` must be a LongTensor of text ids, a float modality tensor or a (type, tensor) tuple, got {type(item).__name__}")

            row.append(len(types))
            types.append(modality_type)
            raw.append(tensor.to(model.device))
            row_of.append(b)
        rows.append(row)

    latents: list[Tensor | None] = [None] * len(raw)
    for k in range(model.num_modalities):
        indices = [i for i, t in enumerate(types) if t == k]
        encoded = model.encode([raw[i] for i in indices], k) if encode else [raw[i] for i in indices]
        for i, x in zip(indices, encoded):
            latents[i] = to_latent(model.spec(k), x, f"{name} item (modality {k}, instance {i})", model.dtype)

    return Prepared(rows, types, latents, raw, row_of)  # type: ignore[arg-type]


def modality_only_items(modalities, name: str = "modalities") -> list[Tensor]:
    """A modality-only batch `(b, *shape, d)` or a list of tensors → the list of its items."""
    if torch.is_tensor(modalities) and modalities.ndim < 2:
        raise ValueError(f"`{name}` must be a batch (batch, *shape, dim_latent) of one modality, got shape {tuple(modalities.shape)}")
    items = list(modalities.unbind(0)) if torch.is_tensor(modalities) else list(modalities)
    if len(items) == 0:
        raise ValueError(f"`{name}` must hold at least one sample")
    for i, item in enumerate(items):
        if not is_float_tensor(item):
            raise TypeError(f"`{name}[{i}]` must be a float modality tensor (modality-only batch), got {describe(item)}")
    return items


def instance_times(prepared: Prepared, times, times_fn, device) -> Tensor:
    """Flow time of every instance `(m,)`, from `times (b, m)` (a sample's modalities in order;
    a modality-only batch may give `(b,)`) or `times_fn(num_modalities (b,)) -> (b, m)`."""
    batch = len(prepared.rows)
    counts_list = [0] * batch
    for row in prepared.row_of:
        counts_list[row] += 1
    max_count = max(counts_list)
    if times is None:
        times = times_fn(torch.tensor(counts_list, dtype=torch.long, device=device))
    if is_float_tensor(times) and times.ndim == 1 and max_count <= 1:  # one modality per sample
        times = times[:, None]
    if not is_float_tensor(times) or times.ndim != 2 or times.shape[0] != batch or times.shape[1] < max_count:
        got = tuple(times.shape) if torch.is_tensor(times) else type(times).__name__
        raise ValueError(f"`times` must be a float tensor of shape (batch={batch}, max modalities per sample={max_count}), got {got}")
    seen = [0] * batch
    flat = []
    for row in prepared.row_of:
        flat.append(times[row, seen[row]])
        seen[row] += 1
    return check_times(torch.stack(flat)).to(device).float() if flat else torch.zeros(0, device=device)


def prompt_items(prompt) -> list:
    """A prompt for `sample`: None, a text tensor `(n,)` / `(1, n)`, a modality tensor, a `(type, tensor)`
    tuple or an interleaved list → the list of its items."""
    if prompt is None:
        return []
    if torch.is_tensor(prompt) and not prompt.is_floating_point():
        if prompt.ndim > 1 and prompt.shape[0] != 1:
            raise ValueError(f"`prompt` text must be one sequence, shape (n,) or (1, n), got {tuple(prompt.shape)}: `sample` writes one sample")
        return [prompt.reshape(-1)]
    if torch.is_tensor(prompt) or isinstance(prompt, tuple):
        return [prompt]
    if isinstance(prompt, list):
        return prompt
    raise TypeError(f"`prompt` must be a text tensor, a modality tensor, a (type, tensor) tuple or a list, got {type(prompt).__name__}")


def check_init_noise(noise, dtype: torch.dtype) -> Tensor | None:
    if noise is None:
        return None
    if not torch.is_tensor(noise) or not noise.is_floating_point() or noise.ndim != 2:
        raise ValueError(f"`init_modality_noise` must be a float tensor of shape (tokens, dim_latent), got {describe(noise)}")
    if not bool(noise.isfinite().all()):
        raise ValueError("`init_modality_noise` must be finite (no NaN or inf)")
    return noise.to(dtype)


# ------------------------------------------------------------------ the constructor's per-modality arguments


def modality_settings(
    special_ids: Callable,
    dim: int,
    dim_latent,
    channel_first_latent,
    add_pos_emb,
    modality_encoder,
    modality_decoder,
    pre_post_transformer_enc_dec,
    modality_default_shape,
    modality_num_dim,
    to_modality_shape_fn,
) -> list[dict]:
    """`Transfusion`'s per-modality arguments (one value for all, or a tuple with one per modality)
    → per modality, its `ModalitySpec` and the keywords of its `ModalityHeads` (add_pos_emb,
    encoder, decoder, pre_post)."""
    dim_latents = default(dim_latent, dim)
    dim_latents = dim_latents if isinstance(dim_latents, tuple) else (dim_latents,)
    if len(dim_latents) == 0 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dim_latents):
        raise ValueError(f"`dim_latent` must be a positive int or a tuple of positive ints, got {dim_latent!r}")

    num_modalities = len(dim_latents)

    if modality_default_shape is None or is_shape(modality_default_shape):
        default_shapes = (modality_default_shape,) * num_modalities
    else:
        default_shapes = per_modality(modality_default_shape, num_modalities, "modality_default_shape")
    for shape in default_shapes:
        if shape is not None and (not is_shape(shape) or any(s <= 0 for s in shape)):
            raise ValueError(f"`modality_default_shape` entries must be tuples of positive ints or None, got {shape!r}")

    if modality_num_dim is None:
        num_dims = tuple(len(s) if s is not None else None for s in default_shapes)
    else:
        num_dims = per_modality(modality_num_dim, num_modalities, "modality_num_dim")
    for k, (nd, shape) in enumerate(zip(num_dims, default_shapes)):
        if nd is not None and (not isinstance(nd, int) or not 0 <= nd <= 3):
            raise ValueError(f"`modality_num_dim` must be 0, 1, 2 or 3 (or None), got {nd!r} for modality {k}")
        if nd is not None and shape is not None and len(shape) != nd:
            raise ValueError(f"`modality_default_shape` {shape} of modality {k} has {len(shape)} axes but `modality_num_dim` is {nd}")

    channel_firsts = per_modality(channel_first_latent, num_modalities, "channel_first_latent")
    add_pos_embs = per_modality(add_pos_emb, num_modalities, "add_pos_emb")
    for k, (flag, nd) in enumerate(zip(add_pos_embs, num_dims)):
        if flag and (nd is None or nd == 0):
            raise ValueError(f"`add_pos_emb` for modality {k} needs `modality_num_dim` (or `modality_default_shape`) of 1 to 3 axes, got {nd}")

    encoders = per_modality(modality_encoder, num_modalities, "modality_encoder")
    decoders = per_modality(modality_decoder, num_modalities, "modality_decoder")
    shape_fns = per_modality(to_modality_shape_fn, num_modalities, "to_modality_shape_fn")

    if pre_post_transformer_enc_dec is None or (len(pre_post_transformer_enc_dec) == 2 and all(isinstance(m, Module) for m in pre_post_transformer_enc_dec)):
        pre_posts = (pre_post_transformer_enc_dec,) * num_modalities
    else:
        pre_posts = per_modality(pre_post_transformer_enc_dec, num_modalities, "pre_post_transformer_enc_dec")

    ids = special_ids(num_modalities)  # `layout.SpecialIds` for this many modalities
    return [
        (
            ModalitySpec(
                k,
                dim_latents[k],
                channel_firsts[k],
                num_dims[k],
                default_shapes[k],
                shape_fns[k],
                ids.som[k],
                ids.eom[k],
                strict_num_dim=modality_num_dim is not None or add_pos_embs[k],
            ),
            dict(add_pos_emb=add_pos_embs[k], encoder=encoders[k], decoder=decoders[k], pre_post=pre_posts[k]),
        )
        for k in range(num_modalities)
    ]


def batch_kind(num_modalities: int, modalities, modality_type, pack, return_loss, return_breakdown, delta_time, times_fn) -> tuple[str, float]:
    """Check `Transfusion.forward`'s arguments; the kind of batch (`"text"`, `"modality"` or
    `"interleaved"`) and the velocity-consistency δ as a float."""
    if not isinstance(pack, (bool, int)) or (not isinstance(pack, bool) and pack <= 0):
        raise ValueError(f"`pack` must be True / False or a positive row length, got {pack!r}")
    check_bool("return_loss", return_loss)
    check_bool("return_breakdown", return_breakdown)
    delta_time = check_float("velocity_consistency_delta_time", delta_time, 0.0, 1.0)
    if times_fn is not None and not callable(times_fn):
        raise TypeError(f"`num_modalities_to_times_fn` must be callable, got {type(times_fn).__name__}")
    if modality_type is not None:
        check_modality_type(num_modalities, modality_type)

    if is_int_tensor(modalities):
        if modality_type is not None:
            raise TypeError(f"`modalities` is an int tensor (text ids) but `modality_type`={modality_type} was given: modality latents must be float")
        if pack is not False:
            raise ValueError("`pack` applies to interleaved batches; a text-only batch has no padding to pack away")
        return "text", delta_time

    # modality only: one float tensor, a list of float tensors, or a flat list with `modality_type=`
    # (an interleaved batch is a list of samples, each a list)
    is_flat_list = isinstance(modalities, (list, tuple)) and len(modalities) > 0 and not any(isinstance(m, (list, tuple)) for m in modalities)
    modality_only = is_float_tensor(modalities) or (is_flat_list and (modality_type is not None or all(is_float_tensor(m) for m in modalities)))
    if torch.is_tensor(modalities) and not modality_only:
        raise TypeError(f"`modalities` tensor must be long (text) or float (one modality), got {modalities.dtype}")
    if pack is not False and modality_only:
        raise ValueError("`pack` applies to interleaved batches; a modality-only batch has one instance per row")
    if pack is not False and not return_loss:
        raise ValueError("`pack` applies to the loss only (logits of a packed batch have no per-sample layout)")
    return ("modality" if modality_only else "interleaved"), delta_time
