"""A trained checkpoint back in memory (for evaluation and export): its weights file, config and models.

A checkpoint is named by a run's ``output_dir`` (its ``checkpoints/latest``), a checkpoint folder, or
the ``model.safetensors`` itself; the ``config.yaml`` the trainer writes beside the weights says
what to build.
"""
from __future__ import annotations

from pathlib import Path

import torch

from blip2_ds.config import Config, ConfigError, load_config


def resolve_weights(path: str | Path) -> Path:
    """The ``model.safetensors`` of a run dir (via ``checkpoints/latest``), a checkpoint folder, or the file itself."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / "model.safetensors").is_file():
        return path / "model.safetensors"
    latest = path / "checkpoints" / "latest"
    if latest.is_file():
        weights = path / "checkpoints" / latest.read_text().strip() / "model.safetensors"
        if weights.is_file():
            return weights
        raise ConfigError(f"--checkpoint {path}: {latest} names {weights.parent.name}, which has no model.safetensors.")
    raise ConfigError(f"--checkpoint {path}: not a run folder (checkpoints/latest), a checkpoint folder "
                      "(model.safetensors) or a weights file.")


def load_checkpoint_config(weights: Path, config: str | Path | None = None,
                           overrides: list[str] | None = None) -> Config:
    """``config`` or else the ``config.yaml`` beside ``weights``, with ``key=value`` overrides."""
    path = Path(config) if config is not None else weights.parent / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"no config: {path} not found; pass --config.")
    return load_config(path, overrides)


def build_trained(cfg: Config, weights: Path, device: torch.device | str = "cpu", kernels: str | None = None):
    """(frozen vision tower, stage model with the checkpoint's weights, in eval mode) on ``device``."""
    from blip2_ds.models.vision import build_vision_tower
    from blip2_ds.state_io import read_state_dict

    kernels = cfg.kernels if kernels is None else kernels
    tower = build_vision_tower(cfg.vision).to(device)
    if cfg.stage == 1:
        from blip2_ds.models.stage1 import Stage1Model

        model = Stage1Model(cfg.model, cfg.objectives, kernels=kernels)
    else:
        from blip2_ds.models.language import build_language_model
        from blip2_ds.models.stage2 import Stage2Model

        model = Stage2Model(cfg.model, build_language_model(cfg.language), kernels=kernels)
    model.load_state_dict(read_state_dict(weights))
    return tower, model.to(device).eval()
