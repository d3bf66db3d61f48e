"""The quality benchmarks (`benchmarks/bench_diffusion.py`, `benchmarks/bench_ablation.py`):
their samplers and metrics against closed forms, and a smoke run of each script's `--quick`
(and of `benchmarks/bench_attention.py`'s)."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from conftest import randomized

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_ablation  # noqa: E402
import bench_attention  # noqa: E402
import bench_diffusion  # noqa: E402
import bench_lib as L  # noqa: E402


def random_covariance(d: int, n: int, generator: np.random.Generator) -> np.ndarray:
    x = generator.standard_normal((n, d)) @ generator.standard_normal((d, d))
    return np.cov(x, rowvar=False)


@pytest.mark.parametrize("samples", [40, 8])  # full rank, and rank-deficient (fewer samples than dimensions)
def test_frechet_distance_matches_sqrtm(samples):
    g = np.random.default_rng(0)
    mu1, mu2 = g.standard_normal(12), g.standard_normal(12)
    s1, s2 = random_covariance(12, samples, g), random_covariance(12, 40, g)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(scipy.linalg.sqrtm(s1 @ s2)))
    assert L.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6, abs=1e-6)
    # the square root at a singular spectrum turns float64 rounding ε of the zero eigenvalues into √ε: the
    # self-distance of the rank-deficient Σ₁ is -1.5e-6 on an AVX2 LAPACK (scipy's sqrtm: -1.7e-6), for Tr Σ₁ = 133
    assert L.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-7 * np.trace(s1))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("nfe", [1, 7, 100])
def test_diffusion_samplers_recover_a_point_mass(sampler, nfe):
    """With the exact ε of data concentrated at x*, ε(x_t) = (x_t − √ᾱ x*) / √(1 − ᾱ), both chains end at x*."""
    schedule = L.DDPMSchedule()
    target = torch.rand(3, 5) * 1.6 - 0.8
    calls = []

    def eps_fn(x, t):
        calls.append(t)
        a = float(schedule.alpha_bar[t])
        return (x - math.sqrt(a) * target) / math.sqrt(1 - a)

    out = L.solve_diffusion(eps_fn, torch.randn(3, 5), sampler, nfe, schedule)
    torch.testing.assert_close(out, target, atol=1e-5, rtol=1e-5)
    assert len(calls) == nfe and calls[0] == schedule.num_steps - 1 and calls[-1] == (0 if nfe > 1 else schedule.num_steps - 1)
    assert calls == sorted(calls, reverse=True)


def test_diffusion_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="sampler"):
        L.solve_diffusion(lambda x, t: x, torch.zeros(2), "euler", 4, L.DDPMSchedule())
    with pytest.raises(ValueError, match="diffusion steps"):
        L.DDPMSchedule().timesteps(1001)


def test_flow_solvers_spend_their_budget_and_converge_with_order():
    """dx/dt = −x from x₀: exact x(1) = x₀ / e. Each fixed-grid solver makes exactly `nfe` calls,
    and at equal NFE the higher-order ones are closer; dopri5's calls are counted."""
    x0 = torch.randn(4, 3)
    exact = x0 * math.exp(-1)
    errors = {}
    for solver in ("euler", "midpoint", "rk4"):
        calls = []
        out = L.solve_flow(lambda t, x: calls.append(t) or -x, x0, solver, nfe=16)
        assert len(calls) == 16
        errors[solver] = float((out - exact).abs().max())
    assert errors["rk4"] < errors["midpoint"] < errors["euler"]
    calls = []
    out = L.solve_flow(lambda t, x: calls.append(t) or -x, x0, "dopri5", tolerance=1e-6)
    assert (out - exact).abs().max() < 1e-4 and len(calls) >= 6
    with pytest.raises(ValueError, match="nfe"):
        L.solve_flow(lambda t, x: -x, x0, "rk4", nfe=6)


def test_causal_image_model_hides_later_image_tokens():
    """In the ablation's causal-image model the first image token does not see the last one;
    in the Transfusion model (bidirectional inside the image) it does."""
    for causal, sees in ((True, False), (False, True)):
        torch.manual_seed(0)
        model = randomized(L.build_model(dim=32, depth=1, heads=2, causal_image=causal)).eval()
        rows, types, shape = L.prompt_rows(model, torch.tensor([3]))
        x = torch.randn(*shape)
        y = x.clone()
        y[-1, -1] += 1.0  # the last token of the 7 × 7 grid
        with torch.no_grad():
            a = model.predict(rows, types, [x], torch.tensor([0.5]))[2][0]
            b = model.predict(rows, types, [y], torch.tensor([0.5]))[2][0]
        assert torch.allclose(a[0, 0], b[0, 0], atol=1e-6) != sees


def test_ddpm_loss_trains_the_shared_backbone():
    torch.manual_seed(0)
    model = L.build_model(dim=32, depth=1, heads=2)
    images, labels = torch.rand(4, 1, 28, 28) * 2 - 1, torch.tensor([0, 1, 2, 3])
    loss = L.ddpm_loss(model, L.DDPMSchedule(), L.generation_batch(images, labels))
    loss.backward()
    assert torch.isfinite(loss) and model.modality_heads[0].latent_to_model.weight.grad.abs().sum() > 0


