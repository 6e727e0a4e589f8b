"""Everything a run needs, built from a Config: checked first, then towers, model, data, engine.

:func:`check_run` validates what can be validated without starting anything (config, ds config,
batch decomposition, every path and shard pattern), so a bad run fails in a second with one
line, before any process group or model exists.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from blip2_ds import distributed
from blip2_ds.config import Config, ConfigError


@dataclass
class RunPlan:
    world_size: int
    micro_batch: int
    grad_accum: int
    ds_config: dict[str, Any]
    problems: list[str]
    """Missing files or data (an error for a real run; listed by ``--dry-run``)."""

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size


def launcher_world_size() -> int:
    """The world size the launcher announced (deepspeed, torchrun, srun, mpirun) or 1, before any process group.

    A partial or contradictory launcher environment is a ConfigError here, before anything is built.
    """
    from blip2_ds.launch_env import LaunchEnvError, detect

    try:
        return detect().world_size
    except LaunchEnvError as err:
        raise ConfigError(str(err)) from None


def accumulation_steps(cfg: Config, world_size: int) -> int:
    micro = cfg.data.batch_size
    if cfg.optim.global_batch is None:
        return 1
    per_step = micro * world_size
    if cfg.optim.global_batch % per_step:
        lower = max(per_step, cfg.optim.global_batch // per_step * per_step)
        divisors = [m for m in range(1, 4 * micro + 1)
                    if cfg.optim.global_batch % (m * world_size) == 0][-3:]
        raise ConfigError(
            f"optim.global_batch={cfg.optim.global_batch} is not data.batch_size={micro} x {world_size} ranks x "
            f"an accumulation count. Use optim.global_batch={lower} or {lower + per_step}"
            + (f", or data.batch_size in {divisors}" if divisors else "") + ".")
    return cfg.optim.global_batch // per_step


def _missing(path: str | None, field: str, what: str) -> list[str]:
    if path is not None and not Path(path).exists():
        return [f"{field}={path}: {what} not found (paths are local; nothing is downloaded)."]
    return []


def vision_width_problems(cfg: Config) -> list[str]:
    """The tower's architecture built on the meta device (no memory, no weights; ~0.3 s for ViT-g) against
    ``model.vision_width``, so that a mismatch is not found only after the real tower is built and loaded."""
    from blip2_ds.models.vision import build_vision_tower, check_matches_qformer

    if cfg.vision.model_config is not None and not Path(cfg.vision.model_config).exists():
        return []  # reported as missing
    try:
        with torch.device("meta"):
            tower = build_vision_tower(dataclasses.replace(cfg.vision, checkpoint=None))
        check_matches_qformer(tower, cfg.model.vision_width)
    except ConfigError as err:
        return [str(err)]
    return []


def _check_devices(cfg: Config) -> None:
    from blip2_ds.kernels import why_triton_cannot_run

    reason = why_triton_cannot_run(torch.cuda.is_available()) if cfg.kernels == "triton" else None
    if reason is not None:
        raise ConfigError(reason)
    if cfg.memory_snapshot and not torch.cuda.is_available():
        raise ConfigError("memory_snapshot=true records the CUDA allocator, and this machine has no CUDA GPU; "
                          "leave it off on a CPU.")


def check_run(cfg: Config, ds_path: str | Path, world_size: int | None = None, strict: bool = True) -> RunPlan:
    """Validate everything cheap to validate; returns the batch decomposition and the filled ds config.

    With ``strict`` (a real run) a missing file or shard pattern is an error; otherwise (``--dry-run``)
    it is listed in ``plan.problems``.
    """
    from blip2_ds.data.shards import resolve_shards
    from blip2_ds.train.engine import fill_ds_config

    cfg.validate()
    world_size = world_size or launcher_world_size()
    ds_path = Path(ds_path)
    if not ds_path.is_file():
        raise ConfigError(f"--ds {ds_path}: DeepSpeed config not found (see ds_configs/).")
    try:
        ds_config = json.loads(ds_path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"--ds {ds_path}: not valid JSON ({err}).") from None
    _check_devices(cfg)
    accum = accumulation_steps(cfg, world_size)
    try:
        filled = fill_ds_config(ds_config, micro_batch=cfg.data.batch_size, grad_accum=accum, world_size=world_size,
                                grad_clip=cfg.optim.grad_clip, precision=cfg.precision,
                                ds_source=str(ds_path), yaml_source="the YAML config")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    problems = [
        *_missing(cfg.vision.checkpoint, "vision.checkpoint", "vision tower weights"),
        *_missing(cfg.vision.model_config, "vision.model_config", "open_clip model config"),
        *vision_width_problems(cfg),
        *_missing(cfg.pretrained.bert_path, "pretrained.bert_path", "BERT checkpoint folder"),
        *_missing(cfg.pretrained.tokenizer_path, "pretrained.tokenizer_path", "tokenizer folder"),
    ]
    if cfg.pretrained.tokenizer_path is None and cfg.pretrained.bert_path is None:
        problems.append("pretrained.tokenizer_path (or pretrained.bert_path): the Q-Former's BERT tokenizer "
                        "folder is required.")
    if cfg.stage == 2:
        problems += _missing(cfg.pretrained.qformer_checkpoint, "pretrained.qformer_checkpoint", "stage-1 checkpoint")
        if cfg.language.path is None:
            problems.append("language.path: stage 2 needs the frozen LLM's local folder.")
        problems += _missing(cfg.language.path, "language.path", "LLM folder")
    if cfg.eval_every:
        from blip2_ds.data.shards import expand_urls

        try:
            expand_urls(cfg.eval_data)
        except ConfigError as err:
            problems.append(f"eval_data: {err}")
    try:
        resolve_shards(cfg.data)  # a pattern matching nothing fails here
    except ConfigError as err:
        problems.append(str(err))
    if strict and problems:
        raise ConfigError(problems[0] + (f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""))
    return RunPlan(world_size, cfg.data.batch_size, accum, filled, problems)


def build_tokenizer(cfg: Config):
    from blip2_ds.models.pretrained import load_tokenizer

    tokenizer = load_tokenizer(cfg.pretrained.tokenizer_path or cfg.pretrained.bert_path,
                               max_length=cfg.pretrained.max_text_len)
    if len(tokenizer) != cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} but the tokenizer "
                          f"({cfg.pretrained.tokenizer_path or cfg.pretrained.bert_path}) has {len(tokenizer)} tokens "
                          f"with [DEC]; set model.vocab_size={len(tokenizer)}.")
    return tokenizer


def build_model(cfg: Config, tower, device: torch.device):
    """The trainable module of the stage (what the engine wraps) and, for stage 2, the frozen LLM."""
    from blip2_ds.models.vision import check_matches_qformer

    check_matches_qformer(tower, cfg.model.vision_width)
    if cfg.stage == 1:
        from blip2_ds.models.pretrained import load_bert_into_qformer
        from blip2_ds.models.stage1 import Stage1Model

        model = Stage1Model(cfg.model, cfg.objectives, kernels=cfg.kernels)
        if cfg.pretrained.bert_path:
            report = load_bert_into_qformer(model.qformer, cfg.pretrained.bert_path)
            if distributed.rank() == 0:
                print(report.summary(), flush=True)
        return _with_training_options(cfg, model).to(device)
    from blip2_ds.models.language import build_language_model
    from blip2_ds.models.stage2 import Stage2Model

    from blip2_ds.models.stage2 import load_stage1_into_stage2
    from blip2_ds.state_io import read_state_dict

    llm = build_language_model(cfg.language)
    model = Stage2Model(cfg.model, llm, kernels=cfg.kernels)
    if cfg.pretrained.qformer_checkpoint:
        state = read_state_dict(cfg.pretrained.qformer_checkpoint)
        report = load_stage1_into_stage2(model, state, fmt=cfg.pretrained.qformer_checkpoint_format)
        print(report.summary(), flush=True)
    return _with_training_options(cfg, model).to(device)


def _with_training_options(cfg: Config, model: torch.nn.Module) -> torch.nn.Module:
    model.qformer.checkpoint_layers = cfg.activation_checkpointing
    if cfg.apex:
        from blip2_ds.kernels.apex import use_fused_layer_norms

        use_fused_layer_norms(model.qformer)
    return model
