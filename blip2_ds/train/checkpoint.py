"""Checkpoints: saved by every rank, complete or invisible, the last K kept, resumable exactly.

Layout under ``<output_dir>/checkpoints/``::

    step_00001000/
        mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt   DeepSpeed: module, optimizer, scheduler
        rank_00000.json             this rank's loop counters and data-stream position, Python/NumPy RNG
        rank_00000_rng.safetensors  this rank's torch (and CUDA) RNG states
        model.safetensors           the trainable weights alone, for inference and conversion
        config.yaml                 the run's configuration
        COMPLETE                    written last, once every rank has finished writing
    latest                          the tag of the newest COMPLETE checkpoint (atomically replaced)
    abandoned/step_00001500/        checkpoints newer than the one a run was resumed from (moved, never deleted)

A checkpoint without ``COMPLETE`` (a save killed midway) is never loaded and ``latest`` still
names the previous one; every file is flushed to disk before ``COMPLETE`` is written, and each rename
after it, so that holds after a power loss or node crash too. Resuming from a checkpoint older than ``latest`` (going back before a
divergence) starts a new line of training: the newer checkpoints are moved to ``abandoned/``, so that
``latest``, ``--resume auto`` and keep-K follow the resumed line only. Everything is read weights-only: our files are JSON and safetensors, and
DeepSpeed's are loaded with an allowlist of its few classes (:func:`weights_only_deepspeed_loading`). The frozen towers are never in a checkpoint: they are not part of the
module the engine wraps, and they load from their own files.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from blip2_ds import distributed
from blip2_ds.state_io import fsync_file, read_state_dict, replace_durably, write_safetensors

LATEST = "latest"
AUTO = "auto"
"""``--resume auto``: ``latest`` when the run folder has a checkpoint, else a fresh start (requeued jobs)."""
COMPLETE = "COMPLETE"
_TAG = re.compile(r"step_(\d{8,})\Z")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be resumed from; the message says which ones can."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write_text(path: Path, text: str) -> None:
    """The old text or the new one, even after a power loss (the rename itself made durable too)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    replace_durably(tmp, path)


@contextlib.contextmanager
def durable_deepspeed_saving(engine):
    """Within this context each file DeepSpeed's checkpoint engine writes is flushed to disk by the rank
    that wrote it (on a shared filesystem only the writing node can flush its cache), so that the
    ``COMPLETE`` marker written after them never names data still in a page cache."""
    checkpoint_engine = engine.checkpoint_engine
    original = checkpoint_engine.save

    def save(state_dict, path: str):
        result = original(state_dict, path)
        fsync_file(path)
        return result

    checkpoint_engine.save = save
    try:
        yield
    finally:
        checkpoint_engine.save = original


def _barrier() -> None:
    if distributed.is_distributed():
        torch.distributed.barrier()


def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON-able Python/NumPy states, torch/CUDA state tensors) of this process."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    meta = {"python": [py_version, list(py_state), py_gauss],
            "numpy": [np_kind, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{index}"] = state
    return meta, tensors


def set_rng_state(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, np_gauss = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, np_gauss))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


# The only non-tensor classes DeepSpeed 0.19.8 pickles into its ZeRO-1/2 checkpoint files (fp32, bf16,
# fp16, CPU offload), found by loading each kind weights-only.
_DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


@contextlib.contextmanager
def weights_only_deepspeed_loading():
    """DeepSpeed reads its files with ``torch.load(weights_only=False)``, which would run any code a
    tampered checkpoint pickles; within this context it reads them weights-only, allowing exactly the
    DeepSpeed classes above."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    allowed = []
    for name in _DEEPSPEED_SAFE_GLOBALS:
        module, _, attribute = name.rpartition(".")
        allowed.append(getattr(importlib.import_module(module), attribute))
    original = TorchCheckpointEngine.load

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    TorchCheckpointEngine.load = load
    try:
        yield
    finally:
        TorchCheckpointEngine.load = original


@dataclass(frozen=True)
class SavedCheckpoint:
    """What one :meth:`CheckpointManager.save` wrote and how long every rank was stopped for it."""

    folder: Path
    seconds: float
    """Wall time of the save on this rank, up to its last barrier: the slowest rank's writing sets it."""
    bytes: int
    """Size of the checkpoint folder, every rank's files (counted by rank 0; 0 on the other ranks)."""


