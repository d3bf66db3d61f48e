"""Turning samples into one token sequence per row.

A sample `[text, image, text]` becomes

    [sos] text… [meta] "h,w" [som_k] <h·w modality tokens> [eom_k] text… [eos]

Ids `0 … num_text_tokens-1` are the user's text; after them come `sos`, `eos`, one
`som` per modality, one `eom` per modality, `meta`, and 128 character ids for the
shape string (the same id layout as 0.12, so the model writes the shape of what it
is about to generate).

A row is described as a list of *segments*: a `LongTensor` of token ids, or an `int`
naming a modality instance (whose token count the caller knows). `build_layout` turns
rows of segments into the padded index tensors the model needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._typing import Int
from .inputs import check_lengths

NUM_CHAR_IDS = 128

# a segment that starts a new document inside a packed row: positions restart, and the
# document mask keeps the documents apart
DOCUMENT_BREAK = "document_break"


@dataclass(frozen=True)
class SpecialIds:
    num_text_tokens: int
    num_modalities: int

    @property
    def sos(self) -> int:
        return self.num_text_tokens

    @property
    def eos(self) -> int:
        return self.num_text_tokens + 1

    @property
    def som(self) -> tuple[int, ...]:
        return tuple(range(self.num_text_tokens + 2, self.num_text_tokens + 2 + self.num_modalities))

    @property
    def eom(self) -> tuple[int, ...]:
        start = self.num_text_tokens + 2 + self.num_modalities
        return tuple(range(start, start + self.num_modalities))

    @property
    def meta(self) -> int:
        return self.num_text_tokens + 2 + 2 * self.num_modalities

    @property
    def char_offset(self) -> int:
        return self.meta + 1

    @property
    def vocab_size(self) -> int:
        return self.char_offset + NUM_CHAR_IDS

    def encode_shape(self, shape: tuple[int, ...]) -> list[int]:
        """`(h, w)` → ids of `[meta] "h,w"` (a 0-D modality writes the empty string)."""
        return [self.meta, *(ord(char) + self.char_offset for char in ",".join(map(str, shape)))]

    def decode_chars(self, ids: list[int]) -> str:
        return "".join(chr(min(max(i - self.char_offset, 0), NUM_CHAR_IDS - 1)) for i in ids)

    def modality_wrapper(self, modality_type: int, shape: tuple[int, ...]) -> tuple[list[int], list[int]]:
        """Ids before (`[meta] shape [som]`) and after (`[eom]`) a modality's tokens."""
        return [*self.encode_shape(shape), self.som[modality_type]], [self.eom[modality_type]]


def default_to_modality_shape_fn(shape_str: str) -> tuple[int, ...]:
    """Parse the shape string the model wrote: `"4,6"` → `(4, 6)`, `""` → `()`."""
    if shape_str == "":
        return ()
    return tuple(int(side) for side in shape_str.split(","))


@dataclass
class Layout:
    """Index tensors for a padded batch of rows.

    token_ids:      (b, n) text ids; -1 at modality tokens and padding
    positions:      (b, n) rotary positions: the tokens of one instance share one position
    token_instance: (b, n) index of the instance each token belongs to, -1 for text / padding
    document_ids:   (b, n) document (sample) of each token in a packed row, -1 for padding;
                    None when no row holds more than one document
    lengths:        (b,) real length of each row
    instance_index: (total modality tokens,) flat index `row * n + offset` of every
                    modality token, instances in order, each instance's tokens contiguous
    instance_offsets: per instance (row, offset in row, length)
    masks:          attention masks built for this layout, kept so that the ODE steps of a
                    sampler, which reuse one layout, build each mask once
    """

    token_ids: Tensor
    positions: Tensor
    token_instance: Tensor
    document_ids: Tensor | None
    lengths: Tensor
    instance_index: Tensor
    instance_offsets: list[tuple[int, int, int]]
    masks: dict = field(default_factory=dict, repr=False)

    @property
    def batch(self) -> int:
        return self.token_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.token_ids.shape[1]

    @property
    def has_modalities(self) -> bool:
        return len(self.instance_offsets) > 0

    @property
    def one_instance_per_row(self) -> bool:
        """Every row is exactly one modality instance, nothing else (a modality-only batch of one shape)."""
        return len(self.instance_offsets) == self.batch and all(offset == 0 and length == self.seq_len for _, offset, length in self.instance_offsets)


