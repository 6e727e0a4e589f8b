"""The DeepSpeed side of the trainer: optimizer groups, ds-config filling, engine construction.

Tested with deepspeed 0.19.8 / torch 2.14 on CPU (``tests/test_engine.py``): ZeRO-2 on 2 gloo
ranks matches one plain-PyTorch process (torch AdamW, same groups, clipping, schedule, clamp) on
the same global batch with gradient accumulation 2: 20-step losses within 1.4e-7 relative in fp32,
within the bf16 noise floor (~1e-2 .. 4e-2) in bf16; first-step gradients 4e-7 (fp32) / 2.5e-2
(bf16, vs fp32).

Training loop (one optimizer step = ``grad_accum`` calls)::

    engine = build_engine(model, fill_ds_config(json.load(f), ...), cfg.optim,
                          total_steps=cfg.max_steps, precision=cfg.precision)
    for step, micro_batch in ...:
        out = train_step(engine, image_embeds, text_ids, text_mask, sample_seed=micro_step_index)
        # == out = engine(...); engine.backward(out.loss); engine.step();
        #    constrain_parameters_(engine) at each gradient-accumulation boundary

Running DeepSpeed on CPU (tests, laptops): set ``DS_ACCELERATOR=cpu`` before deepspeed is first
imported (without it DeepSpeed still falls back to CPU when no GPU is visible, with a warning);
without ``oneccl_bindings_for_pytorch`` the CPU accelerator's backend is ``gloo`` (with it,
``ccl``: pass ``backend="gloo"`` to force gloo). Use one intra-op thread per rank
(``torch.set_num_threads(1)`` when ranks share few cores: oversubscription slowed steps ~10x). :func:`init_distributed` passes the accelerator's backend
(``nccl`` on CUDA, ``gloo`` on CPU). ZeRO-2 with ``torch.optim.AdamW`` as the client optimizer
needs no extra config flag (torch AdamW is on DeepSpeed's list of ZeRO-supported optimizers) and
builds no C++ op.

Two DeepSpeed 0.19.8 problems are handled here:

* ``DeepSpeedEngine._broadcast_model`` broadcasts ``p.data.view(torch.uint8)``, which raises
  ``self.dim() cannot be 0 to view Float as Byte`` for a 0-dim parameter (the ITC temperature
  ``temp``) as soon as the world size is > 1 (on GPU too). :func:`build_engine` patches that
  method for the duration of ``deepspeed.initialize`` so 0-dim parameters are broadcast through
  a 1-element view of the same storage.
* ZeRO keeps an fp32 master copy of every trainable parameter (also in fp32 mode); clamping the
  module's parameter after ``engine.step()`` (``model.clamp_parameters_()``) is undone by the
  next step, which copies the unclamped master back. :func:`constrain_parameters_` clamps the
  master copies too.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import gc
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from blip2_ds.config import OptimConfig
from blip2_ds.train import schedule

PRECISIONS = ("fp32", "bf16", "fp16")


# ---- parameter groups -------------------------------------------------------------------------
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower()


def decay_split(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names of the trainable parameters (decayed, not decayed).

    Not decayed: every parameter with ``ndim <= 1`` (biases, norm weights, the 0-dim temperature
    ``temp``), any parameter named ``*bias``, and every parameter of a normalisation module.
    Frozen parameters (``requires_grad`` False) appear in neither list. Tied parameters are
    listed once (under their first name).
    """
    norm_params = {id(p) for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith("bias") or id(param) in norm_params:
            no_decay.append(name)
        else:
            decay.append(name)
    return decay, no_decay


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups ``[{"params", "weight_decay"}]`` of the trainable parameters (see :func:`decay_split`).

    Empty groups are left out (DeepSpeed drops them itself, which would desynchronise a
    scheduler built before ``deepspeed.initialize``).
    """
    decay, no_decay = decay_split(model)
    params = dict(model.named_parameters())
    groups = [
        {"params": [params[n] for n in decay], "weight_decay": weight_decay},
        {"params": [params[n] for n in no_decay], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


# ---- batch arithmetic and the ds config -------------------------------------------------------
def decompose_batch(global_batch: int, world_size: int, max_micro_batch: int) -> tuple[int, int]:
    """Split a global batch into (micro batch per rank, gradient-accumulation steps).

    ``global_batch == micro * accum * world_size`` with the largest ``micro <= max_micro_batch``
    (the fewest accumulation steps). E.g. 1680 over 16 ranks with at most 64 per rank -> (35, 3).
    Raises ValueError, with nearby valid global batches, when ``global_batch`` is not a multiple
    of ``world_size``.
    """
    for name, value in (("global_batch", global_batch), ("world_size", world_size), ("max_micro_batch", max_micro_batch)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if global_batch % world_size:
        lower = (global_batch // world_size) * world_size
        upper = lower + world_size
        full = world_size * max_micro_batch
        options = sorted({b for b in (lower, upper) if b > 0})
        hint = ", ".join(f"{b} ({_describe_split(b, world_size, max_micro_batch)})" for b in options)
        full_lower = (global_batch // full) * full
        full_options = sorted({b for b in (full_lower, full_lower + full) if b > 0})
        raise ValueError(
            f"global batch {global_batch} cannot be split over {world_size} ranks "
            f"({global_batch} is not a multiple of {world_size}). Nearest valid global batches: {hint}. "
            f"With full micro batches of {max_micro_batch}: "
            + ", ".join(f"{b} ({_describe_split(b, world_size, max_micro_batch)})" for b in full_options) + "."
        )
    per_rank = global_batch // world_size
    accum = next(a for a in range(math.ceil(per_rank / max_micro_batch), per_rank + 1) if per_rank % a == 0)
    return per_rank // accum, accum


def _describe_split(global_batch: int, world_size: int, max_micro_batch: int) -> str:
    micro, accum = decompose_batch(global_batch, world_size, max_micro_batch)
    return f"micro {micro} x accum {accum} x {world_size} ranks"


def fill_ds_config(
    ds_config: dict,
    *,
    micro_batch: int,
    grad_accum: int,
    world_size: int,
    grad_clip: float,
    precision: str,
    ds_source: str = "ds_config",
    yaml_source: str = "config",
    yaml_fields: dict[str, str] | None = None,
) -> dict:
    """A copy of ``ds_config`` with the batch, clipping and precision keys taken from the YAML side.

    Filled keys: ``train_batch_size`` (= micro * accum * world), ``train_micro_batch_size_per_gpu``,
    ``gradient_accumulation_steps``, ``gradient_clipping`` (0 = off), ``bf16.enabled``,
    ``fp16.enabled``. A key that is ``"auto"`` or absent is filled; a key given explicitly must
    agree with the YAML value, otherwise ValueError naming both values and where they come from
    (``ds_source`` / ``yaml_source`` are the file names, ``yaml_fields`` the YAML field names).
    The YAML side owns the optimizer and scheduler, so ``optimizer`` / ``scheduler`` sections are
    rejected; any ``"auto"`` left elsewhere is an error (DeepSpeed itself does not resolve them).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
    for name, value in (("micro_batch", micro_batch), ("grad_accum", grad_accum), ("world_size", world_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    fields = {"micro_batch": "data.batch_size", "grad_accum": "the accumulation (optim.global_batch / (data.batch_size "
              "x ranks))", "world_size": "the world size", "grad_clip": "optim.grad_clip", "precision": "precision"}
    fields.update(yaml_fields or {})
    for section in ("optimizer", "scheduler"):
        if section in ds_config:
            raise ValueError(
                f"{ds_source}: remove the '{section}' section; the optimizer and learning-rate schedule come from "
                f"{yaml_source} (optim.*) and are passed to deepspeed.initialize as client objects.")

    zero = ds_config.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    if stage not in (0, 1, 2):
        raise ValueError(f"{ds_source}: zero_optimization.stage={stage!r}; this trainer supports ZeRO stages 0-2 (its "
                         f"trainable Q-Former fits every GPU; stage 3 would also shard it and its checkpoints): use 2.")
    if "bfloat16" in ds_config:
        raise ValueError(f"{ds_source}: rename the legacy 'bfloat16' section to 'bf16' (DeepSpeed reads 'bfloat16' only "
                         f"when 'bf16' is absent, and {yaml_source}'s precision fills 'bf16').")
    writer = ds_config.get("checkpoint", {}).get("writer") if isinstance(ds_config.get("checkpoint"), dict) else None
    if (isinstance(writer, dict) and writer.get("decoupled")) or ds_config.get("datastates_ckpt", False) is not False:
        raise ValueError(f"{ds_source}: remove {'checkpoint.writer.decoupled' if writer else 'datastates_ckpt'}: "
                         f"asynchronous checkpoint writers return before their files are written, and a checkpoint "
                         f"is marked COMPLETE (and older ones deleted) as soon as every rank returns.")
    out = copy.deepcopy(ds_config)
    batch_origin = (f"{fields['micro_batch']}={micro_batch} x {fields['grad_accum']}={grad_accum} x "
                    f"{fields['world_size']}={world_size}")
    wanted: list[tuple[tuple[str, ...], Any, str]] = [
        (("train_micro_batch_size_per_gpu",), micro_batch, f"{fields['micro_batch']}={micro_batch}"),
        (("gradient_accumulation_steps",), grad_accum, f"{fields['grad_accum']}={grad_accum}"),
        (("train_batch_size",), micro_batch * grad_accum * world_size, batch_origin),
        (("gradient_clipping",), float(grad_clip or 0.0), f"{fields['grad_clip']}={grad_clip}"),
        (("bf16", "enabled"), precision == "bf16", f"{fields['precision']}={precision!r}"),
        (("fp16", "enabled"), precision == "fp16", f"{fields['precision']}={precision!r}"),
    ]
    for path, value, origin in wanted:
        parent = out
        for key in path[:-1]:
            parent = parent.setdefault(key, {})
            if not isinstance(parent, dict):
                raise ValueError(f"{ds_source}: '{key}' must be an object, got {parent!r}.")
        key = path[-1]
        given = parent.get(key, "auto")
        if given == "auto":
            parent[key] = value
        elif not _same(given, value):
            dotted = ".".join(path)
            raise ValueError(
                f"{ds_source}: {dotted}={given!r} contradicts {origin} in {yaml_source} "
                f"(which gives {dotted}={value!r}); set {dotted} to \"auto\" in {ds_source} or make them agree.")
    leftovers = list(_auto_paths(out))
    if leftovers:
        raise ValueError(f"{ds_source}: these keys are \"auto\" but nothing fills them: {', '.join(leftovers)}.")
    return out


def _same(given: Any, value: Any) -> bool:
    if isinstance(value, bool):
        return isinstance(given, bool) and given == value
    if isinstance(given, bool) or not isinstance(given, (int, float)):
        return False
    return math.isclose(float(given), float(value), rel_tol=1e-12, abs_tol=0.0)


def _auto_paths(node: Any, prefix: str = "") -> Iterable[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _auto_paths(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _auto_paths(value, f"{prefix}[{i}]")
    elif node == "auto":
        yield prefix


# ---- distributed setup and the engine ---------------------------------------------------------
def init_distributed(backend: str | None = None, init_method: str | None = None, rank: int = -1,
                     world_size: int = -1) -> None:
    """``deepspeed.init_distributed`` with the accelerator's backend (``nccl`` on CUDA, ``gloo`` on CPU).

    - Under a launcher (deepspeed, torchrun, an srun step, mpirun) or as a single process: call with
      no arguments; :func:`blip2_ds.launch_env.detect` reads the launcher's variables (a partial or
      contradictory set raises LaunchEnvError) and exports RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/
      MASTER_PORT, which torch's env:// rendezvous and DeepSpeed's engine read.
    - Explicit ranks (tests, ``torch.multiprocessing.spawn``): pass ``init_method`` (e.g.
      ``file:///tmp/x``), ``rank`` and ``world_size``; RANK/WORLD_SIZE/LOCAL_RANK are set in the
      environment if absent, since DeepSpeed's engine reads ``LOCAL_RANK`` from there.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from blip2_ds import launch_env

    if torch.distributed.is_initialized():
        return
    if backend is None:
        backend = get_accelerator().communication_backend_name()
    if rank >= 0:
        if world_size < 1:
            raise ValueError("init_distributed: give world_size together with rank.")
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world_size))
        os.environ.setdefault("LOCAL_RANK", str(rank))
    else:
        launch_env.detect().export()
    deepspeed.init_distributed(dist_backend=backend, init_method=init_method, rank=rank, world_size=world_size,
                               auto_mpi_discovery=False, verbose=False)
    atexit.unregister(_shut_down_process_groups)  # once, however often a process initialises
    atexit.register(_shut_down_process_groups)
    _release_shared_memory_buffer()


EXIT_GRACE_SECONDS = 0.1
"""How long the main thread lets go of the GIL at exit, so gloo's worker threads finish releasing work."""


def _shut_down_process_groups() -> None:
    """Destroy the process groups while the interpreter is still whole (at exit; see init_distributed).

    A gloo worker thread releases each finished collective a moment after the caller has its
    result; if the tensors' Python objects died first, that release takes the GIL. Python 3.11
    ends any thread that asks for the GIL once interpreter finalization has begun, and ending
    it inside gloo's C++ loop aborts the process ("terminate called without an active
    exception", SIGABRT) AFTER a successful run: exit code -6 instead of 0, or instead of 75,
    which is what the SLURM scripts requeue on (torch issue 190489; measured here: 5 of 8
    4-rank runs that exit straight after an all_reduce). Destroying the groups joins the
    worker threads of every group no one else holds; DeepSpeed keeps its own references to
    some groups (``deepspeed.utils.groups``, the engine), whose threads stay, so the main
    thread also sleeps a moment without the GIL, letting a release in progress finish (also when the
    program destroyed the groups itself).

    Not after an uncaught exception: NCCL's destroy waits for this rank's collectives to
    finish, and with a peer gone or blocked that wait would keep a failed rank from exiting
    (torchtitan destroys only after success for the same reason); the launcher ends the rest.
    """
    if torch.distributed.is_initialized() and not _ending_on_an_uncaught_exception():
        torch.distributed.destroy_process_group()
    gc.collect()  # engines no one holds any more, and with them their references to the groups
    time.sleep(EXIT_GRACE_SECONDS)


def _ending_on_an_uncaught_exception() -> bool:
    """At exit: whether Python reported an uncaught exception (it sets ``sys.last_value`` first;
    ``sys.exit(code)`` does not)."""
    return getattr(sys, "last_exc", None) is not None or getattr(sys, "last_value", None) is not None


SHM_BUFFER = Path("/dev/shm")
"""Where DeepSpeed's CPU all-reduce puts each rank's ``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``."""


def _release_shared_memory_buffer() -> None:
    """Unlink this rank's DeepSpeed CPU shared-memory buffer as soon as every rank has mapped it.

    With ranks on one machine, DeepSpeed's CPU backend creates one ~67 MB file per rank in /dev/shm
    for its shared-memory all-reduce and never removes it (only a reboot does; a known DeepSpeed
    issue): every CPU run would leave RAM behind. Each rank maps every other rank's file during
    ``init_distributed``; after a barrier no one opens them by name again, so the names can go while
    the mappings live on until the processes exit (also after a kill -9).
    """
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() < 2:
        return
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{torch.distributed.get_rank()}")
    torch.distributed.barrier()  # on every rank, whatever each one finds: a collective must never depend on it
    (SHM_BUFFER / name).unlink(missing_ok=True)


@contextlib.contextmanager
def _scalar_safe_broadcast():
    """Let ``DeepSpeedEngine._broadcast_model`` handle 0-dim parameters (deepspeed 0.19.8 bug).

    It broadcasts ``p.data.view(torch.uint8)``, impossible for a 0-dim tensor. During the call
    every 0-dim parameter's ``.data`` becomes a 1-element view of its own storage (so the
    broadcast writes into the parameter), and is set back to the 0-dim view afterwards. This runs
    before the ZeRO optimizer registers its gradient hooks, so autograd never sees the 1-D shape.
    """
    from deepspeed.runtime.engine import DeepSpeedEngine

    original = DeepSpeedEngine._broadcast_model

    def broadcast_model(self):
        scalars = [p for p in self.module.parameters() if p.dim() == 0]
        for p in scalars:
            p.data = p.data.reshape(1)
        try:
            return original(self)
        finally:
            for p in scalars:
                p.data = p.data.reshape(())

    DeepSpeedEngine._broadcast_model = broadcast_model
    try:
        yield
    finally:
        DeepSpeedEngine._broadcast_model = original


def build_engine(model: nn.Module, ds_config: dict, optim: OptimConfig | None = None, *,
                 total_steps: int = 250_000, precision: str = "bf16", use_apex: bool = False):
    """Wrap ``model`` in a DeepSpeed engine with AdamW on its trainable parameters and the lr schedule.

    ``ds_config`` must be filled (:func:`fill_ds_config`); its ``gradient_clipping`` must equal
    ``optim.grad_clip`` and its bf16/fp16 flags ``precision``. The cosine ends at ``total_steps``. Only parameters with
    ``requires_grad`` enter the optimizer: keep the frozen vision tower outside ``model`` (with
    bf16, DeepSpeed casts the whole wrapped module) or at least frozen before this call.
    The process group is initialised with :func:`init_distributed` if it is not already.

    Returns the engine; ``engine.optimizer`` is the ZeRO optimizer, ``engine.lr_scheduler`` the
    ``LambdaLR`` of :mod:`blip2_ds.train.schedule` (stepped by ``engine.step()``).
    ``use_apex``: NVIDIA apex's FusedAdam (AdamW mode) on GPU when apex is installed (a warning otherwise).
    """
    import deepspeed

    optim = optim or OptimConfig()
    optim.validate()
    schedule.validate(optim.lr, optim.warmup_steps, total_steps, optim.min_lr, optim.warmup_start_lr)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
    leftovers = list(_auto_paths(ds_config))
    if leftovers:
        raise ValueError(f"ds config still has \"auto\" keys ({', '.join(leftovers)}); fill it with fill_ds_config.")
    clip = float(ds_config.get("gradient_clipping", 0.0))
    if not math.isclose(clip, optim.grad_clip):
        raise ValueError(f"ds config gradient_clipping={clip} but optim.grad_clip={optim.grad_clip}.")
    flags = {p: bool(ds_config.get(p, {}).get("enabled", False)) for p in ("bf16", "fp16")}
    expected = {p: precision == p for p in ("bf16", "fp16")}
    if flags != expected:
        raise ValueError(f"ds config precision flags {flags} do not match precision={precision!r}.")

    init_distributed()
    groups = param_groups(model, optim.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters.")
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload == "cpu":  # ZeRO-Offload steps the optimizer on the host: DeepSpeed's vectorised CPU AdamW
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, adamw_mode=True)
    else:
        # torch's fused AdamW: one pass over each tensor on GPU and on CPU. ZeRO hands the optimizer one
        # flat fp32 partition per group, far larger than any cache: the unfused loop streams it through
        # memory ~6 times per step (5x slower on CPU: 177 ms vs 29 ms for 50M elements).
        on_gpu = next(p for g in groups for p in g["params"]).is_cuda
        optimizer = None
        if use_apex and on_gpu:
            from blip2_ds.kernels.apex import fused_adamw

            optimizer = fused_adamw(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
        if optimizer is None:
            optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, fused=True)
    scheduler = schedule.build_scheduler(optimizer, optim.lr, optim.warmup_steps, total_steps,
                                         optim.min_lr, optim.warmup_start_lr)
    # DeepSpeed makes cuda:LOCAL_RANK current unless told the device: a task that sees only its own GPU (srun
    # --gpus-per-task=1 / --gpu-bind) has it as cuda:0 whatever its LOCAL_RANK (distributed.local_device).
    device = next(p for g in groups for p in g["params"]).device
    args = argparse.Namespace(device_rank=device.index) if device.type == "cuda" else None
    with _scalar_safe_broadcast():
        engine, _, _, _ = deepspeed.initialize(args=args, model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=ds_config)
    return engine


# ---- the step -----------------------------------------------------------------------------------
def _default_constrained(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad and p.dim() == 0]


def _whole_local_masters(params: Sequence[nn.Parameter]) -> list[tuple[nn.Parameter, torch.Tensor]] | None:
    """(parameter, its fp32 master shaped like it) for each parameter whose master ZeRO-1/2 keeps
    whole on this rank; None when a master is split across ranks or held by ZeRO-3 (then only a
    gather can show it whole). Parameters without a master (no ZeRO) or owned by another rank are left out."""
    local = []
    for p in params:
        if hasattr(p, "ds_id"):
            return None
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:
            continue
        fragment = mapping.get_hp_fragment()
        if fragment.numel() != p.numel():
            return None
        local.append((p, fragment.view(p.shape)))
    return local


def apply_optim_config(engine, optim: OptimConfig) -> dict[str, tuple[Any, Any]]:
    """After a checkpoint load: the config's optimizer settings, not the checkpoint's, drive the rest of the run.

    DeepSpeed's load restores each group's ``lr``, ``weight_decay``, ``betas`` and ``eps`` and the
    scheduler's base lrs as they were saved, so a resume with a lower ``optim.lr`` (what one does after a
    divergence) would silently keep the old one. This puts the config's values back (the Adam moments,
    the step counts and the schedule's position stay the checkpoint's) and sets the next step's lr to
    the config's schedule at that position. Returns ``{setting: (checkpoint's, config's)}`` for what changed.
    """
    groups = engine.optimizer.param_groups  # ZeRO's wrapper exposes its client optimizer's groups
    scheduler = engine.lr_scheduler
    expected = param_groups(engine.module, optim.weight_decay)  # same order and filtering as at build time
    if len(groups) != len(expected):
        raise ValueError(f"the optimizer has {len(groups)} parameter groups; the model gives {len(expected)}.")
    changed: dict[str, tuple[Any, Any]] = {}
    if not math.isclose(scheduler.base_lrs[0], optim.lr, rel_tol=1e-12):
        changed["optim.lr"] = (scheduler.base_lrs[0], optim.lr)
    multiplier = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for group, want in zip(groups, expected):
        settings = {"weight_decay": want["weight_decay"], "betas": tuple(optim.betas), "eps": optim.eps}
        for key, value in settings.items():
            saved = tuple(group[key]) if key == "betas" else group.get(key)
            if key in group and saved != value:
                changed.setdefault(f"optim.{key}", (saved, value))  # the decayed group's, for weight_decay
                group[key] = value
        group["lr"] = optim.lr * multiplier
    scheduler.base_lrs = [optim.lr] * len(groups)
    scheduler._last_lr = [group["lr"] for group in groups]
    return changed


@torch.no_grad()
def constrain_parameters_(engine, params: Sequence[nn.Parameter] | None = None) -> None:
    """Apply ``engine.module.clamp_parameters_()`` to the module AND to ZeRO's fp32 master copies.

    ``params``: the parameters ``clamp_parameters_`` may change (default: the trainable 0-dim
    ones, i.e. ``temp`` for :class:`Stage1Model`). Call it on every rank. When each of them lies
    whole in one rank's partition (always so for 0-dim ones under ZeRO-1/2), the owner clamps its
    master in place and every rank clamps its working copy: no collective, so it costs nothing per
    step. Otherwise the full fp32 masters are gathered (a small all-reduce), the clamp runs on
    them, and the result is written back to the master partitions and the working copies.
    """
    module = engine.module
    clamp = getattr(module, "clamp_parameters_", None)
    if clamp is None:
        return
    params = _default_constrained(module) if params is None else list(params)
    local = _whole_local_masters(params)
    if local is None:
        _constrain_through_gather(params, clamp)
    else:
        for (_, master), value in zip(local, _with_data(local, clamp)):
            if value is not master:
                master.copy_(value)
    clamp()  # the module's working copies (and parameters DeepSpeed does not manage)


def _with_data(pairs: Sequence[tuple[nn.Parameter, torch.Tensor]], fn) -> list[torch.Tensor]:
    """Run ``fn()`` with each parameter's ``.data`` replaced by the paired tensor; returns what the
    parameters held at the end (``fn`` may rebind as well as modify in place)."""
    working = [p.data for p, _ in pairs]
    try:
        for p, data in pairs:
            p.data = data
        fn()
        return [p.data for p, _ in pairs]
    finally:
        for (p, _), data in zip(pairs, working):
            p.data = data


def _constrain_through_gather(params: Sequence[nn.Parameter], clamp) -> None:
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    masters = [safe_get_full_fp32_param(p) for p in params]
    linked = [(p, m.to(p.device)) for p, m in zip(params, masters) if m is not None]
    for (p, _), value in zip(linked, _with_data(linked, clamp)):
        safe_set_full_fp32_param(p, value)


def train_step(engine, *inputs, **kwargs):
    """One micro step: forward, backward, ``engine.step()``; constraints at the accumulation boundary.

    ``engine.step()`` only updates the weights (and steps the lr schedule) when this micro
    step closes a gradient-accumulation cycle. Returns the model's output (``.loss`` is this
    rank's loss of this micro batch, unscaled).
    """
    out = engine(*inputs, **kwargs)
    boundary = engine.is_gradient_accumulation_boundary()
    engine.backward(out.loss)
    engine.step()
    if boundary:
        constrain_parameters_(engine)
    return out


def optimizer_partition_numel(engine) -> list[int]:
    """Elements of this rank's fp32 partition, per optimizer group (ZeRO-1/2)."""
    return [int(t.numel()) for t in engine.optimizer.single_partition_of_fp32_groups]
