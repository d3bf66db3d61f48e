"""Checkpoints: one file, checksummed, written atomically, loaded without executing code.

The file (format `transfusion_pytorch.checkpoint/2`) is a fixed 133-byte ASCII header and a
payload:

    transfusion_pytorch.checkpoint/2\n     the magic line: format and version
    sha256 <64 hex digits>\n               SHA-256 of the payload
    length <20 decimal digits>\n           the payload's length in bytes
    <payload>                               `torch.save` (zip) of the checkpoint dict

`read_checkpoint` checks magic, length and digest before it deserialises anything, so a
truncated or bit-flipped file is refused with a ValueError naming it instead of loading
damaged weights. The digest guards against damage, not against a forger (anyone can write a
valid one); safety comes from the load: the payload holds only tensors and plain Python values
and is read with `torch.load(weights_only=True)`, which never runs code from the file.

A checkpoint is written to a temporary file in the same folder, fsynced, moved over the old
one (`os.replace`) and the folder fsynced, so a crash or power cut mid-write leaves the
previous checkpoint whole (a killed writer may leave a `.NAME.*.tmp` file beside it, which
nothing reads). `save_checkpoint` refuses a model or EMA with NaN / inf weights: a checkpoint
always holds a state training can resume from.

The model's constructor arguments travel with it as JSON; modules among them (encoders,
decoders, U-Net blocks) are recorded by class and `get_config()`, and rebuilt only for classes
of this package. This module knows no model class: `load_model` is given one.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import io
import json
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .helpers import exists
from .inputs import check_int
from .layout import default_to_modality_shape_fn
from .transformer import Transformer

CHECKPOINT_FORMAT = "transfusion_pytorch.checkpoint/2"
LEGACY_FORMAT = "transfusion_pytorch.checkpoint/1"  # a bare torch.save zip: no header, no checksum

_MAGIC = f"{CHECKPOINT_FORMAT}\n".encode()
_FIELDS = re.compile(rb"sha256 ([0-9a-f]{64})\nlength ([0-9]{20})\n")
HEADER_SIZE = len(_MAGIC) + len(b"sha256 \n") + 64 + len(b"length \n") + 20


def _class_path(obj) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}:{cls.__qualname__}"


def config_to_json(value):
    """A constructor config → JSON-able data (tuples, Transformers, modules and callables tagged)."""
    if isinstance(value, Transformer):
        return {"__transformer__": config_to_json(value.config)}
    if isinstance(value, nn.Module):
        get_config = getattr(value, "get_config", None)
        return {"__module__": _class_path(value), "config": config_to_json(get_config()) if callable(get_config) else None}
    if value is default_to_modality_shape_fn:
        return {"__callable__": "default"}
    if callable(value):
        return {"__callable__": _class_path(value) if isinstance(value, type) else f"{value.__module__}:{value.__qualname__}"}
    if isinstance(value, tuple):
        return {"__tuple__": [config_to_json(v) for v in value]}
    if isinstance(value, list):
        return [config_to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): config_to_json(v) for k, v in value.items()}
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot record {type(value).__name__} in a checkpoint config")


def _rebuild(value, name: str, overrides: dict):
    if isinstance(value, list):
        return [_rebuild(v, name, overrides) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tuple__" in value:
        return tuple(_rebuild(v, name, overrides) for v in value["__tuple__"])
    if "__transformer__" in value:
        return _rebuild(value["__transformer__"], name, overrides)
    if "__callable__" in value:
        if value["__callable__"] == "default":
            return default_to_modality_shape_fn
        raise ValueError(f"the checkpoint's `{name}` is a custom function ({value['__callable__']}); pass it to from_checkpoint(..., {name}=...)")
    if "__module__" in value:
        path, config = value["__module__"], value["config"]
        if not path.startswith("transfusion_pytorch.") or config is None:
            raise ValueError(
                f"the checkpoint's `{name}` is a {path} module that cannot be rebuilt from its config; pass it to from_checkpoint(..., {name}=...)"
            )
        module_name, qualname = path.split(":")
        cls = importlib.import_module(module_name)
        for part in qualname.split("."):
            cls = getattr(cls, part)
        return cls(**_rebuild(config, name, overrides))
    if "__dtype__" in value:
        return getattr(torch, value["__dtype__"].split(".")[-1])
    return {k: _rebuild(v, f"{name}.{k}" if name else k, overrides) for k, v in value.items()}


def model_from_config(config_json: dict, model_class: type, **overrides):
    """Rebuild a `model_class` from its recorded config; `overrides` replace (or supply) arguments."""
    kwargs = {}
    for name, value in config_json.items():
        kwargs[name] = overrides[name] if name in overrides else _rebuild(value, name, overrides)
    return model_class(**kwargs)


# ------------------------------------------------------------------ checkpoints


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {"keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}
    except ImportError:
        pass
    return state


def _set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        s = state["numpy"]
        np.random.set_state(("MT19937", s["keys"].numpy().astype("uint32"), s["pos"], s["has_gauss"], s["cached"]))


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the module itself); anything else is refused."""
    model = model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    return model


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    ema: nn.Module | None = None,
    step: int = 0,
    extra: dict | None = None,
) -> Path:
    """Write everything needed to resume (or to sample) atomically to `path`.

    `extra` holds what else the run wants back (best score, data position): tensors, numbers,
    strings, bools, None, and lists / tuples / dicts of them, which a weights-only load reads.
    """
    model = _unwrap(model)
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("ema", ema)):
        if exists(obj) and not callable(getattr(obj, "state_dict", None)):
            raise TypeError(f"`{name}` must have a `state_dict()`, got {type(obj).__name__}")
    step = check_int("step", step, 0)
    _check_extra(extra)
    _check_finite_weights("model", model)
    _check_finite_weights("ema", ema)
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"`path` {str(path)!r} is a directory, not a checkpoint file")
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": json.dumps(config_to_json(model.config)) if hasattr(model, "config") else None,
        "model": model.state_dict(),
        "step": int(step),
        "rng": _rng_state(),
        "optimizer": optimizer.state_dict() if exists(optimizer) else None,
        "scheduler": scheduler.state_dict() if exists(scheduler) else None,
        "ema": ema.state_dict() if exists(ema) else None,
        "extra": extra or {},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)  # serialised before the file is touched: a failure here writes nothing
    data = buffer.getbuffer()
    _write_atomically(path, (_header(data), data))
    return path


