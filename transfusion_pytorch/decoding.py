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
`sample_many(..., compile=True)` and `generate_text_only(..., compile=True)` use it (the
first two compile their ODE step the same way: `ode_step.py`).

At batch 1 a token's arithmetic is a few matrix-vector products, so the step is all
overhead unless it is lean. For the plain transformer (no hooks, hyper-connections, LASER or
soft-capping) it therefore runs `text_decode_step`: the same computation written out on
plain tensors (`TextWeights`, a snapshot of the weights it reads, with the CPU matrices
stored transposed: `x @ w` on a `(in, out)` matrix ran 1.3-1.6x faster than `F.linear` on one
row here), no module calls, and under `torch.compile` attention as two fused reductions.
Other transformers take `decode_one_token`, the step through `Transformer.forward`.
`generate_text_only(..., compile=True)` goes one step further (`sample_text_step`): the
next token is drawn inside the compiled call, from noise drawn outside it exactly as
`torch.multinomial` draws it, so a fixed seed gives the same tokens compiled or eager, and a
long run decodes `STEPS_PER_CALL` tokens per compiled call (`sample_text_steps`). Measurements
and the profile behind these choices: `benchmarks/results.md`, issue-16 section.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from ._typing import Bool, Float, Int, typecheck, typecheck_disabled
from .attention import AttentionMask, KVCache, Rotation, SlotCache, rotate
from .helpers import autocast_dtype

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


def min_p_filter(logits: Tensor, min_p: float = 0.1) -> Tensor:
    """Min-p sampling (Nguyen et al. 2024, arXiv 2407.01082): drop tokens whose probability is
    below `min_p` times the most likely token's."""
    probs = logits.softmax(dim=-1)
    limit = min_p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < limit, float("-inf"))


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


# the lean step on a snapshot of the weights


class TextWeights:
    """The weights a text token reads, as plain tensors: per block the text rows of the two
    adaptive norms (`1 + gain`, `1 + layerscale`), attention's qkv and gate projections (one
    matrix), its output projection, the feed-forward's and the U-Net skip's; then the final
    RMSNorm and the text head. On the CPU each matrix is a transposed copy `(in, out)`, else a
    view. `of(model)` keeps one snapshot per model and takes a new one when a parameter
    changed (its version counter or storage), e.g. after an optimizer step or `load_state_dict`.
    """

    def __init__(self, model: Transfusion):
        transformer = model.transformer
        self.heads, self.dim_head = transformer.heads, transformer.dim_head
        self.sources = [p for p in model.parameters()]
        self.fingerprint = self.current(self.sources)
        copy = model.device.type == "cpu"

        def matrix(*linears) -> Tensor:  # (in, out) for `x @ w`
            weight = torch.cat([linear.weight for linear in linears]).detach() if len(linears) > 1 else linears[0].weight.detach()
            return weight.t().contiguous() if copy else weight.t()

        self.layers = []
        for block in transformer.blocks:
            attn, ff = block.attn, block.ff
            gated = attn.to_gates is not None
            self.layers.append(
                (
                    (1.0 + block.attn_norm.text_gain).detach(),
                    (1.0 + block.attn_norm.text_layerscale).detach(),
                    matrix(attn.to_qkv, attn.to_gates) if gated else matrix(attn.to_qkv),
                    matrix(attn.to_out),
                    (1.0 + block.ff_norm.text_gain).detach(),
                    (1.0 + block.ff_norm.text_layerscale).detach(),
                    matrix(ff.proj_in),
                    ff.proj_in.bias.detach(),
                    matrix(ff.proj_out),
                    ff.proj_out.bias.detach(),
                    matrix(block.skip_proj) if block.skip_proj is not None else None,
                )
            )
        self.gated = all(block.attn.to_gates is not None for block in transformer.blocks)
        self.num_skips = sum(block.skip_proj is not None for block in transformer.blocks)
        self.embed = model.text_embed.weight.detach()
        self.freqs = transformer.rotary.embed.freqs.detach()
        self.norm_scale, self.norm_gamma = transformer.norm.scale, transformer.norm.gamma.detach()
        self.head = matrix(model.to_text_logits)
        self.cast: dict[torch.dtype, tuple] = {}

    @staticmethod
    def current(sources: list[Tensor]) -> tuple:
        return tuple((p._version, p.data_ptr(), p.dtype, p.device) for p in sources)

    @staticmethod
    def supported(model: Transfusion) -> bool:
        """The plain transformer: one residual stream, softmax attention without LASER or
        soft-capping, and no forward hooks (the lean step calls no module, so a hook would be skipped)."""
        transformer = model.transformer
        if transformer.num_residual_streams != 1:
            return False
        hooks = torch.nn.modules.module
        if hooks._global_forward_hooks or hooks._global_forward_pre_hooks or any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
            return False
        return all(not block.attn.laser and block.attn.softcap_value <= 0 for block in transformer.blocks)

    @classmethod
    def of(cls, model: Transfusion) -> TextWeights:
        weights = getattr(model, "_decode_weights", None)
        if weights is None or [id(p) for p in weights.sources] != [id(p) for p in model.parameters()] or cls.current(weights.sources) != weights.fingerprint:
            weights = cls(model)
            object.__setattr__(model, "_decode_weights", weights)  # not a submodule or a state-dict entry
        return weights

    def tensors(self, matmul_dtype: torch.dtype | None = None) -> tuple:
        """Everything the step reads, for `text_decode_step` (a tuple of tensors and tuples).
        `matmul_dtype` (autocast's): the matrices cast to it, once per snapshot, where autocast
        would cast every one of them at every token (the norms' rows and biases stay as they are)."""
        if matmul_dtype is None or matmul_dtype == self.head.dtype:
            return (self.embed, self.freqs, tuple(self.layers), self.norm_gamma, self.head)
        if matmul_dtype not in self.cast:
            matrices = (2, 3, 6, 8, 10)  # qkv, out, proj_in, proj_out, skip: the right operands of `@` in the step
            layers = tuple(tuple(x.to(matmul_dtype) if i in matrices and x is not None else x for i, x in enumerate(layer)) for layer in self.layers)
            self.cast[matmul_dtype] = (self.embed, self.freqs, layers, self.norm_gamma, self.head.to(matmul_dtype))
        return self.cast[matmul_dtype]


