"""The training loop: accumulation, the non-finite guard, signals, checkpoints, metrics.

One optimizer step = ``grad_accum`` micro batches per rank. Each micro batch: the next batch of
the stream -> device transform -> frozen vision tower (no autograd) -> the stage model inside the
DeepSpeed engine -> backward. The hard-negative draw (stage 1) and T5's prefix split (stage 2) are
seeded by the global micro-step index, so a resumed run draws what the uninterrupted one drew.

Non-finite loss: all ranks agree (one all-reduce) and skip that micro batch (no backward, no
step); ``max_nonfinite_steps`` in a row stop the run with an error, leaving the last good
checkpoint as it is. SIGTERM / SIGUSR1: the current step finishes, every rank saves, and the
process exits with :data:`REQUEUE_EXIT_CODE` so a wrapper (SLURM script) can requeue it.
The objects alive after setup are frozen out of garbage collection for the loop, and the time spent in
collections is logged per step (``gc_time``; see train/garbage.py). ``profile_steps`` records chosen
steps with torch's profiler (train/profiling.py). Running out of GPU memory ends the run with an error
that says what to change, and with ``memory_snapshot`` a snapshot per rank (train/memory.py).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from blip2_ds import distributed
from blip2_ds.config import Config, to_dict
from blip2_ds.train import signals

REQUEUE_EXIT_CODE = 75
"""Exit status after a signal-triggered checkpoint (EX_TEMPFAIL): requeue and ``--resume latest``."""


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss stayed non-finite); the message says what to do."""


class StopRequest:
    """SIGTERM / SIGUSR1 (see train/signals.py), acted on at a step boundary by every rank together."""

    def __init__(self) -> None:
        signals.install()

    @property
    def signal_name(self) -> str | None:
        return signals.received()

    def agreed(self) -> bool:
        """True on every rank as soon as any rank was signalled."""
        flag = torch.tensor([1.0 if self.signal_name else 0.0])
        if distributed.is_distributed():
            flag = flag.to(_comm_device())
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


def _comm_device() -> torch.device:
    backend = torch.distributed.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def _reduced_over_ranks(values: torch.Tensor, op=torch.distributed.ReduceOp.SUM) -> torch.Tensor:
    """``values`` all-reduced with ``op`` (as float, on the CPU); unchanged in a single process."""
    values = values.detach().float().to(_comm_device() if distributed.is_distributed() else values.device)
    if distributed.is_distributed():
        torch.distributed.all_reduce(values, op=op)
    return values.cpu()


def _mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    return _reduced_over_ranks(values) / distributed.world_size()


WORST_RANK_SHARES = ("data_wait_share", "gc_share")
"""Logged also as their maximum over ranks (``*_worst_rank``): in synchronous data parallelism every rank's step
takes as long as the slowest one's, so a straggler shows in where its time goes (waiting for data, collecting
garbage), not in its step time; rank 0's own share can hide it."""


def _worst_over_ranks(window: dict[str, Any]) -> dict[str, float]:
    values = _reduced_over_ranks(torch.tensor([float(window[name]) for name in WORST_RANK_SHARES]),
                                 torch.distributed.ReduceOp.MAX)
    return {f"{name}_worst_rank": value for name, value in zip(WORST_RANK_SHARES, values.tolist())}


def endless(stream) -> Iterator[dict[str, Any]]:
    """Batches across epochs (the stream advances its own epoch counter)."""
    while True:
        yield from stream


