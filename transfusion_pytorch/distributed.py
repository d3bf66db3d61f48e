"""Multi-process training on `torch.distributed`: set-up from torchrun's environment, DDP over
the model (or FSDP2, `ctx.shard`: see `fsdp.py`), rank-0 checkpoints (sharded ones under FSDP),
and the checks that keep ranks in step.

    ctx = setup_distributed(enabled=args.ddp, device=args.device, seed=args.seed)
    try:
        model = build_model(args).to(ctx.device)      # the same initial weights on every rank
        ema = model.create_ema()                      # an identical EMA on every rank
        ddp_model = ctx.wrap(model)                   # DistributedDataParallel, or `model` itself
        ...  loss = ddp_model(batch); precision.step(loss, optimizer, model.named_parameters())
        ctx.save_checkpoint(path, model, optimizer, scheduler, ema, step=step)   # rank 0 writes
    finally:
        ctx.teardown()

Launch with `torchrun --standalone --nproc_per_node=N script.py --ddp` (one node) or
`torchrun --nnodes=M --nproc_per_node=N --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT ...`
(several); torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, which
`setup_distributed` reads. NCCL on CUDA (one device per local rank), gloo on the CPU.

What is synchronised, and why:
  - initial weights: every rank seeds torch with the same `seed` before the model is built, and
    DDP broadcasts rank 0's parameters and buffers when it wraps the model anyway;
  - gradients: DDP averages them over ranks in backward (all-reduce), so every rank applies
    the same optimizer step and the weights stay bitwise identical (`check_in_sync` checks);
  - EMA: not communicated. Every rank keeps its own EMA and updates it from its (identical)
    weights, so the EMAs stay identical too; any rank can sample from it and rank 0 saves it.
    Costs one model copy per rank, saves an all-reduce or broadcast per step;
  - data: NOT the same — each rank draws its own share of the global batch.

Unused parameters. Which parameters a Transfusion step uses depends on the batch: the null token
of classifier-free guidance only when some instance is dropped (random per instance), the time
conditioning and modality heads not in text-only steps, the text head not in modality-only
steps. DDP without `find_unused_parameters` waits for a gradient of every parameter, and when
the used sets differ between ranks the reductions no longer pair up: an error on the next step
or a hang. `wrap` therefore sets `find_unused_parameters=True` by default: DDP walks the
autograd graph after each forward and marks parameters without a gradient as ready (a
parameter unused on every rank keeps `grad=None`, as in one process, so AdamW skips it exactly
as a 1-process run does). Routing every parameter into the graph (`loss + 0 * p.sum()`) would
avoid the walk but give unused parameters a zero gradient, which AdamW does not skip (its
momentum keeps moving them), so training would differ from one process. The walk's cost is
measured in the README ("Multi-process training"); pass `find_unused_parameters=False` for a
workload that uses every parameter on every step.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from .fsdp import UnusedParameters, is_sharded, load_full_checkpoint, load_sharded_checkpoint, save_sharded_checkpoint, shard_model
from .helpers import exists
from .inputs import check_bool, check_float, check_int
from .training import load_checkpoint, resolve_device, save_checkpoint

__all__ = ["DistributedContext", "setup_distributed", "seed_everything", "TORCHRUN_VARIABLES"]

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def seed_everything(seed: int) -> None:
    """torch (CPU and CUDA), numpy and Python's `random` from one seed."""
    torch.manual_seed(seed)
    random.seed(seed)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed % 2**32)


