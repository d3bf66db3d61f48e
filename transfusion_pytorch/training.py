"""What the example scripts share: mixed precision, checkpoints that resume, logging.

Checkpoints themselves (atomic, weights-only) are `checkpoint.py`; this module re-exports
them and adds `load_model(path)` for `Transfusion`.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CHECKPOINT_FORMAT, config_to_json, load_checkpoint, model_from_config, read_checkpoint, save_checkpoint
from .checkpoint import load_model as load_model_of_class
from .helpers import exists
from .inputs import check_bool, check_float
from .transfusion import Transfusion

__all__ = [
    "CHECKPOINT_FORMAT",
    "Precision",
    "RunLogger",
    "breakdown_metrics",
    "config_to_json",
    "load_checkpoint",
    "load_model",
    "make_precision",
    "model_from_config",
    "read_checkpoint",
    "save_checkpoint",
]


def load_model(path: str | os.PathLike, **overrides) -> Transfusion:
    """The `Transfusion` of a checkpoint, with its weights, ready to sample (`Transfusion.from_checkpoint`)."""
    return load_model_of_class(path, Transfusion, **overrides)


# ------------------------------------------------------------------ mixed precision

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Precision:
    """Autocast and (for fp16 on CUDA) loss scaling, in one object the training loop calls.

    bf16 needs no loss scaling; fp16 gets a `torch.amp.GradScaler`. Losses, the flow
    target and the ODE state stay fp32 inside the model whatever the autocast dtype.
    """

    use_amp: bool = False
    dtype: torch.dtype = torch.bfloat16
    device_type: str = "cpu"
    scaler: Any = None

    def autocast(self):
        if not self.use_amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, parameters, max_grad_norm: float | None = None) -> torch.Tensor:
        """backward → (unscale) → clip → optimizer step → zero grads; returns the gradient norm."""
        if exists(max_grad_norm) and not max_grad_norm == float("inf"):  # inf: measure the norm, clip nothing
            check_float("max_grad_norm", max_grad_norm, 0.0)
            if max_grad_norm == 0:
                raise ValueError("`max_grad_norm` must be > 0 (0 would zero every gradient); use None or inf for no clipping")
        parameters = [p for p in parameters if p.requires_grad]
        if exists(self.scaler):
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(optimizer)
        else:
            loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm if exists(max_grad_norm) else float("inf"))
        if exists(self.scaler):
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm


def make_precision(use_amp: bool = False, amp_dtype: str = "bf16", device: torch.device | str = "cpu") -> Precision:
    check_bool("use_amp", use_amp)
    if amp_dtype not in AMP_DTYPES:
        raise ValueError(f"`amp_dtype` must be one of {sorted(AMP_DTYPES)}, got {amp_dtype!r}")
    try:
        device_type = torch.device(device).type
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"`device` must be a torch device or its name ('cpu', 'cuda', 'cuda:1'), got {device!r}") from error
    if use_amp and amp_dtype == "fp16" and device_type != "cuda":
        raise ValueError("`amp_dtype='fp16'` needs CUDA (with a GradScaler); use 'bf16' on the CPU")
    scaler = torch.amp.GradScaler("cuda") if use_amp and amp_dtype == "fp16" else None
    return Precision(use_amp=use_amp, dtype=AMP_DTYPES[amp_dtype], device_type=device_type, scaler=scaler)


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
