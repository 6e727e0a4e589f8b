"""The training data stream of one rank: worker processes decode batches; the main process
tracks exactly what was consumed so that a run resumes where it stopped.

Order and resume. Every worker produces the same number of batches (its quota, from
:class:`~blip2_ds.data.shards.EpochPlan`), and the DataLoader hands batches out round-robin
over its workers, so batch k of an epoch comes from worker k mod W. Each batch carries its
worker's position after it (shard index, samples read in that shard). The stream's state is
(epoch, batches consumed, last position of each worker). On resume, worker w restarts at its
position, with its remaining quota, and the DataLoader's workers are rotated so that the first
batch comes from the worker that was next: the batches are exactly those the uninterrupted run
would have produced, in the same order. Per-sample augmentation is seeded by the sample's
position, so it does not depend on where a run was interrupted.

The DataLoader is created per epoch: the epoch and the resume position are baked into the
dataset the workers receive, so persistent workers cannot drift from the main process's epoch.
Workers stay alive for the whole epoch.
"""
from __future__ import annotations

import collections
import logging
import random
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from blip2_ds import distributed
from blip2_ds.config import DataConfig
from blip2_ds.data.shards import EpochPlan, _mix, resolve_shards
from blip2_ds.data.tario import iter_samples
from blip2_ds.data.text import CaptionTokenizer, clean_caption
from blip2_ds.data.transforms import (
    DeviceTransform, decode_and_crop, pack_images, sample_jitter, train_crop,
)

log = logging.getLogger("blip2_ds.data")


class DataError(RuntimeError):
    """The data cannot feed the run (e.g. a worker's shards hold no usable sample); the message says why."""


_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, TypeError)
_LLM_TEXT_STREAM = 1
"""Mixed into the seed of a batch's LLM text draws, apart from its samples' augmentation seeds."""


class _RateLimitedLog:
    """At most one line per reason every ``interval`` seconds, with the running count."""

    def __init__(self, interval: float = 30.0):
        self.interval = interval
        self.last: dict[str, float] = {}
        self.total: collections.Counter = collections.Counter()

    def __call__(self, reason: str, detail: str) -> None:
        self.total[reason] += 1
        now = time.monotonic()
        if now - self.last.get(reason, -1e9) >= self.interval:
            self.last[reason] = now
            log.warning("skipped sample (%s, %d so far in this worker): %s", reason, self.total[reason], detail)


@dataclass
class _Prepared:
    key: str
    pixels: np.ndarray
    flip: bool
    caption: str
    jitter: tuple[float, float, float] | None


