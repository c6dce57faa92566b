"""Checkpoints on disk: atomic files, safe loading, and checkpoint folders that are either complete or absent.

A file is written atomically by writing a temporary file next to it, fsyncing it and renaming it over the target, so
a reader (or a run killed mid-write) sees the old file or the new one, never half of one. A checkpoint folder
(`<root>/step-<N>/`) is built the same way: every file goes into a hidden temporary folder, `state.json` (with the
sha256 of every other file) is written last, and the folder is renamed into place. A folder whose files no longer
match their checksums is reported and skipped by `latest_checkpoint`.

Weights are stored as safetensors (no code can run on load); anything else torch-specific (an optimiser state) goes
through `torch.save` and is read back only by `safe_torch_load`, which refuses pickles that would execute code.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import uuid
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from vgstudy.errors import CheckpointError

STATE_FILE = "state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TEMP_PREFIX = ".tmp-"
_MAX_KEYS_LISTED = 20


# --- Atomic files ---------------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call `write(temp_path)`, fsync the result, rename it to `path`; on any error remove the temporary file."""
    path = Path(path)
    temp = path.with_name(f"{_TEMP_PREFIX}{path.name}.{uuid.uuid4().hex}")
    try:
        write(temp)
        with open(temp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that `path` holds either its old content or all of `data`."""
    _atomic_write(path, lambda temp: temp.write_bytes(data))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically. Values JSON cannot hold (paths, ...) are written as strings."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    """`torch.save(obj)` atomically; keep `obj` to tensors and plain containers so `safe_torch_load` can read it."""
    _atomic_write(path, lambda temp: torch.save(obj, temp))


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# --- State dicts ----------------------------------------------------------------------------------------------------


def save_state_dict(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Save tensors as safetensors, atomically.

    safetensors refuses tensors that share memory (tied weights, views); each tensor whose storage was already seen
    is saved as its own contiguous copy, so every key of `model.state_dict()` is kept and loads back strictly.
    """
    seen_storages: set[int] = set()
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        tensor = tensor.detach()
        if tensor.numel() > 0:
            storage = tensor.untyped_storage().data_ptr()
            if storage in seen_storages:
                tensor = tensor.clone()
            seen_storages.add(tensor.untyped_storage().data_ptr())
        tensors[key] = tensor.contiguous()
    _atomic_write(path, lambda temp: save_file(tensors, str(temp)))


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file onto the CPU; a missing, truncated or malformed file raises `CheckpointError`."""
    try:
        return load_file(str(path), device="cpu")
    except FileNotFoundError as e:
        raise CheckpointError(f"weights file {path} does not exist") from e
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"weights file {path} is not a readable safetensors file (truncated or corrupt): {e}"
        ) from e


def listed(kind: str, keys: list[str]) -> str:
    """Error-message text: "3 <kind>: a, b, c" (the first keys, then how many more); "" for no keys."""
    if not keys:
        return ""
    shown = ", ".join(keys[:_MAX_KEYS_LISTED])
    more = f" and {len(keys) - _MAX_KEYS_LISTED} more" if len(keys) > _MAX_KEYS_LISTED else ""
    return f"{len(keys)} {kind}: {shown}{more}"


def load_into(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True
) -> tuple[list[str], list[str]]:
    """Copy `state_dict` into `model`; returns (missing keys, unexpected keys), empty lists when strict.

    Raises `CheckpointError` listing the keys (up to 20 of each kind, then a count) when shapes differ, or, with
    `strict`, when the model has keys the state dict lacks or the state dict has keys the model lacks.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mis_shaped = [
        f"{k} (checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)})"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    problems = []
    if mis_shaped:
        problems.append(listed("keys with a different shape", mis_shaped))
    if strict and missing:
        problems.append(listed("keys missing from the checkpoint", missing))
    if strict and unexpected:
        problems.append(listed("unexpected keys in the checkpoint", unexpected))
    if problems:
        raise CheckpointError(f"checkpoint does not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(dict(state_dict), strict=strict)
    return missing, unexpected


def safe_torch_load(path: str | os.PathLike) -> Any:
    """`torch.load(path, weights_only=True)` onto the CPU: tensors and plain containers only.

    A pickle that would import or call anything else (an executable payload) is refused with a `CheckpointError`
    naming the file; so is a missing or truncated file.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint file {path} does not exist") from e
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to load {path}: it holds objects other than tensors and plain containers "
            f"(possibly code that would run on load): {e}"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"checkpoint file {path} is not a readable torch file (truncated or corrupt): {e}") from e


# --- Checkpoint folders ---------------------------------------------------------------------------------------------


def step_dir_name(step: int) -> str:
    """Name of the checkpoint folder of optimiser step `step`."""
    return f"step-{step}"


def checkpoint_dirs(root: str | os.PathLike) -> list[Path]:
    """Complete-looking checkpoint folders `root/step-<N>`, oldest step first (temporary folders are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def write_checkpoint(root: str | os.PathLike, step: int, write_files: Callable[[Path], None], state: dict) -> Path:
    """Write the checkpoint folder `root/step-<step>` atomically and return its path.

    `write_files(folder)` writes the payload files into a temporary folder; then `state` plus the sha256 of every
    payload file (under "files") goes to `state.json`, and the folder is renamed into place. An existing folder of
    the same step is replaced.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    temp = root / f"{_TEMP_PREFIX}{step_dir_name(step)}.{uuid.uuid4().hex}"
    final = root / step_dir_name(step)
    temp.mkdir()
    try:
        write_files(temp)
        files = {p.name: sha256_file(p) for p in sorted(temp.iterdir()) if p.is_file()}
        atomic_write_json(temp / STATE_FILE, {**state, "files": files})
        _fsync_dir(temp)
        if final.exists():
            # Move the old folder aside first: a rename cannot replace a non-empty directory.
            old = root / f"{_TEMP_PREFIX}old-{final.name}.{uuid.uuid4().hex}"
            os.rename(final, old)
            os.rename(temp, final)
            shutil.rmtree(old)
        else:
            os.rename(temp, final)
    finally:
        if temp.exists():
            shutil.rmtree(temp)
    _fsync_dir(root)
    return final


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Read `path/state.json` and check every file it lists against its sha256; returns the state.

    Raises `CheckpointError` naming the folder and the first problem: no or unreadable state.json, a missing file,
    or a checksum mismatch (a corrupted or truncated file).
    """
    path = Path(path)
    try:
        state = json.loads((path / STATE_FILE).read_text())
        files = state["files"]
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {path} has no {STATE_FILE} (incomplete)") from e
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} is unreadable or lacks 'files': {e}") from e
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} lacks {name}, which its {STATE_FILE} lists")
        if sha256_file(file) != expected:
            raise CheckpointError(f"checkpoint {path}: {name} does not match its sha256 (corrupted or truncated)")
    return state


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest checkpoint folder under `root` that verifies; None when there is none at all.

    A newer folder that fails verification is reported with a warning naming it, and the previous one is tried. If
    folders exist but none verifies, `CheckpointError` lists them: nothing is discarded silently.
    """
    problems = []
    for path in reversed(checkpoint_dirs(root)):
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            problems.append(str(e))
            warnings.warn(f"skipping a bad checkpoint: {e}", stacklevel=2)
            continue
        return path
    if problems:
        raise CheckpointError(f"no valid checkpoint under {root}: " + "; ".join(problems))
    return None


def prune_checkpoints(root: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest `keep` checkpoint folders under `root`, and temporary folders left by killed runs."""
    root = Path(root)
    for path in checkpoint_dirs(root)[:-keep] if keep > 0 else checkpoint_dirs(root):
        shutil.rmtree(path)
    for path in root.glob(f"{_TEMP_PREFIX}*"):
        if path.is_dir():
            shutil.rmtree(path)
