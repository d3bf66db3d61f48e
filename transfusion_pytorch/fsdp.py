"""FSDP2 over a Transfusion, for models whose weights, gradients and optimizer state outgrow one
device, and sharded checkpoints through `torch.distributed.checkpoint` (DCP).

    ctx = setup_distributed(enabled=True, device="cuda", seed=0)        # under torchrun
    model = build_model(args)                      # full weights in host memory, the same on every rank
    ema = model.create_ema()
    model = ctx.shard(model, ema=ema)              # fully_shard: every rank keeps 1/N of each tensor
    optimizer = make_optimizer(model.parameters()) # AFTER sharding: it steps the shards
    ctx.skip_unused(model, optimizer)              # a parameter no rank used keeps grad=None (below)
    ...  loss = model(batch); precision.step(loss, optimizer, model.named_parameters()); ema.update()
    ctx.save_checkpoint(out / "latest.dcp", model, optimizer, scheduler, ema, step=step)  # every rank writes its shards
    consolidate_checkpoint(out / "latest.dcp", out / "model.pt")   # one process: the single file from_checkpoint loads

What is sharded (ZeRO-3, Rajbhandari et al. 2020, as FSDP2 does it): every parameter is a DTensor
cut along its first dimension over the ranks; each transformer block (and the U-Net skip
projection the transformer calls outside its block) is one FSDP unit, all-gathered just before
its forward and backward and freed after; what is left (embeddings, heads, time conditioning,
final norm) is the root unit. Gradients are reduce-scattered, so each rank receives the mean
gradient of its own shard, and the optimizer (made after sharding) keeps Adam moments of its
shards only. Buffers are replicated.

EMA under sharding: every rank keeps the EMA of its own shards. `shard` cuts the EMA copy
exactly as the model, so `ema.update()` lerps shard into shard with no communication; the
EMA of a shard is the shard of the EMA (an elementwise rule), so the gathered EMA equals that of
a 1-process run. Sampling needs the full weights: gather them with `consolidate_checkpoint` (or
`get_model_state_dict(..., full_state_dict=True)`) and sample on one process.

Unused parameters. A Transfusion step may leave the CFG null token, the time conditioning or a
modality's heads without a gradient, and differently on each rank. FSDP2 reduce-scatters only
the gradients that exist, so ranks would pair up collectives of different sizes; `shard` turns
on `set_reduce_scatter_unused_params`, which sends zeros for them. A zero gradient is not "no
gradient" to AdamW (its momentum and step count move on), so `skip_unused` records on each rank
which parameters accumulated a gradient (a hook on the gathered parameters that forward uses)
and, before each optimizer step, sets to None the gradients no rank produced (one all-reduce of
a flag per parameter): the step then equals a 1-process run, as DDP's `find_unused_parameters`
does. (An optimizer step that is skipped — a non-finite loss, an fp16 overflow — keeps its
flags for the next step, which may then step such a parameter with a zero gradient.)

Checkpoints are a directory: DCP's shard files and `.metadata`, plus our `meta.pt` (format,
model config, step, scheduler, RNG of rank 0, extra). Every rank writes its shards into
`.NAME.tmp`; after a barrier rank 0 moves the previous checkpoint aside to `.NAME.old`, renames
the new one into place and deletes the old one, so a crash leaves either the old or the new
checkpoint whole (a load falls back to `.NAME.old` when NAME is missing). DCP reshards on load,
so a checkpoint written by N processes resumes on M, sharded or not (`load_sharded_checkpoint`
also loads into a plain model in one process).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from .checkpoint import (
    _check_extra,
    _config_differences,
    _fsync_directory,
    _rng_state,
    _set_rng_state,
    _write_atomically,
    config_to_json,
    model_from_config,
    read_checkpoint,
    save_checkpoint,
)
from .helpers import exists
from .inputs import check_int

__all__ = [
    "SHARDED_FORMAT",
    "is_sharded",
    "shard_model",
    "UnusedParameters",
    "save_sharded_checkpoint",
    "load_sharded_checkpoint",
    "load_full_checkpoint",
    "consolidate_checkpoint",
    "read_meta",
]

SHARDED_FORMAT = "transfusion_pytorch.sharded/1"
META = "meta.pt"


def is_sharded(module) -> bool:
    """Whether `module` was sharded with FSDP2 (`fully_shard`)."""
    return isinstance(module, FSDPModule)


def _units(model: nn.Module) -> list[nn.Module]:
    """The modules to shard one by one, innermost first: the U-Net skip projection (the transformer
    calls it outside its block, so it must gather its own weights) and each transformer block."""
    transformer = getattr(model, "transformer", None)
    blocks = getattr(transformer, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"`model` must be a Transfusion (a `.transformer.blocks` list), got {type(model).__name__}")
    units = []
    for block in blocks:
        if isinstance(getattr(block, "skip_proj", None), nn.Module):
            units.append(block.skip_proj)
        units.append(block)
    return units


def shard_model(model: nn.Module, ema: nn.Module | None = None, device: torch.device | None = None, param_dtype: torch.dtype | None = None) -> nn.Module:
    """Shard `model` (and the EMA copy of `ema`, cut alike) over every rank of the process group
    with FSDP2; returns `model`, now a `FSDPModule` whose parameters are DTensor shards on `device`.

    param_dtype: with `torch.bfloat16`, blocks are all-gathered and computed in bf16 (half the
        communication; a `MixedPrecisionPolicy`), gradients reduced in fp32, shards and the
        optimizer kept in fp32. None (default): fp32 weights, bf16 where autocast says so.
    """
    if not dist.is_initialized():
        raise ValueError("FSDP needs a process group: launch under torchrun and call `setup_distributed(enabled=True)` first")
    if param_dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"`param_dtype` must be None, torch.float32, torch.bfloat16 or torch.float16, got {param_dtype!r}")
    if exists(ema) and not isinstance(getattr(ema, "ema_model", None), nn.Module):
        raise TypeError(f"`ema` must be the model's EMA (`model.create_ema()`), got {type(ema).__name__}")
    if exists(ema) and ema.model is not model:
        raise ValueError("`ema` must be the EMA of `model` (made by `model.create_ema()` before sharding)")
    if is_sharded(model):
        raise ValueError("`model` is sharded already")
    device = device or next(model.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if exists(param_dtype) else None)
    for module in (model, ema.ema_model) if exists(ema) else (model,):
        for unit in _units(module):
            fully_shard(unit, mesh=mesh, mp_policy=policy)
        fully_shard(module, mesh=mesh, mp_policy=policy)  # the root: embeddings, heads, time conditioning
    model.set_reduce_scatter_unused_params(True)  # zeros for a gradient this rank lacks: the collectives pair up
    return model


class UnusedParameters:
    """Which parameters of a sharded `model` accumulated a gradient on this rank since the last
    optimizer step; as an optimizer step pre-hook, it sets to None the gradients of those no rank
    used (see the module docstring). Install with `DistributedContext.skip_unused(model, optimizer)`."""

    _NAME = "_transfusion_parameter_name"

    def __init__(self, model: nn.Module):
        if not is_sharded(model):
            raise TypeError(f"`model` must be sharded (`shard_model`), got {type(model).__name__}")
        self.used: set[str] = set()
        self.forward_ran = False
        self.sharded = dict(model.named_parameters())
        for prefix, module in model.named_modules():
            if is_sharded(module):  # runs after FSDP's own pre-hook (prepended): the module holds the gathered parameters
                module.register_forward_pre_hook(lambda module, args, prefix=prefix: self._watch(prefix, module))

    def _watch(self, prefix: str, module: nn.Module) -> None:
        self.forward_ran = True
        for name, parameter in module.named_parameters(prefix=prefix):
            if isinstance(parameter, DTensor) or not parameter.requires_grad:  # a shard of a unit not gathered now
                continue
            if getattr(parameter, self._NAME, None) != name:  # once per gathered parameter object
                setattr(parameter, self._NAME, name)
                parameter.register_post_accumulate_grad_hook(lambda _, name=name: self.used.add(name))

    def __call__(self, optimizer, *args) -> None:
        if not self.forward_ran:  # a step without a forward: `get_optimizer_state_dict` creating the state (zero grads, lr 0)
            return
        self.forward_ran = False
        names = list(self.sharded)
        device = next(iter(self.sharded.values())).device
        flags = torch.tensor([name in self.used for name in names], dtype=torch.float32, device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        for name, used in zip(names, flags.tolist()):
            if not used:
                self.sharded[name].grad = None
        self.used.clear()


# ------------------------------------------------------------------ checkpoints


def _state(model, optimizer, ema) -> dict:
    """The tensors DCP saves / loads in place: sharded (DTensor) for a sharded model, whole otherwise."""
    state = {"model": get_model_state_dict(model)}
    if exists(optimizer):
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    if exists(ema):
        state["ema"] = get_model_state_dict(ema.ema_model)
        state["ema_counters"] = {"initted": ema.initted.detach().clone(), "step": ema.step.detach().clone()}
    return state


def _check_parts(optimizer, scheduler, ema) -> None:
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler)):
        if exists(obj) and not callable(getattr(obj, "state_dict", None)):
            raise TypeError(f"`{name}` must have a `state_dict()`, got {type(obj).__name__}")
    if exists(ema) and not isinstance(getattr(ema, "ema_model", None), nn.Module):
        raise TypeError(f"`ema` must be the model's EMA (`model.create_ema()`), got {type(ema).__name__}")


def _check_finite(model, ema) -> None:
    """Refuse NaN / inf weights on every rank (each checks its shards; one all-reduce), before
    anything is written: as `save_checkpoint`, a checkpoint always holds a state training can resume from."""
    bad = []
    for name, module in (("model", model), ("ema", ema.ema_model if exists(ema) else None)):
        for parameter_name, p in module.named_parameters() if exists(module) else ():
            local = p.to_local() if isinstance(p, DTensor) else p
            if local.is_floating_point() and not bool(torch.isfinite(local).all()):
                bad.append(f"{name}.{parameter_name}")
    flag = torch.tensor([float(len(bad))], device=next(model.parameters()).device)
    if _distributed():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() > 0:
        mine = f" ({', '.join(bad[:5])} here)" if bad else ""
        raise ValueError(f"non-finite (NaN / inf) weights{mine}; refusing to write a checkpoint of them (the previous one is kept)")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def save_sharded_checkpoint(path, model, optimizer=None, scheduler=None, ema=None, step: int = 0, extra: dict | None = None) -> Path:
    """Every rank writes its shards of model, optimizer and EMA into the directory `path` (DCP);
    rank 0 adds `meta.pt` and moves the directory into place (see the module docstring). Call on
    every rank. Returns `path`."""
    _check_parts(optimizer, scheduler, ema)
    step = check_int("step", step, 0)
    _check_extra(extra)
    path = Path(path)
    if path.is_file():
        raise ValueError(f"`path` {str(path)!r} is a file; a sharded checkpoint is a directory")
    if path.is_dir() and not (path / META).is_file():  # replacing it would delete it
        raise ValueError(f"`path` {str(path)!r} is a directory that is not a sharded checkpoint; refusing to replace it")
    _check_finite(model, ema)
    tmp, old = path.parent / f".{path.name}.tmp", path.parent / f".{path.name}.old"
    rank = dist.get_rank() if _distributed() else 0
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # what a crashed save left
        tmp.mkdir()
    _barrier()
    with warnings.catch_warnings():  # one process without a process group: DCP warns that it saves alone, as asked
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(_state(model, optimizer, ema), checkpoint_id=tmp, no_dist=not _distributed())
    if rank == 0:
        meta = {
            "format": SHARDED_FORMAT,
            "config": json.dumps(config_to_json(model.config)) if hasattr(model, "config") else None,
            "step": int(step),
            "rng": _rng_state(),
            "scheduler": scheduler.state_dict() if exists(scheduler) else None,
            "has_optimizer": exists(optimizer),
            "has_ema": exists(ema),
            "world_size": dist.get_world_size() if _distributed() else 1,
            "extra": extra or {},
        }
        buffer = io.BytesIO()
        torch.save(meta, buffer)
        _write_atomically(tmp / META, (buffer.getbuffer(),))
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
        _fsync_directory(path.parent)
    _barrier()
    return path


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _sharded_path(path) -> Path:
    """`path`, or the previous checkpoint a crash mid-rename left beside it."""
    path = Path(path)
    old = path.parent / f".{path.name}.old"
    if not (path / META).is_file() and (old / META).is_file():
        return old
    if not (path / META).is_file():
        raise ValueError(f"`path` {str(path)!r} is not a sharded checkpoint (no {META} in it)")
    return path


def read_meta(path) -> dict:
    """The `meta.pt` of a sharded checkpoint: format, config, step, scheduler, rng, extra."""
    path = _sharded_path(path)
    try:
        meta = torch.load(path / META, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"sharded checkpoint `path` {str(path)!r} has an unreadable {META}: {error}") from error
    if not isinstance(meta, dict) or meta.get("format") != SHARDED_FORMAT:
        raise ValueError(f"`path` {str(path)!r} is not a transfusion_pytorch sharded checkpoint")
    return meta


def _check_config(path, config, model) -> None:
    if exists(config) and hasattr(model, "config"):
        differences = _config_differences(json.loads(config), config_to_json(model.config))
        if differences:
            raise ValueError(f"checkpoint `path` {str(path)!r} was written for another configuration: " + "; ".join(differences))


def load_sharded_checkpoint(
    path, model, optimizer=None, scheduler=None, ema=None, restore_rng: bool = True, no_dist: bool = False, check_config: bool = True
) -> dict:
    """Restore a sharded checkpoint into `model` (sharded or not), `optimizer`, `scheduler` and
    `ema`, whatever number of processes wrote it; returns `{"step", "extra"}`. Call on every rank
    (or with `no_dist=True` in a single process that does not involve the others). A checkpoint
    of another model configuration is refused (a ValueError naming the differences) unless
    `check_config=False` (the model was built from the checkpoint's own config)."""
    _check_parts(optimizer, scheduler, ema)
    meta = read_meta(path)
    path = _sharded_path(path)
    if check_config:
        _check_config(path, meta["config"], model)
    for name, obj in (("optimizer", optimizer), ("ema", ema)):
        if exists(obj) and not meta[f"has_{name}"]:
            raise ValueError(f"checkpoint `path` {str(path)!r} has no {name} state to restore")
    if exists(scheduler) and meta["scheduler"] is None:
        raise ValueError(f"checkpoint `path` {str(path)!r} has no scheduler state to restore")
    state = _state(model, optimizer, ema)
    if exists(optimizer):  # no state for a parameter the writer never stepped (AdamW skipped it), as in the writer
        saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        moments = state["optimizer"]["state"]
        for name in [name for name, value in moments.items() if f"optimizer.state.{name}.{next(iter(value), '')}" not in saved]:
            del moments[name]
    no_dist = no_dist or not _distributed()
    try:
        with warnings.catch_warnings():  # DCP warns that it loads in one process, which is what no_dist asks for
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=path, no_dist=no_dist)
    except Exception as error:
        raise ValueError(f"sharded checkpoint `path` {str(path)!r} does not fit the model: {error}") from error
    set_model_state_dict(model, state["model"])
    if exists(optimizer):  # not strict: a parameter the writer never stepped has no state, here neither
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(strict=False))
    if exists(ema):
        set_model_state_dict(ema.ema_model, state["ema"])
        ema.initted.copy_(state["ema_counters"]["initted"])
        ema.step.copy_(state["ema_counters"]["step"])
    if exists(scheduler):
        scheduler.load_state_dict(meta["scheduler"])
    if restore_rng:
        _set_rng_state(meta["rng"])
    return {"step": meta["step"], "extra": meta["extra"]}


