"""Spawned DeepSpeed ranks and the plain-PyTorch reference for ``tests/test_engine.py``.

Both sides train the same tiny Stage1Model (dropout 0; the Q-Former runs three times per
micro step: ITC, ITM, ITG) plus a frozen ``nn.Linear`` "tower" inside the wrapped module, on
the same global batch per step: ``WORLD`` ranks x ``MICRO`` samples x ``ACCUM`` micro steps.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from conftest import random_text, tiny_qformer_config
from torch import nn

from blip2_ds.config import OptimConfig
from blip2_ds.models.stage1 import Stage1Model
from blip2_ds.train import engine as ds_engine
from blip2_ds.train import schedule

ROOT = Path(__file__).resolve().parents[1]
WORLD, MICRO, ACCUM, STEPS = 2, 2, 2, 20
GLOBAL = WORLD * MICRO * ACCUM
TEXT_LEN, IMAGE_TOKENS = 10, 6
PRECISIONS = ("fp32", "bf16")


def optim_config() -> OptimConfig:
    return OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=5, warmup_start_lr=1e-5, weight_decay=0.05, grad_clip=20.0)


class TowerAndStage1(nn.Module):
    """A frozen linear "vision tower" in front of Stage1Model, both inside the engine."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        cfg = tiny_qformer_config()
        self.tower = nn.Linear(cfg.vision_width, cfg.vision_width).requires_grad_(False)
        self.stage1 = Stage1Model(cfg)

    def forward(self, image, text_ids, text_mask, sample_seed=None):
        with torch.no_grad():
            feats = self.tower(image.to(self.tower.weight.dtype))
        return self.stage1(feats, text_ids, text_mask, sample_seed=sample_seed)

    def clamp_parameters_(self):
        self.stage1.clamp_parameters_()


def global_batch(step: int):
    """The step's global batch, the same in every process."""
    cfg = tiny_qformer_config()
    generator = torch.Generator().manual_seed(1000 + step)
    image = torch.randn(GLOBAL, IMAGE_TOKENS, cfg.vision_width, generator=generator)
    ids, mask = random_text(GLOBAL, TEXT_LEN, cfg.vocab_size, generator)
    return image, ids, mask


def rows(rank: int, micro: int) -> torch.Tensor:
    """Rows of the global batch that ``rank`` uses at micro step ``micro``."""
    start = rank * MICRO * ACCUM + micro * MICRO
    return torch.arange(start, start + MICRO)


def micro_inputs(step: int, micro: int, ranks):
    image, ids, mask = global_batch(step)
    index = torch.cat([rows(r, micro) for r in ranks])
    return image[index], ids[index], mask[index]


def ds_config(precision: str) -> dict:
    raw = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    optim = optim_config()
    return ds_engine.fill_ds_config(raw, micro_batch=MICRO, grad_accum=ACCUM, world_size=WORLD,
                                    grad_clip=optim.grad_clip, precision=precision)


# ---- DeepSpeed ranks --------------------------------------------------------------------------
def _train_deepspeed(rank: int, precision: str) -> dict:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad, safe_set_full_fp32_param

    model = TowerAndStage1()
    tower_before = {n: t.clone() for n, t in model.tower.state_dict().items()}
    engine = ds_engine.build_engine(model, ds_config(precision), optim_config(), total_steps=STEPS, precision=precision)
    losses, lrs = [], []
    for step in range(STEPS):
        lrs.append(engine.get_lr()[0])
        local = []
        for micro in range(ACCUM):
            inputs = micro_inputs(step, micro, [rank])
            if step == 0 and micro == ACCUM - 1:  # train_step, opened up to read the first averaged gradient
                out = engine(*inputs, sample_seed=step * ACCUM + micro)
                engine.backward(out.loss)
                first_grads = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()
                               if p.requires_grad}
                engine.step()
                ds_engine.constrain_parameters_(engine)
            else:
                out = ds_engine.train_step(engine, *inputs, sample_seed=step * ACCUM + micro)
            local.append(out.loss.detach().double())
        loss = torch.stack(local).mean()
        dist.all_reduce(loss)
        losses.append(float(loss) / WORLD)

    zero = engine.optimizer
    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    frozen = [p for p in engine.module.parameters() if not p.requires_grad]
    in_groups = {id(p) for group in zero.bit16_groups for p in group}
    state_numel = sum(int(s["exp_avg"].numel()) for s in zero.optimizer.state.values())
    info = {
        "partition_numel": ds_engine.optimizer_partition_numel(engine),
        "state_numel": state_numel,
        "trainable_numel": sum(p.numel() for p in trainable),
        "trainable_in_groups": all(id(p) in in_groups for p in trainable),
        "frozen_in_groups": any(id(p) in in_groups for p in frozen),
        "frozen_hp_linked": any(getattr(p, "_hp_mapping", None) is not None for p in frozen),
        "frozen_in_client_groups": any(id(p) == id(q) for g in zero.optimizer.param_groups for q in g["params"]
                                       for p in frozen),
        "tower_unchanged": all(torch.equal(model.tower.state_dict()[n], t.to(model.tower.state_dict()[n].dtype))
                               for n, t in tower_before.items()),
        "tower_dtype": str(model.tower.weight.dtype),
        "module_dtype": str(next(engine.module.stage1.parameters()).dtype),
    }
    # Final fp32 master weights (collective: every rank, same order).
    masters = {n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters() if p.requires_grad}

    # The temperature clamp reaches ZeRO's fp32 master copy, not only the module's working copy.
    # As an optimizer step leaves them: master and working copy both out of range.
    temp = engine.module.stage1.temp
    safe_set_full_fp32_param(temp, torch.tensor(10.0))
    temp.data.fill_(10.0)
    collectives = []
    all_reduce = torch.distributed.all_reduce
    torch.distributed.all_reduce = lambda *a, **k: collectives.append(a) or all_reduce(*a, **k)
    try:
        ds_engine.constrain_parameters_(engine)
    finally:
        torch.distributed.all_reduce = all_reduce
    info["constrain_collectives"] = len(collectives)
    info["temp_master_after_clamp"] = float(safe_get_full_fp32_param(temp))
    info["temp_module_after_clamp"] = float(temp.detach())
    info["temp_max"] = engine.module.stage1.objectives.temperature_max
    return {"losses": losses, "lrs": lrs, "info": info, "masters": masters, "first_grads": first_grads}


