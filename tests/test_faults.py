"""Faults in training: a NaN / inf is never applied, named, and never checkpointed; a run killed
at any moment (mid-checkpoint-write included) resumes bit-identically."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn, randint, randn

from transfusion_pytorch import Transfusion
from transfusion_pytorch import checkpoint as checkpoint_module
from transfusion_pytorch.training import NonFiniteError, Precision, load_checkpoint, make_precision, read_checkpoint, save_checkpoint

TINY = dict(dim=16, depth=1, dim_head=8, heads=2)


# ------------------------------------------------------------------ non-finite losses and gradients


def two_modalities():
    """Text, two modality types, velocity consistency (EMA) and reconstruction (a decoder on type 1):
    every loss term of a LossBreakdown exists."""
    torch.manual_seed(0)
    model = Transfusion(
        num_text_tokens=8,
        dim_latent=(4, 6),
        modality_default_shape=((2,), (3,)),
        modality_decoder=(None, nn.Identity()),
        reconstruction_loss_weight=0.5,
        transformer=TINY,
    )
    ema = model.create_ema(beta=0.9, update_after_step=0, update_every=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, ema, optimizer


def batch_for(step):
    g = torch.Generator().manual_seed(step)
    return [
        [randint(0, 8, (3,), generator=g), (0, randn(2, 4, generator=g)), randint(0, 8, (2,), generator=g), (1, randn(3, 6, generator=g))] for _ in range(2)
    ]


def train_step(model, ema, optimizer, precision, step, **kwargs):
    loss, breakdown = model(batch_for(step), velocity_consistency_ema_model=ema, return_breakdown=True)
    return precision.step(loss, optimizer, model.named_parameters(), max_grad_norm=1.0, breakdown=breakdown, step=step, **kwargs)


def snapshot(model, optimizer):
    return {k: v.clone() for k, v in model.state_dict().items()}, json.dumps(_plain(optimizer.state_dict()))


def _plain(state):
    """An optimizer state dict as JSON-able data, tensors as lists (to compare two of them exactly)."""
    if torch.is_tensor(state):
        return state.tolist()
    if isinstance(state, dict):
        return {str(k): _plain(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return [_plain(v) for v in state]
    return state


def nan_output(module):
    return module.register_forward_hook(lambda _module, _inputs, output: output * float("nan"))


# which module to poison → the loss terms that must be named (and only those)
POISONS = {
    "text": (lambda model, ema: model.to_text_logits, {"text"}),
    "flow of modality 1": (lambda model, ema: model.modality_heads[1].model_to_latent, {"flow[1]", "velocity[1]", "recon[1]"}),
    "velocity of modality 0": (lambda model, ema: ema.ema_model.modality_heads[0].model_to_latent, {"velocity[0]"}),
    "recon of modality 1": (lambda model, ema: model.modality_heads[1].decoder, {"recon[1]"}),
}


@pytest.mark.parametrize("poison", list(POISONS))
def test_a_nan_loss_term_is_named_with_its_step_and_never_applied(poison, tmp_path):
    model, ema, optimizer = two_modalities()
    precision = make_precision()
    train_step(model, ema, optimizer, precision, step=0)  # one good step: Adam has state
    ema.update()
    good_weights, good_optimizer = snapshot(model, optimizer)

    module_of, terms = POISONS[poison]
    hook = nan_output(module_of(model, ema))
    with pytest.raises(NonFiniteError) as error:
        train_step(model, ema, optimizer, precision, step=12)
    message = str(error.value)
    assert message.startswith("step 12: non-finite loss: ") and "the optimizer was not stepped" in message
    assert set(error.value.terms) == terms and all(f"{term}=nan" in message for term in terms)
    assert error.value.step == 12 and isinstance(error.value, FloatingPointError)

    # nothing of the bad step reached the weights, the optimizer or the gradients
    assert all(torch.equal(v, good_weights[k]) for k, v in model.state_dict().items())
    assert snapshot(model, optimizer)[1] == good_optimizer
    assert all(p.grad is None for p in model.parameters())

    # so a checkpoint written after the error holds the last good step
    save_checkpoint(tmp_path / "ckpt.pt", model, optimizer, ema=ema, step=1)
    hook.remove()
    restored, _, restored_optimizer = two_modalities()
    load_checkpoint(tmp_path / "ckpt.pt", restored, restored_optimizer)
    assert all(torch.equal(v, good_weights[k]) for k, v in restored.state_dict().items())
    assert snapshot(restored, restored_optimizer)[1] == good_optimizer


def test_a_nan_gradient_names_the_parameter():
    model, ema, optimizer = two_modalities()
    weights, _ = snapshot(model, optimizer)
    name = "transformer.blocks.0.attn.to_qkv.weight"
    dict(model.named_parameters())[name].register_hook(lambda grad: grad * float("nan"))
    precision = make_precision()
    with pytest.raises(NonFiniteError, match=rf"^step 3: non-finite gradient in {name}; the optimizer was not stepped$") as error:
        train_step(model, ema, optimizer, precision, step=3)
    assert error.value.parameters == [name] and error.value.terms == {}
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    # without names (`model.parameters()`) the parameter is given by position; without a step, no step
    loss = model(batch_for(0))
    with pytest.raises(NonFiniteError, match=r"^non-finite gradient in parameter #\d+;"):
        precision.step(loss, optimizer, model.parameters())


def test_skip_mode_counts_the_step_and_training_goes_on():
    model, ema, optimizer = two_modalities()
    precision = make_precision()
    weights, state = snapshot(model, optimizer)
    hook = nan_output(model.modality_heads[0].model_to_latent)
    norm = train_step(model, ema, optimizer, precision, step=5, on_nonfinite="skip")
    assert not torch.isfinite(norm) and precision.skipped_steps == 1
    assert precision.last_nonfinite.startswith("step 5: non-finite loss: flow[0]=nan")
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items()) and snapshot(model, optimizer)[1] == state

    hook.remove()
    for step in (6, 7):
        norm = train_step(model, ema, optimizer, precision, step=step, on_nonfinite="skip")
        assert torch.isfinite(norm)
    assert precision.skipped_steps == 1
    assert any(not torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_with_a_grad_scaler_an_overflow_is_skipped_and_a_nan_loss_raised():
    """fp16 + GradScaler: an inf gradient under a finite loss is the scaler's business (skip the
    step, lower the scale), counted but not raised; a NaN loss is raised as without a scaler.
    (A CPU GradScaler over fp32 stands in for the CUDA one here.)"""
    model, ema, optimizer = two_modalities()
    precision = Precision(scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
    weights, state = snapshot(model, optimizer)
    hook = model.to_text_logits.weight.register_hook(lambda grad: grad * float("inf"))
    train_step(model, ema, optimizer, precision, step=0)  # on_nonfinite="raise", yet no error
    assert precision.skipped_steps == 1 and "GradScaler skipped" in precision.last_nonfinite
    assert precision.scaler.get_scale() == 512.0
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items()) and snapshot(model, optimizer)[1] == state
    hook.remove()

    nan_output(model.modality_heads[1].model_to_latent)
    with pytest.raises(NonFiniteError, match=r"step 1: non-finite loss: flow\[1\]=nan"):
        train_step(model, ema, optimizer, precision, step=1)
    assert precision.scaler.get_scale() == 256.0  # the scaler saw the NaN gradients too
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_nonfinite_weights_never_reach_a_checkpoint(tmp_path):
    model, ema, optimizer = two_modalities()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model, optimizer, ema=ema, step=1)
    before = path.read_bytes()
    with torch.no_grad():
        model.transformer.blocks[0].attn.to_qkv.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"`model` has non-finite .* transformer\.blocks\.0\.attn\.to_qkv\.weight"):
        save_checkpoint(path, model, optimizer, ema=ema, step=2)
    ema.update()
    model, _, _ = two_modalities()
    with pytest.raises(ValueError, match=r"`ema` has non-finite"):
        save_checkpoint(path, model, optimizer, ema=ema, step=2)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ckpt.pt"]


def test_bad_nonfinite_arguments():
    model, ema, optimizer = two_modalities()
    precision = make_precision()
    for kwargs, error, name in (
        (dict(on_nonfinite="ignore"), ValueError, "on_nonfinite"),
        (dict(step=-1), ValueError, "step"),
        (dict(breakdown=(1, 2)), TypeError, "breakdown"),
    ):
        with pytest.raises(error, match=f"`{name}`"):
            precision.step(model(batch_for(0)), optimizer, model.parameters(), **kwargs)


# ------------------------------------------------------------------ killed at any moment

STEPS = 10


def tiny_run():
    torch.manual_seed(0)
    model = Transfusion(num_text_tokens=8, dim_latent=4, modality_default_shape=(2,), transformer=TINY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    ema = model.create_ema(beta=0.9, update_after_step=0, update_every=1)
    return model, optimizer, scheduler, ema


def tiny_batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    return [[randint(0, 8, (3,), generator=g), randn(2, 4, generator=g)] for _ in range(2)]


def train_and_checkpoint(path, steps, progress_fd=None):
    """A training run that resumes from `path` when it exists and checkpoints after every step."""
    model, optimizer, scheduler, ema = tiny_run()
    precision = make_precision()
    if os.path.exists(path):
        start = load_checkpoint(path, model, optimizer, scheduler, ema)["step"]
    else:
        start = 0
        torch.manual_seed(7)
        random.seed(7)  # a forked child's `random` is reseeded from the OS: seed it as a script would
    for step in range(start, steps):
        loss = model(tiny_batch(step), velocity_consistency_ema_model=ema)  # the flow times come from the global RNG
        precision.step(loss, optimizer, model.named_parameters(), max_grad_norm=1.0, step=step)
        scheduler.step()
        ema.update()
        save_checkpoint(path, model, optimizer, scheduler, ema, step=step + 1)
        if progress_fd is not None:
            os.write(progress_fd, b".")


class _DyingFile:
    """A file that SIGKILLs its process once `offset` bytes are written (`offset` < 0: from the end;
    a float: that fraction of the file, whose size the header's length field gives)."""

    def __init__(self, file, offset):
        self.file, self.offset, self.written = file, offset, 0

    def write(self, data):
        data = memoryview(data).cast("B")
        if self.written == 0:
            total = checkpoint_module.HEADER_SIZE + int(bytes(data[-21:-1]))  # the header is written first
            self.offset = int(self.offset * total) if isinstance(self.offset, float) else self.offset % total
        if self.written + len(data) > self.offset:
            self.file.write(data[: self.offset - self.written])
            self.file.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        self.written += len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.file.__exit__(*exc)


def _arm(kind, nth, offset=None):
    """In a forked child: SIGKILL during the `nth` checkpoint write, at the moment `kind` names."""
    calls = {"fdopen": 0, "replace": 0}
    real_fdopen, real_replace = os.fdopen, os.replace

    def fdopen(fd, *args, **kwargs):
        calls["fdopen"] += 1
        file = real_fdopen(fd, *args, **kwargs)
        return _DyingFile(file, offset) if kind == "mid-write" and calls["fdopen"] == nth else file

    def replace(src, dst):
        calls["replace"] += 1
        if calls["replace"] == nth and kind == "before-rename":
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)
        if calls["replace"] == nth and kind == "after-rename":  # before the folder's fsync
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint_module.os.fdopen, checkpoint_module.os.replace = fdopen, replace