def build_layout(rows: list[list[Tensor | int | str]], instance_lengths: list[int], device=None) -> Layout:
    """Rows of segments (id tensors, instance indices, `DOCUMENT_BREAK`) → a padded `Layout`.

    Positions: text advances by one per token; all tokens of a modality instance take
    the position of the instance, and the text after it continues one further. Inside
    an instance attention is bidirectional, so a shared position means rotary adds no
    false order between its tokens (its spatial order comes from the axial positional
    embedding, `add_pos_emb`), while every instance stays one step away from its
    neighbouring text — the same choice as 0.12. After a `DOCUMENT_BREAK` (packing)
    positions restart at 0, as if the next sample had a row of its own.
    """
    ids_rows, pos_rows, inst_rows, doc_rows = [], [], [], []
    instance_offsets: list[tuple[int, int, int] | None] = [None] * len(instance_lengths)
    packed = False

    for row_index, segments in enumerate(rows):
        ids, pos, inst, docs = [], [], [], []
        offset = position = document = 0
        for segment in segments:
            if isinstance(segment, str):
                if segment != DOCUMENT_BREAK:
                    raise ValueError(f"unknown layout segment {segment!r}")
                document += 1
                position = 0
                packed = True
                continue
            if isinstance(segment, int):
                length = instance_lengths[segment]
                instance_offsets[segment] = (row_index, offset, length)
                ids.append(torch.full((length,), -1, dtype=torch.long))
                pos.append(torch.full((length,), position, dtype=torch.long))
                inst.append(torch.full((length,), segment, dtype=torch.long))
                position += 1
            else:
                length = segment.shape[0]
                ids.append(segment.cpu().long())
                pos.append(torch.arange(position, position + length))
                inst.append(torch.full((length,), -1, dtype=torch.long))
                position += length
            docs.append(torch.full((length,), document, dtype=torch.long))
            offset += length
        empty = torch.empty(0, dtype=torch.long)
        ids_rows.append(torch.cat(ids) if ids else empty)
        pos_rows.append(torch.cat(pos) if pos else empty)
        inst_rows.append(torch.cat(inst) if inst else empty)
        doc_rows.append(torch.cat(docs) if docs else empty)

    lengths = torch.tensor([len(r) for r in ids_rows], dtype=torch.long)
    seq_len = int(lengths.max()) if len(rows) > 0 else 0

    def pad(rows_, value):
        out = torch.full((len(rows_), seq_len), value, dtype=torch.long)
        for i, r in enumerate(rows_):
            out[i, : len(r)] = r
        return out

    token_ids, positions, token_instance = pad(ids_rows, -1), pad(pos_rows, 0), pad(inst_rows, -1)
    document_ids = pad(doc_rows, -1).to(device) if packed else None

    if any(o is None for o in instance_offsets):
        raise ValueError("every modality instance must appear in exactly one row")

    flat = [torch.arange(row * seq_len + off, row * seq_len + off + length) for row, off, length in instance_offsets]
    instance_index = torch.cat(flat) if flat else torch.empty(0, dtype=torch.long)

    return Layout(
        token_ids=token_ids.to(device),
        positions=positions.to(device),
        token_instance=token_instance.to(device),
        document_ids=document_ids,
        lengths=lengths.to(device),
        instance_index=instance_index.to(device),
        instance_offsets=instance_offsets,  # type: ignore[arg-type]
    )


