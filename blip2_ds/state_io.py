"""Reading and writing tensor files: safetensors, torch pickles (.pth/.bin/.pt), HF folders."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_HF_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _read_file(path: Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path}: holds Python objects besides tensors (e.g. a training config), which safe loading "
            f"refuses ({str(err).splitlines()[0]}). If you trust the file, pass --trust-pickle."
        ) from None
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]  # LAVIS checkpoints wrap the state dict as {"model": ...}
    elif isinstance(obj, dict) and "module" in obj and isinstance(obj["module"], dict):
        obj = obj["module"]  # DeepSpeed model-states files
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: not a state dict (expected a mapping of names to tensors).")
    return obj


def read_state_dict(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a weight file, or of an HF-format folder (sharded or not).

    ``trust_pickle`` allows torch pickles holding arbitrary Python objects (original LAVIS
    training checkpoints store their config beside the weights); only for files you trust.
    """
    path = Path(path)
    if path.is_file():
        return _read_file(path, trust_pickle)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or directory.")
    for name in _HF_INDEX_FILES:
        index = path / name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(_read_file(path / shard))
            return state
    for name in _HF_WEIGHT_FILES:
        if (path / name).is_file():
            return _read_file(path / name)
    raise FileNotFoundError(
        f"{path}: no weights found (looked for {', '.join(_HF_WEIGHT_FILES + _HF_INDEX_FILES)})."
    )


def write_safetensors(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write contiguous, non-aliased copies (safetensors refuses shared storage), atomically and durably:
    after a crash or power loss, the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(tmp), metadata=metadata)
    replace_durably(tmp, path)


def replace_durably(tmp: str | Path, path: str | Path) -> None:
    """Rename a fully written ``tmp`` over ``path`` so that a crash or power loss leaves the old file or the whole
    new one: the data on disk before the name points at it, and the rename itself flushed."""
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def fsync_file(path: str | Path) -> None:
    """Flush a written file's data to the storage device (what a ``close`` does not promise)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make a folder's entries (files created, renamed or removed in it) survive a power loss or node crash."""
    fsync_file(path)  # a directory opened read-only can be fsynced like a file on POSIX systems
