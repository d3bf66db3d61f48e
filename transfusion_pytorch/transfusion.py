"""`Transfusion`: embed → transformer → text logits / velocities → losses.

One transformer reads one interleaved sequence of text tokens and continuous modality
tokens (Transfusion, arXiv 2408.11039), trained with next-token cross entropy on text
and rectified-flow regression on modalities (`flow.py`). Sampling lives in
`sampling.py`; this module keeps thin public methods that call it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from ema_pytorch import EMA
from torch import Tensor, nn
from torch.nn import Module, ModuleList

from ._typing import Int, typecheck
from .attention import AttentionMask, KVCache
from .data import pack_samples
from .flow import default_times_fn, noise_path, predicted_data, velocity_target
from .helpers import default, eval_mode, exists, per_modality
from .inputs import check_bool, check_float, check_int
from .layout import DOCUMENT_BREAK, Layout, SpecialIds, build_layout, default_to_modality_shape_fn, text_labels
from .masks import block_mask, dense_mask, transfusion_mask
from .modality import ModalityHeads, ModalitySpec, map_grouped, to_channel_first, to_channel_last
from .transformer import Transformer

# (modality_type, tensor), a text LongTensor, or an untyped float tensor (modality 0)
ModalitySample = list


class LossBreakdown(NamedTuple):
    total: Tensor
    text: Tensor
    flow: list[Tensor]  # one per modality type
    velocity: list[Tensor] | None = None  # one per modality type, with an EMA model
    recon: list[Tensor] | None = None  # one per modality type, with reconstruction_loss_weight > 0


class _Prepared(NamedTuple):
    """A validated batch: rows of segments (text id tensors / instance indices) and the instances."""

    rows: list[list[Tensor | int]]
    types: list[int]
    latents: list[Tensor]  # channel-last, encoded
    raw: list[Tensor]  # as given (before the encoder), for the reconstruction loss
    row_of: list[int]


def _is_int_tensor(t) -> bool:
    return torch.is_tensor(t) and not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def _is_float_tensor(t) -> bool:
    return torch.is_tensor(t) and t.is_floating_point()


def check_times(times: Tensor) -> Tensor:
    """Flow times lie in [0, 1] (0 is noise, 1 is data); NaN is refused too."""
    if not bool(((times >= 0) & (times <= 1)).all()):
        raise ValueError("`times` must lie in [0, 1] (0 is noise, 1 is data), without NaN")
    return times


def _is_shape(value) -> bool:
    return isinstance(value, tuple) and all(isinstance(s, int) and not isinstance(s, bool) for s in value)


class Transfusion(Module):
    """One transformer for text (next token) and continuous modalities (flow matching).

    The keyword arguments and defaults of transfusion-pytorch 0.12 are kept; every
    per-modality argument takes one value for all modalities or a tuple with one value
    per modality (`dim_latent=(384, 192)` declares two modalities). See SPEC.md.
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
    ):
        # the constructor's arguments, for checkpoints (`training.py`)
        config = {name: value for name, value in locals().items() if name not in ("self", "__class__")}
        super().__init__()
        self.config = config

        if not isinstance(num_text_tokens, int) or isinstance(num_text_tokens, bool) or num_text_tokens < 0:
            raise ValueError(f"`num_text_tokens` must be an int >= 0, got {num_text_tokens!r}")

        unconditional_prob = check_float("unconditional_prob", unconditional_prob, 0.0, 1.0)

        if isinstance(transformer, dict):
            transformer = Transformer(**transformer)
        if not isinstance(transformer, Transformer):
            raise TypeError(f"`transformer` must be a dict of Transformer keywords or a Transformer, got {type(transformer).__name__}")

        self.transformer = transformer
        dim = self.dim = transformer.dim

        # modalities

        dim_latents = default(dim_latent, dim)
        dim_latents = dim_latents if isinstance(dim_latents, tuple) else (dim_latents,)
        if len(dim_latents) == 0 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dim_latents):
            raise ValueError(f"`dim_latent` must be a positive int or a tuple of positive ints, got {dim_latent!r}")

        self.dim_latents = dim_latents
        num_modalities = self.num_modalities = len(dim_latents)

        if modality_default_shape is None or _is_shape(modality_default_shape):
            default_shapes = (modality_default_shape,) * num_modalities
        else:
            default_shapes = per_modality(modality_default_shape, num_modalities, "modality_default_shape")
        for shape in default_shapes:
            if shape is not None and (not _is_shape(shape) or any(s <= 0 for s in shape)):
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

        if pre_post_transformer_enc_dec is None or (
            len(pre_post_transformer_enc_dec) == 2 and all(isinstance(m, Module) for m in pre_post_transformer_enc_dec)
        ):
            pre_posts = (pre_post_transformer_enc_dec,) * num_modalities
        else:
            pre_posts = per_modality(pre_post_transformer_enc_dec, num_modalities, "pre_post_transformer_enc_dec")

        self.ids = SpecialIds(num_text_tokens, num_modalities)
        self.num_text_tokens = num_text_tokens
        self.fallback_to_default_shape_if_invalid = fallback_to_default_shape_if_invalid
        self.modality_encoder_decoder_requires_batch_dim = modality_encoder_decoder_requires_batch_dim

        self.modality_heads = ModuleList(
            [
                ModalityHeads(
                    ModalitySpec(
                        modality_type=k,
                        dim_latent=dim_latents[k],
                        channel_first=channel_firsts[k],
                        num_dim=num_dims[k],
                        default_shape=default_shapes[k],
                        to_shape_fn=shape_fns[k],
                        som_id=self.ids.som[k],
                        eom_id=self.ids.eom[k],
                    ),
                    dim=dim,
                    add_pos_emb=add_pos_embs[k],
                    encoder=encoders[k],
                    decoder=decoders[k],
                    pre_post=pre_posts[k],
                )
                for k in range(num_modalities)
            ]
        )

        # text embedding and unembedding over the whole vocabulary (text + special + shape chars)

        vocab_size = self.ids.vocab_size
        self.text_embed = nn.Embedding(vocab_size, dim)
        self.to_text_logits = nn.Linear(dim, vocab_size, bias=False)
        self.register_buffer("text_only_logits_mask", torch.arange(vocab_size) < num_text_tokens, persistent=False)

        # classifier-free guidance: with probability `unconditional_prob` a modality instance
        # loses its conditioning in training (see `masks.classifier_free`); it then starts
        # with this learned null token instead of seeing what came before it

        self.unconditional_prob = unconditional_prob
        self.null_embed = nn.Parameter(torch.randn(dim) * 0.02)

        # losses

        self.ignore_index = ignore_index
        self.flow_loss_weight = flow_loss_weight
        self.text_loss_weight = text_loss_weight
        self.velocity_consistency_loss_weight = velocity_consistency_loss_weight
        self.reconstruction_loss_weight = reconstruction_loss_weight
        # 'auto': flex attention on CUDA when the transformer has use_flex_attn, SDPA elsewhere;
        # 'flex' forces flex (on CPU: forward only, torch 2.13 has no CPU backward); 'sdpa' forces SDPA
        self.attention_backend = "auto"

        self.odeint_kwargs = dict(default(odeint_kwargs, dict(atol=1e-5, rtol=1e-5, method="midpoint")))

    # public ids (0.12 names)

    @property
    def sos_id(self) -> int:
        return self.ids.sos

    @property
    def eos_id(self) -> int:
        return self.ids.eos

    @property
    def meta_id(self) -> int:
        return self.ids.meta

    @property
    def som_ids(self) -> list[int]:
        return list(self.ids.som)

    @property
    def eom_ids(self) -> list[int]:
        return list(self.ids.eom)

    @property
    def device(self) -> torch.device:
        return self.text_embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype: latents given in another float dtype (numpy's float64, say) are cast to it."""
        return self.text_embed.weight.dtype

    def spec(self, modality_type: int) -> ModalitySpec:
        return self.modality_heads[modality_type].spec

    def parameters_without_encoder_decoder(self) -> set:
        frozen = set()
        for heads in self.modality_heads:
            for module in (heads.encoder, heads.decoder):
                if exists(module):
                    frozen |= set(module.parameters())
        return set(self.parameters()) - frozen

    @classmethod
    def from_checkpoint(cls, path, **overrides) -> Transfusion:
        """Rebuild a model (encoders / decoders of this package included) from a checkpoint written
        by `training.save_checkpoint`, with its weights, ready to sample. Arguments the checkpoint
        cannot rebuild (your own encoder class, a custom shape parser) are passed as `overrides`."""
        import inspect
        import json

        from .training import model_from_config, read_checkpoint

        payload = read_checkpoint(path)
        if payload["config"] is None:
            raise ValueError(f"checkpoint `path` {str(path)!r} holds no model config")
        config = json.loads(payload["config"])
        unknown = sorted(set(overrides) - set(inspect.signature(cls.__init__).parameters) - set(config))
        if unknown:
            raise ValueError(f"`overrides` {unknown} are not arguments of {cls.__name__}")
        model = model_from_config(config, cls, **overrides)
        try:
            model.load_state_dict(payload["model"])
        except RuntimeError as error:
            raise ValueError(
                f"the weights in checkpoint `path` {str(path)!r} do not fit the model built with `overrides` {sorted(overrides)}: {error}"
            ) from error
        return model

    def create_ema(self, beta: float = 0.99, **ema_kwargs) -> EMA:
        """An `ema_pytorch.EMA` copy whose `sample` / `generate_*` run the EMA weights."""
        return EMA(
            self,
            beta=beta,
            forward_method_names=("sample", "generate_text_only", "generate_modality_only"),
            **ema_kwargs,
        )

    # ------------------------------------------------------------------ validation

    def check_modality_type(self, modality_type, name: str = "modality_type") -> int:
        if modality_type is None:
            if self.num_modalities > 1:
                raise ValueError(f"`{name}` must be given when the model has {self.num_modalities} modalities")
            return 0
        modality_type = check_int(name, modality_type)
        if not 0 <= modality_type < self.num_modalities:
            raise ValueError(f"`{name}` must be in [0, {self.num_modalities}), got {modality_type}")
        return modality_type

    def check_cfg_scale(self, cfg_scale) -> float:
        cfg_scale = check_float("cfg_scale", cfg_scale)
        if cfg_scale != 1 and self.unconditional_prob <= 0:
            raise ValueError(
                f"`cfg_scale`={cfg_scale} needs a model trained with conditioning dropout (`unconditional_prob` > 0); this one has unconditional_prob=0"
            )
        return float(cfg_scale)

    def check_text(self, ids: Tensor, name: str, limit: int | None = None, allow_ignore: bool = False) -> Tensor:
        limit = default(limit, self.ids.vocab_size)
        if not _is_int_tensor(ids):
            kind = f"{ids.dtype} tensor" if torch.is_tensor(ids) else type(ids).__name__
            raise TypeError(f"`{name}` must be an integer (long) tensor of text ids, got a {kind}")
        valid = (ids >= 0) & (ids < limit)
        if allow_ignore:
            valid |= ids == self.ignore_index
        if not bool(valid.all()):
            bad = ids[~valid][0].item()
            raise ValueError(f"`{name}` has text id {bad} out of range: ids must be in [0, {limit})")
        return ids.long()

    def to_latent(self, tensor: Tensor, modality_type: int, name: str) -> Tensor:
        """Validate an encoded modality tensor and move it to channel-last."""
        spec = self.spec(modality_type)
        if not _is_float_tensor(tensor):
            raise TypeError(f"`{name}` must be a float tensor, got {tensor.dtype}")
        channel_axis = 0 if spec.channel_first else -1
        if tensor.ndim == 0 or tensor.shape[channel_axis] != spec.dim_latent:
            order = "first" if spec.channel_first else "last"
            raise ValueError(
                f"`{name}` of modality {modality_type} has shape {tuple(tensor.shape)}: expected {spec.dim_latent} "
                f"channels on the {order} axis (dim_latent={spec.dim_latent}, channel_first_latent={spec.channel_first})"
            )
        if exists(spec.num_dim) and tensor.ndim - 1 != spec.num_dim:
            raise ValueError(
                f"`{name}` of modality {modality_type} has {tensor.ndim - 1} spatial axes (shape {tuple(tensor.shape)}), "
                f"expected {spec.num_dim} (modality_num_dim)"
            )
        if tensor.numel() == 0:
            raise ValueError(f"`{name}` of modality {modality_type} has an empty axis: shape {tuple(tensor.shape)}")
        return to_channel_last(tensor, spec.channel_first).to(self.dtype)

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

    def prepare(self, batch: list, name: str = "modalities") -> _Prepared:
        """Validate an interleaved batch, split it into rows of segments and instances, encode."""
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
                    modality_type = self.check_modality_type(item[0], f"{where}[0]")
                    tensor = item[1]
                    if not _is_float_tensor(tensor):
                        raise TypeError(f"`{where}[1]` must be a float modality tensor, got {tensor.dtype}")
                elif _is_float_tensor(item):
                    modality_type, tensor = 0, item
                elif _is_int_tensor(item):
                    if item.ndim > 1:
                        raise ValueError(f"`{where}` text must be a 1-D tensor of ids, got shape {tuple(item.shape)}")
                    row.append(self.check_text(item.reshape(-1), where).to(self.device))
                    continue
                else:
                    raise TypeError(f"`{where}` must be a LongTensor of text ids, a float modality tensor or a (type, tensor) tuple, got {type(item).__name__}")

                row.append(len(types))
                types.append(modality_type)
                raw.append(tensor.to(self.device))
                row_of.append(b)
            rows.append(row)

        latents: list[Tensor | None] = [None] * len(raw)
        for k in range(self.num_modalities):
            indices = [i for i, t in enumerate(types) if t == k]
            encoded = self.encode([raw[i] for i in indices], k)
            for i, x in zip(indices, encoded):
                latents[i] = self.to_latent(x, k, f"{name} item (modality {k}, instance {i})")

        return _Prepared(rows, types, latents, raw, row_of)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ the network

    def wrap_rows(self, prepared: _Prepared, add_sos_eos: bool) -> list[list[Tensor | int]]:
        """Insert `[meta] shape [som]` / `[eom]` around every instance, `[sos]` / `[eos]` around rows."""
        device = self.device
        rows = []
        for row in prepared.rows:
            out: list[Tensor | int] = [torch.tensor([self.sos_id], device=device)] if add_sos_eos else []
            for segment in row:
                if isinstance(segment, int):
                    before, after = self.ids.modality_wrapper(prepared.types[segment], tuple(prepared.latents[segment].shape[:-1]))
                    out += [torch.tensor(before, device=device), segment, torch.tensor(after, device=device)]
                else:
                    out.append(segment)
            if add_sos_eos:
                out.append(torch.tensor([self.eos_id], device=device))
            rows.append(out)
        return rows

    def attention_mask(self, layout: Layout, full_attention: bool = False, unconditional: list[bool] | None = None) -> AttentionMask:
        if full_attention:
            return AttentionMask()
        if not layout.has_modalities and layout.document_ids is None:
            return AttentionMask(is_causal=True)
        if unconditional is not None and any(unconditional):
            is_null = torch.zeros(layout.batch * layout.seq_len, dtype=torch.bool, device=self.device)
            starts = [row * layout.seq_len + offset for (row, offset, _), u in zip(layout.instance_offsets, unconditional) if u]
            is_null[starts] = True
            flags = torch.tensor(unconditional, dtype=torch.bool, device=self.device)
            mask_fn = transfusion_mask(layout.token_instance, layout.document_ids, unconditional=flags, is_null=is_null.reshape(layout.batch, layout.seq_len))
        elif layout.document_ids is not None or layout.has_modalities:
            mask_fn = transfusion_mask(layout.token_instance, layout.document_ids)
        backend = self.attention_backend
        if backend not in ("auto", "flex", "sdpa"):
            raise ValueError(f"`attention_backend` must be 'auto', 'flex' or 'sdpa', got {backend!r}")
        if backend == "flex" or (backend == "auto" and self.transformer.use_flex_attn and self.device.type == "cuda"):
            return AttentionMask(block=block_mask(mask_fn, layout.batch, layout.seq_len, layout.seq_len, self.device))
        return AttentionMask(dense=dense_mask(mask_fn, layout.batch, layout.seq_len, layout.seq_len, self.device))

    @staticmethod
    def row_lengths(rows: list[list], instance_lengths: list[int]) -> list[int]:
        return [sum(instance_lengths[s] if isinstance(s, int) else s.shape[0] for s in row) for row in rows]

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
            modality_type = self.check_modality_type(modality_type)
            batch = [[(modality_type, x)] for x in batch]
        prepared = self.prepare(batch, "batch")
        tokens, _ = self.instance_tokens(prepared.types, prepared.latents)
        if modality_only:
            return [t.shape[0] for t in tokens]
        return self.row_lengths(self.wrap_rows(prepared, add_sos_eos=True), [t.shape[0] for t in tokens])

    @classmethod
    def pack_rows(cls, rows: list[list], instance_lengths: list[int], pack_length: int) -> list[list]:
        """Sequence packing: several samples per row, separated by `DOCUMENT_BREAK`."""
        sample_lengths = cls.row_lengths(rows, instance_lengths)
        packed = []
        for group in pack_samples(sample_lengths, pack_length or max(sample_lengths)):
            row: list = []
            for sample in group:
                row += ([DOCUMENT_BREAK] if row else []) + rows[sample]
            packed.append(row)
        return packed

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

    def predict(
        self,
        rows: list[list[Tensor | int]],
        types: list[int],
        latents: list[Tensor],
        times: Tensor,
        layout: Layout | None = None,
        full_attention: bool = False,
        cache: KVCache | None = None,
        unconditional: list[bool] | None = None,
        pack_length: int | None = None,
    ) -> tuple[Tensor, Layout, list[Tensor]]:
        """Run the network on rows of segments with noised latents at `times` (one per instance).

        `unconditional` marks instances that see only themselves and the null token (CFG).
        Returns the final hidden states `(b, n, d)`, the layout, and the predicted velocity
        of every instance (channel-last, the instance's latent shape).
        """
        tokens, token_shapes = self.instance_tokens(types, latents, unconditional)
        if layout is None:
            lengths = [t.shape[0] for t in tokens]
            if pack_length is not None:  # planned without the null tokens, so a batch packs the same way whatever the draw
                planned = lengths if unconditional is None else [n - int(u) for n, u in zip(lengths, unconditional)]
                rows = self.pack_rows(rows, planned, pack_length)
            layout = build_layout(rows, lengths, device=self.device)

        x = self.text_embed(layout.token_ids.clamp(min=0))
        if layout.has_modalities:
            b, n, d = x.shape
            modality_tokens = torch.cat(tokens).to(x.dtype)
            x = x.reshape(b * n, d).index_put((layout.instance_index,), modality_tokens).reshape(b, n, d)

        embed = self.transformer(
            x,
            layout.positions,
            self.attention_mask(layout, full_attention, unconditional),
            token_instance=layout.token_instance if layout.has_modalities else None,
            instance_times=times if layout.has_modalities else None,
            cache=cache,
        )

        velocities: list = [None] * len(types)
        if layout.has_modalities:
            outputs = embed.reshape(-1, embed.shape[-1])[layout.instance_index]
            per_instance = outputs.split([t.shape[0] for t in tokens])
            if unconditional is not None:  # drop the null token's output
                per_instance = [p[1:] if u else p for p, u in zip(per_instance, unconditional)]
            for k in set(types):
                indices = [i for i, t in enumerate(types) if t == k]
                predicted = self.modality_heads[k].to_latents(torch.cat([per_instance[i] for i in indices]), [token_shapes[i] for i in indices])
                for i, v in zip(indices, predicted):
                    velocities[i] = v

        return embed, layout, velocities

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        modalities: list | Tensor,
        times: Tensor | None = None,
        num_modalities_to_times_fn: Callable[[Tensor], Tensor] | None = None,
        modality_type: int | None = None,
        velocity_consistency_ema_model: Transfusion | EMA | None = None,
        velocity_consistency_delta_time: float = 1e-3,
        return_loss: bool = True,
        return_breakdown: bool = False,
        pack: bool | int = False,
    ):
        """
        modalities: an interleaved batch (list of samples), text `LongTensor (b, n)`, or one
            modality `FloatTensor (b, *shape, d)` (or a list of such tensors of different
            shapes) with `modality_type=`.
        times: `(b, m)` flow time of each sample's modalities in order (modality-only: `(b,)`)
        pack: sequence packing of an interleaved batch for the loss: several samples share a
            row (no attention across them, positions restart); `True` packs into rows as long
            as the longest sample, an int sets the row length (a row may run past it by the
            null tokens of conditioning dropout). The loss equals the unpacked one.
        Returns the scalar loss, `(loss, LossBreakdown)` with `return_breakdown=True`, or the
        text logits `(b, n, l)` with `return_loss=False`.
        """
        if not isinstance(pack, (bool, int)) or (not isinstance(pack, bool) and pack <= 0):
            raise ValueError(f"`pack` must be True / False or a positive row length, got {pack!r}")
        check_bool("return_loss", return_loss)
        check_bool("return_breakdown", return_breakdown)
        check_float("velocity_consistency_delta_time", velocity_consistency_delta_time, 0.0, 1.0)
        if exists(num_modalities_to_times_fn) and not callable(num_modalities_to_times_fn):
            raise TypeError(f"`num_modalities_to_times_fn` must be callable, got {type(num_modalities_to_times_fn).__name__}")
        if exists(modality_type):
            self.check_modality_type(modality_type)
        ema_model = velocity_consistency_ema_model
        if isinstance(ema_model, EMA):
            ema_model = ema_model.ema_model
        if exists(ema_model) and not isinstance(ema_model, Transfusion):
            raise TypeError(f"`velocity_consistency_ema_model` must be a Transfusion or its EMA, got {type(ema_model).__name__}")

        if torch.is_tensor(modalities) and _is_int_tensor(modalities):
            if exists(modality_type):
                raise TypeError(f"`modalities` is an int tensor (text ids) but `modality_type`={modality_type} was given: modality latents must be float")
            if modalities.ndim != 2 or modalities.shape[0] == 0:
                raise ValueError(f"`modalities` text batch must have shape (batch, seq) with batch >= 1, got {tuple(modalities.shape)}")
            if return_loss and modalities.shape[1] < 2:
                raise ValueError(f"`modalities` text batch needs seq >= 2 for a next-token loss, got shape {tuple(modalities.shape)}")
            # `times`, `num_modalities_to_times_fn` and the EMA have nothing to act on here; 0.12 ignored them too
            if pack is not False:
                raise ValueError("`pack` applies to interleaved batches; a text-only batch has no padding to pack away")
            return self.forward_text(modalities, return_loss=return_loss, return_breakdown=return_breakdown)

        # modality only: one float tensor, a list of float tensors, or a flat list with `modality_type=`
        # (an interleaved batch is a list of samples, each a list)
        is_flat_list = isinstance(modalities, (list, tuple)) and len(modalities) > 0 and not any(isinstance(m, (list, tuple)) for m in modalities)
        is_modality_only = _is_float_tensor(modalities) or (
            is_flat_list and (exists(modality_type) or all(torch.is_tensor(m) and _is_float_tensor(m) for m in modalities))
        )
        if is_modality_only:
            if pack is not False:
                raise ValueError("`pack` applies to interleaved batches; a modality-only batch has one instance per row")
            return self.forward_modality(
                modalities,
                times=times,
                num_modalities_to_times_fn=num_modalities_to_times_fn,
                modality_type=modality_type,
                velocity_consistency_ema_model=ema_model,
                velocity_consistency_delta_time=velocity_consistency_delta_time,
                return_loss=return_loss,
                return_breakdown=return_breakdown,
            )

        if torch.is_tensor(modalities):
            raise TypeError(f"`modalities` tensor must be long (text) or float (one modality), got {modalities.dtype}")

        return self.forward_interleaved(
            modalities,
            times=times,
            num_modalities_to_times_fn=num_modalities_to_times_fn,
            ema_model=ema_model,
            delta_time=velocity_consistency_delta_time,
            return_loss=return_loss,
            return_breakdown=return_breakdown,
            pack=pack,
        )

    @typecheck
    def forward_text(self, text: Int["b n"], return_loss: bool = True, return_breakdown: bool = False):
        """Language modelling on text alone (no sos / eos added, as in 0.12)."""
        text = self.check_text(text, "modalities", limit=self.num_text_tokens if return_loss else None, allow_ignore=True).to(self.device)
        b, n = text.shape
        positions = torch.arange(n, device=self.device).expand(b, n)
        embed = self.transformer(self.text_embed(text.clamp(min=0)), positions, AttentionMask(is_causal=True))

        if not return_loss:
            return self.to_text_logits(embed)

        labels = text[:, 1:]
        keep = labels != self.ignore_index
        logits = self.to_text_logits(embed[:, :-1][keep])
        logits = logits.masked_fill(~self.text_only_logits_mask, torch.finfo(logits.dtype).min)
        loss = F.cross_entropy(logits.float(), labels[keep]) if keep.any() else embed.sum() * 0.0

        if not return_breakdown:
            return loss
        return loss, LossBreakdown(loss, loss, [loss.new_zeros(()) for _ in range(self.num_modalities)])

    def instance_times(self, prepared: _Prepared, times: Tensor | None, times_fn: Callable | None) -> Tensor:
        """Flow time of every instance, from `times (b, m)` or `num_modalities_to_times_fn`."""
        batch = len(prepared.rows)
        counts_list = [0] * batch
        for row in prepared.row_of:
            counts_list[row] += 1
        counts = torch.tensor(counts_list, dtype=torch.long)
        max_count = max(counts_list)
        if times is None:
            times = default(times_fn, default_times_fn)(counts.to(self.device))
        if not _is_float_tensor(times) or times.ndim != 2 or times.shape[0] != batch or times.shape[1] < max_count:
            got = tuple(times.shape) if torch.is_tensor(times) else type(times).__name__
            raise ValueError(f"`times` must be a float tensor of shape (batch={batch}, max modalities per sample={max_count}), got {got}")
        seen = [0] * batch
        flat = []
        for row in prepared.row_of:
            flat.append(times[row, seen[row]])
            seen[row] += 1
        return check_times(torch.stack(flat)).to(self.device).float() if flat else torch.zeros(0, device=self.device)

    def forward_interleaved(
        self,
        batch: list,
        times: Tensor | None = None,
        num_modalities_to_times_fn: Callable | None = None,
        ema_model: Transfusion | None = None,
        delta_time: float = 1e-3,
        return_loss: bool = True,
        return_breakdown: bool = False,
        pack: bool | int = False,
    ):
        prepared = self.prepare(batch)
        if pack is not False and not return_loss:
            raise ValueError("`pack` applies to the loss only (logits of a packed batch have no per-sample layout)")
        pack_length = None if pack is False else (0 if pack is True else int(pack))
        rows = self.wrap_rows(prepared, add_sos_eos=return_loss)

        if not return_loss:
            t = self.instance_times(prepared, times, lambda counts: torch.ones(len(counts), int(counts.max()) if len(counts) else 0, device=counts.device))
            embed, _, _ = self.predict(rows, prepared.types, prepared.latents, t)
            return self.to_text_logits(embed)

        t = self.instance_times(prepared, times, num_modalities_to_times_fn)
        if exists(ema_model):
            t = t * (1.0 - delta_time)  # leave room for the EMA's look at t + delta

        noises = [torch.randn_like(x) for x in prepared.latents]
        noised = [noise_path(x1, x0, t_i) for x1, x0, t_i in zip(prepared.latents, noises, t)]
        targets = [velocity_target(x1, x0) for x1, x0 in zip(prepared.latents, noises)]

        unconditional = self.draw_unconditional(len(prepared.types))
        embed, layout, velocities = self.predict(rows, prepared.types, noised, t, unconditional=unconditional, pack_length=pack_length)

        # text: next-token cross entropy where this and the next token are text

        labels = text_labels(layout, self.ignore_index)
        keep = labels != self.ignore_index
        total_tokens = layout.lengths.sum()
        if keep.any():
            text_loss = F.cross_entropy(self.to_text_logits(embed[keep]).float(), labels[keep])
        else:
            text_loss = embed.sum() * 0.0
        total = text_loss * (keep.sum() / total_tokens) * self.text_loss_weight

        # flow: velocity regression per modality type, weighted by its share of the tokens (as 0.12)

        weights = self.modality_token_weights(prepared.types, layout, total_tokens)
        flow_losses = self.per_type_mse(prepared.types, velocities, targets)
        total = total + sum(w * loss for w, loss in zip(weights, flow_losses)) * self.flow_loss_weight

        velocity_losses = None
        if exists(ema_model):
            velocity_losses = self.velocity_consistency(ema_model, rows, prepared, noises, t, delta_time, layout, velocities, unconditional)
            total = total + sum(w * loss for w, loss in zip(weights, velocity_losses)) * self.velocity_consistency_loss_weight

        recon_losses = None
        if self.reconstruction_loss_weight > 0:
            recon_losses = self.reconstruction_losses(prepared, noised, velocities, t)
            total = total + sum(w * loss for w, loss in zip(weights, recon_losses)) * self.reconstruction_loss_weight

        if not return_breakdown:
            return total
        return total, LossBreakdown(total, text_loss, flow_losses, velocity_losses, recon_losses)

    def modality_token_weights(self, types: list[int], layout: Layout, total_tokens: Tensor) -> list[Tensor]:
        counts = [0] * self.num_modalities
        for (_, _, length), k in zip(layout.instance_offsets, types):
            counts[k] += length
        return [torch.as_tensor(c, device=self.device) / total_tokens for c in counts]

    def per_type_mse(self, types: list[int], predictions: list[Tensor], targets: list[Tensor]) -> list[Tensor]:
        losses = []
        for k in range(self.num_modalities):
            indices = [i for i, t in enumerate(types) if t == k]
            if not indices:
                losses.append(torch.zeros((), device=self.device))
                continue
            pred = torch.cat([predictions[i].reshape(-1) for i in indices]).float()
            target = torch.cat([targets[i].reshape(-1) for i in indices]).float()
            losses.append(F.mse_loss(pred, target))
        return losses

    def draw_unconditional(self, num_instances: int) -> list[bool] | None:
        """Conditioning dropout: which instances train unconditionally this step (training only)."""
        if not self.training or self.unconditional_prob <= 0 or num_instances == 0:
            return None
        return (torch.rand(num_instances) < self.unconditional_prob).tolist()

    def velocity_consistency(self, ema_model, rows, prepared: _Prepared, noises, t, delta_time, layout, velocities, unconditional=None) -> list[Tensor]:
        """Consistency Flow Matching (Yang et al. 2024, arXiv 2407.02398), velocity term:
        the velocity at `(x_t, t)` should match the EMA model's velocity a small step
        `delta` further along the *same* path (same noise), `(x_{t+δ}, t + δ)`."""
        t_next = t + delta_time
        noised_next = [noise_path(x1, x0, t_i) for x1, x0, t_i in zip(prepared.latents, noises, t_next)]
        was_training = ema_model.training
        ema_model.eval()
        with torch.no_grad():
            _, _, ema_velocities = ema_model.predict(rows, prepared.types, noised_next, t_next, layout=layout, unconditional=unconditional)
        ema_model.train(was_training)
        return self.per_type_mse(prepared.types, velocities, ema_velocities)

    def reconstruction_losses(self, prepared: _Prepared, noised, velocities, t) -> list[Tensor]:
        """MSE between the data one Euler step from `x_t` points at and the input (through the
        decoder, when the modality has one; the decoder's parameters receive gradients too)."""
        losses = []
        for k in range(self.num_modalities):
            indices = [i for i, ty in enumerate(prepared.types) if ty == k]
            if not indices:
                losses.append(torch.zeros((), device=self.device))
                continue
            heads = self.modality_heads[k]
            recon = [predicted_data(noised[i], velocities[i], t[i]) for i in indices]
            if exists(heads.decoder):
                recon = map_grouped(
                    heads.decoder, [to_channel_first(x, heads.spec.channel_first) for x in recon], self.modality_encoder_decoder_requires_batch_dim
                )
                target = [prepared.raw[i] for i in indices]
            else:
                target = [prepared.latents[i] for i in indices]
            losses.append(sum(F.mse_loss(r.float(), x.float()) for r, x in zip(recon, target)) / len(indices))
        return losses

    def forward_modality(
        self,
        modalities: Tensor | list[Tensor],
        times: Tensor | None = None,
        modality_type: int | None = None,
        num_modalities_to_times_fn: Callable[[Tensor], Tensor] | None = None,
        velocity_consistency_ema_model: Transfusion | None = None,
        velocity_consistency_delta_time: float = 1e-3,
        return_loss: bool = True,
        return_breakdown: bool = False,
    ):
        """One modality alone: `(b, *shape, d)` (or a list of tensors of different shapes).

        With `return_loss=False`, `modalities` are noised latents at `times (b,)` and the
        predicted velocities are returned (stacked when shapes agree).
        """
        modality_type = self.check_modality_type(modality_type)
        if torch.is_tensor(modalities) and modalities.ndim < 2:
            raise ValueError(f"`modalities` must be a batch (batch, *shape, dim_latent) of one modality, got shape {tuple(modalities.shape)}")
        items = list(modalities.unbind(0)) if torch.is_tensor(modalities) else list(modalities)
        if len(items) == 0:
            raise ValueError("`modalities` must hold at least one sample")
        for i, item in enumerate(items):
            if not torch.is_tensor(item) or not _is_float_tensor(item):
                got = item.dtype if torch.is_tensor(item) else type(item).__name__
                raise TypeError(f"`modalities[{i}]` must be a float modality tensor (modality-only batch), got {got}")
        batch = [[(modality_type, x)] for x in items]
        if not return_loss:  # inputs are already encoded, noised latents
            prepared = _Prepared(
                [[i] for i in range(len(items))],
                [modality_type] * len(items),
                [self.to_latent(x.to(self.device), modality_type, "modalities") for x in items],
                items,
                list(range(len(items))),
            )
        else:
            prepared = self.prepare(batch)
        rows = [[i] for i in range(len(items))]
        unconditional = self.draw_unconditional(len(items)) if return_loss else None
        # one instance per row and equal lengths: no mask at all
        full = len({tuple(x.shape) for x in prepared.latents}) == 1 and (unconditional is None or len(set(unconditional)) == 1)

        if times is None and exists(num_modalities_to_times_fn):  # one modality per sample
            times = num_modalities_to_times_fn(torch.ones(len(items), dtype=torch.long, device=self.device))
        if times is None:
            t = torch.rand(len(items), device=self.device)
        else:
            if not _is_float_tensor(times) or times.ndim not in (1, 2) or times.shape[0] != len(items) or (times.ndim == 2 and times.shape[1] == 0):
                got = tuple(times.shape) if torch.is_tensor(times) else type(times).__name__
                raise ValueError(
                    f"`times` must be a float tensor of shape ({len(items)},) or ({len(items)}, m >= 1) (one modality per sample: column 0 is used), got {got}"
                )
            t = check_times(times if times.ndim == 1 else times[:, 0]).to(self.device).float()

        if not return_loss:
            _, _, velocities = self.predict(rows, prepared.types, prepared.latents, t, full_attention=full)
            velocities = [to_channel_first(v, self.spec(modality_type).channel_first) for v in velocities]
            return torch.stack(velocities) if full else velocities

        ema_model = velocity_consistency_ema_model
        if exists(ema_model):
            t = t * (1.0 - velocity_consistency_delta_time)
        noises = [torch.randn_like(x) for x in prepared.latents]
        noised = [noise_path(x1, x0, t_i) for x1, x0, t_i in zip(prepared.latents, noises, t)]
        targets = [velocity_target(x1, x0) for x1, x0 in zip(prepared.latents, noises)]
        _, layout, velocities = self.predict(rows, prepared.types, noised, t, full_attention=full, unconditional=unconditional)

        flow_losses = self.per_type_mse(prepared.types, velocities, targets)
        total = flow_losses[modality_type]

        velocity_losses = None
        if exists(ema_model):
            velocity_losses = self.velocity_consistency(
                ema_model, rows, prepared, noises, t, velocity_consistency_delta_time, layout, velocities, unconditional
            )
            total = total + velocity_losses[modality_type] * self.velocity_consistency_loss_weight

        recon_losses = None
        if self.reconstruction_loss_weight > 0:
            recon_losses = self.reconstruction_losses(prepared, noised, velocities, t)
            total = total + recon_losses[modality_type] * self.reconstruction_loss_weight

        if not return_breakdown:
            return total
        return total, LossBreakdown(total, torch.zeros((), device=self.device), flow_losses, velocity_losses, recon_losses)

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
    ) -> ModalitySample:
        """Continue `prompt` (text, a modality, `(type, tensor)` or an interleaved list) into one
        interleaved sample: text tensors and `(modality_type, tensor)` tuples."""
        from .sampling import sample_interleaved

        return sample_interleaved(
            self,
            prompt=prompt,
            max_length=max_length,
            text_temperature=text_temperature,
            text_min_p=text_min_p,
            cache_kv=cache_kv,
            fixed_modality_shape=fixed_modality_shape,
            init_modality_noise=init_modality_noise,
            modality_steps=modality_steps,
            return_unprocessed_modalities=return_unprocessed_modalities,
            cfg_scale=cfg_scale,
        )

    @torch.no_grad()
    @eval_mode
    def generate_text_only(self, prompt: Tensor, seq_len: int, temperature: float = 1.5, min_p: float = 0.1) -> Tensor:
        """Continue a text batch `(b, n)` to `seq_len` tokens with a KV cache; returns the new tokens `(b, seq_len - n)`."""
        from .sampling import generate_text

        return generate_text(self, prompt, seq_len, temperature=temperature, min_p=min_p)

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
        decoder); with a list of shapes, one per item, a list of tensors of those shapes."""
        from .sampling import generate_modality

        return generate_modality(
            self,
            batch_size=batch_size,
            modality_type=modality_type,
            fixed_modality_shape=fixed_modality_shape,
            modality_steps=modality_steps,
            return_unprocessed_modalities=return_unprocessed_modalities,
            cfg_scale=cfg_scale,
        )