def kill_plans(seed, self_kills, parent_kills):
    """Where each process of the interrupted run dies: inside its nth checkpoint write (in the
    header, mid-payload, before the last byte), just before or after the rename, or at a random
    moment after its nth step as seen from the parent. Fixed by `seed`."""
    rng = random.Random(seed)
    moments = [("mid-write", 40), ("mid-write", -1), ("before-rename", None), ("after-rename", None)]
    plans = [dict(kind=kind, nth=rng.randint(1, 2), offset=offset) for kind, offset in moments]
    plans += [dict(kind="mid-write", nth=rng.randint(1, 2), offset=rng.uniform(0.02, 0.98)) for _ in range(self_kills - len(moments))]
    rng.shuffle(plans)
    return plans + [dict(kind="parent", nth=1, delay=rng.uniform(0.0, 0.05)) for _ in range(parent_kills)]


def kill_and_resume(folder, plans, steps):
    """Run in a fresh process that has imported everything but run no tensor op: one forked child
    per process of the run (forks start in milliseconds; OMP_NUM_THREADS=1, so no thread pool
    crosses a fork). Each child resumes from the checkpoint and is killed as its plan says; after
    each kill the checkpoint file is copied aside. Then one child finishes the run and another
    trains the same steps without interruption."""
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # warm the optimizer's lazy imports once
    path = os.path.join(folder, "interrupted", "ckpt.pt")
    os.makedirs(os.path.dirname(path))
    statuses = []

    def child(plan, target, progress=None):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.close(read)
                torch.set_num_threads(1)
                if plan and plan["kind"] != "parent":
                    _arm(plan["kind"], plan["nth"], plan["offset"])
                train_and_checkpoint(target, steps, write)
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            os._exit(code)
        os.close(write)
        if plan and plan["kind"] == "parent":
            done = 0
            while done < plan["nth"] and (chunk := os.read(read, plan["nth"] - done)):
                done += len(chunk)
            if done == plan["nth"]:  # the child finished its nth step: kill it a moment later
                time.sleep(plan["delay"])
            os.kill(pid, signal.SIGKILL)  # a no-op if it already finished
        _, status = os.waitpid(pid, 0)
        os.close(read)
        return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)

    temporaries, seen = [], set()
    for index, plan in enumerate(plans):
        statuses.append(child(plan, path))
        if os.path.exists(path):
            with open(path, "rb") as src, open(os.path.join(folder, f"after_kill_{index}.pt"), "wb") as dst:
                dst.write(src.read())
        left = {name for name in os.listdir(os.path.dirname(path)) if name.endswith(".tmp")}
        temporaries.append(sorted(left - seen))  # what this kill left behind
        seen |= left
    statuses.append(child(None, path))
    statuses.append(child(None, os.path.join(folder, "uninterrupted.pt")))
    with open(os.path.join(folder, "statuses.json"), "w") as f:
        json.dump({"statuses": statuses, "temporaries": temporaries}, f)