def test_bench_diffusion_quick(tmp_path):
    args = bench_diffusion.build_parser().parse_args(["--quick", "--threads", "1", "--json", str(tmp_path / "d.json")])
    bench_diffusion.main(args)
    report = json.loads((tmp_path / "d.json").read_text())
    for plot in report["plots"]:
        assert Path(plot).stat().st_size > 1000
    assert set(report["training"]) == {"flow", "flow+vc", "ddpm"}
    for history in report["training"].values():
        assert len(history["loss"]) == args.steps and history["evals"][-1]["step"] == args.steps
    points = {(p["model"], p["sampler"], p["nfe"]) for p in report["sweep"]}
    assert {("flow", "euler", 1), ("flow", "midpoint", 4), ("flow", "rk4", 4), ("ddpm", "ddim", 2), ("ddpm", "ddpm", 8)} <= points
    assert any(p["sampler"] == "dopri5" and p["nfe"] >= 6 for p in report["sweep"])
    # a barely trained model is far from the data; real digits against real digits are close
    worst = min(p["digit_fid"] for p in report["sweep"])
    assert report["real_floor"]["digit_fid"] < worst
    assert all(math.isfinite(h["fid"]) and h["fid"] > 0 for h in report["headline"].values())
    assert "flow_le16_reaches_ddpm250_digit_fid" not in report["goals"]  # quick has no DDPM-250 to compare with


def test_bench_ablation_quick(tmp_path):
    args = bench_ablation.build_parser().parse_args(["--quick", "--threads", "1", "--json", str(tmp_path / "a.json")])
    report = bench_ablation.main(args)
    assert set(report["results"]) == {"linear-p4", "linear-p4-causal", "unet-p4"}
    assert all(r["tokens_per_image"] == 49 and r["nfe"] == 4 for r in report["results"].values())
    assert set(report["findings"]) == {"bidirectional beats causal inside images", "U-Net blocks beat linear patches (patch 4)"}
    assert Path(report["plot"]).stat().st_size > 1000
    with pytest.raises(ValueError, match="variants"):
        bench_ablation.main(bench_ablation.build_parser().parse_args(["--variants", "nope"]))


def test_compare_quality_quick_runs_the_012_api_script_with_our_package(tmp_path):
    """`quality_worker.py` uses only 0.12.0's public API; with our package it trains, samples and
    is judged. (Both sides, with 0.12.0's venv built from PyPI, in the slow test below.)"""
    import compare_quality

    args = compare_quality.build_parser().parse_args(["--quick", "--sides", "ours", "--json", str(tmp_path / "q.json")])
    report = compare_quality.main(args)
    result = report["results"]["ours"]
    assert result["steps"] > 0 and 0.0 <= result["prompt_accuracy"] <= 1.0 and 0.0 <= result["captioning_accuracy"] <= 1.0
    assert math.isfinite(result["digit_fid"]) and result["digit_fid"] > report["real_floor_digit_fid"]
    assert Path(report["plot"]).stat().st_size > 1000
    with pytest.raises(ValueError, match="sides"):
        compare_quality.main(compare_quality.build_parser().parse_args(["--quick", "--sides", "0.11"]))
    with pytest.raises(ValueError, match="--captions"):
        compare_quality.main(compare_quality.build_parser().parse_args(["--captions", "0"]))


@pytest.mark.slow
def test_compare_quality_quick_both_sides(tmp_path):
    import compare_quality

    args = compare_quality.build_parser().parse_args(["--quick", "--json", str(tmp_path / "q.json")])
    report = compare_quality.main(args)
    assert set(report["results"]) == {"ours", "0.12.0"} and all(r["steps"] > 0 for r in report["results"].values())


def test_bench_attention_quick(tmp_path, monkeypatch):
    path = tmp_path / "attention.json"
    monkeypatch.setattr(sys, "argv", ["bench_attention.py", "--quick", "--threads", "1", "--json", str(path)])
    bench_attention.main()
    report = json.loads(path.read_text())
    assert [row["dtype"] for row in report["rows"]] == ["bfloat16", "float32"]
    for row in report["rows"]:
        assert row["fused_train_ms"] > 0 and row["explicit_train_ms"] > 0
        assert row["train_speedup"] == pytest.approx(row["fused_train_ms"] / row["explicit_train_ms"], rel=0.02)
    bf16, fp32 = report["rows"]
    assert bf16["upcast_train_speedup"] == pytest.approx(bf16["fused_train_ms"] / bf16["upcast_train_ms"], rel=0.02)
    assert "upcast_train_ms" not in fp32  # fp32 inputs have nothing to upcast


def test_bench_attention_refuses_zero_rounds(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench_attention.py", "--rounds", "0"])
    with pytest.raises(SystemExit):
        bench_attention.main()
