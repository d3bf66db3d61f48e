"""Shape annotations and the runtime type-check switch.

Shape letters used across the package (einops patterns and jaxtyping annotations):

    b  batch (rows of the packed sequence)
    n  sequence length (tokens in a row)
    m  modality instances (in a row, or in the whole batch)
    d  model width; `dl` a modality's latent width
    h  attention heads, `dh` head width
    i, j  query / key positions of an attention matrix
    l  text logits (the full vocabulary: text ids + special ids)
    t  flow-matching time in [0, 1]: 0 is pure noise, 1 is clean data

Set `TYPECHECK=1` in the environment to check every annotated function with
beartype at call time (jaxtyping checks the shapes); otherwise `typecheck` is
the identity and costs nothing.
"""

from __future__ import annotations

import contextlib
import os

import jaxtyping
from torch import Tensor


class _TorchTyping:
    def __init__(self, abstract_dtype):
        self.abstract_dtype = abstract_dtype

    def __getitem__(self, shapes: str):
        return self.abstract_dtype[Tensor, shapes]


Float = _TorchTyping(jaxtyping.Float)
Int = _TorchTyping(jaxtyping.Int)
Bool = _TorchTyping(jaxtyping.Bool)

TYPECHECK = os.environ.get("TYPECHECK", "").lower() in ("1", "true", "yes")

if TYPECHECK:
    from beartype import beartype

    typecheck = jaxtyping.jaxtyped(typechecker=beartype)
else:

    def typecheck(fn):
        return fn


@contextlib.contextmanager
def typecheck_disabled():
    """Switch the checks off for a while: `torch.compile` cannot trace beartype / jaxtyping's
    checks, so a compiled function runs (and is traced) without them. The eager path that it
    is tested against keeps them."""
    if not TYPECHECK:
        yield
        return
    previous = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", previous)