def _optimizer_by_name(state: dict, model: nn.Module, optimizer) -> dict:
    """A `torch.optim` state dict (parameters numbered in optimizer order) keyed by parameter name
    instead, as `set_optimizer_state_dict` takes it. The numbering is that of an optimizer made
    over `model.parameters()`, as the checkpoint's writer did."""
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    return {
        "state": {order[index]: value for index, value in state["state"].items()},
        "param_groups": [{**group, "params": [order[index] for index in group["params"]]} for group in state["param_groups"]],
    }


def load_full_checkpoint(path, model, optimizer=None, scheduler=None, ema=None, restore_rng: bool = True) -> dict:
    """Restore a single-file checkpoint (`training.save_checkpoint`) into a sharded `model`,
    `optimizer` and `ema`: every rank reads the file and keeps its shards. Returns `{"step", "extra"}`."""
    _check_parts(optimizer, scheduler, ema)
    payload = read_checkpoint(path)
    _check_config(path, payload["config"], model)
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("ema", ema)):
        if exists(obj) and payload[name] is None:
            raise ValueError(f"checkpoint `path` {str(path)!r} has no {name} state to restore")
    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, payload["model"], options=full)
    if exists(optimizer):
        saved = _optimizer_by_name(payload["optimizer"], model, optimizer)
        get_optimizer_state_dict(model, optimizer)  # creates the state the saved one is distributed into
        for name, parameter in model.named_parameters():
            if name not in saved["state"]:  # never stepped by the writer: no state, as there
                optimizer.state.pop(parameter, None)
        set_optimizer_state_dict(model, optimizer, saved, options=StateDictOptions(full_state_dict=True, strict=False))
    if exists(ema):
        ema_state = payload["ema"]
        set_model_state_dict(ema.ema_model, {k.removeprefix("ema_model."): v for k, v in ema_state.items() if k.startswith("ema_model.")}, options=full)
        ema.initted.copy_(ema_state["initted"])
        ema.step.copy_(ema_state["step"])
    if exists(scheduler):
        scheduler.load_state_dict(payload["scheduler"])
    if restore_rng:
        _set_rng_state(payload["rng"])
    return {"step": payload["step"], "extra": payload["extra"]}


