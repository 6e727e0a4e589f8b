"""Python's garbage collector in the training loop: the setup's objects frozen out of it, its time measured.

A full (generation-2) collection walks every object the collector tracks. After setup a rank holds
over half a million (the modules of torch, transformers, DeepSpeed and open_clip, the tokenizer, the
model's Python objects): on the demo a full collection takes ~300 ms, and it comes when this rank's
allocation counts say so, at a different step on every rank. The next collective makes all ranks wait
for the one that paused, so a run of R ranks loses up to R such pauses where one rank loses one.
:class:`FrozenSetup` moves everything alive after setup into the collector's permanent
generation (``gc.freeze``): later collections walk only what the loop created (~0.4 ms on the demo).
Automatic collection stays on, so reference cycles made during training are freed as before (unlike
switching the collector off and collecting every N steps, nothing waits for a schedule). DataLoader
workers forked afterwards also leave the frozen objects' memory pages unwritten (no copy-on-write
from their collections).
"""
from __future__ import annotations

import gc
import time


class FrozenSetup:
    """While entered, the objects alive at entry (after one collection) are frozen out of garbage
    collection; :meth:`freeze_more` adds those alive now; on exit (also by an exception) all are unfrozen.

    The loop calls :meth:`freeze_more` after its first step, whose lazy setup (torch.compile's graphs
    with ``vision.compile``: ~22,000 objects, 8-9 ms per full collection on the demo; DeepSpeed's and
    the DataLoader's first-use state) would otherwise be walked by every later full collection.
    """

    def __enter__(self) -> "FrozenSetup":
        self.freeze_more()
        return self

    def __exit__(self, *exc_info) -> None:
        gc.unfreeze()

    @staticmethod
    def freeze_more() -> None:
        gc.collect()  # garbage of the moment is freed, not frozen in
        gc.freeze()

    @property
    def objects(self) -> int:
        """How many objects are frozen now."""
        return gc.get_freeze_count()


class CollectionClock:
    """Seconds this process spends in garbage collections (any generation, any thread), while entered.

    ``take()`` returns the seconds since the previous ``take()`` (the loop calls it once per step).
    """

    def __init__(self) -> None:
        self._started: float | None = None
        self._seconds = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        now = time.perf_counter()
        if phase == "start":
            self._started = now
        elif self._started is not None:
            self._seconds += now - self._started
            self._started = None

    def __enter__(self) -> "CollectionClock":
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc_info) -> None:
        gc.callbacks.remove(self._callback)

    def take(self) -> float:
        seconds, self._seconds = self._seconds, 0.0
        return seconds


def full_collection_seconds() -> dict[str, float | int]:
    """What a full collection costs in this process now, and with the live objects frozen (same run).

    Keys: ``seconds`` (a full collection as Python's own schedule would run it), ``frozen_seconds``
    (the same inside :class:`FrozenSetup`), ``objects`` (how many were frozen).
    """
    gc.collect()  # what is garbage now is not what a steady-state collection walks
    start = time.perf_counter()
    gc.collect()
    seconds = time.perf_counter() - start
    with FrozenSetup() as frozen:
        start = time.perf_counter()
        gc.collect()
        frozen_seconds = time.perf_counter() - start
        objects = frozen.objects
    return {"seconds": seconds, "frozen_seconds": frozen_seconds, "objects": objects}