class CheckpointManager:
    def __init__(self, output_dir: str | Path, keep_last: int = 3):
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last
        self.rank = distributed.rank()

    # ---- what is on disk ------------------------------------------------------------------------
    def complete_tags(self) -> list[str]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        tags = [p.name for p in self.root.iterdir() if _TAG.match(p.name) and (p / COMPLETE).is_file()]
        return sorted(tags, key=lambda t: int(_TAG.match(t).group(1)))

    def auto_resume(self) -> str | None:
        """``--resume auto`` -> ``latest`` when a checkpoint exists, None (start fresh) when none does.

        Checkpoint folders without a ``latest`` pointer are an error, not a fresh start: starting
        over would overwrite a run that can be resumed by naming its checkpoint.
        """
        if (self.root / LATEST).is_file():
            return LATEST
        tags = self.complete_tags()
        if tags:
            raise CheckpointError(f"--resume auto: {self.root} has complete checkpoints ({', '.join(tags)}) but no "
                                  f"{LATEST} pointer; resume one with --resume <tag> or move the folder away.")
        return None

    def resolve(self, which: str) -> Path:
        """``latest``, a tag, or a checkpoint folder -> the folder of a complete checkpoint."""
        if which == LATEST:
            pointer = self.root / LATEST
            if not pointer.is_file():
                raise CheckpointError(f"--resume latest: {pointer} does not exist (no checkpoint saved yet). "
                                      f"{self._available()}")
            tag = pointer.read_text().strip()
            if not _TAG.match(tag) or not (self.root / tag / COMPLETE).is_file():
                raise CheckpointError(f"{pointer} names {tag[:60]!r}, which is not a complete checkpoint. "
                                      f"{self._available()} Resume with --resume <folder>.")
            return self.root / tag
        path = Path(which)
        if not path.is_dir():
            path = self.root / which
        if not (path / COMPLETE).is_file():
            raise CheckpointError(f"{which} is not a complete checkpoint folder (no {COMPLETE} marker). "
                                  f"{self._available()}")
        return path

    def _available(self) -> str:
        tags = self.complete_tags()
        return (f"Complete checkpoints in {self.root}: {', '.join(tags)}." if tags
                else f"There is no complete checkpoint in {self.root}.")

    def refuse_fresh_start(self) -> None:
        """A run started without ``--resume`` must not write over another run's checkpoints."""
        tags = self.complete_tags()
        if tags:
            raise CheckpointError(f"{self.root} already holds checkpoints of a run ({', '.join(tags[-3:])}): continue "
                                  f"it with --resume latest (or --resume <tag>), or start this run in another output_dir.")

    # ---- saving ---------------------------------------------------------------------------------
    def save(self, engine, step: int, loop_state: dict[str, Any], stream_state: dict[str, Any] | None,
             config: dict[str, Any]) -> SavedCheckpoint:
        """Collective: every rank must call it (DeepSpeed writes each rank's optimizer partition)."""
        start = time.perf_counter()
        tag = tag_for(step)
        folder = self.root / tag
        if self.rank == 0:
            if folder.exists():  # a save of this step that never completed (killed) or a re-run
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
        _barrier()
        with durable_deepspeed_saving(engine):
            engine.save_checkpoint(str(self.root), tag=tag, save_latest=False)
        meta, tensors = rng_state()
        own = {"step": step, "loop": loop_state, "data": stream_state, "rng": meta,
               "world_size": distributed.world_size()}
        # Every rank's last writes flush the folder after its files (durable_deepspeed_saving, then each
        # write below: file, rename, folder), so past the barrier all of them are on disk, names included.
        _atomic_write_text(folder / f"rank_{self.rank:05d}.json", json.dumps(own))
        write_safetensors(tensors, folder / f"rank_{self.rank:05d}_rng.safetensors")
        if self.rank == 0:
            module = engine.module
            write_safetensors({k: v.detach().float().cpu() for k, v in module.state_dict().items()},
                              folder / "model.safetensors", {"format": "ours", "step": str(step)})
            _atomic_write_text(folder / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        _barrier()
        if self.rank == 0:
            _atomic_write_text(folder / COMPLETE, f"{step}\n")
            _atomic_write_text(self.root / LATEST, tag + "\n")
            self._prune(keep=tag)
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if self.rank == 0 else 0
        _barrier()
        return SavedCheckpoint(folder, time.perf_counter() - start, size)

    def _prune(self, keep: str) -> None:
        complete = self.complete_tags()
        for tag in complete[: max(0, len(complete) - self.keep_last)]:
            if tag != keep:
                shutil.rmtree(self.root / tag, ignore_errors=True)
        newest = int(_TAG.match(keep).group(1))
        for path in self.root.iterdir():  # incomplete leftovers older than the newest complete one
            match = _TAG.match(path.name)
            if match and int(match.group(1)) < newest and not (path / COMPLETE).is_file():
                shutil.rmtree(path, ignore_errors=True)

    # ---- loading --------------------------------------------------------------------------------
    def load(self, engine, which: str) -> dict[str, Any]:
        """Restore the engine and this rank's RNG; returns this rank's saved state (step, loop, data)."""
        folder = self.resolve(which)
        own_file = folder / f"rank_{self.rank:05d}.json"
        if not own_file.is_file():
            raise CheckpointError(f"{folder} has no state for rank {self.rank}: it was saved with fewer ranks. "
                                  f"Resume with the same number of ranks.")
        own = json.loads(own_file.read_text())
        if own["world_size"] != distributed.world_size():
            raise CheckpointError(f"{folder} was saved by {own['world_size']} ranks; this run has "
                                  f"{distributed.world_size()}. Resume with the same number of ranks.")
        with weights_only_deepspeed_loading():
            load_path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_module_strict=True,
                                                  load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load {folder}. {self._available()}")
        set_rng_state(own["rng"], read_state_dict(folder / f"rank_{self.rank:05d}_rng.safetensors"))
        return own

    def continue_from(self, which: str, step: int) -> None:
        """Collective, once the resume has succeeded on every rank: this run's line of checkpoints goes on
        from ``which`` (see :meth:`_abandon_newer_than`)."""
        folder = self.resolve(which)
        _barrier()
        if self.rank == 0:
            self._abandon_newer_than(step, folder)
        _barrier()

    def _abandon_newer_than(self, step: int, resumed: Path) -> None:
        """The checkpoints past the resumed step belong to the line of training left behind: complete ones
        move to ``abandoned/`` (kept for the user), incomplete ones are deleted (they cannot be loaded),
        and ``latest`` names the resumed checkpoint when it is one of this run's."""
        if not self.root.is_dir():  # resumed from another run's checkpoint into a new output_dir
            return
        newer = [path for path in self.root.iterdir() if (match := _TAG.match(path.name)) and int(match.group(1)) > step]
        for path in sorted(newer):
            if not (path / COMPLETE).is_file():
                shutil.rmtree(path, ignore_errors=True)
                continue
            target = self.root / "abandoned" / path.name
            suffix = 1
            while target.exists():
                target, suffix = self.root / "abandoned" / f"{path.name}.{suffix}", suffix + 1
            target.parent.mkdir(exist_ok=True)
            os.replace(path, target)
            print(f"resumed from step {step}: the newer checkpoint {path.name} was moved to {target}", flush=True)
        pointer = self.root / LATEST
        if resumed.resolve().parent == self.root.resolve() and (
                not pointer.is_file() or pointer.read_text().strip() != resumed.name):
            _atomic_write_text(pointer, resumed.name + "\n")
