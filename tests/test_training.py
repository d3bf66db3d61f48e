"""The training toolkit: checkpoints that resume, mixed precision, logging."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn, randint, randn

from conftest import tiny_transformer
from transfusion_pytorch import Transfusion
from transfusion_pytorch.codecs import Patchify, Unpatchify
from transfusion_pytorch.training import (
    RunLogger,
    breakdown_metrics,
    load_checkpoint,
    make_precision,
    native_amp,
    read_checkpoint,
    save_checkpoint,
    script_precision,
)


def build(depth=2):
    return Transfusion(
        num_text_tokens=16,
        dim_latent=8,
        channel_first_latent=True,
        modality_default_shape=(2, 2),
        modality_encoder=Patchify(2),
        modality_decoder=Unpatchify(2),
        add_pos_emb=True,
        transformer=tiny_transformer() | dict(depth=depth),
    )


def batch_for(step):
    g = torch.Generator().manual_seed(1000 + step)
    return [[randint(0, 16, (4,), generator=g), randn(2, 4, 4, generator=g)] for _ in range(3)]


def train(model, optimizer, scheduler, ema, steps, start=0):
    for step in range(start, start + steps):
        loss = model(batch_for(step), velocity_consistency_ema_model=ema)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        ema.update()


def fresh(seed=0):
    torch.manual_seed(seed)
    model = build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    ema = model.create_ema(beta=0.9, update_after_step=0, update_every=1)
    return model, optimizer, scheduler, ema


def test_resume_matches_uninterrupted_training(tmp_path):
    model, optimizer, scheduler, ema = fresh()
    torch.manual_seed(7)
    train(model, optimizer, scheduler, ema, 5)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    reference_ema = {k: v.clone() for k, v in ema.state_dict().items()}

    model, optimizer, scheduler, ema = fresh()
    torch.manual_seed(7)
    train(model, optimizer, scheduler, ema, 3)
    save_checkpoint(tmp_path / "ckpt.pt", model, optimizer, scheduler, ema, step=3)
    torch.rand(100)  # the "crash": the global RNG moves on, everything is thrown away

    model, optimizer, scheduler, ema = fresh(seed=123)  # different init, overwritten by the load
    state = load_checkpoint(tmp_path / "ckpt.pt", model, optimizer, scheduler, ema)
    assert state["step"] == 3
    train(model, optimizer, scheduler, ema, 2, start=3)
    for name, value in model.state_dict().items():
        assert torch.equal(value, reference[name]), name
    for name, value in ema.state_dict().items():
        assert torch.equal(value, reference_ema[name]), name


def test_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = build()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model, step=1)
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, step=2)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind


def test_checkpoint_of_another_configuration(tmp_path):
    save_checkpoint(tmp_path / "ckpt.pt", build(depth=2))
    with pytest.raises(ValueError, match=r"path.*another configuration.*transformer.depth"):
        load_checkpoint(tmp_path / "ckpt.pt", build(depth=3))


def test_loading_never_executes_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "evil.pt"
    torch.save({"format": "transfusion_pytorch.checkpoint/1", "model": Evil()}, bad)
    with pytest.raises(ValueError, match="path"):
        load_checkpoint(bad, build())
    assert not marker.exists()
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="path"):
        Transfusion.from_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="path"):
        Transfusion.from_checkpoint(tmp_path / "missing.pt")


def test_from_checkpoint_rebuilds_model_with_codecs(tmp_path):
    model = build().eval()
    save_checkpoint(tmp_path / "ckpt.pt", model)
    rebuilt = Transfusion.from_checkpoint(tmp_path / "ckpt.pt").eval()
    assert isinstance(rebuilt.modality_heads[0].encoder, Patchify)
    x = randn(2, 8, 2, 2)
    t = torch.rand(2)
    with torch.no_grad():
        assert torch.allclose(model(x, times=t, return_loss=False), rebuilt(x, times=t, return_loss=False))


def test_from_checkpoint_needs_overrides_for_foreign_modules(tmp_path):
    model = Transfusion(num_text_tokens=4, dim_latent=8, modality_encoder=nn.Linear(3, 8), transformer=tiny_transformer())
    save_checkpoint(tmp_path / "ckpt.pt", model)
    with pytest.raises(ValueError, match="modality_encoder"):
        Transfusion.from_checkpoint(tmp_path / "ckpt.pt")
    rebuilt = Transfusion.from_checkpoint(tmp_path / "ckpt.pt", modality_encoder=nn.Linear(3, 8))
    assert torch.equal(rebuilt.modality_heads[0].encoder.weight, model.modality_heads[0].encoder.weight)


def test_bf16_autocast_tracks_fp32():
    precision = make_precision(use_amp=True, amp_dtype="bf16")
    losses = {}
    for name, ctx in (("fp32", make_precision().autocast), ("bf16", precision.autocast)):
        torch.manual_seed(0)
        model = build()
        ema = model.create_ema()
        torch.manual_seed(1)
        with ctx():
            loss, breakdown = model(batch_for(0), velocity_consistency_ema_model=ema, return_breakdown=True)
        assert loss.dtype == torch.float32  # losses stay fp32
        assert all(torch.isfinite(v) for v in (loss, *breakdown.flow, *breakdown.velocity))
        losses[name] = loss.item()
    # bf16 keeps 8 bits of mantissa (~0.4 % per rounding); through a 2-layer net the loss
    # moves by well under 5 %
    assert abs(losses["bf16"] - losses["fp32"]) / losses["fp32"] < 0.05


def test_bf16_training_steps_stay_finite_and_learn():
    torch.manual_seed(0)
    model = build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    precision = make_precision(use_amp=True, amp_dtype="bf16")
    losses = []
    for step in range(30):
        with precision.autocast():
            loss = model(batch_for(step % 2))
        grad_norm = precision.step(loss, optimizer, model.parameters(), max_grad_norm=1.0)
        assert torch.isfinite(grad_norm)
        losses.append(loss.item())
    assert sum(losses[-5:]) < sum(losses[:5])


def test_bad_precision_arguments():
    with pytest.raises(ValueError, match="amp_dtype"):
        make_precision(True, "fp8")
    with pytest.raises(ValueError, match="amp_dtype"):
        make_precision(True, "fp16", "cpu")


def test_logger_writes_jsonl_and_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    model = build()
    _, breakdown = model(batch_for(0), return_breakdown=True)
    metrics = breakdown_metrics(breakdown)
    assert set(metrics) == {"loss/total", "loss/text", "loss/flow_0"}
    logger = RunLogger(tmp_path, use_wandb=True, config={"lr": 1e-3})
    logger.log(metrics, step=1)
    logger.log_images("samples", [torch.rand(4, 4)], step=1, captions=["x"])
    logger.finish()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["loss/total"] == pytest.approx(metrics["loss/total"])
    assert any((tmp_path / "wandb").iterdir())  # the offline run was written locally


def test_nothing_imports_wandb_without_the_flag(tmp_path):
    code = f"import sys; from transfusion_pytorch.training import RunLogger; RunLogger({str(tmp_path)!r}).log({{'a': 1}}, 0); print('wandb' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_toy_script_runs_with_amp_and_logs(tmp_path):
    import train_toy

    args = train_toy.build_parser().parse_args(
        [
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--log-every",
            "1",
            "--threads",
            "1",
            "--device",
            "cpu",
            "--use-amp",
            "--amp-dtype",
            "bf16",
            "--out",
            str(tmp_path),
        ]
    )
    train_toy.main(args)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and "grad_norm" in json.loads(lines[-1])


def test_checkpoint_arguments_are_checked_before_writing(tmp_path):
    import numpy as np

    model = build()
    path = tmp_path / "ckpt.pt"
    for extra in ({"best": np.float64(0.5)}, {"dir": tmp_path}, ["not", "a", "dict"]):
        with pytest.raises(TypeError, match="`extra`"):
            save_checkpoint(path, model, extra=extra)
    assert not path.exists() and not list(tmp_path.iterdir())  # nothing written, not even a temporary file
    for step, error in (("x", TypeError), (None, TypeError), (1.7, TypeError), (-1, ValueError)):
        with pytest.raises(error, match="`step`"):
            save_checkpoint(path, model, step=step)
    with pytest.raises(TypeError, match="`optimizer`"):
        save_checkpoint(path, model, optimizer="adam")
    with pytest.raises(ValueError, match="`path`"):
        save_checkpoint(tmp_path, model)

    save_checkpoint(path, model, extra={"best": 0.5, "history": [1, 2.0, "three", None, torch.ones(2)]})
    assert load_checkpoint(path, model)["extra"]["best"] == 0.5


def test_loading_into_mismatched_objects(tmp_path):
    model, optimizer, scheduler, ema = fresh()
    save_checkpoint(tmp_path / "ckpt.pt", model, optimizer=optimizer)
    other = torch.optim.AdamW(nn.Linear(2, 2).parameters())
    with pytest.raises(ValueError, match="`optimizer`"):
        load_checkpoint(tmp_path / "ckpt.pt", model, optimizer=other)
    with pytest.raises(ValueError, match="`overrides`"):
        Transfusion.from_checkpoint(tmp_path / "ckpt.pt", not_an_argument=1)
    with pytest.raises(ValueError, match="`overrides`"):
        Transfusion.from_checkpoint(tmp_path / "ckpt.pt", transformer=tiny_transformer() | dict(depth=3))
    payload = read_checkpoint(tmp_path / "ckpt.pt") | {"format": "transfusion_pytorch.checkpoint/1"}  # written the old, header-less way
    del payload["model"]
    torch.save(payload, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="lacks model"):
        load_checkpoint(tmp_path / "broken.pt", model)


def test_negative_max_grad_norm():
    precision = make_precision(use_amp=False, device="cpu")
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for bad in (-1.0, 0.0, float("nan")):
        with pytest.raises(ValueError, match="`max_grad_norm`"):
            precision.step(model(randn(3, 2)).sum(), optimizer, model.parameters(), max_grad_norm=bad)
    norm = precision.step(model(randn(3, 2)).sum(), optimizer, model.parameters(), max_grad_norm=float("inf"))  # measure only
    assert torch.isfinite(norm) and norm > 0
    with pytest.raises(ValueError, match="`device`"):
        make_precision(device="gpu")
    with pytest.raises(ValueError, match="`use_amp`"):
        make_precision(use_amp="yes")
    with pytest.raises(TypeError, match="`use_amp`"):
        make_precision(use_amp=1)


@pytest.mark.parametrize("native", [True, False])
def test_amp_follows_native_bf16(monkeypatch, native):
    """`"auto"` (a script's default, `--use-amp` given neither way) autocasts to bf16 on a CPU only
    where it has AMX or AVX512-BF16: elsewhere bf16 is emulated, slower than fp32. An explicit
    choice is kept, with a warning where it costs time."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    assert native_amp("cpu") is native and native_amp("cpu", "fp16") is False
    assert make_precision("auto", device="cpu").use_amp is native
    lines = []
    assert script_precision(None, "bf16", "cpu", log=lines.append).use_amp is native
    assert script_precision(False, "bf16", "cpu", log=lines.append).use_amp is False
    assert bool(lines) is not native and all("no native bf16" in line for line in lines)
    lines.clear()
    forced = script_precision(True, "bf16", "cpu", log=lines.append)
    assert forced.use_amp and forced.dtype == torch.bfloat16
    assert bool(lines) is not native and all(line.startswith("warning: --use-amp") for line in lines)
    assert script_precision(None, "fp16", "cpu", log=lines.append).use_amp is False  # fp16 autocast needs CUDA
    with pytest.raises(ValueError, match="`amp_dtype`"):
        native_amp("cpu", "fp8")
    with pytest.raises(TypeError, match="`use_amp`"):
        script_precision("auto", "bf16", "cpu")


def test_step_clips_like_clip_grad_norm():
    """`Precision.step` measures the norm before clipping (to catch NaN first), then clips exactly
    as `clip_grad_norm_` does."""
    weights = {}
    for how in ("precision", "torch"):
        torch.manual_seed(0)
        model = build()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(1)
        loss = model(batch_for(0))
        if how == "precision":
            norm = make_precision().step(loss, optimizer, model.named_parameters(), max_grad_norm=0.05)
        else:
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            optimizer.step()
        assert norm > 0.05  # the clip was active
        weights[how] = model.state_dict()
    for name, value in weights["torch"].items():
        assert torch.equal(weights["precision"][name], value), name


def test_optimizer_over_parameters_without_encoder_decoder_resumes_in_another_process(tmp_path):
    """The AdamW state is saved by parameter position: the trainable list must come in the same
    order in every process (a `set` of parameters did not), or the moments land on the wrong tensors."""
    script = f"""
import os, sys, torch
sys.path.insert(0, {os.path.dirname(__file__)!r})
from test_training import batch_for, build
from transfusion_pytorch.training import save_checkpoint, load_checkpoint
mode, path, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
model = build()
_ = [torch.empty(1000) for _ in range(int(sys.argv[4]))]  # move the allocator: ids differ between processes
optimizer = torch.optim.AdamW(model.parameters_without_encoder_decoder(), lr=1e-2)
start = 0
if mode == "resume":
    start = load_checkpoint(path, model, optimizer)["step"]
for step in range(start, start + steps):
    torch.manual_seed(step)
    model(batch_for(step)).backward()
    optimizer.step()
    optimizer.zero_grad()
save_checkpoint(path, model, optimizer, step=start + steps)
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    split, whole = str(tmp_path / "split.pt"), str(tmp_path / "whole.pt")
    subprocess.run([sys.executable, "-c", script, "first", split, "3", "0"], env=env | {"PYTHONHASHSEED": "1"}, check=True)
    subprocess.run([sys.executable, "-c", script, "resume", split, "2", "37"], env=env | {"PYTHONHASHSEED": "2"}, check=True)
    subprocess.run([sys.executable, "-c", script, "first", whole, "5", "11"], env=env, check=True)
    resumed = read_checkpoint(split)["model"]
    uninterrupted = read_checkpoint(whole)["model"]
    for name, value in uninterrupted.items():
        assert torch.equal(value, resumed[name]), name
    model = build()
    names = {id(p): n for n, p in model.named_parameters()}
    assert [names[id(p)] for p in model.parameters_without_encoder_decoder()] == [n for n, _ in model.named_parameters()]


def test_checkpoint_written_before_a_constructor_argument_existed(tmp_path):
    """A checkpoint from before an argument was added (its config lacks the key) loads into a
    model that leaves the argument at its default, and not into one that changes it."""
    old = build(depth=2)
    del old.config["flow_prediction"]  # as written before `flow_prediction` existed
    save_checkpoint(tmp_path / "old.pt", old, step=3)
    assert load_checkpoint(tmp_path / "old.pt", build(depth=2))["step"] == 3
    rebuilt = Transfusion.from_checkpoint(tmp_path / "old.pt")
    assert rebuilt.flow_prediction == "velocity"
    changed = build(depth=2)
    changed.flow_prediction = changed.config["flow_prediction"] = "data"
    with pytest.raises(ValueError, match=r"another configuration.*flow_prediction"):
        load_checkpoint(tmp_path / "old.pt", changed)
