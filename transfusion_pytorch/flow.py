"""Rectified flow (flow matching): the noising path, the training loss, the ODE solve, guidance.

Convention (kept from 0.12): `t = 0` is pure noise, `t = 1` is clean data.

    x_t = t · x1 + (1 − t) · x0,   x0 ~ N(0, I),   target velocity  v = x1 − x0

`transfusion_loss` is the one loss of every batch that holds modalities (interleaved rows
and modality-only rows alike): it noises the latents, runs the network once, and adds the
text cross entropy, the per-modality flow regression, velocity consistency and
reconstruction. The sampler integrates dx/dt = v(t, x) from t = 0 to 1 with torchdiffeq;
`integrate` and `guided` work on any velocity callable, as in facebookresearch/flow_matching.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torchdiffeq import odeint

from ._typing import Float, Int, typecheck
from .helpers import exists
from .modality import map_grouped, to_channel_first

if TYPE_CHECKING:
    from .inputs import Prepared
    from .transfusion import Transfusion

# velocity consistency looks this far along the path (one default for every batch kind;
# 0.12 used 1e-3 for interleaved and 1e-5 for modality-only batches)
VELOCITY_CONSISTENCY_DELTA = 1e-3


class LossBreakdown(NamedTuple):
    total: Tensor
    text: Tensor
    flow: list[Tensor]  # one per modality type
    velocity: list[Tensor] | None = None  # one per modality type, with an EMA model
    recon: list[Tensor] | None = None  # one per modality type, with reconstruction_loss_weight > 0


# ------------------------------------------------------------------ the path


@typecheck
def noise_path(x1: Float["..."], x0: Float["..."], t: Tensor | float) -> Float["..."]:
    """The point at time `t` on the straight path from noise `x0` to data `x1`."""
    return t * x1 + (1.0 - t) * x0


@typecheck
def velocity_target(x1: Float["..."], x0: Float["..."]) -> Float["..."]:
    return x1 - x0


# with `flow_prediction="data"`, the gap 1 - t below which a predicted datum is not divided
# further (JiT, arXiv 2511.13720, clips it the same way): near t = 1 the velocity
# (x̂ - x_t) / (1 - t) would blow a small error of x̂ up without bound
DATA_PREDICTION_MIN_GAP = 0.05


@typecheck
def data_to_velocity(x_hat: Float["..."], x_t: Float["..."], t: Tensor | float) -> Float["..."]:
    """The velocity that points from `x_t` at time `t` to the predicted data `x_hat` at t = 1
    (the inverse of `predicted_data`), computed in fp32 and returned in `x_hat`'s dtype."""
    gap = (1.0 - torch.as_tensor(t, dtype=torch.float32, device=x_hat.device)).clamp(min=DATA_PREDICTION_MIN_GAP)
    return ((x_hat.float() - x_t.float()) / gap).to(x_hat.dtype)


@typecheck
def predicted_data(x_t: Float["..."], velocity: Float["..."], t: Tensor | float) -> Float["..."]:
    """One Euler step to t = 1: the data the predicted velocity points at."""
    return x_t + (1.0 - t) * velocity


@typecheck
def default_times_fn(num_modalities: Int["b"]) -> Float["b m"]:
    """Independent `t ~ U(0, 1)` for every modality instance of every sample."""
    batch = num_modalities.shape[0]
    max_modalities = int(num_modalities.max()) if batch > 0 else 0
    return torch.rand((batch, max_modalities), device=num_modalities.device)


def draw_unconditional(probability: float, num_instances: int) -> list[bool] | None:
    """Conditioning dropout for classifier-free guidance: which instances train unconditionally."""
    if probability <= 0 or num_instances == 0:
        return None
    return (torch.rand(num_instances) < probability).tolist()


# ------------------------------------------------------------------ the loss


def per_type_mse(types: list[int], predictions: list[Tensor], targets: list[Tensor], num_modalities: int) -> list[Tensor]:
    """Mean squared error over every element of the instances of each modality type (0 where none)."""
    device = predictions[0].device if predictions else None
    losses = []
    for k in range(num_modalities):
        indices = [i for i, t in enumerate(types) if t == k]
        if not indices:
            losses.append(torch.zeros((), device=device))
            continue
        pred = torch.cat([predictions[i].reshape(-1) for i in indices]).float()
        target = torch.cat([targets[i].reshape(-1) for i in indices]).float()
        losses.append(F.mse_loss(pred, target))
    return losses


def reconstruction_losses(model: Transfusion, prepared: Prepared, noised: list[Tensor], velocities: list[Tensor], times: Tensor) -> list[Tensor]:
    """MSE between the data one Euler step from `x_t` points at and the input (through the
    decoder, when the modality has one; the decoder's parameters receive gradients too)."""
    losses = []
    for k in range(model.num_modalities):
        indices = prepared.indices_of(k)
        if not indices:
            losses.append(torch.zeros((), device=model.device))
            continue
        heads = model.modality_heads[k]
        recon = [predicted_data(noised[i], velocities[i], times[i]) for i in indices]
        if exists(heads.decoder):
            recon = map_grouped(
                heads.decoder, [to_channel_first(x, heads.spec.channel_first) for x in recon], model.modality_encoder_decoder_requires_batch_dim
            )
            target = [prepared.raw[i] for i in indices]
        else:
            target = [prepared.latents[i] for i in indices]
        losses.append(sum(F.mse_loss(r.float(), x.float()) for r, x in zip(recon, target)) / len(indices))
    return losses


