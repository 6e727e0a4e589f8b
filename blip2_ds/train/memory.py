"""Running out of GPU memory: an error that says what to change, and on request where the memory went.

An out-of-memory error anywhere in the loop (forward, backward, step, evaluation, a save) becomes a
:class:`~blip2_ds.train.loop.TrainingError` whose message names the step, the micro batch and the
settings that lower memory (:func:`out_of_memory_message`); the last complete checkpoint is untouched.

``memory_snapshot: true`` (CUDA only) records the CUDA caching allocator's history from the start of
the loop (``torch.cuda.memory._record_memory_history``: each allocation and free with its stack, the
last :data:`MAX_ENTRIES`). When the loop runs out of memory, every rank that did writes
``output_dir/memory/oom_step_N_rankR.pickle`` before the error goes on: drag it onto
https://pytorch.org/memory_viz to see which tensors held the memory and where they were made.
Recording takes host time at every allocation, hence off by default: turn it on to rerun a run
that ran out of memory.
"""
from __future__ import annotations

from pathlib import Path

import torch

MAX_ENTRIES = 100_000
"""Allocator events kept (a ring buffer): several steps of the Q-Former's allocations."""
VIEWER = "https://pytorch.org/memory_viz"


class MemoryRecorder:
    """Records the CUDA allocator's history while the loop runs (``enabled``) and dumps it after an OOM."""

    def __init__(self, enabled: bool, output_dir: Path, rank: int):
        self.enabled, self.rank = enabled, rank
        self.folder = Path(output_dir) / "memory"

    def __enter__(self) -> "MemoryRecorder":
        if self.enabled:
            torch.cuda.memory._record_memory_history(max_entries=MAX_ENTRIES)
        return self

    def __exit__(self, *exc) -> bool:
        if self.enabled:
            torch.cuda.memory._record_memory_history(enabled=None)
        return False

    def dump_after_out_of_memory(self, step: int) -> Path | None:
        """This rank's snapshot (None when not recording). Call it while handling the OOM: the history
        stops at the loop's end. A snapshot that cannot be written is said, not raised over the OOM."""
        if not self.enabled:
            return None
        path = self.folder / f"oom_step_{step}_rank{self.rank}.pickle"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            torch.cuda.memory._dump_snapshot(str(path))
        except (OSError, RuntimeError) as err:
            print(f"[rank {self.rank}] could not write the memory snapshot {path}: {err}", flush=True)
            return None
        return path


def out_of_memory_message(step: int, rank: int, micro_batch: int, device: torch.device,
                          snapshot: Path | None) -> str:
    """What the user reads when rank ``rank`` ran out of memory in ``step``."""
    where = f"rank {rank} ran out of GPU memory in step {step} (data.batch_size={micro_batch} per GPU"
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 1024 ** 3
        total = torch.cuda.get_device_properties(device).total_memory / 1024 ** 3
        where += f"; {peak:.1f} GiB allocated at the peak of {total:.1f} GiB"
    found = (f"Its memory snapshot: {snapshot} (open it in {VIEWER})." if snapshot is not None else
             "Rerun with memory_snapshot=true to record where the memory went (a snapshot per rank).")
    return (f"{where}). Lower data.batch_size (optim.global_batch stays the same: gradient accumulation makes "
            f"up the rest; `python launch/bench.py --plan --gpus G --gpu-memory M` sizes it), or set "
            f"activation_checkpointing=true. The last complete checkpoint is untouched: --resume latest. {found}")