def _header(payload) -> bytes:
    return _MAGIC + f"sha256 {hashlib.sha256(payload).hexdigest()}\nlength {len(payload):020d}\n".encode()


def _write_atomically(path: Path, parts) -> None:
    """Temporary file in the same folder → fsync → `os.replace` → fsync the folder: at every
    moment `path` is the old file or the new one, whole, and after a power cut too."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for part in parts:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(folder: Path) -> None:
    """Make the rename itself durable, where the OS lets a folder be opened and fsynced (POSIX)."""
    if not hasattr(os, "O_DIRECTORY"):  # Windows: a folder cannot be opened; NTFS journals the rename
        return
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems (network mounts) refuse to fsync a folder
        pass
    finally:
        os.close(fd)


def _check_finite_weights(name: str, module) -> None:
    """Refuse NaN / inf weights before anything is written: such a state cannot resume training."""
    if not isinstance(module, nn.Module):
        return
    bad = [n for n, p in module.named_parameters() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ValueError(f"`{name}` has non-finite (NaN / inf) weights in {shown}; refusing to write a checkpoint of them (the previous one is kept)")


def _check_extra(extra) -> None:
    """Refuse what `torch.load(weights_only=True)` could not read back, before anything is written."""
    if extra is None:
        return
    if not isinstance(extra, dict):
        raise TypeError(f"`extra` must be a dict, got {type(extra).__name__}")
    buffer = io.BytesIO()
    torch.save(extra, buffer)
    buffer.seek(0)
    try:
        torch.load(buffer, weights_only=True)
    except Exception as error:
        raise TypeError(
            "`extra` must hold only tensors, numbers, strings, bools, None and lists / tuples / dicts of them "
            f"(a weights-only load must read it back; convert numpy scalars with float() / int(), paths with str()): {error}"
        ) from None


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint's contents without executing code from it.

    The header's magic, payload length and SHA-256 are checked first: a truncated, damaged or
    foreign file raises a ValueError that names it and says what is wrong. Checkpoints of the
    earlier format `transfusion_pytorch.checkpoint/1` (a bare `torch.save` zip) still load; they
    carry no checksum, so only what `torch.load` itself notices is caught in them.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"`path` {str(path)!r} is not a checkpoint file")
    payload = _verified_payload(path)
    source = path if payload is None else io.BytesIO(payload)
    expected = LEGACY_FORMAT if payload is None else CHECKPOINT_FORMAT
    try:
        contents = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged legacy file, or code a weights-only load refuses
        raise ValueError(f"`path` {str(path)!r} is not a readable checkpoint: {error}") from error
    if not isinstance(contents, dict) or contents.get("format") != expected:
        raise ValueError(f"`path` {str(path)!r} is not a transfusion_pytorch checkpoint")
    missing = [key for key in ("config", "model", "step", "rng", "optimizer", "scheduler", "ema", "extra") if key not in contents]
    if missing:
        raise ValueError(f"checkpoint `path` {str(path)!r} lacks {', '.join(missing)}")
    if contents["config"] is not None:
        try:
            json.loads(contents["config"])
        except (TypeError, ValueError) as error:
            raise ValueError(f"checkpoint `path` {str(path)!r} has an unreadable model config: {error}") from None
    return contents


def _verified_payload(path: Path) -> bytes | None:
    """The payload of a checkpoint whose header, length and digest check out; None for a legacy
    (format /1) zip, which has no header."""
    where = f"checkpoint `path` {str(path)!r}"
    with open(path, "rb") as f:
        header = f.read(HEADER_SIZE)
        if header.startswith(b"PK\x03\x04"):  # a bare zip: torch.save as format /1 wrote it
            return None
        if not header.startswith(_MAGIC):
            if len(header) < len(_MAGIC) and _MAGIC.startswith(header):
                raise ValueError(f"{where} is truncated: {len(header)} bytes, inside its {HEADER_SIZE}-byte header")
            first_line = header.split(b"\n", 1)[0][:60]
            if first_line.startswith(b"transfusion_pytorch.checkpoint/"):
                raise ValueError(f"{where} has the unknown format {first_line.decode(errors='replace')!r} (damaged, or written by a newer version)")
            raise ValueError(f"`path` {str(path)!r} is not a transfusion_pytorch checkpoint (it starts with {header[:16]!r})")
        if len(header) < HEADER_SIZE:
            raise ValueError(f"{where} is truncated: {len(header)} bytes, inside its {HEADER_SIZE}-byte header")
        fields = _FIELDS.fullmatch(header[len(_MAGIC) :])
        if fields is None:
            raise ValueError(f"{where} has a damaged header: {header[len(_MAGIC) :]!r}")
        payload = f.read()
    digest, length = fields.group(1).decode(), int(fields.group(2))
    if len(payload) < length:
        raise ValueError(f"{where} is truncated: its payload has {len(payload)} of {length} bytes")
    if len(payload) > length:
        raise ValueError(f"{where} is damaged: {len(payload) - length} bytes follow its {length}-byte payload")
    actual = hashlib.sha256(payload).hexdigest()
    if actual != digest:
        raise ValueError(f"{where} is damaged: the SHA-256 of its payload is {actual}, its header says {digest}")
    return payload


def _with_later_defaults(saved: dict, model: nn.Module) -> dict:
    """A checkpoint's config, with every constructor argument added since it was written set to
    that argument's default: the behaviour the checkpoint was trained with (`from_checkpoint`
    rebuilds it the same way, leaving the argument out)."""
    parameters = inspect.signature(type(model).__init__).parameters
    later = {name: p.default for name, p in parameters.items() if name not in saved and name in model.config and p.default is not inspect.Parameter.empty}
    return saved | config_to_json(later) if later else saved


def _config_differences(saved, current, prefix="") -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        if "__module__" in saved and "__module__" in current:  # modules: compare the class only
            return [] if saved["__module__"] == current["__module__"] else [prefix or "module"]
        keys = sorted(set(saved) | set(current))
        return [d for k in keys for d in _config_differences(saved.get(k), current.get(k), f"{prefix}.{k}" if prefix else k)]
    return [] if saved == current else [f"{prefix}: checkpoint {saved!r} != model {current!r}"]


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    ema: nn.Module | None = None,
    restore_rng: bool = True,
) -> dict:
    """Restore a checkpoint into existing objects; returns `{"step", "extra"}`.

    A checkpoint written for a model of another configuration raises a ValueError that
    names the differing constructor arguments.
    """
    model = _unwrap(model)
    payload = read_checkpoint(path)
    if payload["config"] is not None and hasattr(model, "config"):
        differences = _config_differences(_with_later_defaults(json.loads(payload["config"]), model), config_to_json(model.config))
        if differences:
            raise ValueError(f"checkpoint `path` {str(path)!r} was written for another configuration: " + "; ".join(differences))
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as error:
        raise ValueError(f"checkpoint `path` {str(path)!r} does not fit the model: {error}") from error
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("ema", ema)):
        if exists(obj):
            if payload[name] is None:
                raise ValueError(f"checkpoint `path` {str(path)!r} has no {name} state to restore")
            if not callable(getattr(obj, "load_state_dict", None)):
                raise TypeError(f"`{name}` must have a `load_state_dict()`, got {type(obj).__name__}")
            try:
                obj.load_state_dict(payload[name])
            except (RuntimeError, ValueError, KeyError) as error:
                raise ValueError(f"the {name} state in checkpoint `path` {str(path)!r} does not fit `{name}`: {error}") from error
    if restore_rng:
        _set_rng_state(payload["rng"])
    return {"step": payload["step"], "extra": payload["extra"]}


def load_model(path: str | os.PathLike, model_class: type, **overrides):
    """A `model_class` rebuilt from the config in a checkpoint, with its weights (not its EMA or
    optimizer). Arguments the checkpoint cannot rebuild (your own encoder class, a custom shape
    parser) are passed as `overrides`. `training.load_model` is this for `Transfusion`."""
    payload = read_checkpoint(path)
    if payload["config"] is None:
        raise ValueError(f"checkpoint `path` {str(path)!r} holds no model config")
    config = json.loads(payload["config"])
    unknown = sorted(set(overrides) - set(inspect.signature(model_class.__init__).parameters) - set(config))
    if unknown:
        raise ValueError(f"`overrides` {unknown} are not arguments of {model_class.__name__}")
    model = model_from_config(config, model_class, **overrides)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as error:
        raise ValueError(f"the weights in checkpoint `path` {str(path)!r} do not fit the model built with `overrides` {sorted(overrides)}: {error}") from error
    return model