@typecheck
def transfusion_loss(
    model: Transfusion,
    prepared: Prepared,
    rows: list[list],
    times: Float["m"],
    ema_model: Transfusion | None = None,
    delta_time: float = VELOCITY_CONSISTENCY_DELTA,
    pack_length: int | None = None,
) -> tuple[Tensor, LossBreakdown]:
    """The training loss of a batch with modalities (Transfusion, arXiv 2408.11039, eq. 4 with
    rectified flow in place of the DDPM loss): `λ_text · L_text + λ_flow · Σ_k w_k L_flow,k`,
    plus velocity consistency and reconstruction when enabled.

    rows: rows of segments as the network reads them (`[sos] … [eos]` for interleaved samples,
        one bare instance per row for a modality-only batch)
    times: `(m,)` flow time of every instance
    Each modality's terms are weighted by its share `w_k` of the batch's tokens and the text
    loss by the share of text tokens with a label, as in 0.12; for a modality-only batch
    `w_k = 1` and there is no text term.
    """
    if exists(ema_model):
        times = times * (1.0 - delta_time)  # leave room for the EMA's look at t + δ

    latents = prepared.latents
    noises = [torch.randn_like(x) for x in latents]
    noised = [noise_path(x1, x0, t) for x1, x0, t in zip(latents, noises, times)]
    targets = [velocity_target(x1, x0) for x1, x0 in zip(latents, noises)]

    unconditional = draw_unconditional(model.unconditional_prob, len(latents)) if model.training else None
    embed, layout, velocities = model.predict(rows, prepared.types, noised, times, unconditional=unconditional, pack_length=pack_length)

    total_tokens = layout.lengths.sum()
    text_loss, text_tokens = model.text_loss(embed, layout)
    total = text_loss * (text_tokens / total_tokens) * model.text_loss_weight

    # one weight per modality type: its share of the batch's tokens
    counts = [0] * model.num_modalities
    for (_, _, length), k in zip(layout.instance_offsets, prepared.types):
        counts[k] += length
    weights = [torch.as_tensor(c, device=model.device) / total_tokens for c in counts]

    def weighted(losses: list[Tensor]) -> Tensor:
        return sum(w * loss for w, loss in zip(weights, losses))

    flow_losses = per_type_mse(prepared.types, velocities, targets, model.num_modalities)
    total = total + weighted(flow_losses) * model.flow_loss_weight

    velocity_losses = None
    if exists(ema_model):
        # Consistency Flow Matching (Yang et al. 2024, arXiv 2407.02398), velocity term: the
        # velocity at (x_t, t) should match the EMA model's a small step δ further along the
        # *same* path (same noise), at (x_{t+δ}, t + δ)
        times_next = times + delta_time
        noised_next = [noise_path(x1, x0, t) for x1, x0, t in zip(latents, noises, times_next)]
        was_training = ema_model.training
        ema_model.eval()
        with torch.no_grad():
            _, _, ema_velocities = ema_model.predict(rows, prepared.types, noised_next, times_next, layout=layout, unconditional=unconditional)
        ema_model.train(was_training)
        velocity_losses = per_type_mse(prepared.types, velocities, ema_velocities, model.num_modalities)
        total = total + weighted(velocity_losses) * model.velocity_consistency_loss_weight

    recon_losses = None
    if model.reconstruction_loss_weight > 0:
        recon_losses = reconstruction_losses(model, prepared, noised, velocities, times)
        total = total + weighted(recon_losses) * model.reconstruction_loss_weight

    return total, LossBreakdown(total, text_loss, flow_losses, velocity_losses, recon_losses)


# ------------------------------------------------------------------ sampling


def integrate(
    velocity_fn: Callable[[Tensor, Tensor], Tensor],
    noise: Tensor,
    steps: int,
    odeint_kwargs: dict,
) -> Tensor:
    """Integrate from `noise` at t = 0 to t = 1 over `steps` time points (0.12's `modality_steps`)."""
    if steps < 2:
        raise ValueError(f"`modality_steps` must be at least 2 (the start and end times), got {steps}")
    times = torch.linspace(0.0, 1.0, steps, device=noise.device)
    return odeint(velocity_fn, noise, times, **odeint_kwargs)[-1]


def cfg_blend(v_cond: Tensor, v_uncond: Tensor, cfg_scale: float) -> Tensor:
    """Classifier-free guidance (Ho & Salimans, arXiv 2207.12598) on velocities: `v_u + s · (v_c − v_u)`."""
    return v_uncond + cfg_scale * (v_cond - v_uncond)


def guided(velocity_fn: Callable[[Tensor, Tensor, bool], Tensor], cfg_scale: float) -> Callable[[Tensor, Tensor], Tensor]:
    """Classifier-free guidance as a wrapper around a velocity function; every sampler uses it.

    `velocity_fn(t, x, with_unconditional)` returns the conditional velocity (shaped like `x`)
    or, with `with_unconditional=True`, the conditional and unconditional velocities from one
    batched forward, stacked `(2, *x.shape)` (DiT's doubled batch). At `cfg_scale == 1` the
    unconditional pass is skipped.
    """
    if cfg_scale == 1.0:
        return lambda t, x: velocity_fn(t, x, False)

    def velocity(t: Tensor, x: Tensor) -> Tensor:
        v_cond, v_uncond = velocity_fn(t, x, True)
        return cfg_blend(v_cond, v_uncond, cfg_scale)

    return velocity