def text_decode_step(
    weights: tuple,
    shape: tuple[int, int, float],
    keys: list[Tensor],
    values: list[Tensor],
    tokens: Tensor,
    positions: Tensor,
    slot: Tensor,
    visible: Tensor | None,
) -> Tensor:
    """`_decode_one_token` for the plain transformer on `TextWeights.tensors()`; `shape` is
    `(heads, dim_head, norm_scale)`, `visible (b, c)` the slots each row attends to (None:
    slots up to `slot`). Returns the next-token logits `(b, l)`."""
    embed, freqs, layers, norm_gamma, head = weights
    heads, dim_head, norm_scale = shape
    num_skips = sum(layer[-1] is not None for layer in layers)
    x = F.embedding(tokens, embed)  # (b, d)
    capacity = keys[0].shape[-2]
    if visible is None:
        visible = (torch.arange(capacity, device=tokens.device) <= slot)[None].expand(tokens.shape[0], capacity)

    with torch.autocast(x.device.type, enabled=False):  # the rotary angles in fp32, as `RotaryEmbedding`
        angles = (positions[:, None].to(freqs.dtype) * freqs).repeat_interleave(2, dim=-1)[:, None]  # (b, 1, dh)
    rotation = Rotation(angles.cos(), angles.sin())
    compiled = torch.compiler.is_compiling()

    skips = []
    for index, (attn_gain, attn_scale, qkv_w, out_w, ff_gain, ff_scale, in_w, in_b, proj_w, proj_b, skip_w) in enumerate(layers):
        if index < num_skips:
            skips.append(x)
        if skip_w is not None:
            x = x + torch.cat((x, skips.pop()), dim=-1) @ skip_w

        h = F.layer_norm(x, x.shape[-1:]) * attn_gain
        projected = h @ qkv_w
        inner = heads * dim_head
        q, k, v = projected[:, : 3 * inner].unflatten(-1, (3, heads, dim_head)).unbind(1)  # (b, h, dh) each
        q, k = rotate(rotation, q), rotate(rotation, k)
        cached_keys, cached_values = keys[index], values[index]
        cached_keys.index_copy_(-2, slot, k[:, :, None].to(cached_keys.dtype))
        cached_values.index_copy_(-2, slot, v[:, :, None].to(cached_values.dtype))
        if compiled:  # one query per row: two reductions over the cache that inductor fuses with the softmax
            scores = (q[:, :, None] * cached_keys).sum(-1) * dim_head**-0.5  # (b, h, c)
            scores = scores.masked_fill(~visible[:, None], float("-inf")).softmax(dim=-1)
            out = (scores[..., None] * cached_values).sum(-2).to(v.dtype)  # (b, h, dh)
        else:  # eager: one SDPA call
            out = F.scaled_dot_product_attention(q[:, :, None], cached_keys.to(q.dtype), cached_values.to(q.dtype), attn_mask=visible[:, None, None])[:, :, 0]
        if projected.shape[-1] > 3 * inner:  # per-head output gates
            out = out * projected[:, 3 * inner :, None].sigmoid()
        x = x + (out.flatten(1) @ out_w) * attn_scale

        h = F.layer_norm(x, x.shape[-1:]) * ff_gain
        h, gates = (h @ in_w + in_b).chunk(2, dim=-1)
        x = x + ((F.gelu(gates) * h) @ proj_w + proj_b) * ff_scale

    x = F.normalize(x, dim=-1) * norm_scale * (norm_gamma + 1.0)
    return x @ head