@dataclass
class DistributedContext:
    """Where this process stands in a run: its rank, the world size, its device. With
    `enabled=False` it is the 1-process stand-in (rank 0 of 1) whose methods do nothing
    distributed, so a script calls them the same way with and without `--ddp`."""

    enabled: bool
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs, writes checkpoints and evaluates."""
        return self.rank == 0

    def __enter__(self) -> DistributedContext:
        return self

    def __exit__(self, *exc_info) -> None:
        self.teardown()

    # ------------------------------------------------------------------ the model

    def wrap(self, model: nn.Module, find_unused_parameters: bool = True, **ddp_kwargs) -> nn.Module:
        """`model` in `DistributedDataParallel` (rank 0's weights are broadcast to every rank), or
        `model` itself when not distributed. Call the wrapper for the training loss (its backward
        averages the gradients); sample, evaluate and save with the unwrapped `model`.

        `find_unused_parameters` (default True): see the module docstring — a Transfusion step
        may leave the null token, time conditioning or a modality's heads without a gradient."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
        check_bool("find_unused_parameters", find_unused_parameters)
        if not self.enabled:
            return model
        devices = {p.device for p in model.parameters()}
        if devices != {self.device}:
            raise ValueError(
                f"`model` must be on this rank's device {self.device} before wrapping (move it with .to(ctx.device)), got {sorted(map(str, devices))}"
            )
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters, **ddp_kwargs)

    def shard(self, model: nn.Module, ema: nn.Module | None = None, param_dtype: torch.dtype | None = None) -> nn.Module:
        """FSDP2 instead of DDP: `model` and the EMA copy of `ema` sharded over the ranks (`fsdp.py`),
        or `model` itself when not distributed. Build the optimizer after this, from the returned
        model's parameters (the shards), then call `skip_unused`. Call the returned model for the
        loss; sampling needs the gathered weights (`fsdp.consolidate_checkpoint`)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
        if not self.enabled:
            return model
        return shard_model(model, ema, device=self.device, param_dtype=param_dtype)

    def skip_unused(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> UnusedParameters | None:
        """For a sharded `model`: before each `optimizer` step, set to None the gradients no rank
        produced (FSDP2 reduce-scatters zeros for them), so AdamW skips those parameters exactly as
        one process would. Nothing to do for DDP or one process (returns None)."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not is_sharded(model):
            return None
        tracker = UnusedParameters(model)
        optimizer.register_step_pre_hook(tracker)
        return tracker

    def no_sync(self, model: nn.Module, sync: bool):
        """Context for gradient accumulation: with `sync=False` the backward of a DDP `model`
        only accumulates local gradients (no all-reduce; under FSDP2 no reduce-scatter, the
        gathered gradients kept until then); the micro-batch with `sync=True` reduces the sum.
        Wrap forward AND backward of each micro-batch in it."""
        check_bool("sync", sync)
        if sync:
            return contextlib.nullcontext()
        if is_sharded(model):
            return _fsdp_no_sync(model)
        if isinstance(model, DistributedDataParallel):
            return model.no_sync()
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ data and randomness

    def local_batch_size(self, global_batch_size: int) -> int:
        """This rank's share of a global batch: `global_batch_size / world_size`."""
        global_batch_size = check_int("global_batch_size", global_batch_size, 1)
        if global_batch_size % self.world_size:
            raise ValueError(f"`batch_size` is the global batch and must divide evenly over the {self.world_size} processes, got {global_batch_size}")
        return global_batch_size // self.world_size

    def seed_per_rank(self, seed: int) -> None:
        """Give each rank its own random stream for data and noise: rank 0 keeps the stream it
        has (a 1-process run is unchanged), rank r > 0 is reseeded from `(seed, r)`. Call after
        the model is built (identical weights) and after a resume restored the RNG."""
        seed = check_int("seed", seed, 0)
        if self.rank > 0:
            seed_everything((seed * 1_000_003 + self.rank) % 2**63)

    # ------------------------------------------------------------------ communication

    def barrier(self) -> None:
        if self.enabled:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def mean_metrics(self, metrics: dict) -> dict[str, float]:
        """Each number's mean over all ranks, in one all-reduce (every rank must call it with the same keys)."""
        if not isinstance(metrics, dict):
            raise TypeError(f"`metrics` must be a dict of numbers, got {type(metrics).__name__}")
        keys = sorted(metrics)
        values = torch.tensor([float(metrics[key]) for key in keys], dtype=torch.float64)
        if self.enabled and keys:
            values = values.to(self.device)
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
            values = values.cpu() / self.world_size
        return dict(zip(keys, values.tolist()))

    def check_in_sync(self, *modules: nn.Module, atol: float = 0.0) -> None:
        """Raise a RuntimeError, on every rank, naming the first parameters or buffers that differ
        from rank 0's by more than `atol` (default: any difference). DDP keeps weights bitwise
        identical; a difference means a rank skipped a step or changed its weights on its own.
        Sends every tensor once: call it at checkpoints, not every step."""
        check_float("atol", atol, 0.0)
        if not self.enabled:
            return
        names, tensors, seen = [], [], set()
        for index, module in enumerate(modules):
            if not isinstance(module, nn.Module):
                raise TypeError(f"`modules` must be nn.Modules, got {type(module).__name__}")
            module = module.module if isinstance(module, DistributedDataParallel) else module
            for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
                if isinstance(tensor, DTensor):  # an FSDP shard: each rank holds another part
                    continue
                if not tensor.is_complex() and id(tensor) not in seen:  # an EMA holds the online model too: send it once
                    seen.add(id(tensor))
                    names.append(f"modules[{index}].{name}")
                    tensors.append(tensor.detach().reshape(-1).to(torch.float64))
        if not tensors:
            return
        sizes = [t.numel() for t in tensors]
        mine = torch.cat(tensors).to(self.device)
        reference = mine.clone()
        dist.broadcast(reference, src=0)
        differences = torch.stack([d.abs().max() if d.numel() else d.new_zeros(()) for d in (mine - reference).split(sizes)])
        dist.all_reduce(differences, op=dist.ReduceOp.MAX)
        bad = (differences > atol).nonzero().reshape(-1).tolist()
        if bad:
            shown = ", ".join(f"{names[i]} (max |difference| {float(differences[i]):.3g})" for i in bad[:5])
            raise RuntimeError(f"ranks are out of sync: {len(bad)} tensors differ from rank 0's: {shown}" + (" ..." if len(bad) > 5 else ""))

    # ------------------------------------------------------------------ output

    def save_checkpoint(self, path, model, optimizer=None, scheduler=None, ema=None, step: int = 0, extra: dict | None = None):
        """Rank 0 writes the checkpoint (atomically: `training.save_checkpoint`); every rank then
        waits for it, so none reads or resumes from a half-written state. A sharded `model`
        (FSDP2) writes a sharded checkpoint, the directory `path`, every rank its shards
        (`fsdp.save_sharded_checkpoint`). Returns `path`."""
        if is_sharded(model):
            return save_sharded_checkpoint(path, model, optimizer, scheduler, ema, step=step, extra=extra)
        if self.is_main:
            save_checkpoint(path, model, optimizer, scheduler, ema, step=step, extra=extra)
        self.barrier()
        return path

    def load_checkpoint(self, path, model, optimizer=None, scheduler=None, ema=None, restore_rng: bool = True) -> dict:
        """Resume from a single-file checkpoint or a sharded one (a directory), into a sharded or a
        plain model, whatever number of processes wrote it. Every rank calls it; returns
        `{"step", "extra"}`."""
        if os.path.isdir(path):
            return load_sharded_checkpoint(path, model, optimizer, scheduler, ema, restore_rng=restore_rng)
        if is_sharded(model):
            return load_full_checkpoint(path, model, optimizer, scheduler, ema, restore_rng=restore_rng)
        return load_checkpoint(path, model, optimizer, scheduler, ema, restore_rng=restore_rng)

    def print(self, *args, **kwargs) -> None:
        """`print` on rank 0 only."""
        if self.is_main:
            print(*args, **kwargs, flush=True)

    def teardown(self) -> None:
        """Leave the process group (safe to call twice, and when not distributed)."""
        if self.enabled and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer (torchrun sets it), got {value!r}") from None