def text_labels(layout: Layout, ignore_index: int) -> Int["b n"]:
    """Next-token labels: the next id where both this token and the next are text, else ignored.

    The `som` position (whose next token is a modality token) and the last modality
    token (whose next token is `eom`, always appended by the sampler) are not trained.
    """
    next_ids = torch.cat((layout.token_ids[:, 1:], torch.full_like(layout.token_ids[:, :1], -1)), dim=1)
    is_text = layout.token_instance == -1
    keep = (next_ids >= 0) & is_text
    if layout.document_ids is not None:  # no label across a document boundary of a packed row
        next_docs = torch.cat((layout.document_ids[:, 1:], torch.full_like(layout.document_ids[:, :1], -1)), dim=1)
        keep &= next_docs == layout.document_ids
    return torch.where(keep, next_ids, torch.full_like(next_ids, ignore_index))


# ------------------------------------------------------------------ rows of segments: wrapping, lengths, packing


def pack_samples(lengths: Sequence[int], max_length: int, keep_order: bool = True) -> list[list[int]]:
    """Sample indices grouped into rows of at most `max_length` tokens, in few rows.

    Two packings are tried and the one with fewer rows is kept (first-fit decreasing on a tie):
      - first-fit decreasing: longest first, each into the first row with room;
      - next-fit in the given order: fill a row until the next sample does not fit. This
        recovers rows that a sampler has already planned and listed one after the other
        (`PackedBatchSampler`), and no packing into consecutive runs of the order needs fewer.
    A sample longer than `max_length` gets a row of its own. With `keep_order=True` (the
    default), each row lists its samples in input order; otherwise first-fit decreasing rows
    list them in the order they were placed (longest first), rows in the order they opened.
    """
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length <= 0:
        raise ValueError(f"`max_length` must be a positive int, got {max_length!r}")
    lengths = check_lengths(lengths, allow_empty=True)
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for row, free in enumerate(room):
            if lengths[index] <= free:
                rows[row].append(index)
                room[row] -= lengths[index]
                break
        else:
            rows.append([index])
            room.append(max_length - lengths[index])
    if not keep_order:
        return rows

    in_order: list[list[int]] = []
    free = 0
    for index, length in enumerate(lengths):
        if in_order and length <= free:
            in_order[-1].append(index)
            free -= length
        else:
            in_order.append([index])
            free = max_length - length
    if len(in_order) < len(rows):
        return in_order
    return [sorted(row) for row in rows]


def wrap_rows(
    rows: list[list[Tensor | int]],
    instance_shapes: list[tuple[int, tuple[int, ...]]],
    ids: SpecialIds,
    add_sos_eos: bool,
    device=None,
) -> list[list[Tensor | int]]:
    """Insert `[meta] shape [som]` / `[eom]` around every instance, and `[sos]` / `[eos]` around
    each row when `add_sos_eos`. `instance_shapes[i]` is `(modality_type, latent shape)` of instance `i`."""

    def ids_tensor(values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    wrapped = []
    for row in rows:
        out: list[Tensor | int] = [ids_tensor([ids.sos])] if add_sos_eos else []
        for segment in row:
            if isinstance(segment, int):
                before, after = ids.modality_wrapper(*instance_shapes[segment])
                out += [ids_tensor(before), segment, ids_tensor(after)]
            else:
                out.append(segment)
        if add_sos_eos:
            out.append(ids_tensor([ids.eos]))
        wrapped.append(out)
    return wrapped


def row_lengths(rows: list[list[Tensor | int]], instance_lengths: list[int]) -> list[int]:
    """Tokens in each row of segments (an instance counts `instance_lengths[i]` tokens)."""
    return [sum(instance_lengths[s] if isinstance(s, int) else s.shape[0] for s in row) for row in rows]


def pack_rows(rows: list[list], instance_lengths: list[int], pack_length: int) -> list[list]:
    """Sequence packing: several rows (samples) share one row of at most `pack_length` tokens
    (0: as long as the longest sample), separated by `DOCUMENT_BREAK` (see `pack_samples`)."""
    lengths = row_lengths(rows, instance_lengths)
    packed = []
    for group in pack_samples(lengths, pack_length or max(lengths)):
        row: list = []
        for sample in group:
            row += ([DOCUMENT_BREAK] if row else []) + rows[sample]
        packed.append(row)
    return packed
