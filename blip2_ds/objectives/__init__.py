"""The stage-1 objectives: ITC (itc.py), ITM with hard negatives (itm.py), ITG (itg.py)."""
import torch

LOSS_RANGE = "blip2_ds.loss"
"""Profiler ranges ``blip2_ds.loss.<name>`` mark the loss computations (similarities, the negative
draw, cross-entropies; not the Q-Former passes): the step benchmark's ``losses`` column is their time."""


def loss_range(name: str) -> torch.profiler.record_function:
    """``with loss_range("itc"): ...``: a profiler range (about a microsecond when no profiler runs)."""
    return torch.profiler.record_function(f"{LOSS_RANGE}.{name}")


def at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """Loss math runs in fp32 even when the model runs in bf16/fp16 (and stays fp64 in fp64 tests)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))
