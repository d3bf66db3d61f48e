"""What the example scripts share: mixed precision, checkpoints that resume, logging.

Checkpoints themselves (checksummed, atomic, weights-only) are `checkpoint.py`; this module
re-exports them and adds `load_model(path)` for `Transfusion`. `Precision.step` refuses to
step on a NaN / inf loss or gradient (`NonFiniteError`, or a counted skip), so such a state
never reaches the weights, the optimizer or a checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import CHECKPOINT_FORMAT, config_to_json, load_checkpoint, model_from_config, read_checkpoint, save_checkpoint
from .checkpoint import load_model as load_model_of_class
from .flow import LossBreakdown
from .helpers import exists
from .inputs import check_bool, check_float, check_int
from .transfusion import Transfusion

__all__ = [
    "CHECKPOINT_FORMAT",
    "NonFiniteError",
    "Precision",
    "RunLogger",
    "breakdown_metrics",
    "config_to_json",
    "load_checkpoint",
    "load_model",
    "make_precision",
    "make_optimizer",
    "resolve_device",
    "device_argument",
    "model_from_config",
    "read_checkpoint",
    "save_checkpoint",
]


def load_model(path: str | os.PathLike, **overrides) -> Transfusion:
    """The `Transfusion` of a checkpoint, with its weights, ready to sample (`Transfusion.from_checkpoint`)."""
    return load_model_of_class(path, Transfusion, **overrides)


# ------------------------------------------------------------------ mixed precision

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteError(FloatingPointError):
    """A NaN / inf loss or gradient. The optimizer was not stepped and the gradients are zeroed,
    so the weights, the optimizer state and any checkpoint written next hold the last good step.

    `step`: the training step (when the loop passed it); `terms`: the non-finite loss terms,
    name → value (`text`, `flow[k]`, `velocity[k]`, `recon[k]`, or `total`); `parameters`: the
    parameters with a non-finite gradient (named when the loop passed named parameters).
    """

    def __init__(self, message: str, step: int | None = None, terms: dict | None = None, parameters: list | None = None):
        super().__init__(message)
        self.step, self.terms, self.parameters = step, terms or {}, parameters or []


ON_NONFINITE = ("raise", "skip")


def _nonfinite_terms(loss: torch.Tensor, breakdown: LossBreakdown | None = None) -> dict[str, float]:
    """The loss terms that are NaN / inf, name → value: `text`, `flow[k]`, `velocity[k]`,
    `recon[k]` of a `LossBreakdown`, or `total` when no breakdown names them."""
    terms = {}
    if exists(breakdown):
        terms["text"] = breakdown.text
        for kind in ("flow", "velocity", "recon"):
            terms.update({f"{kind}[{k}]": value for k, value in enumerate(getattr(breakdown, kind) or ())})
    values = {name: float(value.detach().float()) for name, value in terms.items() if torch.is_tensor(value)}
    bad = {name: value for name, value in values.items() if not math.isfinite(value)}
    return bad or {"total": float(loss.detach().float())}


def _named(parameters) -> list[tuple[str, torch.Tensor]]:
    """`module`, `module.named_parameters()` or a plain iterable of tensors → (name, tensor) pairs."""
    if isinstance(parameters, nn.Module):
        parameters = parameters.named_parameters()
    named = []
    for index, item in enumerate(parameters):
        name, tensor = item if isinstance(item, tuple) else (f"parameter #{index}", item)
        if not torch.is_tensor(tensor):
            raise TypeError(f"`parameters` must hold tensors or (name, tensor) pairs, got {type(tensor).__name__}")
        if tensor.requires_grad:
            named.append((name, tensor))
    return named


def _grad_norm(parameters: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all gradients together (as `clip_grad_norm_` measures it), clipping nothing."""
    grads = [p.grad for p in parameters if exists(p.grad)]
    if not grads:
        return torch.zeros(())
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        norm = torch.nn.utils.get_total_norm(grads)
        # FSDP2: the gradients are DTensor shards, their norm a DTensor pending a reduction over the ranks (full_tensor does it)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    device = grads[0].device
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach()).to(device) for g in grads]))


def _clip(parameters: list[torch.Tensor], max_norm: float, total_norm: torch.Tensor) -> None:
    if hasattr(torch.nn.utils, "clip_grads_with_norm_"):  # torch >= 2.6
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total_norm)
        return
    scale = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    for p in parameters:
        if exists(p.grad):
            p.grad.detach().mul_(scale.to(p.grad.device))