class ShardDataset(IterableDataset):
    """The worker side: shards -> samples -> cleaned, decoded, cropped -> tokenized batches."""

    def __init__(self, cfg: DataConfig, plan: EpochPlan, rank: int, tokenizer, max_text_len: int,
                 start: dict[int, tuple[int, int]], remaining: list[int], rotation: int,
                 llm_text: Callable[[list[str], random.Random], Any] | None = None):
        self.cfg, self.plan, self.rank = cfg, plan, rank
        self.tokenize = CaptionTokenizer(tokenizer, max_text_len)
        self.llm_text = llm_text
        self.start, self.remaining, self.rotation = start, remaining, rotation

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        loader_worker = info.id if info is not None else 0
        worker = (loader_worker + self.rotation) % self.plan.workers
        try:
            yield from self._batches(worker, self.remaining[worker], *self.start.get(worker, (0, 0)))
        except Exception as err:  # noqa: BLE001 - handed to the main process, which stops the workers, then raises
            detail = str(err) if isinstance(err, DataError) else traceback.format_exc()
            yield {"error": f"worker {worker} of rank {self.rank}: {detail}"}

    def _batches(self, worker: int, quota: int, shard_index: int, position: int):
        counts: collections.Counter = collections.Counter()
        report = _RateLimitedLog()
        pending: list[_Prepared] = []
        produced, good_since_pass = 0, 0
        first_of_pass = shard_index + (1 if position else 0)  # a resumed, partly read shard is no full pass
        while produced < quota:
            shard, repeated = self.plan.shard(self.rank, worker, shard_index)
            for position, key, fields in iter_samples(shard.url, counts, skip=position, report=report):
                seed = _mix(self.plan.seed, self.plan.epoch, self.rank, worker, shard_index, position)
                sample = self._prepare(key, fields, random.Random(seed), counts, report, shard.url)
                if sample is None:
                    continue
                good_since_pass += 1
                if repeated:
                    counts["repeated_to_fill"] += 1
                pending.append(sample)
                if len(pending) == self.cfg.batch_size:
                    batch = self._collate(pending, worker, (shard_index, position), counts)
                    counts.clear()  # in place: the shard reader holds this same counter
                    pending = []
                    yield batch
                    produced += 1
                    if produced == quota:
                        break
            else:
                shard_index, position = shard_index + 1, 0
                if shard_index - first_of_pass >= self.plan.pass_length(self.rank, worker):
                    if good_since_pass == 0:  # never spin forever on data that is all bad
                        raise DataError(f"it read a full pass over its shards without one usable sample "
                                        f"(skipped: {dict(counts)}).")
                    first_of_pass, good_since_pass = shard_index, 0
        if counts:  # what was skipped after the last batch still reaches the trainer's counters
            yield {"worker": worker, "counts": dict(counts), "trailer": True}

    def _prepare(self, key, fields, rng, counts, report, url) -> _Prepared | None:
        cfg = self.cfg
        extension = next((e for e in cfg.image_extensions if e in fields), None)
        if extension is None:
            counts["missing_image"] += 1
            report("missing_image", f"{url}: {key}")
            return None
        if "txt" not in fields:
            counts["missing_caption"] += 1
            report("missing_caption", f"{url}: {key}")
            return None
        caption = clean_caption(fields["txt"].decode("utf-8", errors="replace"), cfg.max_words, cfg.prompt)
        if not caption.strip():
            counts["empty_caption"] += 1
            report("empty_caption", f"{url}: {key}")
            return None
        try:
            pixels, flip = decode_and_crop(
                fields[extension], lambda w, h: train_crop(rng, w, h, cfg.crop_scale, cfg.hflip),
                cfg.image_size, cfg.reduced_decode)
        except _DECODE_ERRORS as err:
            counts["corrupt_image"] += 1
            report("corrupt_image", f"{url}: {key}: {err}")
            return None
        jitter = sample_jitter(rng, cfg.color_jitter) if cfg.color_jitter > 0 else None
        return _Prepared(key, pixels, flip, caption, jitter)

    def _collate(self, samples: list[_Prepared], worker: int, position: tuple[int, int],
                 counts: collections.Counter) -> dict[str, Any]:
        packed, shapes = pack_images([s.pixels for s in samples], shared=get_worker_info() is not None)
        captions = [s.caption for s in samples]
        ids, mask = self.tokenize(captions)
        batch = {
            "image": packed, "image_shapes": shapes, "flips": torch.tensor([s.flip for s in samples]),
            "jitter": torch.tensor([s.jitter for s in samples]) if samples[0].jitter is not None else None,
            "text_ids": ids, "text_mask": mask, "captions": captions, "keys": [s.key for s in samples],
            "worker": worker, "position": position, "counts": dict(counts),
        }
        if self.llm_text is not None:
            # Seeded by the batch's place in the epoch, like the per-sample augmentation: a resumed
            # run draws what the uninterrupted run drew.
            seed = _mix(self.plan.seed, self.plan.epoch, self.rank, worker, *position, _LLM_TEXT_STREAM)
            batch["llm_text"] = self.llm_text(captions, random.Random(seed))
        return batch


