import math

import torch

from transfusion_pytorch.flow import default_times_fn, integrate, noise_path, predicted_data, velocity_target

MIDPOINT = dict(method="midpoint")


def test_path_endpoints_and_target():
    x1, x0 = torch.randn(4, 3), torch.randn(4, 3)
    assert torch.allclose(noise_path(x1, x0, 0.0), x0)
    assert torch.allclose(noise_path(x1, x0, 1.0), x1)
    t = 0.3
    xt = noise_path(x1, x0, t)
    v = velocity_target(x1, x0)
    assert torch.allclose(predicted_data(xt, v, t), x1, atol=1e-6)


def test_constant_velocity_field_is_exact():
    noise = torch.randn(5, 2)
    v = torch.randn(5, 2)
    out = integrate(lambda t, x: v.expand_as(x), noise, steps=4, odeint_kwargs=MIDPOINT)
    assert torch.allclose(out, noise + v, atol=1e-6)


def test_linear_field_matches_exponential():
    # dx/dt = x  →  x(1) = e · x(0); midpoint is second order, so 64 steps is close
    noise = torch.randn(3)
    out = integrate(lambda t, x: x, noise, steps=64, odeint_kwargs=MIDPOINT)
    assert torch.allclose(out, noise * math.e, rtol=1e-3)


def test_straight_path_velocity_recovers_data():
    # the exact rectified-flow velocity of a single data point is (x1 - x) / (1 - t)
    x1 = torch.randn(6)
    noise = torch.randn(6)
    out = integrate(lambda t, x: (x1 - x) / (1 - t).clamp(min=1e-3), noise, steps=16, odeint_kwargs=MIDPOINT)
    assert torch.allclose(out, x1, atol=1e-4)


def test_default_times_shape_and_range():
    times = default_times_fn(torch.tensor([2, 0, 3]))
    assert times.shape == (3, 3)
    assert ((times >= 0) & (times <= 1)).all()
