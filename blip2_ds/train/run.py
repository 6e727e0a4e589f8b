"""One training run, from a checked Config to the exit code (what ``launch/train.py`` calls)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from blip2_ds import distributed
from blip2_ds.config import Config, to_dict
from blip2_ds.train.build import RunPlan, build_model, build_tokenizer


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _trim_log(path: Path, step: int) -> None:
    """Drop log records past the resumed step (they were computed after the last checkpoint)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def train(cfg: Config, plan: RunPlan, resume: str | None = None) -> int:
    from blip2_ds.data.stream import ShardStream
    from blip2_ds.data.transforms import DeviceTransform
    from blip2_ds.models.vision import build_vision_tower
    from blip2_ds.train.checkpoint import AUTO, CheckpointError, CheckpointManager
    from blip2_ds.train.engine import apply_optim_config, build_engine, init_distributed
    from blip2_ds.train.loop import StepRunner, train_loop
    from blip2_ds.train.metrics import MetricsLogger, Throughput, measure_matmul_tflops

    init_distributed()
    rank = distributed.rank()
    device = distributed.local_device()
    output = Path(cfg.output_dir)
    checkpoints = CheckpointManager(output, cfg.keep_last)
    if resume == AUTO:
        resume = checkpoints.auto_resume()
    if resume:
        checkpoints.resolve(resume)  # a bad --resume fails here, before anything is built
    else:
        checkpoints.refuse_fresh_start()
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)
    _seed(cfg.seed)  # identical model init on every rank
    tower = build_vision_tower(cfg.vision).to(device)
    tower.compile_forward(cfg.vision.compile)
    tokenizer = build_tokenizer(cfg)
    model = build_model(cfg, tower, device)
    engine = build_engine(model, plan.ds_config, cfg.optim, total_steps=cfg.max_steps, precision=cfg.precision,
                          use_apex=cfg.apex)
    _seed(cfg.seed + 1000 * rank)  # dropout differs across ranks, like their data
    stream = ShardStream(cfg.data, tokenizer, cfg.pretrained.max_text_len, seed=cfg.seed,
                         llm_text=model.text_tokenizer() if cfg.stage == 2 else None)
    transform = DeviceTransform(cfg.data.image_size, dtype=tower.dtype)
    throughput = Throughput(flops_per_sample=flops_per_sample(cfg, tower), world_size=plan.world_size,
                            peak_tflops=measure_matmul_tflops(device), device=device)
    state = {"step": 0, "micro_step": 0, "samples": 0, "skipped": 0}
    if resume:
        own = checkpoints.load(engine, resume)
        state.update(own["loop"])
        if own["data"] is not None:
            try:
                stream.load_state_dict(own["data"])
            except ValueError as err:
                raise CheckpointError(f"{checkpoints.resolve(resume)}: {err}") from err
        changed = apply_optim_config(engine, cfg.optim)
        checkpoints.continue_from(resume, state["step"])
        if rank == 0:
            _trim_log(output / "train_log.jsonl", state["step"])
            print(f"resumed from step {state['step']} ({state['samples']} samples seen)", flush=True)
            for name, (saved, now) in changed.items():
                print(f"resumed with {name}={now} (the checkpoint's run had {saved}); the schedule continues from "
                      f"step {state['step']} with it", flush=True)
    elif rank == 0:
        (output / "train_log.jsonl").unlink(missing_ok=True)
    logger = MetricsLogger(output / "tensorboard", rank=rank, total_steps=cfg.max_steps,
                           config_dict=to_dict(cfg), start_step=state["step"])
    runner = StepRunner(cfg, engine, tower, transform, device)
    evaluator = None
    if cfg.eval_every:
        from blip2_ds.train.periodic_eval import PeriodicEval

        evaluator = PeriodicEval(cfg, tower, tokenizer, device)
    try:
        return train_loop(cfg, engine, runner, stream, checkpoints, plan.grad_accum, plan.global_batch,
                          logger, throughput, state, evaluator)
    finally:
        logger.close()


def flops_per_sample(cfg: Config, tower) -> float | None:
    """Model FLOPs of one training sample as executed (frozen forwards included); see train/metrics.py.

    Stage 1: captions are assumed to fill half of the padded text length. Stage 2: the LLM counted at
    ``language.max_text_len``, an upper bound of what runs (a batch is padded to its longest row only,
    and its length groups compute fewer positions still; ``perf/llm_pad_share`` shows what remains).
    None (no TFLOP/s, no MFU) for T5, which the analytic count does not model yet.
    """
    from blip2_ds.train.metrics import LLMDims, VisionDims, stage1_step_flops, stage2_step_flops

    vision = VisionDims.from_tower(tower)
    text_len = cfg.pretrained.max_text_len
    if cfg.stage == 1:
        return stage1_step_flops(cfg.model, vision, text_len, predicting_tokens=text_len // 2)["total"]
    if cfg.language.kind != "opt":
        return None
    from transformers import AutoConfig

    llm = LLMDims.from_hf_config(AutoConfig.from_pretrained(cfg.language.path, local_files_only=True))
    return stage2_step_flops(cfg.model, vision, llm, cfg.language.max_text_len)["total"]