class ShardStream:
    """Batches for this rank, epoch after epoch, resumable (``state_dict`` / ``load_state_dict``).

    Each batch holds the captions and their Q-Former tokens (``text_ids`` / ``text_mask``, from
    ``tokenizer``); with ``llm_text`` (stage 2: a
    :class:`~blip2_ds.models.stage2.LLMTextTokenizer`) also ``llm_text``, the captions in the
    frozen LLM's format, made in the workers as well.
    """

    def __init__(self, cfg: DataConfig, tokenizer, max_text_len: int, seed: int,
                 rank: int | None = None, world: int | None = None,
                 llm_text: Callable[[list[str], random.Random], Any] | None = None):
        self.cfg, self.tokenizer, self.max_text_len, self.seed = cfg, tokenizer, max_text_len, seed
        self.llm_text = llm_text
        self.rank = distributed.rank() if rank is None else rank
        self.world = distributed.world_size() if world is None else world
        self.workers = max(1, cfg.num_workers)
        self.shards = resolve_shards(cfg)  # bad patterns fail here, before any training
        self.epoch, self.batches_done = 0, 0
        self.positions: dict[int, tuple[int, int]] = {}
        self.skipped: collections.Counter = collections.Counter()
        self.plan()  # and so does a configuration that cannot be planned

    def plan(self, epoch: int | None = None) -> EpochPlan:
        return EpochPlan(self.cfg, self.shards, self.epoch if epoch is None else epoch, self.seed,
                         self.world, self.workers)

    def batches_per_epoch(self) -> int:
        return self.plan().batches_per_worker * self.workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The rest of the current epoch; then the stream moves to the next epoch."""
        plan = self.plan()
        full, extra = divmod(self.batches_done, self.workers)
        remaining = [plan.batches_per_worker - full - (1 if w < extra else 0) for w in range(self.workers)]
        dataset = ShardDataset(self.cfg, plan, self.rank, self.tokenizer, self.max_text_len,
                               dict(self.positions), remaining, rotation=extra, llm_text=self.llm_text)
        loader = DataLoader(
            dataset, batch_size=None, num_workers=self.cfg.num_workers, pin_memory=torch.cuda.is_available(),
            prefetch_factor=self.cfg.prefetch_batches if self.cfg.num_workers else None,
            # Its own generator: creating the loader must not draw from the global RNG, or a resumed
            # run's dropout would be one draw off the uninterrupted run's.
            generator=torch.Generator().manual_seed(_mix(self.seed, self.epoch, self.rank)),
            worker_init_fn=_ignore_stop_signals,
        )
        error = None
        batches = iter(loader)
        try:
            for batch in batches:
                if "error" in batch:
                    error = batch["error"]
                    break
                self.skipped.update(batch["counts"])
                if batch.get("trailer"):
                    continue
                self.positions[batch["worker"]] = tuple(batch["position"])
                self.batches_done += 1
                yield batch
        finally:
            # However the stream is left (an error in a worker, the generator closed, an exception raised in
            # the rank while it waited for a batch): a traceback through the DataLoader's frames would keep
            # the workers, which ignore SIGTERM, alive, and the rank would wait for them at exit forever.
            _stop_workers(batches)
        if error is not None:
            # Raised here, not in the DataLoader: its re-raise would carry the worker's traceback instead.
            raise DataError(f"data: {error}")
        self.epoch, self.batches_done, self.positions = self.epoch + 1, 0, {}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches_done": self.batches_done,
                "positions": {int(k): list(v) for k, v in self.positions.items()},
                "skipped": dict(self.skipped), "workers": self.workers, "world": self.world}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["workers"], state["world"]) != (self.workers, self.world):
            raise ValueError(
                f"the data position was saved with {state['world']} ranks x {state['workers']} workers; this run has "
                f"{self.world} x {self.workers}. Resume with the same data.num_workers and number of ranks: the "
                f"order of the batches depends on both.")
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])
        self.positions = {int(k): tuple(v) for k, v in state["positions"].items()}
        self.skipped = collections.Counter(state.get("skipped", {}))


def _stop_workers(batches) -> None:
    """Stop a DataLoader iterator's workers now: the loader's own shutdown (they finish their batch and
    go), then a kill for any still there after it, such as one blocked reading a stalled ``pipe:`` source
    (they ignore SIGTERM, the shutdown's last resort)."""
    workers = list(getattr(batches, "_workers", ()))  # none when the loader reads in the rank (num_workers=0)
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for worker in workers:
        if worker.is_alive():
            worker.kill()
            worker.join()


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave SIGTERM / SIGUSR1 to their rank process, which finishes its step, saves and then
    shuts them down; launchers signal whole process trees, and a worker dying first would crash the step."""
    from blip2_ds.train import signals

    signals.ignore_in_worker()


def batch_to_device(batch: dict[str, Any], transform: DeviceTransform, device: torch.device | str):
    """(pixels (B, 3, S, S), text ids, text mask) on ``device``; the resize and normalisation run there."""
    packed = batch["image"].to(device, non_blocking=True)
    pixels = transform(packed, batch["image_shapes"], batch["flips"], batch["jitter"])
    return (pixels, batch["text_ids"].to(device, non_blocking=True),
            batch["text_mask"].to(device, non_blocking=True))
