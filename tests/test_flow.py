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


# ------------------------------------------------------------------ data prediction (flow_prediction="data")


def test_data_to_velocity_inverts_predicted_data_and_clips_near_one():
    from transfusion_pytorch.flow import DATA_PREDICTION_MIN_GAP, data_to_velocity

    x1, x0 = torch.randn(4, 3), torch.randn(4, 3)
    for t in (0.0, 0.3, 0.9):
        xt = noise_path(x1, x0, t)
        v = data_to_velocity(x1, xt, torch.tensor(t))
        assert torch.allclose(v, velocity_target(x1, x0), atol=1e-5)  # the true datum gives the true velocity
        assert torch.allclose(predicted_data(xt, v, t), x1, atol=1e-5)
    xt = noise_path(x1, x0, 0.999)  # the gap is clipped: no blow-up at t → 1
    assert torch.allclose(data_to_velocity(x1, xt, 0.999), (x1 - xt) / DATA_PREDICTION_MIN_GAP)
    assert data_to_velocity(x1.bfloat16(), xt, 0.5).dtype == torch.bfloat16


def _image_model(flow_prediction: str):
    from transfusion_pytorch import Transfusion

    return Transfusion(
        num_text_tokens=8,
        dim_latent=4,
        modality_default_shape=(2, 2),
        flow_prediction=flow_prediction,
        transformer=dict(dim=32, depth=1, dim_head=8, heads=2),
    )


def test_data_prediction_turns_the_heads_output_into_a_velocity():
    import pytest

    torch.manual_seed(0)
    by_velocity, by_data = _image_model("velocity"), _image_model("data")
    by_data.load_state_dict(by_velocity.state_dict())  # the same network: only the reading of its output differs
    for p in by_velocity.parameters():  # randomised weights (zero-initialised gates would hide the context)
        p.data.normal_(0, 0.2)
    by_data.load_state_dict(by_velocity.state_dict())
    text, latent = torch.randint(0, 8, (3,)), torch.randn(2, 2, 4)
    times = torch.tensor([0.3])
    _, _, (raw,) = by_velocity.predict([[text, 0]], [0], [latent], times)
    _, _, (velocity,) = by_data.predict([[text, 0]], [0], [latent], times)
    assert torch.allclose(velocity, (raw - latent) / 0.7, atol=1e-5)
    assert not torch.allclose(velocity, raw, atol=1e-3)
    loss = by_data([[text, latent]])  # trains and samples like any other model
    loss.backward()
    sample = by_data.sample(prompt=text, max_length=16, modality_steps=3, force_modality_at_start=0)
    assert any(isinstance(item, tuple) and item[1].shape == (2, 2, 4) for item in sample)
    assert by_data.config["flow_prediction"] == "data"
    with pytest.raises(ValueError, match="`flow_prediction`"):
        _image_model("noise")