class _SavedState:
    """A state dict standing in for the object that had it (the scheduler of a sharded checkpoint)."""

    def __init__(self, state):
        self.state = state

    def state_dict(self):
        return self.state


def consolidate_checkpoint(sharded, out, model_class: type | None = None) -> Path:
    """The single-file checkpoint (`Transfusion.from_checkpoint`, `training.load_checkpoint`) of the
    sharded checkpoint `sharded`: model, EMA, optimizer, scheduler, step, RNG and extra, gathered
    in this one process (no collective: call it on one rank, or after training). Needs the full
    model in host memory. Returns `out`."""
    if model_class is None:
        from .transfusion import Transfusion as model_class
    meta = read_meta(sharded)
    if meta["config"] is None:
        raise ValueError(f"sharded checkpoint `sharded` {str(sharded)!r} holds no model config")
    model = model_from_config(json.loads(meta["config"]), model_class)
    ema = model.create_ema() if meta["has_ema"] else None
    optimizer = torch.optim.AdamW(model.parameters()) if meta["has_optimizer"] else None  # hyperparameters come from the checkpoint
    if exists(optimizer) and exists(meta["scheduler"]):
        for group in optimizer.param_groups:  # DCP loads the keys the receiving state has: add the one an lr scheduler adds
            group.setdefault("initial_lr", group["lr"])
    state = load_sharded_checkpoint(sharded, model, optimizer, None, ema, restore_rng=False, no_dist=True, check_config=False)
    scheduler = _SavedState(meta["scheduler"]) if exists(meta["scheduler"]) else None
    mine = _rng_state()
    _set_rng_state(meta["rng"])  # save_checkpoint records the RNG of the writing process: the checkpoint's own
    try:
        return save_checkpoint(out, model, optimizer, scheduler, ema, step=state["step"], extra=state["extra"])
    finally:
        _set_rng_state(mine)