class StepRunner:
    """Runs one micro batch of a stage through the frozen tower and the engine."""

    METRICS = {1: ("loss", "loss_itc", "loss_itm", "loss_itg", "itm_accuracy", "temperature"),
               2: ("loss", "llm_pad_share")}

    def __init__(self, cfg: Config, engine, tower, transform, device: torch.device):
        self.cfg, self.engine, self.tower, self.transform, self.device = cfg, engine, tower, transform, device

    def __call__(self, batch: dict[str, Any], micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        from blip2_ds.data.stream import batch_to_device

        pixels, ids, mask = batch_to_device(batch, self.transform, self.device)
        with torch.no_grad():
            image_embeds = self.tower(pixels)
        if self.cfg.stage == 1:
            out = self.engine(image_embeds, ids, mask, sample_seed=micro_step)
            metrics = torch.stack([getattr(out, name).detach().float() for name in self.METRICS[1]])
            return out.loss, metrics
        text = batch["llm_text"]
        pad_share = self.engine.module.llm_pad_share(text)  # on the host copy: no device sync
        loss = self.engine(image_embeds, text.to(self.device), sample_seed=micro_step)
        # torch.full: a fill on the device, not a blocking host->device copy of the number
        return loss, torch.stack([loss.detach().float(), torch.full((), pad_share, device=loss.device)])


def train_loop(cfg: Config, engine, runner: StepRunner, stream, checkpoints, grad_accum: int,
               global_batch: int, logger, throughput, state: dict[str, Any], evaluator=None) -> int:
    """Train from ``state`` (step, micro_step, samples, skipped) to ``cfg.max_steps``; returns the exit code.

    ``logger``: a :class:`~blip2_ds.train.metrics.MetricsLogger`; ``throughput``: a
    :class:`~blip2_ds.train.metrics.Throughput` fed with each step's time and data wait;
    ``evaluator``: a :class:`~blip2_ds.train.periodic_eval.PeriodicEval` (or None).
    """
    from blip2_ds.train.garbage import CollectionClock, FrozenSetup
    from blip2_ds.train.memory import MemoryRecorder, out_of_memory_message
    from blip2_ds.train.profiling import StepProfiler

    rank = distributed.rank()
    profiler = StepProfiler(cfg.profiled_steps(), Path(cfg.output_dir), rank, runner.device)
    batches = endless(stream)
    with FrozenSetup() as frozen, CollectionClock() as gc_clock, profiler, \
            MemoryRecorder(cfg.memory_snapshot, Path(cfg.output_dir), rank) as memory:
        try:
            return _train_steps(cfg, engine, runner, stream, batches, checkpoints, grad_accum, global_batch, logger,
                                throughput, state, evaluator, frozen, gc_clock, profiler)
        except torch.OutOfMemoryError as err:
            step = state["step"] + 1  # one past the last finished step (the one running)
            raise TrainingError(out_of_memory_message(step, rank, cfg.data.batch_size, runner.device,
                                                      memory.dump_after_out_of_memory(step))) from err
        finally:
            # Closing the generator stops the data workers now (the stream's own ``finally``; it also does when
            # the error came out of the stream). Left to the error's traceback, which holds this frame, they
            # would live until exit, where multiprocessing SIGTERMs its daemonic workers and joins them: ours
            # ignore SIGTERM (data/stream.py), so the rank would wait forever.
            batches.close()


def _train_steps(cfg: Config, engine, runner: StepRunner, stream, batches: Iterator[dict[str, Any]], checkpoints,
                 grad_accum: int, global_batch: int, logger, throughput, state: dict[str, Any], evaluator, frozen,
                 gc_clock, profiler) -> int:
    from blip2_ds.train.engine import constrain_parameters_

    stop = StopRequest()
    names = StepRunner.METRICS[cfg.stage]
    jsonl = Path(cfg.output_dir) / "train_log.jsonl"
    consecutive_bad = 0
    save = _CheckpointSaver(checkpoints, engine, stream, to_dict(cfg), logger)
    first_step = state["step"] + 1
    while state["step"] < cfg.max_steps:
        profiler.step_begins(state["step"] + 1)
        step_start, data_wait = time.perf_counter(), 0.0
        lr = engine.get_lr()[0]  # this step's: the scheduler moves on at its last micro batch
        done, summed = 0, None  # metrics summed where they are: no host sync per micro batch
        while done < grad_accum:
            wait_start = time.perf_counter()
            batch = next(batches)
            data_wait += time.perf_counter() - wait_start
            loss, metrics = runner(batch, state["micro_step"])
            state["micro_step"] += 1
            finite = _mean_over_ranks(torch.isfinite(loss.detach()).float().view(1))
            if finite.item() < 1.0:
                state["skipped"] += 1
                consecutive_bad += 1
                if consecutive_bad >= cfg.max_nonfinite_steps:
                    raise TrainingError(_nonfinite_message(consecutive_bad, state["step"] + 1, checkpoints))
                continue
            consecutive_bad = 0
            engine.backward(loss)
            engine.step()
            summed = metrics.detach() if summed is None else summed + metrics.detach()
            done += 1
        constrain_parameters_(engine)
        state["step"] += 1
        state["samples"] += global_batch
        averaged = _mean_over_ranks(summed / grad_accum)
        step_time, gc_time = time.perf_counter() - step_start, gc_clock.take()
        throughput.record(step_time, data_wait, global_batch // distributed.world_size(), gc_time)
        record = {"step": state["step"], **dict(zip(names, averaged.tolist())),
                  "lr": lr, "grad_norm": _grad_norm(engine), "loss_scale": _loss_scale(engine),
                  "skipped_steps": state["skipped"], "samples": state["samples"], "step_time": step_time,
                  "data_wait": data_wait, "gc_time": gc_time}
        if cfg.stage == 2:
            record["loss_lm"] = record["loss"]
        if distributed.rank() == 0:
            with open(jsonl, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        if state["step"] % cfg.log_every == 0 or state["step"] == cfg.max_steps:  # the same steps on every rank
            window = throughput.summary()
            window.update(_worst_over_ranks(window))
            logger.log(state["step"], {**{k: v for k, v in record.items() if k not in _NOT_LOGGED},
                                       **window, "skipped_samples": dict(stream.skipped)})
        profiler.step_ends(state["step"])
        if evaluator is not None and evaluator.due(state["step"]):
            evaluator(engine.module, state["step"], logger)
        if state["step"] == first_step:
            frozen.freeze_more()  # what the first step set up lazily (see train/garbage.py)
            gc_clock.take()  # that collection is setup, not the next step's
        last = state["step"] == cfg.max_steps
        if state["step"] % cfg.save_every == 0 or last:
            save(state)
        if not last and stop.agreed():
            if state["step"] % cfg.save_every:
                save(state)
            print(f"[rank {distributed.rank()}] {stop.signal_name or 'a peer was signalled'}: checkpoint at step "
                  f"{state['step']} saved; exiting with {REQUEUE_EXIT_CODE} (requeue, then --resume latest)",
                  flush=True)
            return REQUEUE_EXIT_CODE
    return 0


def _nonfinite_message(count: int, step: int, checkpoints) -> str:
    tags = checkpoints.complete_tags()
    where = "no checkpoint was saved yet"
    if tags:
        where = f"the checkpoints are untouched ({', '.join(tags)})"
        if int(tags[-1].removeprefix("step_")) == step - 1:  # saved right before this step: its weights gave these losses
            where += (f"; {tags[-1]} holds the weights that gave these losses, so resume from an earlier one "
                      f"if the data is not the cause (--resume <tag>)")
    return (f"the loss was non-finite {count} micro batches in a row (step {step}); stopping: {where}. Lower optim.lr "
            f"(a resume applies it), use precision=bf16, or inspect the data, then resume.")


class _CheckpointSaver:
    """Saves through the CheckpointManager (every rank) and logs what each save cost the run."""

    def __init__(self, checkpoints, engine, stream, config: dict[str, Any], logger):
        self.checkpoints, self.engine, self.stream, self.config, self.logger = checkpoints, engine, stream, config, logger
        self.previous_end = time.perf_counter()

    def __call__(self, state: dict[str, Any]) -> None:
        saved = self.checkpoints.save(self.engine, state["step"], dict(state), self.stream.state_dict(), self.config)
        now = time.perf_counter()
        self.logger.log_checkpoint(state["step"], saved.seconds, saved.bytes,
                                   saved.seconds / max(now - self.previous_end, 1e-9))
        self.previous_end = now


_NOT_LOGGED = ("step", "samples", "step_time", "data_wait", "gc_time")


def _loss_scale(engine) -> float | None:
    scale = getattr(engine.optimizer, "cur_scale", None) if engine.fp16_enabled() else None
    return None if scale is None else float(scale)


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if isinstance(norm, torch.Tensor) else norm)
