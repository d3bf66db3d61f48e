"""`Transfusion`: the network. Embed → transformer → text logits / velocities.

One transformer reads one interleaved sequence of text tokens and continuous modality
tokens (Transfusion, arXiv 2408.11039). This module holds the network and thin public
methods; the rest lives beside it:

    inputs.py    validation of everything a user passes
    layout.py    samples → rows of token ids, positions, instance indices (and packing)
    masks.py     the attention rule, as flex BlockMask or dense SDPA mask
    flow.py      the loss of every batch with modalities, the ODE solve, guidance
    sampling.py  text decoding, the text ↔ modality state machine, the KV cache
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange
from ema_pytorch import EMA
from torch import Tensor, nn
from torch.nn import Module, ModuleList

from . import sampling
from ._typing import Float, typecheck
from .attention import AttentionMask, KVCache, KVCacheRows
from .checkpoint import load_model
from .flow import VELOCITY_CONSISTENCY_DELTA, LossBreakdown, data_to_velocity, default_times_fn, transfusion_loss
from .helpers import default, eval_mode, exists
from .inputs import batch_kind, check_choice, check_float, check_modality_type, check_text, instance_times, modality_only_items, modality_settings, prepare
from .layout import Layout, SpecialIds, build_layout, default_to_modality_shape_fn, pack_rows, row_lengths, text_labels, wrap_rows
from .masks import layout_mask
from .modality import ModalityHeads, ModalitySpec, map_grouped, to_channel_first
from .sample_many import sample_many
from .transformer import Transformer

__all__ = ["Transfusion", "LossBreakdown"]


class Transfusion(Module):
    """One transformer for text (next token) and continuous modalities (flow matching).

    The keyword arguments and defaults of transfusion-pytorch 0.12 are kept; every
    per-modality argument takes one value for all modalities or a tuple with one value
    per modality (`dim_latent=(384, 192)` declares two modalities). See SPEC.md.
    `unconditional_prob` (new) is the conditioning dropout for classifier-free guidance.
    """

    def __init__(
        self,
        *,
        num_text_tokens: int,
        transformer: dict | Transformer,
        dim_latent: int | tuple[int, ...] | None = None,
        channel_first_latent: bool | tuple[bool, ...] = False,
        add_pos_emb: bool | tuple[bool, ...] = False,
        modality_encoder: Module | tuple[Module | None, ...] | None = None,
        modality_decoder: Module | tuple[Module | None, ...] | None = None,
        pre_post_transformer_enc_dec: tuple | None = None,
        modality_default_shape: tuple | None = None,
        fallback_to_default_shape_if_invalid: bool = False,
        modality_num_dim: int | tuple[int | None, ...] | None = None,
        to_modality_shape_fn: Callable | tuple[Callable, ...] = default_to_modality_shape_fn,
        ignore_index: int = -1,
        flow_loss_weight: float = 1.0,
        text_loss_weight: float = 1.0,
        velocity_consistency_loss_weight: float = 0.1,
        reconstruction_loss_weight: float = 0.0,
        modality_encoder_decoder_requires_batch_dim: bool = True,
        odeint_kwargs: dict | None = None,
        unconditional_prob: float = 0.0,
        flow_prediction: str = "velocity",
    ):
        # the constructor's arguments, for checkpoints (`checkpoint.py`)
        config = {name: value for name, value in locals().items() if name not in ("self", "__class__")}
        super().__init__()
        self.config = config

        if not isinstance(num_text_tokens, int) or isinstance(num_text_tokens, bool) or num_text_tokens < 0:
            raise ValueError(f"`num_text_tokens` must be an int >= 0, got {num_text_tokens!r}")
        if isinstance(transformer, dict):
            transformer = Transformer(**transformer)
        if not isinstance(transformer, Transformer):
            raise TypeError(f"`transformer` must be a dict of Transformer keywords or a Transformer, got {type(transformer).__name__}")

        self.transformer = transformer
        dim = self.dim = transformer.dim

        settings = modality_settings(
            partial(SpecialIds, num_text_tokens),
            dim,
            dim_latent,
            channel_first_latent,
            add_pos_emb,
            modality_encoder,
            modality_decoder,
            pre_post_transformer_enc_dec,
            modality_default_shape,
            modality_num_dim,
            to_modality_shape_fn,
        )
        self.modality_heads = ModuleList([ModalityHeads(spec, dim=dim, **heads) for spec, heads in settings])
        num_modalities = self.num_modalities = len(settings)
        self.dim_latents = tuple(spec.dim_latent for spec, _ in settings)
        self.ids = SpecialIds(num_text_tokens, num_modalities)
        self.num_text_tokens = num_text_tokens
        self.fallback_to_default_shape_if_invalid = fallback_to_default_shape_if_invalid
        self.modality_encoder_decoder_requires_batch_dim = modality_encoder_decoder_requires_batch_dim

        # text embedding and unembedding over the whole vocabulary (text + special + shape chars)

        vocab_size = self.ids.vocab_size
        self.text_embed = nn.Embedding(vocab_size, dim)
        self.to_text_logits = nn.Linear(dim, vocab_size, bias=False)
        self.register_buffer("text_only_logits_mask", torch.arange(vocab_size) < num_text_tokens, persistent=False)

        # classifier-free guidance: with probability `unconditional_prob` a modality instance
        # loses its conditioning in training (see `masks.classifier_free`); it then starts
        # with this learned null token instead of seeing what came before it

        self.unconditional_prob = check_float("unconditional_prob", unconditional_prob, 0.0, 1.0)
        self.null_embed = nn.Parameter(torch.randn(dim) * 0.02)

        self.ignore_index = ignore_index
        self.flow_loss_weight = check_float("flow_loss_weight", flow_loss_weight, 0.0)
        self.text_loss_weight = check_float("text_loss_weight", text_loss_weight, 0.0)
        self.velocity_consistency_loss_weight = check_float("velocity_consistency_loss_weight", velocity_consistency_loss_weight, 0.0)
        self.reconstruction_loss_weight = check_float("reconstruction_loss_weight", reconstruction_loss_weight, 0.0)

        # the heads output the velocity (as 0.12) or the clean data, which `flow.data_to_velocity`
        # turns into one (arXiv 2511.13720): the loss and the samplers see velocities either way
        self.flow_prediction = check_choice("flow_prediction", flow_prediction, ("velocity", "data"))

        # 'auto': flex attention on CUDA when the transformer has use_flex_attn, SDPA elsewhere;
        # 'flex' forces flex (on CPU: forward only, torch 2.13 has no CPU backward); 'sdpa' forces SDPA
        self.attention_backend = "auto"

        self.odeint_kwargs = dict(default(odeint_kwargs, dict(atol=1e-5, rtol=1e-5, method="midpoint")))

    # public ids (0.12 names)
    sos_id = property(lambda self: self.ids.sos)
    eos_id = property(lambda self: self.ids.eos)
    meta_id = property(lambda self: self.ids.meta)
    som_ids = property(lambda self: list(self.ids.som))
    eom_ids = property(lambda self: list(self.ids.eom))

    @property
    def device(self) -> torch.device:
        return self.text_embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype: latents given in another float dtype (numpy's float64, say) are cast to it."""
        return self.text_embed.weight.dtype

    def spec(self, modality_type: int) -> ModalitySpec:
        return self.modality_heads[modality_type].spec

    def parameters_without_encoder_decoder(self) -> list[nn.Parameter]:
        """The trainable parameters, without the (frozen) modality encoders and decoders, in the
        order of `parameters()`: the same in every process, so an optimizer state resumes onto
        the right tensors."""
        frozen = set()
        for heads in self.modality_heads:
            for module in (heads.encoder, heads.decoder):
                if exists(module):
                    frozen |= {id(p) for p in module.parameters()}
        return [p for p in self.parameters() if id(p) not in frozen]

    @classmethod
    def from_checkpoint(cls, path, **overrides) -> Transfusion:
        """Rebuild a model (encoders / decoders of this package included) from a checkpoint written
        by `training.save_checkpoint`, with its weights, ready to sample. Arguments the checkpoint
        cannot rebuild (your own encoder class, a custom shape parser) are passed as `overrides`."""
        return load_model(path, cls, **overrides)

    def create_ema(self, beta: float = 0.99, **ema_kwargs) -> EMA:
        """An `ema_pytorch.EMA` copy whose `sample` / `generate_*` run the EMA weights."""
        return EMA(self, beta=beta, forward_method_names=("sample", "sample_many", "generate_text_only", "generate_modality_only"), **ema_kwargs)

    # ------------------------------------------------------------------ encoders and decoders

    def encode(self, raw: list[Tensor], modality_type: int) -> list[Tensor]:
        """Run the modality's (frozen) encoder, batched per group of equal shapes."""
        encoder = self.modality_heads[modality_type].encoder
        if not exists(encoder) or len(raw) == 0:
            return raw
        encoder.eval()
        with torch.no_grad():
            return [t.detach() for t in map_grouped(encoder, raw, self.modality_encoder_decoder_requires_batch_dim)]

    def decode(self, latents: list[Tensor], modality_type: int) -> list[Tensor]:
        """Channel-last latents → the modality's declared layout, through its decoder if it has one."""
        heads = self.modality_heads[modality_type]
        latents = [to_channel_first(x, heads.spec.channel_first) for x in latents]
        if not exists(heads.decoder) or len(latents) == 0:
            return latents
        heads.decoder.eval()
        with torch.no_grad():
            return map_grouped(heads.decoder, latents, self.modality_encoder_decoder_requires_batch_dim)

    # ------------------------------------------------------------------ the network

    def interleaved_rows(self, prepared, add_sos_eos: bool = True) -> list[list]:
        """The rows of segments of an interleaved batch, each instance in `[meta] shape [som] … [eom]`."""
        shapes = [(k, tuple(x.shape[:-1])) for k, x in zip(prepared.types, prepared.latents)]
        return wrap_rows(prepared.rows, shapes, self.ids, add_sos_eos, device=self.device)

    @torch.no_grad()
    @eval_mode  # counting must not move BatchNorm statistics of U-Net blocks
    def token_lengths(self, batch: list, modality_type: int | None = None) -> list[int]:
        """Tokens each sample of an interleaved batch takes in a training row: `[sos]`, text,
        `[meta] shape [som]`, modality tokens, `[eom]`, `[eos]`. These are the `lengths` that
        `BucketBatchSampler` and `PackedBatchSampler` want. Modality encoders (and U-Net down
        blocks) run, since they set the token count. Conditioning dropout adds one null token to
        each unconditional instance on top of this; packing plans rows without them, so a
        packed row may run that many tokens past `pack`.

        A modality-only batch (a list of tensors of one modality, with `modality_type=` when the
        model has several) counts each item's modality tokens: its rows carry nothing else."""
        modality_only = isinstance(batch, (list, tuple)) and len(batch) > 0 and all(torch.is_tensor(x) for x in batch)
        if modality_only:
            modality_type = check_modality_type(self.num_modalities, modality_type)
            batch = [[(modality_type, x)] for x in batch]
        prepared = prepare(self, batch, "batch")
        tokens, _ = self.instance_tokens(prepared.types, prepared.latents)
        if modality_only:
            return [t.shape[0] for t in tokens]
        return row_lengths(self.interleaved_rows(prepared), [t.shape[0] for t in tokens])

    def instance_tokens(self, types: list[int], latents: list[Tensor], unconditional: list[bool] | None = None) -> tuple[list[Tensor], list[tuple[int, ...]]]:
        """Model tokens `(L, d)` of every instance (an unconditional one led by the null token) and their spatial shapes."""
        tokens: list = [None] * len(latents)
        shapes: list = [None] * len(latents)
        for k in set(types):
            indices = [i for i, t in enumerate(types) if t == k]
            toks, token_shapes = self.modality_heads[k].to_model_tokens([latents[i].to(self.dtype) for i in indices])  # ODE states are fp32
            for i, tok, shape in zip(indices, toks, token_shapes):
                tokens[i], shapes[i] = tok, shape
        if unconditional is not None:
            tokens = [torch.cat((self.null_embed[None].to(t.dtype), t)) if u else t for t, u in zip(tokens, unconditional)]
        return tokens, shapes

    @staticmethod
    def with_unconditional_copy(rows: list[list], types: list[int], latents: list[Tensor], times: Tensor, instances: list[int]):
        """The batch for classifier-free guidance in one forward (as DiT doubles its batch): the rows
        as given, then a copy of them in which `instances` are unconditional (they see only their
        null token and themselves, as in training). Returns `rows, types, latents, times,
        unconditional` for `predict`; velocities `[:m]` are conditional, `[m:]` unconditional."""
        count = len(types)
        dropped = set(instances)
        copy = [[s + count if isinstance(s, int) else s for s in row] for row in rows]
        unconditional = [False] * count + [i in dropped for i in range(count)]
        return rows + copy, types * 2, latents * 2, torch.cat((times, times)), unconditional

    @typecheck
    def predict(
        self,
        rows: list[list],
        types: list[int],
        latents: list[Tensor],
        times: Float["m"],
        layout: Layout | None = None,
        cache: KVCache | KVCacheRows | None = None,
        unconditional: list[bool] | None = None,
        pack_length: int | None = None,
        position_offset: int | Tensor = 0,
        prefix_valid: Tensor | None = None,
    ) -> tuple[Float["b n d"], Layout, list[Tensor]]:
        """Run the network on rows of segments with noised latents at `times` (one per instance).

        layout: reuse the layout (and its masks) of an earlier call on rows of the same shape
        cache: the new tokens follow the cached ones (written into the cache, not committed);
            their positions start at `position_offset` (an int, or `(b, 1)` per row)
        prefix_valid: `(b, cache length)`, the cached slots each row holds (batched prompts)
        unconditional: instances that see only themselves and the null token (CFG)
        pack_length: pack the rows into rows of this many tokens (sequence packing)
        Returns the final hidden states `(b, n, d)`, the layout, and the predicted velocity
        of every instance (channel-last, the instance's latent shape).
        """
        tokens, token_shapes = self.instance_tokens(types, latents, unconditional)
        if layout is None:
            lengths = [t.shape[0] for t in tokens]
            if pack_length is not None:  # planned without the null tokens, so a batch packs the same way whatever the draw
                planned = lengths if unconditional is None else [n - int(u) for n, u in zip(lengths, unconditional)]
                rows = pack_rows(rows, planned, pack_length)
            layout = build_layout(rows, lengths, device=self.device)

        x = self.text_embed(layout.token_ids.clamp(min=0))
        if layout.has_modalities:
            flat = rearrange(x, "b n d -> (b n) d").index_put((layout.instance_index,), torch.cat(tokens).to(x.dtype))
            x = rearrange(flat, "(b n) d -> b n d", b=layout.batch)

        prefix = cache.length if exists(cache) else 0
        embed = self.transformer(
            x,
            layout.positions + position_offset,
            self.attention_mask(layout, unconditional, prefix, prefix_valid),
            token_instance=layout.token_instance if layout.has_modalities else None,
            instance_times=times.float() if layout.has_modalities else None,
            cache=cache,
        )

        velocities: list = [None] * len(types)
        if layout.has_modalities:
            outputs = rearrange(embed, "b n d -> (b n) d")[layout.instance_index]
            per_instance = outputs.split([t.shape[0] for t in tokens])
            if unconditional is not None:  # drop the null token's output
                per_instance = [p[1:] if u else p for p, u in zip(per_instance, unconditional)]
            for k in set(types):
                indices = [i for i, t in enumerate(types) if t == k]
                predicted = self.modality_heads[k].to_latents(torch.cat([per_instance[i] for i in indices]), [token_shapes[i] for i in indices])
                for i, v in zip(indices, predicted):
                    velocities[i] = data_to_velocity(v, latents[i], times[i]) if self.flow_prediction == "data" else v

        return embed, layout, velocities

    def attention_mask(self, layout: Layout, unconditional: list[bool] | None = None, prefix: int = 0, prefix_valid: Tensor | None = None) -> AttentionMask:
        """The Transfusion mask of a layout (`masks.transfusion_mask`), after `prefix` cached tokens
        that every conditional query sees (those of `prefix_valid`, per row, when given); built once
        per layout and kept with it (a layout is reused only over one ODE solve, with one `prefix_valid`)."""
        backend = self.attention_backend
        if backend not in ("auto", "flex", "sdpa"):
            raise ValueError(f"`attention_backend` must be 'auto', 'flex' or 'sdpa', got {backend!r}")
        # flex has no dropout: a training step with attention dropout goes through SDPA
        dropout = self.training and self.transformer.config.get("dropout", 0.0) > 0
        use_flex = not dropout and (backend == "flex" or (backend == "auto" and self.transformer.use_flex_attn and self.device.type == "cuda"))
        key = (None if unconditional is None else tuple(unconditional), prefix, use_flex, id(prefix_valid))
        if key not in layout.masks:
            layout.masks[key] = layout_mask(layout, unconditional, prefix, use_flex, prefix_valid)
        return layout.masks[key]

    @typecheck
    def text_loss(self, embed: Float["b n d"], layout: Layout, text_vocab_only: bool = False) -> tuple[Tensor, Tensor]:
        """Next-token cross entropy where this and the next token are text; and how many tokens had a label."""
        labels = text_labels(layout, self.ignore_index)
        keep = labels != self.ignore_index
        if not keep.any():
            return embed.sum() * 0.0, keep.sum()
        logits = self.to_text_logits(embed[keep])
        if text_vocab_only:  # text-only pretraining predicts only text ids (0.12)
            logits = logits.masked_fill(~self.text_only_logits_mask, torch.finfo(logits.dtype).min)
        return F.cross_entropy(logits.float(), labels[keep]), keep.sum()

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        modalities: list | Tensor,
        times: Tensor | None = None,
        num_modalities_to_times_fn: Callable[[Tensor], Tensor] | None = None,
        modality_type: int | None = None,
        velocity_consistency_ema_model: Transfusion | EMA | None = None,
        velocity_consistency_delta_time: float = VELOCITY_CONSISTENCY_DELTA,
        return_loss: bool = True,
        return_breakdown: bool = False,
        pack: bool | int = False,
    ):
        """
        modalities: an interleaved batch (list of samples), text `LongTensor (b, n)`, or one
            modality `FloatTensor (b, *shape, d)` (or a list of such tensors of different
            shapes) with `modality_type=`.
        times: `(b, m)` flow time of each sample's modalities in order (modality-only: `(b,)`)
        velocity_consistency_delta_time: δ of the velocity-consistency loss, for every batch kind
        pack: sequence packing of an interleaved batch for the loss: several samples share a row
            (no attention across them, positions restart); `True` packs into rows as long as the
            longest sample, an int sets the row length (a row may run past it by CFG's null tokens)
        Returns the scalar loss, `(loss, LossBreakdown)` with `return_breakdown=True`, or the
        text logits `(b, n, l)` with `return_loss=False` (modality-only: the velocities).
        """
        kind, delta_time = batch_kind(
            self.num_modalities, modalities, modality_type, pack, return_loss, return_breakdown, velocity_consistency_delta_time, num_modalities_to_times_fn
        )
        ema_model = velocity_consistency_ema_model.ema_model if isinstance(velocity_consistency_ema_model, EMA) else velocity_consistency_ema_model
        if exists(ema_model) and not isinstance(ema_model, Transfusion):
            raise TypeError(f"`velocity_consistency_ema_model` must be a Transfusion or its EMA, got {type(ema_model).__name__}")
        if kind == "text":  # `times`, `num_modalities_to_times_fn` and the EMA have nothing to act on here; 0.12 ignored them too
            return self.forward_text(modalities, return_loss=return_loss, return_breakdown=return_breakdown)

        modality_only = kind == "modality"
        if modality_only:
            modality_type = check_modality_type(self.num_modalities, modality_type)
            items = modality_only_items(modalities)
            prepared = prepare(self, [[(modality_type, x)] for x in items], "modalities", encode=return_loss)
            rows = [[i] for i in range(len(items))]  # one bare instance per row
        else:
            prepared = prepare(self, modalities)
            rows = self.interleaved_rows(prepared, add_sos_eos=return_loss)

        if not return_loss and modality_only:  # the velocities of (already encoded) noised latents at `times`
            t = instance_times(prepared, times, num_modalities_to_times_fn or default_times_fn, self.device)
            _, _, velocities = self.predict(rows, prepared.types, prepared.latents, t)
            velocities = [to_channel_first(v, self.spec(modality_type).channel_first) for v in velocities]
            return torch.stack(velocities) if len({v.shape for v in velocities}) == 1 else velocities
        if not return_loss:  # text logits, every modality clean (t = 1)
            t = instance_times(prepared, times, lambda counts: torch.ones(len(counts), int(counts.max()), device=counts.device), self.device)
            embed, _, _ = self.predict(rows, prepared.types, prepared.latents, t)
            return self.to_text_logits(embed)

        t = instance_times(prepared, times, num_modalities_to_times_fn or default_times_fn, self.device)
        pack_length = None if pack is False else (0 if pack is True else int(pack))  # 0: as long as the longest sample
        loss, breakdown = transfusion_loss(self, prepared, rows, t, ema_model, delta_time, pack_length)
        return (loss, breakdown) if return_breakdown else loss

    def forward_text(self, text: Tensor, return_loss: bool = True, return_breakdown: bool = False):
        """Language modelling on text alone (no sos / eos added, and text ids only, as in 0.12)."""
        if text.ndim != 2 or text.shape[0] == 0 or (return_loss and text.shape[1] < 2):
            raise ValueError(
                f"`modalities` text batch must have shape (batch, seq) with batch >= 1 (and seq >= 2 for a next-token loss), got {tuple(text.shape)}"
            )
        limit = self.num_text_tokens if return_loss else self.ids.vocab_size
        text = check_text(text, "modalities", limit, ignore_index=self.ignore_index).to(self.device)
        embed, layout, _ = self.predict([[row] for row in text], [], [], torch.zeros(0, device=self.device))
        if not return_loss:
            return self.to_text_logits(embed)
        loss, _ = self.text_loss(embed, layout, text_vocab_only=True)
        if not return_breakdown:
            return loss
        return loss, LossBreakdown(loss, loss, [loss.new_zeros(()) for _ in range(self.num_modalities)])

    # ------------------------------------------------------------------ sampling (see sampling.py)

    @torch.no_grad()
    @eval_mode
    def sample(
        self,
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
        force_modality_at_start: int | tuple | None = None,
        compile: bool = False,
    ) -> list:
        """Continue `prompt` (text, a modality, `(type, tensor)` or an interleaved list) into one
        interleaved sample: text tensors and `(modality_type, tensor)` tuples. `force_modality_at_start`
        (`k` or `(k, shape)`) starts with modality `k` instead of decoding text first. `compile=True`
        runs the one-token decode step and the ODE step under `torch.compile` (`decoding.py`, `ode_step.py`)."""
        arguments = {name: value for name, value in locals().items() if name not in ("self", "prompt", "cache_kv", "compile", "__class__")}
        return sampling.sample_interleaved(self, prompt, cache_kv, compile, **arguments)

    @torch.no_grad()
    @eval_mode
    def sample_many(
        self,
        prompts: list,
        max_length: int = 2048,
        text_temperature: float = 1.5,
        text_min_p: float = 0.1,
        fixed_modality_shape: tuple[int, ...] | None = None,
        force_modality_at_start: int | tuple | None = None,
        init_modality_noise: Tensor | list | None = None,
        modality_steps: int = 16,
        return_unprocessed_modalities: bool = False,
        cfg_scale: float = 1.0,
        compile: bool = False,
    ) -> list[list]:
        """One interleaved sample per prompt (each as `sample` takes it), decoded together: one
        KV-cached forward per text step for every sample writing text, one batched ODE solve for
        every sample inside a modality (see `sample_many.py`)."""
        arguments = {name: value for name, value in locals().items() if name not in ("self", "prompts", "__class__")}
        return sample_many(self, prompts, **arguments)

    @torch.no_grad()
    @eval_mode
    def generate_text_only(self, prompt: Tensor, seq_len: int, temperature: float = 1.5, min_p: float = 0.1, compile: bool = False) -> Tensor:
        """Continue a text batch `(b, n)` to `seq_len` tokens with a KV cache (`compile=True`: `decoding.py` compiled); the new tokens `(b, seq_len - n)`."""
        return sampling.generate_text(self, prompt, seq_len, temperature=temperature, min_p=min_p, compile=compile)

    @torch.no_grad()
    @eval_mode
    def generate_modality_only(
        self,
        batch_size: int = 1,
        modality_type: int | None = None,
        fixed_modality_shape: tuple[int, ...] | list[tuple[int, ...]] | None = None,
        modality_steps: int = 16,
        return_unprocessed_modalities: bool = False,
        cfg_scale: float = 1.0,
    ) -> Tensor | list[Tensor]:
        """A batch of one modality from noise, `(batch_size, *shape, d)` (decoded if the modality has a
        decoder); with a list of shapes, one per item, a list of tensors of those shapes.
        Unconditional: `cfg_scale` other than 1 is refused (there is nothing to guide towards;
        prompt `sample` with text to guide)."""
        return sampling.generate_modality(
            self,
            batch_size=batch_size,
            modality_type=modality_type,
            fixed_modality_shape=fixed_modality_shape,
            modality_steps=modality_steps,
            return_unprocessed_modalities=return_unprocessed_modalities,
            cfg_scale=cfg_scale,
        )
