"""``--dry-run``: what a run would be, without building it (meta device, no weights, no processes)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from blip2_ds.config import Config
from blip2_ds.info import count, frozen_vision_count
from blip2_ds.train.build import RunPlan

BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def _trainable_count(cfg: Config, llm_hidden: int | None) -> int:
    with torch.device("meta"):
        if cfg.stage == 1:
            from blip2_ds.models.stage1 import Stage1Model

            return count(Stage1Model(cfg.model, cfg.objectives))
        from blip2_ds.models.stage2 import Stage2Model

        return count(Stage2Model(cfg.model, llm=None, llm_hidden=llm_hidden))


def _vision_count(cfg: Config) -> tuple[str, int]:
    if cfg.vision.model_config is None:
        known = frozen_vision_count(cfg.model.vision_width)
        if known is not None and known[0] == cfg.vision.model_name:
            return known
    from blip2_ds.config import VisionConfig
    from blip2_ds.models.vision import build_vision_tower

    # A custom (small) tower: build it for real, without its checkpoint.
    tower = build_vision_tower(VisionConfig(cfg.vision.model_name, cfg.vision.model_config, None,
                                            cfg.vision.image_size, cfg.vision.dtype))
    return cfg.vision.model_name, count(tower)


def _llm(cfg: Config) -> tuple[int, int, int, int]:
    """(parameters, hidden size, layers, heads) of the LLM described by ``language.path``/config.json,
    on the meta device (T5: encoder + decoder layers)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    llm_cfg = AutoConfig.from_pretrained(cfg.language.path, local_files_only=True)
    factory = AutoModelForCausalLM if cfg.language.kind == "opt" else AutoModelForSeq2SeqLM
    with torch.device("meta"):
        model = factory.from_config(llm_cfg)
    layers = getattr(llm_cfg, "num_hidden_layers", None) or (llm_cfg.num_layers + llm_cfg.num_decoder_layers)
    heads = getattr(llm_cfg, "num_attention_heads", None) or llm_cfg.num_heads
    return count(model), model.get_input_embeddings().weight.shape[1], layers, heads


def transformer_activation_bytes(tokens: int, hidden: int, heads: int, layers: int, precision: str = "bf16") -> int:
    """Saved activations of one sequence through a transformer stack for its backward (Korthikanti
    et al.: ~34 h + 5 a s bytes per token and layer at 2-byte precision). An estimate."""
    return int(layers * tokens * (34 * hidden + 5 * heads * tokens) * BYTES[precision] / 2)


def activation_estimate(cfg: Config, llm_layers: int = 0, llm_hidden: int = 0, llm_heads: int = 0) -> int:
    """Rough bytes of saved activations per rank for one micro batch: the Q-Former passes and, in
    stage 2, the frozen LLM (its activations are kept: the gradient flows through it to the soft
    prompt) over queries + text when its shape is given."""
    m, t, q = cfg.model, cfg.pretrained.max_text_len, cfg.model.num_query_tokens
    passes = [q, t, 3 * (q + t), t] if cfg.stage == 1 else [q]
    per_sample = sum(transformer_activation_bytes(tokens, m.hidden_size, m.num_heads, m.num_layers, cfg.precision)
                     for tokens in passes)
    if cfg.stage == 2 and llm_layers:
        per_sample += transformer_activation_bytes(q + cfg.language.max_text_len, llm_hidden, llm_heads, llm_layers,
                                                   cfg.precision)
    return int(cfg.data.batch_size * per_sample)


def report(cfg: Config, plan: RunPlan) -> str:
    world = plan.world_size
    llm_ready = cfg.stage == 2 and cfg.language.path and Path(cfg.language.path, "config.json").is_file()
    llm_params, llm_hidden, llm_layers, llm_heads = _llm(cfg) if llm_ready else (
        0, 2560 if cfg.stage == 2 else None, 0, 0)
    trainable = _trainable_count(cfg, llm_hidden)
    vision_name, vision_params = _vision_count(cfg)
    w = BYTES[cfg.precision]
    # ZeRO-2: module weights replicated; fp32 master + Adam moments + reduced gradients partitioned.
    weights = trainable * w
    optimizer = trainable * (4 + 8) / world
    gradients = trainable * w / world + min(trainable, 2e8) * w  # partitions + a reduce bucket
    frozen = vision_params * BYTES[cfg.vision.dtype] + llm_params * BYTES[cfg.language.dtype]
    activations = activation_estimate(cfg, llm_layers, llm_hidden or 0, llm_heads)
    total = weights + optimizer + gradients + frozen + activations
    gib = 1024 ** 3
    lines = [
        f"stage {cfg.stage}: trainable {trainable:,} parameters; frozen: {vision_name} {vision_params:,}"
        + (f", LLM {llm_params:,}" if cfg.stage == 2 else ""),
        f"batch: {plan.micro_batch} per rank x {world} ranks x {plan.grad_accum} accumulation = "
        f"{plan.global_batch} samples per optimizer step; {cfg.max_steps:,} steps",
        "memory per GPU (estimate): "
        f"trainable weights {weights / gib:.2f} GiB + optimizer state {optimizer / gib:.2f} + gradients "
        f"{gradients / gib:.2f} + frozen towers {frozen / gib:.2f} + activations ~{activations / gib:.2f} "
        f"= ~{total / gib:.1f} GiB",
        f"deepspeed config: {json.dumps({k: plan.ds_config[k] for k in ('train_batch_size', 'train_micro_batch_size_per_gpu', 'gradient_accumulation_steps', 'gradient_clipping')})}",
    ]
    lines += [f"not ready for a real run: {problem}" for problem in plan.problems]
    return "\n".join(lines)
