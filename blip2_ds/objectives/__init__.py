"""The stage-1 objectives: ITC (itc.py), ITM with hard negatives (itm.py), ITG (itg.py)."""
import torch


def at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """Loss math runs in fp32 even when the model runs in bf16/fp16 (and stays fp64 in fp64 tests)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))
