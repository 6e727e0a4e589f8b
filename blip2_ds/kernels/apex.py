"""NVIDIA apex as an optional accelerator: FusedLayerNorm for the Q-Former, FusedAdam for the optimizer.

apex is never required (PyPI's ``apex`` is an unrelated package; NVIDIA's is built from source).
With ``apex: true`` in the config and apex importable, the trainer swaps them in; otherwise it
warns once and keeps torch's LayerNorm and torch's fused AdamW (which is already one kernel on CUDA).
"""
from __future__ import annotations

import importlib
import warnings
from typing import Callable

import torch
from torch import nn


def _import(module: str, name: str):
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def fused_layer_norm_class():
    """apex's ``FusedLayerNorm`` or None when apex (with its CUDA extension) is not installed."""
    return _import("apex.normalization", "FusedLayerNorm")


def fused_adam_class():
    """apex's ``FusedAdam`` or None."""
    return _import("apex.optimizers", "FusedAdam")


def warn_missing(what: str) -> None:
    warnings.warn(f"apex: true, but NVIDIA apex ({what}) is not importable; using torch's own. Build apex from "
                  "https://github.com/NVIDIA/apex with its CUDA extensions, or set apex: false.", RuntimeWarning,
                  stacklevel=3)


def replace_layer_norms(module: nn.Module, layer_norm_class: Callable[..., nn.Module]) -> int:
    """Swap every ``nn.LayerNorm`` under ``module`` for ``layer_norm_class`` holding the SAME parameters.

    State-dict keys, parameter objects (and so optimizer groups and checkpoints) are unchanged.
    Returns how many were replaced.
    """
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.LayerNorm:
                fused = layer_norm_class(child.normalized_shape, eps=child.eps,
                                         elementwise_affine=child.elementwise_affine)
                if child.elementwise_affine:
                    fused.weight, fused.bias = child.weight, child.bias
                setattr(parent, name, fused)
                replaced += 1
    return replaced


def use_fused_layer_norms(module: nn.Module) -> int:
    """apex FusedLayerNorm for every LayerNorm of ``module`` if apex is installed (warns and returns 0 if not)."""
    fused = fused_layer_norm_class()
    if fused is None:
        warn_missing("apex.normalization.FusedLayerNorm")
        return 0
    return replace_layer_norms(module, fused)


def fused_adamw(groups: list[dict], lr: float, betas: tuple[float, float], eps: float) -> torch.optim.Optimizer | None:
    """apex FusedAdam in AdamW mode over ``groups`` (each group carries its weight decay), or None if not installed."""
    fused_adam = fused_adam_class()
    if fused_adam is None:
        warn_missing("apex.optimizers.FusedAdam")
        return None
    return fused_adam(groups, lr=lr, betas=betas, eps=eps, adam_w_mode=True)