def assert_same(a, b, where="checkpoint"):
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks one process per kill")
@pytest.mark.parametrize(
    "seed, self_kills, parent_kills, steps",
    [(0, 5, 2, STEPS), pytest.param(1, 16, 6, 30, marks=pytest.mark.slow)],
)
def test_killed_at_any_moment_resumes_bit_identically(tmp_path, seed, self_kills, parent_kills, steps):
    """SIGKILL inside the checkpoint writer (in the header, mid-payload, one byte short, before and
    after the rename) and from the parent at random moments: the checkpoint on disk is always a
    whole one (the previous or the new), and resuming from it ends in exactly the state of an
    uninterrupted run: weights, EMA, optimizer, scheduler and RNG, tensor for tensor."""
    plans = kill_plans(seed, self_kills, parent_kills)
    code = (
        f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_faults; test_faults.kill_and_resume({str(tmp_path)!r}, {plans!r}, {steps})"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    record = json.loads((tmp_path / "statuses.json").read_text())
    statuses = record["statuses"]
    assert statuses[-2:] == [0, 0]

    step = 0
    for index, (plan, status, temporaries) in enumerate(zip(plans, statuses, record["temporaries"])):
        copy = tmp_path / f"after_kill_{index}.pt"
        saved = read_checkpoint(copy)["step"] if copy.exists() else 0  # never a damaged file
        if plan["kind"] == "parent":  # killed after at least nth steps (or it finished first)
            assert status == -signal.SIGKILL or (status == 0 and saved == steps)
            assert saved >= min(step + plan["nth"], steps)
        else:  # the kill inside the nth write leaves the previous checkpoint, or the new one once renamed
            assert status == -signal.SIGKILL, plan
            assert saved == step + plan["nth"] - (plan["kind"] != "after-rename"), plan
            # and it struck where planned: a partial temporary file, a whole one never renamed, none
            assert len(temporaries) == (plan["kind"] != "after-rename"), plan
            if temporaries:
                temporary = tmp_path / "interrupted" / temporaries[0]
                if plan["kind"] == "before-rename":
                    assert read_checkpoint(temporary)["step"] == saved + 1
                else:
                    assert plan["offset"] != 40 or temporary.stat().st_size == 40
                    with pytest.raises(ValueError, match="truncated"):
                        read_checkpoint(temporary)
        step = saved

    interrupted = read_checkpoint(tmp_path / "interrupted" / "ckpt.pt")
    uninterrupted = read_checkpoint(tmp_path / "uninterrupted.pt")
    assert interrupted["step"] == uninterrupted["step"] == steps
    for key in ("model", "ema", "optimizer", "scheduler", "rng", "config", "extra"):
        assert_same(interrupted[key], uninterrupted[key], key)
