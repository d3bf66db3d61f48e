"""One text token per row after a KV cache: the decode step every sampler shares.

gpt-fast's `decode_one_token` for this model. A text token needs none of the layout
machinery of `Transfusion.predict` (no modality, no instance, one position per row), so the
step runs the embedding, the transformer and the text head directly. It writes each row's
new keys / values into the cache's preallocated buffer at one slot given as a tensor
(`attention.SlotCache`) and attends over the whole buffer, the slots a row does not hold
hidden by `visible`: its shapes depend on the batch and the cache's capacity, never on the
length decoded so far. So `torch.compile` traces it once and then runs it for every token
(a recompile when the capacity doubles or the batch changes makes those sizes dynamic, and
the one after reuses the kernel); `Transfusion.sample(..., compile=True)`,
`sample_many(..., compile=True)` and `generate_text_only(..., compile=True)` use it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ._typing import Bool, Float, Int, typecheck, typecheck_disabled
from .attention import AttentionMask, KVCache, SlotCache

if TYPE_CHECKING:
    from .transfusion import Transfusion


def _decode_one_token(
    model: torch.nn.Module,
    keys: list[Float["b h c dh"]],
    values: list[Float["b h c dh"]],
    tokens: Int["b"],
    positions: Int["b"],
    slot: Int["1"],
    visible: Bool["b c"],
) -> Float["b l"]:
    """Feed `tokens` (one per row) at rotary `positions`; their keys / values go to cache slot
    `slot` of `keys` / `values` (one buffer of `c` slots per layer); each attends to the slots
    `visible` marks (its own slot included). Returns the next-token logits `(b, l)`."""
    x = model.text_embed(tokens)[:, None]  # (b, 1, d)
    mask = AttentionMask(dense=visible[:, None, None, :])  # (b, 1, 1, c): one query per row
    embed = model.transformer(x, positions[:, None], mask, cache=SlotCache(keys, values, slot))
    return model.to_text_logits(embed[:, -1])


decode_one_token = typecheck(_decode_one_token)  # the eager step; `torch.compile` traces the unwrapped one (dynamo cannot trace beartype's checks)


class TokenDecoder:
    """`decode_one_token` on a `KVCache`, eager or under `torch.compile` (`compile=True`).

    The compiled step is kept on the model (one per model), so every call of every sampler
    reuses it; the first call compiles (seconds to a minute on a CPU), later ones do not.
    """

    def __init__(self, model: Transfusion, compile: bool = False):
        self.model = model
        self.step = compiled_step(model) if compile else decode_one_token

    def __call__(self, cache: KVCache, tokens: Tensor, positions: Tensor, holds: Tensor | None = None, rows: slice = slice(None)) -> Tensor:
        """Write `tokens (b,)` of cache rows `rows` at slot `cache.length`, commit that slot, and
        return their logits `(b, l)`. `holds (b, cache.length)`: the cached slots each row attends
        to (None: all of them); each token also sees itself."""
        length, batch = cache.length, tokens.shape[0]
        if length >= cache.capacity:
            cache.grow(length + 1)
        visible = torch.zeros(batch, cache.capacity, dtype=torch.bool, device=tokens.device)
        visible[:, :length] = True if holds is None else holds
        visible[:, length] = True
        slot = torch.tensor([length], device=tokens.device)
        # one tensor per layer: a compiled step that wrote into a view of one stacked input would
        # copy the whole cache at every token (measured ~40x slower); per-layer inputs are written in place
        keys, values = cache.keys[:, rows].unbind(0), cache.values[:, rows].unbind(0)
        logits = self.step(self.model, list(keys), list(values), tokens, positions, slot, visible)
        cache.commit(1)
        return logits


def compiled_step(model: Transfusion):
    step = getattr(model, "_compiled_decode_step", None)
    if step is None:
        compiled = torch.compile(_decode_one_token, dynamic=None)

        def step(*args):
            with typecheck_disabled():  # with TYPECHECK=1 the transformer's checks cannot be traced
                return compiled(*args)

        object.__setattr__(model, "_compiled_decode_step", step)  # a function, not a submodule or a state-dict entry
    return step