def sample_text_step(weights, shape, keys, values, tokens, positions, slot, allowed: Tensor, noise: Tensor | None, temperature: float, min_p: float) -> Tensor:
    """`text_decode_step` and the next token `(b,)` drawn from its logits as `sampling.sample_token`
    draws it (ids outside `allowed` masked; greedy when `noise` is None): min-p, then the
    softmax at `temperature`, then `torch.multinomial`'s own draw, `argmax(probs / noise)` with
    `noise ~ Exp(1)`, so the noise drawn outside with the same generator gives the same token."""
    logits = text_decode_step(weights, shape, keys, values, tokens, positions, slot, None)
    logits = logits.masked_fill(~allowed, float("-inf"))
    if noise is None:
        return logits.argmax(dim=-1)
    if min_p > 0:
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
    probs = (logits.float() / temperature).softmax(dim=-1)
    return (probs / noise).argmax(dim=-1)


# compiled text decoding runs this many tokens per call once at least `MANY_STEPS` are asked
# for: the per-call cost of a compiled function (its guards, its wrappers; ~0.4 ms here) is then
# paid once per 4 tokens (128 tokens at batch 1: ~15 % faster). One more graph to compile (~35 s
# the first time on this 2-core CPU, then from inductor's cache).
STEPS_PER_CALL = 4
MANY_STEPS = 32


def sample_text_steps(weights, shape, keys, values, token, positions, allowed, noises: tuple, temperature: float, min_p: float) -> Tensor:
    """`sample_text_step` `len(noises)` times in one graph, each token fed to the next at the next
    position and slot; the tokens `(k, b)`."""
    out = []
    for noise in noises:
        token = sample_text_step(weights, shape, keys, values, token, positions, positions[:1], allowed, noise, temperature, min_p)
        out.append(token)
        positions = positions + 1
    return torch.stack(out)


