"""Which shard each (rank, worker) reads, epoch by epoch.

Exact mode: the shard list (each source's shards repeated ``weight`` times) is shuffled by
seed + epoch identically on every node, then dealt to the R x W (rank, worker) slots
(``shards[rank + R * worker :: R * W]``, i.e. split by node, then by worker). Every worker gets
the same quota of batches, so every rank yields the same number of batches and no collective hangs
at the end of an epoch: ``ceil(max over slots(samples) / batch)`` with ``data.balance=repeat``
(a short slot wraps around to its first shard; counted as ``repeated_to_fill``), or
``min over slots(samples) // batch`` with ``balance=drop``. Bad samples make a slot short too.

Resampled mode: each worker's i-th shard is drawn with replacement from a generator seeded by
(seed, epoch, rank, worker, i), with probability proportional to the source weight times the
shard's sample count; the quota comes from the virtual epoch size.

Either way the i-th shard of a worker is a pure function of (seed, epoch, rank, worker, i):
a position (i, samples read in shard i) is all a resume needs.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import braceexpand

from blip2_ds.config import ConfigError, DataConfig
from blip2_ds.data.tario import PIPE_PREFIX, count_samples, is_local


@dataclass(frozen=True)
class Shard:
    url: str
    num_samples: int | None
    """Known from ``*_stats.json`` (img2dataset) or a header scan; None for an unscannable pipe."""
    source: int


def expand_urls(pattern: str) -> list[str]:
    """Brace-expand a pattern (``::`` separates several); local files must exist."""
    urls = [url for part in pattern.split("::") for url in braceexpand.braceexpand(part.strip())]
    local = [u for u in urls if not u.startswith(PIPE_PREFIX)]
    missing = [u for u in local if not is_local(u)]
    if missing:
        raise ConfigError(f"data: {len(missing)} of {len(urls)} shards of {pattern!r} do not exist "
                          f"(first: {missing[0]}). Check the path and the brace range.")
    return urls


def shard_sample_count(url: str) -> int | None:
    if url.startswith(PIPE_PREFIX):
        return None
    path = Path(url.removeprefix("file:"))
    stats = path.with_name(path.name.rsplit(".tar", 1)[0] + "_stats.json")
    if stats.is_file():
        try:
            return int(json.loads(stats.read_text())["successes"])
        except (ValueError, KeyError, TypeError):
            pass  # an unreadable stats file: count instead
    try:
        return count_samples(str(path))
    except Exception:  # noqa: BLE001 - a damaged shard is planned as empty; the reader counts it
        return 0


def resolve_shards(cfg: DataConfig) -> list[Shard]:
    sources = cfg.all_sources()
    if not sources:
        raise ConfigError("data: no training data; set data.train (a shard pattern) or data.sources.")
    shards: list[Shard] = []
    for index, source in enumerate(sources):
        urls = expand_urls(source.urls)
        if not urls:
            raise ConfigError(f"data.sources[{index}]: {source.urls!r} matches no shard.")
        counts = [shard_sample_count(url) for url in urls]
        if any(c is None for c in counts):
            if source.num_samples is None and cfg.mode == "exact":
                raise ConfigError(
                    f"data.sources[{index}] ({source.urls!r}): exact epochs need each shard's sample count; "
                    f"put img2dataset's *_stats.json beside the shards or set its num_samples.")
            if source.num_samples is None and len(sources) > 1:
                raise ConfigError(
                    f"data.sources[{index}] ({source.urls!r}): resampled draws weigh each shard by its sample count, "
                    f"which these shards do not give; set its num_samples (or put img2dataset's *_stats.json "
                    f"beside them), or this source would be drawn as if each shard held one sample.")
            estimate = (source.num_samples or 0) // len(urls) or None
            counts = [c if c is not None else estimate for c in counts]
        shards.extend(Shard(url, count, index) for url, count in zip(urls, counts))
    return shards


class EpochPlan:
    """The shard sequence and batch quota of every (rank, worker) slot for one epoch."""

    def __init__(self, cfg: DataConfig, shards: list[Shard], epoch: int, seed: int, world: int, workers: int):
        self.cfg, self.epoch, self.seed = cfg, epoch, seed
        self.world, self.workers = world, workers
        slots = world * workers
        weights = [s.weight for s in cfg.all_sources()]
        if cfg.mode == "exact":
            order = [s for s in shards for _ in range(int(weights[s.source]))]
            random.Random(_mix(seed, epoch)).shuffle(order)
            if len(order) < slots:
                raise ConfigError(
                    f"data: {len(order)} shards for {world} ranks x {workers} workers = {slots} readers; "
                    f"exact epochs need at least one shard per reader. Lower data.num_workers, "
                    f"write smaller shards, or use data.mode=resampled.")
            self.slots = [order[k::slots] for k in range(slots)]
            per_slot = [sum(s.num_samples or 0 for s in slot) for slot in self.slots]
            if cfg.balance == "repeat":
                self.batches_per_worker = -(-max(per_slot) // cfg.batch_size)
            else:
                self.batches_per_worker = min(per_slot) // cfg.batch_size
        else:
            self.shards = shards
            self.draw_weights = [weights[s.source] * (s.num_samples or 1) for s in shards]
            total = cfg.epoch_samples or sum(s.num_samples or 0 for s in shards)
            self.batches_per_worker = total // (slots * cfg.batch_size)
        if self.batches_per_worker < 1:
            raise ConfigError(f"data: not enough samples for one batch of {cfg.batch_size} per worker "
                              f"({world} ranks x {workers} workers); lower data.batch_size or data.num_workers.")

    def pass_length(self, rank: int, worker: int) -> int:
        """Shards in one pass over a worker's data (resampled: as many draws as there are shards)."""
        if self.cfg.mode == "exact":
            return len(self.slots[rank + self.world * worker])
        return len(self.shards)

    def shard(self, rank: int, worker: int, i: int) -> tuple[Shard, bool]:
        """The i-th shard of a worker, and whether it is a wrap-around repeat (exact mode)."""
        if self.cfg.mode == "exact":
            slot = self.slots[rank + self.world * worker]
            return slot[i % len(slot)], i >= len(slot)
        rng = random.Random(_mix(self.seed, self.epoch, rank, worker, i))
        return rng.choices(self.shards, weights=self.draw_weights)[0], False


def _mix(*values: int) -> int:
    """A stable 63-bit seed from integers (Python's hash of an int tuple is stable across processes)."""
    return hash(tuple(values)) & 0x7FFF_FFFF_FFFF_FFFF
