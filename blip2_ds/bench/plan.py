"""``--plan``: the micro batch and accumulation that reach the recipe's global batch on G GPUs of M GiB.

Memory per GPU = fixed (frozen towers in bf16; trainable weights, fp32 master + Adam moments and
gradients partitioned by ZeRO-2; a reduce bucket) + micro batch x activations per sample. The
activations per sample and the step time per sample come from a measurement when one is given
(two micro batches on this machine's GPU: the slope of peak memory and of step time) and from the
analytic estimate of :func:`blip2_ds.train.dry_run.activation_estimate` otherwise. The largest micro
batch that divides the per-GPU share of the global batch and leaves ``headroom`` of the memory free
is chosen; the expected step time is accumulation x the measured (or unknown) micro-step time.
"""
from __future__ import annotations

from dataclasses import dataclass

GIB = 1024 ** 3

RECIPE_GLOBAL_BATCH = {1: 1680, 2: 1920}
"""BLIP-2's batch sizes: stage 1 with ViT-g 1680 (16 A100 x 105), stage 2 with OPT 1920 (16 x 120)."""


@dataclass
class MemoryModel:
    fixed_bytes: float
    """Everything but the activations, per GPU."""
    bytes_per_sample: float
    """Activations (and temporaries) per sample of the micro batch."""
    seconds_per_sample: float | None = None
    """Step time per sample of the micro batch on this GPU (measured), or None."""
    seconds_fixed: float = 0.0
    """Step time at zero batch (optimizer, launch overheads), measured."""
    source: str = "estimate"


def zero2_fixed_bytes(trainable: int, frozen: int, world: int, precision_bytes: int = 2) -> float:
    """Frozen weights (bf16) + trainable weights + ZeRO-2 partitions of fp32 master, Adam moments, gradients."""
    return (frozen * 2 + trainable * precision_bytes + trainable * 12 / world + trainable * precision_bytes / world
            + min(trainable, 2e8) * precision_bytes)


def from_measurements(fixed_bytes: float, points: list[tuple[int, float, float]]) -> MemoryModel:
    """``points``: (micro batch, peak bytes, step seconds) at two or more batch sizes on the target GPU."""
    (b0, m0, t0), (b1, m1, t1) = points[0], points[-1]
    per_sample = max((m1 - m0) / (b1 - b0), 1.0)
    seconds = max((t1 - t0) / (b1 - b0), 0.0)
    return MemoryModel(max(m0 - per_sample * b0, fixed_bytes), per_sample, seconds, max(t0 - seconds * b0, 0.0),
                       "measured")


@dataclass
class Plan:
    gpus: int
    memory_gib: float
    global_batch: int
    micro_batch: int
    accumulation: int
    memory_used_gib: float
    step_seconds: float | None
    model: MemoryModel

    def describe(self) -> str:
        time = "unknown (no measurement on this GPU)" if self.step_seconds is None else f"{self.step_seconds:.2f} s"
        return (f"{self.gpus} GPUs x {self.memory_gib:g} GiB, global batch {self.global_batch}: micro batch "
                f"{self.micro_batch} x {self.gpus} GPUs x {self.accumulation} accumulation; ~{self.memory_used_gib:.1f} "
                f"GiB per GPU ({self.model.source}: {self.model.fixed_bytes / GIB:.1f} GiB fixed + "
                f"{self.model.bytes_per_sample / 2**20:.0f} MiB per sample); expected step {time}")


def plan(model: MemoryModel, gpus: int, memory_gib: float, global_batch: int, headroom: float = 0.1) -> Plan:
    """The fewest accumulation steps whose micro batch fits; ValueError when nothing fits or divides."""
    if global_batch % gpus:
        raise ValueError(f"global batch {global_batch} is not a multiple of {gpus} GPUs; "
                         f"use {global_batch // gpus * gpus} or {(global_batch // gpus + 1) * gpus}.")
    per_gpu = global_batch // gpus
    budget = memory_gib * GIB * (1 - headroom) - model.fixed_bytes
    if budget < model.bytes_per_sample:
        raise ValueError(f"one sample does not fit: {model.fixed_bytes / GIB:.1f} GiB fixed + "
                         f"{model.bytes_per_sample / GIB:.2f} GiB per sample on {memory_gib:g} GiB GPUs "
                         f"(use more GPUs for ZeRO-2's partitions, or a smaller model).")
    for micro in range(min(per_gpu, int(budget // model.bytes_per_sample)), 0, -1):
        if per_gpu % micro == 0:
            accumulation = per_gpu // micro
            used = (model.fixed_bytes + micro * model.bytes_per_sample) / GIB
            step = None if model.seconds_per_sample is None else \
                accumulation * (model.seconds_fixed + micro * model.seconds_per_sample)
            return Plan(gpus, memory_gib, global_batch, micro, accumulation, used, step, model)
    raise AssertionError("unreachable: micro batch 1 always divides")
