"""Rectified flow (flow matching) pieces, independent of the model.

Convention (kept from 0.12): `t = 0` is pure noise, `t = 1` is clean data.

    x_t = t · x1 + (1 − t) · x0,   x0 ~ N(0, I),   target velocity  v = x1 − x0

The sampler integrates dx/dt = v(x, t) from t = 0 to 1 with torchdiffeq; the solver
works on any `velocity(t, x)` callable.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torchdiffeq import odeint

from ._typing import Float, Int, typecheck


def noise_path(x1: Tensor, x0: Tensor, t: Tensor | float) -> Tensor:
    """The point at time `t` on the straight path from noise `x0` to data `x1`."""
    return t * x1 + (1.0 - t) * x0


def velocity_target(x1: Tensor, x0: Tensor) -> Tensor:
    return x1 - x0


def predicted_data(x_t: Tensor, velocity: Tensor, t: Tensor | float) -> Tensor:
    """One Euler step to t = 1: the data the predicted velocity points at."""
    return x_t + (1.0 - t) * velocity


@typecheck
def default_times_fn(num_modalities: Int["b"]) -> Float["b m"]:
    """Independent `t ~ U(0, 1)` for every modality instance of every sample."""
    batch = num_modalities.shape[0]
    max_modalities = int(num_modalities.max()) if batch > 0 else 0
    return torch.rand((batch, max_modalities), device=num_modalities.device)


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
    """Classifier-free guidance (arXiv 2207.12598) on velocities: `v_u + s · (v_c − v_u)`.
    Every sampler calls this one function."""
    return v_uncond + cfg_scale * (v_cond - v_uncond)
