"""Fused kernels and the switch that picks them.

Two hot spots have Triton kernels, each beside the plain-PyTorch path it replaces:

- :mod:`.cross_attention` (+ ``cross_attention_triton``): the Q-Former's query rows attending
  to the image tokens; the torch path is SDPA;
- :mod:`.contrastive` (+ ``contrastive_triton``): the ITC similarity "max over queries" with its
  argmax kept for backward, without the (B, BW, Q) tensor; the torch path is einsum + amax;
- :mod:`.apex`: NVIDIA apex's FusedLayerNorm / FusedAdam, used only when installed and asked for.

The ``kernels`` config switch (``Config.kernels``) chooses per call:

- ``torch``: always the torch path;
- ``triton``: always the kernel; on a CPU only inside Triton's interpreter (``TRITON_INTERPRET=1``,
  for tests: slow), otherwise a clear error;
- ``auto`` (default): the kernel where :data:`AUTO_PICKS_TRITON` says it pays, on CUDA tensors of
  a supported dtype, and only after it reproduced the torch path on the first call of each shape
  (forward and gradients; a compile error or a mismatch warns once and keeps the torch path);
  the torch path everywhere else.

The Triton modules are imported lazily: ``import blip2_ds`` never needs Triton, and
``TRITON_INTERPRET`` is read when a kernel module is first imported.
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Callable

import torch

from blip2_ds.config import KERNEL_BACKENDS as BACKENDS

AUTO_PICKS_TRITON = {
    # Fewer bytes by construction (no (B, BW, Q) tensor in either direction, forward or backward).
    "contrastive": True,
    # SDPA's flash / cuDNN backends are the bar; until `launch/gpu_check.sh` has shown the kernel
    # beating them on a GPU (BENCHMARKS.md), auto keeps SDPA. Flip when the numbers say so.
    "cross_attention": False,
}

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class KernelUnavailable(RuntimeError):
    """``kernels: triton`` was asked for where the kernel cannot run; the message says what to do."""


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_backend(backend: str, where: str = "kernels") -> None:
    if backend not in BACKENDS:
        raise ValueError(f"{where}={backend!r} is not one of {', '.join(BACKENDS)}.")


def why_triton_cannot_run(on_cuda: bool) -> str | None:
    """None if Triton kernels can run (on CUDA, or anywhere inside Triton's interpreter), else what to do."""
    if not triton_available():
        return ("kernels=triton, but Triton is not installed; install the CUDA build of torch (it brings triton) "
                "or set kernels=torch.")
    if not on_cuda and not interpreting():
        return ("kernels=triton needs a CUDA GPU; on a CPU set kernels=torch (or auto), or TRITON_INTERPRET=1 to "
                "run the kernels in Triton's interpreter (slow: tests only).")
    return None


def check_triton_inputs(kernel: str, *tensors: torch.Tensor) -> None:
    """Raise :class:`KernelUnavailable` unless the Triton ``kernel`` can run on these tensors."""
    reason = why_triton_cannot_run(tensors[0].is_cuda)
    if reason is not None:
        raise KernelUnavailable(f"{reason} (the {kernel} kernel, {tensors[0].device} tensors)")
    for tensor in tensors:
        if tensor.dtype not in TRITON_DTYPES:
            raise KernelUnavailable(f"the Triton {kernel} takes fp32/fp16/bf16, got {tensor.dtype}; set kernels: torch.")


_auto_verdicts: dict[tuple, bool] = {}


def _auto_eligible(kernel: str, *tensors: torch.Tensor) -> bool:
    return (AUTO_PICKS_TRITON[kernel] and triton_available()
            and all(t.is_cuda and t.dtype in TRITON_DTYPES for t in tensors))


def use_triton(backend: str, kernel: str, *tensors: torch.Tensor,
               self_check: Callable[[], None] | None = None) -> bool:
    """Whether this call runs the Triton ``kernel``.

    For ``auto``, ``self_check`` (which runs the kernel and the torch path on copies of this
    call's inputs and raises if they differ) runs once per shape/dtype signature; its verdict is
    cached, and a failure warns and keeps the torch path.
    """
    if backend == "torch":
        return False
    if backend == "triton":
        check_triton_inputs(kernel, *tensors)
        return True
    check_backend(backend)
    if not _auto_eligible(kernel, *tensors):
        return False
    signature = (kernel, *((tuple(t.shape), t.dtype, t.device) for t in tensors))
    if signature not in _auto_verdicts:
        try:
            if self_check is not None:
                # The check differentiates, also when the call itself runs under no_grad / inference_mode.
                # Its random draws leave no trace: a resumed run checks again (the verdicts are not saved)
                # and must go on with the same dropout as the run it resumes.
                cuda = sorted({t.device.index or 0 for t in tensors if t.is_cuda})
                with torch.random.fork_rng(devices=cuda), torch.inference_mode(False), torch.enable_grad():
                    self_check()
            _auto_verdicts[signature] = True
        except Exception as err:  # a compile error or wrong numbers on this GPU: keep the torch path
            warnings.warn(f"kernels: auto keeps the torch path for {kernel} at {signature[1:]}: the Triton kernel "
                          f"failed its first-use check ({type(err).__name__}: {err}). Set kernels: triton to see "
                          "the failure itself.", RuntimeWarning, stacklevel=2)
            _auto_verdicts[signature] = False
    return _auto_verdicts[signature]


def assert_close_relative(name: str, actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    """Max abs difference within ``tolerance`` x (max |expected| + 1): a scale-free check for self tests."""
    actual, expected = actual.float(), expected.float()
    error = (actual - expected).abs().max().item() if actual.numel() else 0.0
    scale = expected.abs().max().item() + 1.0 if expected.numel() else 1.0
    if not error <= tolerance * scale:  # also catches NaN
        raise AssertionError(f"{name}: max difference {error:.3g} exceeds {tolerance:g} x {scale:.3g}")


def self_check_tolerance(dtype: torch.dtype) -> float:
    return 1e-3 if dtype == torch.float32 else 3e-2