@dataclass
class Precision:
    """Autocast and (for fp16 on CUDA) loss scaling, in one object the training loop calls.

    bf16 needs no loss scaling; fp16 gets a `torch.amp.GradScaler`. Losses, the flow
    target and the ODE state stay fp32 inside the model whatever the autocast dtype.

    `skipped_steps` counts the steps `step` did not apply (a non-finite loss or gradient, or an
    fp16 overflow the scaler skipped); `last_nonfinite` says why the last one was skipped.
    """

    use_amp: bool = False
    dtype: torch.dtype = torch.bfloat16
    device_type: str = "cpu"
    scaler: Any = None
    skipped_steps: int = 0
    last_nonfinite: str | None = None

    @property
    def name(self) -> str:
        """What the forward passes compute in: "fp32", or the autocast dtype ("bf16", "fp16")."""
        return next(name for name, dtype in AMP_DTYPES.items() if dtype == self.dtype) if self.use_amp else "fp32"

    def autocast(self):
        if not self.use_amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch of gradient accumulation, scaled like `step`'s; the last
        micro-batch goes through `step`, which checks and applies the accumulated gradients.
        Under DDP, wrap every micro-batch but the last in `DistributedContext.no_sync`."""
        if not torch.is_tensor(loss) or loss.numel() != 1:
            raise TypeError(f"`loss` must be a scalar tensor, got {type(loss).__name__}")
        (self.scaler.scale(loss) if exists(self.scaler) else loss).backward()

    def step(
        self,
        loss: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        parameters,
        max_grad_norm: float | None = None,
        breakdown: LossBreakdown | None = None,
        step: int | None = None,
        on_nonfinite: str = "raise",
    ) -> torch.Tensor:
        """backward → (unscale) → clip → optimizer step → zero grads; returns the gradient norm.

        `parameters`: the model, `model.named_parameters()` (an error can then name the bad
        gradient) or `model.parameters()`. A NaN / inf loss or gradient is never applied: the
        gradients are zeroed, the optimizer is not stepped, and with `on_nonfinite="raise"` a
        `NonFiniteError` names `step` and the bad terms of `breakdown` (text, flow[k],
        velocity[k], recon[k]) or the bad gradients; with `"skip"` the step is counted in
        `skipped_steps` and the returned norm is non-finite (NaN when the loss was), so the loop
        can log it and go on. backward runs in every case, so DDP ranks stay in step (a NaN
        loss on one rank reaches every rank's gradients through the all-reduce).

        With fp16 and a GradScaler, an inf / NaN gradient under a finite loss is the scaler's
        normal overflow: it skips the step and lowers its scale, counted in `skipped_steps`
        whatever `on_nonfinite` says; a non-finite loss is raised or skipped as above.
        """
        if exists(max_grad_norm) and not max_grad_norm == float("inf"):  # inf: measure the norm, clip nothing
            check_float("max_grad_norm", max_grad_norm, 0.0)
            if max_grad_norm == 0:
                raise ValueError("`max_grad_norm` must be > 0 (0 would zero every gradient); use None or inf for no clipping")
        if on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"`on_nonfinite` must be one of {ON_NONFINITE}, got {on_nonfinite!r}")
        if exists(step):
            step = check_int("step", step, 0)
        if exists(breakdown) and not isinstance(breakdown, LossBreakdown):
            raise TypeError(f"`breakdown` must be the model's LossBreakdown, got {type(breakdown).__name__}")
        named = _named(parameters)
        parameters = [p for _, p in named]
        if exists(self.scaler):
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(optimizer)
        else:
            loss.backward()
        grad_norm = _grad_norm(parameters)  # measured before clipping: a NaN norm would clip every gradient to NaN
        loss_finite, grads_finite = torch.stack([loss.detach().float().isfinite(), grad_norm.float().isfinite().to(loss.device)]).tolist()
        if loss_finite and grads_finite:
            if exists(max_grad_norm) and math.isfinite(max_grad_norm):
                _clip(parameters, max_grad_norm, grad_norm)
            self._apply(optimizer)
            return grad_norm

        where = f"step {step}: " if exists(step) else ""
        if exists(self.scaler) and loss_finite:  # an fp16 overflow: the scaler skips and lowers its scale
            self._apply(optimizer)
            self._skipped(f"{where}fp16 gradient overflow; the GradScaler skipped the step (scale now {self.scaler.get_scale():g})")
            return grad_norm

        terms = {} if loss_finite else _nonfinite_terms(loss, breakdown)
        bad_parameters = [name for name, p in named if exists(p.grad) and not bool(p.grad.isfinite().all())]
        optimizer.zero_grad(set_to_none=True)
        if exists(self.scaler):
            self.scaler.update()  # after unscale_ the scaler expects an update; the inf it saw lowers the scale
        reasons = []
        if terms:
            reasons.append("non-finite loss: " + ", ".join(f"{name}={value}" for name, value in terms.items()))
        if terms and bad_parameters:  # the loss is the cause; its gradients follow
            reasons.append(f"{len(bad_parameters)} parameters got non-finite gradients from it")
        elif bad_parameters:
            shown = ", ".join(bad_parameters[:5]) + (f" and {len(bad_parameters) - 5} more" if len(bad_parameters) > 5 else "")
            reasons.append(f"non-finite gradient in {shown}")
        elif not grads_finite:
            reasons.append(f"gradient norm {float(grad_norm)} (every gradient finite: their norm overflowed)")
        message = where + "; ".join(reasons) + "; the optimizer was not stepped"
        self._skipped(message)
        if on_nonfinite == "raise":
            raise NonFiniteError(message, step=step, terms=terms, parameters=bad_parameters)
        return grad_norm if not grads_finite else grad_norm.new_tensor(float("nan"))

    def _apply(self, optimizer):
        if exists(self.scaler):
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def _skipped(self, reason: str):
        self.skipped_steps += 1
        self.last_nonfinite = reason


def native_amp(device: torch.device | str = "cpu", amp_dtype: str = "bf16") -> bool:
    """Whether `device` computes `amp_dtype` natively, so that autocast to it is faster than fp32.

    CUDA: fp16 always, bf16 where `torch.cuda.is_bf16_supported()`. A CPU: bf16 only with AMX
    tiles or AVX512-BF16 instructions (recent Xeons, Zen 4 and later). Elsewhere oneDNN emulates
    bf16, and it is slower than fp32, not faster: on an AVX2-only AMD EPYC with 2 threads a
    1024² matmul took 2.26 s in bf16 against 16 ms in fp32, a 3D convolution 10× as long."""
    if amp_dtype not in AMP_DTYPES:
        raise ValueError(f"`amp_dtype` must be one of {sorted(AMP_DTYPES)}, got {amp_dtype!r}")
    device_type = _device_type(device)
    if device_type == "cuda":
        return amp_dtype == "fp16" or torch.cuda.is_bf16_supported()
    if device_type != "cpu" or amp_dtype != "bf16":
        return False
    # private probes of torch.cpu (present since torch 2.2); missing, assume no native bf16
    probes = (getattr(torch.cpu, "_is_amx_tile_supported", None), getattr(torch.cpu, "_is_avx512_bf16_supported", None))
    return any(bool(probe()) for probe in probes if callable(probe))


def _device_type(device) -> str:
    try:
        return torch.device(device).type
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"`device` must be a torch device or its name ('cpu', 'cuda', 'cuda:1'), got {device!r}") from error


def make_precision(use_amp: bool | str = False, amp_dtype: str = "bf16", device: torch.device | str = "cpu") -> Precision:
    """The training loop's precision. `use_amp`: True / False, or `"auto"`: autocast to `amp_dtype`
    where the device computes it natively (`native_amp`), fp32 elsewhere."""
    if isinstance(use_amp, str):
        if use_amp != "auto":
            raise ValueError(f"`use_amp` must be True, False or 'auto', got {use_amp!r}")
        use_amp = native_amp(device, amp_dtype)
    check_bool("use_amp", use_amp)
    if amp_dtype not in AMP_DTYPES:
        raise ValueError(f"`amp_dtype` must be one of {sorted(AMP_DTYPES)}, got {amp_dtype!r}")
    device_type = _device_type(device)
    if use_amp and amp_dtype == "fp16" and device_type != "cuda":
        raise ValueError("`amp_dtype='fp16'` needs CUDA (with a GradScaler); use 'bf16' on the CPU")
    scaler = torch.amp.GradScaler("cuda") if use_amp and amp_dtype == "fp16" else None
    return Precision(use_amp=use_amp, dtype=AMP_DTYPES[amp_dtype], device_type=device_type, scaler=scaler)


AMP_HELP = (
    "autocast to --amp-dtype; by default on where the device computes it natively (CUDA; a CPU with AMX or AVX512-BF16), "
    "else fp32, which there is faster (--no-use-amp: always fp32)"
)


def script_precision(use_amp: bool | None, amp_dtype: str, device: torch.device | str, log=print) -> Precision:
    """`make_precision` for a script's `--use-amp` (True), `--no-use-amp` (False) or neither (None:
    `"auto"`), saying so where the choice changes the speed: the default turned off on a CPU
    without native bf16, or `--use-amp` asked for there (it runs, slower than fp32)."""
    if use_amp is not None:
        check_bool("use_amp", use_amp)
    native = native_amp(device, amp_dtype)
    if use_amp is None:
        if not native and _device_type(device) == "cpu" and amp_dtype == "bf16":
            log("bf16 autocast off: this CPU has no native bf16 (AMX or AVX512-BF16), where fp32 is faster (--use-amp forces bf16)")
        use_amp = native
    elif use_amp and not native and _device_type(device) == "cpu" and amp_dtype == "bf16":
        log("warning: --use-amp on a CPU without native bf16 (AMX or AVX512-BF16): bf16 is emulated there, slower than fp32")
    return make_precision(use_amp, amp_dtype, device)


# ------------------------------------------------------------------ devices and optimizers


def resolve_device(name: str) -> torch.device:
    """`--device`: `cpu`, `cuda`, or `auto` (cuda when there is one, else cpu)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("`--device cuda` needs CUDA, and this torch sees no CUDA device; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"`--device` must be cpu, cuda or auto, got {name!r}")
    return torch.device(name)


def compiler_available(device: torch.device) -> bool:
    """Whether `torch.compile` can build kernels for `device` here: on a CPU inductor writes C++, which
    needs a compiler (`$CXX`, or g++ / clang++ / c++ on the PATH); CUDA builds of torch ship Triton."""
    if device.type != "cpu":
        return True
    return any(shutil.which(name) for name in (os.environ.get("CXX"), "g++", "clang++", "c++") if name)


def device_argument(name: str) -> str:
    """argparse `type` for `--device`: refuses cuda without CUDA at parse time, with a usage error."""
    if name == "cuda":
        try:
            resolve_device(name)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return name  # unknown names fall through to `choices`, which lists the valid ones


def make_optimizer(parameters, **kwargs) -> torch.optim.AdamW:
    """AdamW with the fused kernel where this torch has one for the parameters' device (CPU and
    CUDA since torch 2.4), else the foreach one: one kernel over all tensors instead of a Python
    loop over them."""
    parameters = list(parameters)
    try:
        return torch.optim.AdamW(parameters, fused=True, **kwargs)
    except RuntimeError:  # "`fused=True` requires all the params to be ... of supported devices"
        return torch.optim.AdamW(parameters, foreach=True, **kwargs)


# ------------------------------------------------------------------ logging


def breakdown_metrics(breakdown, prefix: str = "loss") -> dict[str, float]:
    """`LossBreakdown` → flat floats: loss/total, loss/text, loss/flow_0, loss/velocity_0, …"""
    metrics = {f"{prefix}/total": float(breakdown.total.detach()), f"{prefix}/text": float(breakdown.text.detach())}
    for name in ("flow", "velocity", "recon"):
        values = getattr(breakdown, name)
        if values is not None:
            metrics.update({f"{prefix}/{name}_{k}": float(v.detach()) for k, v in enumerate(values)})
    return metrics


class RunLogger:
    """Metrics to a JSONL file in `out_dir` and, with `use_wandb`, to Weights & Biases.

    wandb is imported only when asked for; it honours `WANDB_MODE` (`offline` and
    `disabled` work without a network).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike | None = None,
        use_wandb: bool = False,
        project: str = "transfusion-pytorch",
        config: dict | None = None,
        run_name: str | None = None,
    ):
        self.path = Path(out_dir) / "metrics.jsonl" if exists(out_dir) else None
        if exists(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.wandb_run = None
        if use_wandb:
            import wandb

            self.wandb = wandb
            self.wandb_run = wandb.init(project=project, config=config, name=run_name, dir=str(out_dir) if exists(out_dir) else None)

    def log(self, metrics: dict, step: int):
        if exists(self.path):
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")
        if exists(self.wandb_run):
            self.wandb_run.log(metrics, step=step)

    def log_images(self, name: str, images: list, step: int, captions: list[str] | None = None):
        """`images`: arrays or tensors `(h, w)` / `(h, w, c)` with values in [0, 1]."""
        if not exists(self.wandb_run):
            return
        captions = captions or [None] * len(images)
        pictures = [self.wandb.Image((torch.as_tensor(img).clamp(0, 1) * 255).byte().cpu().numpy(), caption=c) for img, c in zip(images, captions)]
        self.wandb_run.log({name: pictures}, step=step)

    def finish(self):
        if exists(self.wandb_run):
            self.wandb_run.finish()