def run_distributed(train, args, enabled: bool | None = None, **setup_kwargs):
    """`train(args, ctx)` on the context of `setup_distributed` — joined under torchrun when
    `enabled` (default `args.ddp`), a 1-process stand-in otherwise, every rank seeded alike from
    `args.seed` so every rank builds the same initial weights — and torn down however it ends.
    The `main` of every example script."""
    with setup_distributed(enabled=args.ddp if enabled is None else enabled, device=args.device, seed=args.seed, **setup_kwargs) as ctx:
        return train(args, ctx)


def setup_distributed(
    enabled: bool,
    device: str | torch.device = "auto",
    seed: int = 0,
    timeout_s: float = 600.0,
    backend: str | None = None,
) -> DistributedContext:
    """Join the process group torchrun described, or (with `enabled=False`) stand in for it.

    device: `auto` (CUDA when there is one), `cpu` or `cuda`; under torchrun on CUDA each
        process takes `cuda:LOCAL_RANK`.
    seed: torch, numpy and `random` are seeded with it on every rank, so a model built next has
        the same initial weights everywhere; `seed_per_rank` then splits the data streams.
    timeout_s: how long a collective (all-reduce, barrier) waits for the other ranks. A rank
        that dies or hangs makes the others raise after at most this long instead of hanging
        (a rank that dies usually closes its connections, which the others notice at once).
    backend: `nccl` on CUDA and `gloo` on the CPU by default.
    """
    check_bool("enabled", enabled)
    seed = check_int("seed", seed, 0)
    timeout_s = check_float("timeout_s", timeout_s, 0.0)
    if timeout_s <= 0:
        raise ValueError(f"`timeout_s` must be > 0, got {timeout_s}")
    if isinstance(device, torch.device):
        device = device.type
    device = resolve_device(device)
    seed_everything(seed)
    if not enabled:
        return DistributedContext(enabled=False, rank=0, world_size=1, local_rank=0, device=device)

    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise ValueError(
            f"`enabled=True` (--ddp) needs the environment torchrun sets ({', '.join(missing)} missing): "
            "launch with `torchrun --standalone --nproc_per_node=2 SCRIPT.py --ddp ...`"
        )
    rank, world_size, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} has no CUDA device: this node has {torch.cuda.device_count()}; use --nproc_per_node <= that")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"`backend` must be 'nccl' or 'gloo', got {backend!r}")
    if not dist.is_available():
        raise ValueError("this torch build has no torch.distributed")
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if exists(device.index) else None,
        )
    return DistributedContext(enabled=True, rank=rank, world_size=world_size, local_rank=local_rank, device=device, backend=backend)