class TokenDecoder:
    """The decode step on a `KVCache`, eager or under `torch.compile` (`compile=True`).

    The compiled steps are kept on the model (one per model), so every call of every sampler
    reuses them; the first call compiles (seconds to a minute on a CPU), later ones do not.
    """

    def __init__(self, model: Transfusion, compile: bool = False):
        self.model = model
        self.compile = compile
        self.lean = TextWeights.supported(model)
        if self.lean:
            weights = TextWeights.of(model)
            self.weights, self.shape = (
                weights.tensors(autocast_dtype(model.device.type)),
                (weights.heads, weights.dim_head, float(model.transformer.norm.scale)),
            )
            self.step = compiled(model, "_compiled_text_step", text_decode_step, lean=True) if compile else text_decode_step
        else:
            self.step = compiled(model, "_compiled_decode_step", _decode_one_token, typechecked=True) if compile else decode_one_token

    def __call__(self, cache: KVCache, tokens: Tensor, positions: Tensor, holds: Tensor | None = None, rows: slice = slice(None)) -> Tensor:
        """Write `tokens (b,)` of cache rows `rows` at slot `cache.length`, commit that slot, and
        return their logits `(b, l)`. `holds (b, cache.length)`: the cached slots each row attends
        to (None: all of them); each token also sees itself."""
        length, batch = cache.length, tokens.shape[0]
        if length >= cache.capacity:
            cache.grow(length + 1)
        slot = torch.tensor([length], device=tokens.device)
        # one tensor per layer: a compiled step that wrote into a view of one stacked input would
        # copy the whole cache at every token (measured ~40x slower); per-layer inputs are written in place
        keys, values = list(cache.keys[:, rows].unbind(0)), list(cache.values[:, rows].unbind(0))
        visible = None
        if holds is not None or not self.lean:
            visible = torch.zeros(batch, cache.capacity, dtype=torch.bool, device=tokens.device)
            visible[:, :length] = True if holds is None else holds
            visible[:, length] = True
        if self.lean:
            logits = self.step(self.weights, self.shape, keys, values, tokens, positions, slot, visible)
        else:
            logits = self.step(self.model, keys, values, tokens, positions, slot, visible)
        cache.commit(1)
        return logits

    def continue_text(self, cache: KVCache, token: Tensor, position: int, count: int, allowed: Tensor, temperature: float, min_p: float) -> list[Tensor]:
        """`count` more tokens `(b,)` after `token` (at rotary position and cache slot `position`,
        every row alike, the cache holding all the slots needed), each drawn as `sample_token`
        draws it among the ids `allowed` marks. Compiled, a long run goes `STEPS_PER_CALL` tokens
        per call (`sample_text_steps`)."""
        sampler, out = self.sampler(), []
        several = compiled(self.model, "_compiled_sample_steps", sample_text_steps, lean=True) if sampler and self.compile and count >= MANY_STEPS else None
        keys, values = list(cache.keys.unbind(0)), list(cache.values.unbind(0))

        def noise() -> Tensor | None:  # `torch.multinomial`'s own noise, drawn here: a fixed seed gives the same tokens compiled or eager
            return None if temperature == 0 else torch.empty(token.shape[0], allowed.shape[0], device=token.device).exponential_()

        step = 0
        while step < count:
            positions = torch.full(token.shape, position + step, device=token.device)
            if several is not None and count - step >= STEPS_PER_CALL:
                noises = tuple(noise() for _ in range(STEPS_PER_CALL))  # in order, as one draw per token would take them
                tokens = several(self.weights, self.shape, keys, values, token, positions, allowed, noises, temperature, min_p)
                out.extend(tokens.unbind(0))
                token, step = tokens[-1], step + STEPS_PER_CALL
                cache.commit(STEPS_PER_CALL)
                continue
            if sampler is None:
                logits = self(cache, token, positions)
                token = sample_token(logits.masked_fill(~allowed, float("-inf")), temperature, min_p)[:, 0]
            else:
                token = sampler(self.weights, self.shape, keys, values, token, positions, positions[:1], allowed, noise(), temperature, min_p)
                cache.commit(1)
            out.append(token)
            step += 1
        return out

    def sampler(self):
        """`sample_text_step` (compiled if this decoder is), for the plain transformer; else None."""
        if not self.lean:
            return None
        return compiled(self.model, "_compiled_sample_step", sample_text_step, lean=True) if self.compile else sample_text_step


def compiled(model: torch.nn.Module, name: str, fn, typechecked: bool = False, lean: bool = False, dynamic: bool | None = None):
    """`torch.compile(fn, dynamic=dynamic)`, kept on `model` (a `Transfusion`, or the `Transformer` for
    its training steps) under `name` (a function, not a submodule or a state-dict entry).
    The lean steps on a CPU get inductor's C++ wrapper: the Python that calls the ~100 kernels
    of a step cost about as much as their arithmetic at batch 1."""
    step = getattr(model, name, None)
    if step is None:
        options = {"cpp_wrapper": True} if lean and model.device.type == "cpu" else None
        compiled_fn = torch.compile(fn, dynamic=dynamic, options=options)
        if typechecked:

            def step(*args):
                with typecheck_disabled():  # with TYPECHECK=1 the transformer's checks cannot be traced
                    return compiled_fn(*args)

        else:
            step = compiled_fn
        object.__setattr__(model, name, step)
    return step


def compiled_step(model: Transfusion):
    """The compiled step through `Transformer.forward` (`_decode_one_token`)."""
    return compiled(model, "_compiled_decode_step", _decode_one_token, typechecked=True)
