"""Learning-rate schedule: linear warmup, then a cosine decay evaluated at every optimizer step.

The original BLIP-2 code steps its cosine once per EPOCH (a staircase over 10 epochs); here the
cosine is a smooth function of the optimizer step, so a run defined in steps (250k for stage 1)
decays the same way whatever the epoch length.

Convention: optimizer step ``t`` (0-based, the t-th call of ``optimizer.step()``) uses
``lr_at(t, ...)``. With :func:`build_scheduler` (a ``torch.optim.lr_scheduler.LambdaLR``) that is
exactly what happens when ``scheduler.step()`` follows each ``optimizer.step()``, which is what
DeepSpeed's engine does once per gradient-accumulation boundary.
"""
from __future__ import annotations

import math

import torch


def validate(peak: float, warmup: int, total: int, min_lr: float, warmup_start: float = 0.0) -> None:
    if peak <= 0:
        raise ValueError(f"peak learning rate must be > 0, got {peak}.")
    if warmup < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup}.")
    if total <= warmup:
        raise ValueError(f"total_steps ({total}) must be larger than warmup_steps ({warmup}).")
    if not 0.0 <= min_lr <= peak:
        raise ValueError(f"min_lr must be in [0, peak={peak}], got {min_lr}.")
    if not 0.0 <= warmup_start <= peak:
        raise ValueError(f"warmup start lr must be in [0, peak={peak}], got {warmup_start}.")


def lr_at(step: int, peak: float, warmup: int, total: int, min_lr: float = 0.0, warmup_start: float = 0.0) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    - ``step < warmup``: linear from ``warmup_start`` (at step 0) towards ``peak`` (reached at ``warmup``);
    - ``warmup <= step <= total``: ``min_lr + (peak - min_lr) * (1 + cos(pi * progress)) / 2`` with
      ``progress = (step - warmup) / (total - warmup)``, so ``peak`` at ``warmup`` and ``min_lr`` at ``total``;
    - ``step > total``: ``min_lr``.
    """
    validate(peak, warmup, total, min_lr, warmup_start)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}.")
    if step < warmup:
        return warmup_start + (peak - warmup_start) * step / warmup
    progress = min(1.0, (step - warmup) / (total - warmup))
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_lambda(peak: float, warmup: int, total: int, min_lr: float = 0.0, warmup_start: float = 0.0):
    """``step -> lr_at(step) / peak``: the multiplier ``LambdaLR`` applies to each group's base lr.

    Groups whose base lr is ``peak`` follow :func:`lr_at` exactly; others are scaled proportionally.
    """
    validate(peak, warmup, total, min_lr, warmup_start)

    def multiplier(step: int) -> float:
        return lr_at(step, peak, warmup, total, min_lr, warmup_start) / peak

    return multiplier


def build_scheduler(optimizer: torch.optim.Optimizer, peak: float, warmup: int, total: int, min_lr: float = 0.0,
                    warmup_start: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following :func:`lr_at`; the optimizer's groups must have ``lr == peak``.

    Construct it on the client optimizer BEFORE ``deepspeed.initialize`` and pass it as
    ``lr_scheduler=``; DeepSpeed then steps it once per optimizer step (never on a
    gradient-accumulation micro step) and saves it in its checkpoints.
    """
    for i, group in enumerate(optimizer.param_groups):
        if not math.isclose(group["lr"], peak, rel_tol=1e-12):
            raise ValueError(f"param group {i} has lr={group['lr']}, expected the peak lr {peak}.")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(peak, warmup, total, min_lr, warmup_start))