def worker(rank: int, init_file: str, out_file: str) -> None:
    # CPU + gloo even on a GPU machine (2 ranks would otherwise want 2 GPUs); set before DeepSpeed
    # resolves its accelerator, which happens at the first deepspeed import in this fresh process.
    os.environ["DS_ACCELERATOR"] = "cpu"
    torch.set_num_threads(1)  # 2 ranks on few cores: oversubscribed threads make a step ~10x slower
    ds_engine.init_distributed(backend="gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {precision: _train_deepspeed(rank, precision) for precision in PRECISIONS}
        infos = [None] * WORLD
        dist.all_gather_object(infos, {p: r.pop("info") for p, r in results.items()})
        if rank == 0:
            for precision in PRECISIONS:
                results[precision]["info"] = [info[precision] for info in infos]
            torch.save(results, out_file)
    finally:
        dist.destroy_process_group()


def save_worker(rank: int, init_file: str, run_dir: str) -> None:
    """One step, then a checkpoint, recording in order the path of every ``os.fsync`` this rank makes."""
    from blip2_ds.train.checkpoint import CheckpointManager

    os.environ["DS_ACCELERATOR"] = "cpu"
    torch.set_num_threads(1)
    ds_engine.init_distributed(backend="gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        engine = ds_engine.build_engine(TowerAndStage1(), ds_config("fp32"), optim_config(), total_steps=STEPS,
                                        precision="fp32")
        for micro in range(ACCUM):
            ds_engine.train_step(engine, *micro_inputs(0, micro, [rank]), sample_seed=micro)
        synced, fsync = [], os.fsync
        os.fsync = lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or fsync(fd)
        try:
            CheckpointManager(run_dir).save(engine, 1, {"step": 1}, None, {"stage": 1})
        finally:
            os.fsync = fsync
        Path(run_dir, f"fsynced_by_rank_{rank}.json").write_text(json.dumps(synced))
    finally:
        dist.destroy_process_group()


# ---- the plain-PyTorch reference (one process, whole global batch) -----------------------------
def train_reference(precision: str) -> dict:
    """AdamW with the same groups, schedule, clipping and clamp; bf16 = bf16 model + fp32 master."""
    optim = optim_config()
    master = TowerAndStage1()
    working = copy.deepcopy(master).to(torch.bfloat16) if precision == "bf16" else master
    groups = ds_engine.param_groups(master, optim.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps)
    scheduler = schedule.build_scheduler(optimizer, optim.lr, optim.warmup_steps, STEPS,
                                         optim.min_lr, optim.warmup_start_lr)
    trainable = [(m, w) for m, w in zip(master.parameters(), working.parameters()) if m.requires_grad]
    losses, lrs, grad_norms = [], [], []
    for step in range(STEPS):
        lrs.append(optimizer.param_groups[0]["lr"])
        working.zero_grad(set_to_none=True)
        local = []
        for micro in range(ACCUM):
            out = working(*micro_inputs(step, micro, range(WORLD)), sample_seed=step * ACCUM + micro)
            (out.loss / ACCUM).backward()
            local.append(out.loss.detach().double())
        losses.append(float(torch.stack(local).mean()))
        if working is not master:
            for m, w in trainable:
                m.grad = w.grad.float()
        if step == 0:
            first_grads = {n: m.grad.clone() for n, m in master.named_parameters() if m.requires_grad}
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_([m for m, _ in trainable], optim.grad_clip)))
        optimizer.step()
        scheduler.step()
        master.clamp_parameters_()
        if working is not master:
            with torch.no_grad():
                for m, w in trainable:
                    w.copy_(m)
    masters = {n: p.detach().clone() for n, p in master.named_parameters() if p.requires_grad}
    return {"losses": losses, "lrs": lrs, "grad_norms": grad_norms, "masters": masters, "first_grads": first_grads}
