"""The trainer as users run it: `deepspeed launch/train.py ...`, real processes, real files."""
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from train_runs import STEPS, env, finish, launch, losses, overrides, wait_for_step

from blip2_ds.config import ConfigError
from blip2_ds.train.schedule import lr_at


@pytest.mark.multiprocess
@pytest.mark.slow
def test_run_writes_checkpoints_logs_and_tensorboard(reference_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert sorted(losses(reference_run)) == list(range(1, STEPS + 1))
    records = [json.loads(line) for line in (reference_run / "train_log.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["gc_time"] < r["step_time"] for r in records)
    checkpoints = reference_run / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == f"step_{STEPS:08d}"
    kept = sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("step_"))
    assert kept == [f"step_{STEPS - 5:08d}", f"step_{STEPS:08d}"]  # keep_last=2
    final = checkpoints / f"step_{STEPS:08d}"
    for name in ("COMPLETE", "model.safetensors", "config.yaml", "rank_00000.json", "rank_00001.json"):
        assert (final / name).is_file(), name
    from safetensors import safe_open

    with safe_open(str(final / "model.safetensors"), "pt") as handle:
        names = list(handle.keys())
    assert "qformer.layers.0.cross_attn.key.weight" in names
    trainable = ("qformer.", "query_tokens", "ln_vision.", "vision_proj.", "text_proj.", "itm_head.", "temp")
    assert all(n.startswith(trainable) for n in names)  # the frozen tower is never in a checkpoint
    events = EventAccumulator(str(reference_run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"]) | set(events.Tags()["tensors"])
    for tag in ("loss/total", "loss/itc", "loss/itm", "loss/itg", "train/itm_accuracy", "train/lr", "train/grad_norm",
                "train/temperature", "train/skipped_steps", "perf/samples_per_s", "perf/samples_per_s_per_gpu",
                "perf/data_wait_share", "perf/gc_share", "perf/tflops_per_gpu", "perf/mfu", "perf/peak_memory_gb",
                "perf/data_wait_share_worst_rank", "perf/gc_share_worst_rank"):
        assert tag in tags, tag
    for share in ("data_wait_share", "gc_share"):  # the worst rank's share is at least rank 0's own
        own, worst = (events.Scalars(f"perf/{share}{suffix}") for suffix in ("", "_worst_rank"))
        assert [e.step for e in own] == [e.step for e in worst] == list(range(5, STEPS + 1, 5))
        assert all(w.value >= o.value for o, w in zip(own, worst))
    saves = {tag: events.Scalars(f"checkpoint/{tag}") for tag in ("save_seconds", "size_gb", "time_share")}
    assert all([e.step for e in scalars] == list(range(5, STEPS + 1, 5)) for scalars in saves.values())
    sizes = {e.step: e.value for e in saves["size_gb"]}  # every rank's files, as on disk
    assert sizes[STEPS] == pytest.approx(sum(p.stat().st_size for p in final.rglob("*") if p.is_file()) / 1e9)
    assert all(e.value > 0 for e in saves["save_seconds"]) and all(0 < e.value < 1 for e in saves["time_share"])
    first, last = losses(reference_run)[1], losses(reference_run)[STEPS]
    assert last < first  # it learns


@pytest.mark.multiprocess
@pytest.mark.slow
def test_kill_9_then_resume_gives_the_same_losses(assets, reference_run, tmp_path):
    process = launch(overrides(assets, tmp_path))
    wait_for_step(tmp_path, 17, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000015"
    code, text = finish(launch(overrides(assets, tmp_path) + ["--resume", "latest"]))
    assert code == 0, text[-3000:]
    assert "resumed from step 15" in text
    assert losses(tmp_path) == losses(reference_run)  # bitwise, every step


@pytest.mark.multiprocess
@pytest.mark.slow
def test_sigterm_saves_exits_for_requeue_and_resume_finishes(assets, reference_run, tmp_path):
    process = launch(overrides(assets, tmp_path, save_every=100))
    wait_for_step(tmp_path, 8, process)
    os.killpg(process.pid, signal.SIGTERM)  # what a scheduler does: the whole process tree, workers included
    code, text = finish(process)
    assert text.count("exiting with 75") == 2, text[-3000:]  # both ranks saved and asked for a requeue
    saved = int((tmp_path / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    assert 8 <= saved < STEPS
    code, text = finish(launch(overrides(assets, tmp_path, save_every=100) + ["--resume", "latest"]))
    assert code == 0, text[-3000:]
    assert losses(tmp_path) == losses(reference_run)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_single_process_exit_code_after_sigusr1(assets, tmp_path):
    process = subprocess.Popen([sys.executable, str(ROOT / "launch" / "train.py"), "--config",
                                str(ROOT / "configs" / "demo.yaml"), *overrides(assets, tmp_path, save_every=100)],
                               cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(tmp_path, 3, process)
    process.send_signal(signal.SIGUSR1)
    code, text = finish(process)
    assert code == 75, text[-3000:]
    assert (tmp_path / "checkpoints" / "latest").is_file()


def test_a_stop_signal_during_startup_is_kept_until_the_first_step(assets, tmp_path):
    """A preemption notice while the models are still being built: one step, a checkpoint, exit 75."""
    process = subprocess.Popen([sys.executable, str(ROOT / "launch" / "train.py"), "--config",
                                str(ROOT / "configs" / "demo.yaml"), *overrides(assets, tmp_path, save_every=100)],
                               cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.5)  # importing torch and deepspeed alone takes longer
    assert process.poll() is None and not (tmp_path / "train_log.jsonl").exists()
    process.send_signal(signal.SIGUSR1)
    code, text = finish(process)
    assert code == 75, text[-3000:]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000001"


def test_resume_auto_starts_fresh_or_continues_but_never_overwrites(assets, reference_run, tmp_path):
    import shutil

    def train(*args):
        return subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--config",
                               str(ROOT / "configs" / "demo.yaml"), *overrides(assets, tmp_path, max_steps=STEPS + 2),
                               "--resume", "auto", *args], cwd=ROOT, env=env(), capture_output=True, text=True,
                              timeout=300)

    shutil.copytree(reference_run / "checkpoints", tmp_path / "checkpoints")
    (tmp_path / "checkpoints" / "latest").unlink()
    run = train()
    assert run.returncode == 2 and "no latest pointer" in run.stderr and f"step_{STEPS:08d}" in run.stderr, run.stderr
    shutil.rmtree(tmp_path / "checkpoints")
    run = train("max_steps=5", "optim.warmup_steps=1")
    assert run.returncode == 0 and "resumed" not in run.stdout, run.stdout[-3000:]
    run = train("max_steps=6", "optim.warmup_steps=1")
    assert run.returncode == 0 and "resumed from step 5" in run.stdout, run.stdout[-3000:]


def test_going_back_to_an_earlier_checkpoint_rewrites_the_steps_after_it_and_a_fresh_start_never_overwrites(
        assets, tmp_path):
    """One process. The lr logged for a step is the one it ran at; a start without --resume refuses a
    folder that holds checkpoints; resuming from an earlier checkpoint sets the later ones aside and
    TensorBoard keeps one value per step (the resumed run's)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def train(*args):
        return subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--config",
                               str(ROOT / "configs" / "demo.yaml"), *overrides(assets, tmp_path, max_steps=8,
                               save_every=4, log_every=2, keep_last=5, **{"optim.warmup_steps": 3}), *args],
                              cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)

    run = train()
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    first = {r["step"]: r for r in map(json.loads, (tmp_path / "train_log.jsonl").read_text().splitlines())}
    assert [first[s]["lr"] for s in range(1, 9)] == [pytest.approx(lr_at(s - 1, 0.002, 3, 8)) for s in range(1, 9)]

    log_before = (tmp_path / "train_log.jsonl").read_text()
    run = train("max_steps=10")
    assert run.returncode == 2 and "already holds checkpoints" in run.stderr and "--resume latest" in run.stderr
    assert (tmp_path / "train_log.jsonl").read_text() == log_before  # nothing of the earlier run touched

    run = train("--resume", "step_00000004")
    assert run.returncode == 0 and "resumed from step 4" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / "abandoned" / "step_00000008" / "COMPLETE").is_file()
    assert (checkpoints / "latest").read_text().strip() == "step_00000008"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000004", "step_00000008"]
    again = {r["step"]: r for r in map(json.loads, (tmp_path / "train_log.jsonl").read_text().splitlines())}
    assert sorted(again) == list(range(1, 9)) and again[8]["loss"] == first[8]["loss"]  # exact resume
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("loss/total")] == [2, 4, 6, 8]  # not 2, 4, 6, 8, 6, 8


def test_continuing_from_an_earlier_checkpoint_sets_the_later_ones_aside(tmp_path):
    from blip2_ds.train.checkpoint import CheckpointManager

    manager = CheckpointManager(tmp_path / "run", keep_last=3)
    for step, complete in ((4, True), (8, True), (9, False), (12, True)):
        (manager.root / f"step_{step:08d}").mkdir(parents=True)
        if complete:
            (manager.root / f"step_{step:08d}" / "COMPLETE").write_text(f"{step}\n")
    (manager.root / "abandoned" / "step_00000008").mkdir(parents=True)  # set aside by an earlier resume
    (manager.root / "latest").write_text("step_00000012\n")
    manager.continue_from("step_00000004", 4)
    assert manager.complete_tags() == ["step_00000004"] and (manager.root / "latest").read_text() == "step_00000004\n"
    assert sorted(p.name for p in (manager.root / "abandoned").iterdir()) == [
        "step_00000008", "step_00000008.1", "step_00000012"]  # complete ones kept; the incomplete 9 deleted
    assert not (manager.root / "step_00000009").exists()
    # Resumed from another run's checkpoint into a new output_dir: nothing here to set aside.
    CheckpointManager(tmp_path / "new_run").continue_from(str(manager.root / "step_00000004"), 4)
    assert not (tmp_path / "new_run").exists()


@pytest.mark.multiprocess
def test_incomplete_and_corrupt_checkpoints(assets, reference_run, tmp_path):
    import shutil

    shutil.copytree(reference_run / "checkpoints", tmp_path / "checkpoints")
    # A save killed midway: the newest folder has no COMPLETE marker and `latest` was never moved.
    (tmp_path / "checkpoints" / f"step_{STEPS:08d}" / "COMPLETE").unlink()
    (tmp_path / "checkpoints" / "latest").write_text(f"step_{STEPS - 5:08d}\n")
    code, text = finish(launch(overrides(assets, tmp_path) + ["--resume", "latest"], ranks=2))
    assert code == 0 and f"resumed from step {STEPS - 5}" in text, text[-3000:]
    (tmp_path / "checkpoints" / "latest").write_text("garbage\x00\n")
    run = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--config",
                          str(ROOT / "configs" / "demo.yaml"), *overrides(assets, tmp_path), "--resume", "latest"],
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert "not a complete checkpoint" in run.stderr and f"step_{STEPS:08d}" in run.stderr


class _Tampered:
    """A pickle that would run a command when loaded without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.multiprocess
def test_checkpoints_are_read_weights_only(assets, reference_run, tmp_path):
    import shutil

    import torch

    shutil.copytree(reference_run / "checkpoints", tmp_path / "checkpoints")
    marker = tmp_path / "code_ran"
    tag = (tmp_path / "checkpoints" / "latest").read_text().strip()
    torch.save({"payload": _Tampered(marker)},
               tmp_path / "checkpoints" / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    code, text = finish(launch(overrides(assets, tmp_path) + ["--resume", "latest"]))
    assert code != 0 and "Weights only load failed" in text
    assert not marker.exists()


@pytest.mark.parametrize("override, expected", [
    ("model.hiden_size=3", "model.hiden_size"),
    ("vision.checkpoint=/nonexistent/tower.safetensors", "vision.checkpoint"),
    ("model.vision_width=96", "model.vision_width=96 but the vision tower"),
    ("data.train=/nonexistent/shard-{0000..0003}.tar", "do not exist"),
    ("optim.global_batch=33", "optim.global_batch=33"),
    ("kernels=fast", "kernels='fast'"),
    ("profile_steps=4-2", "profile_steps='4-2'"),
    ("profile_steps=31", "max_steps=30"),
    pytest.param("memory_snapshot=true", "memory_snapshot=true records the CUDA allocator",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only error")),
])
def test_bad_config_fails_in_one_line_before_any_process_group(assets, tmp_path, override, expected):
    start = time.monotonic()
    run = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--config",
                          str(ROOT / "configs" / "demo.yaml"), *overrides(assets, tmp_path), override],
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], run.stderr
    assert not (tmp_path / "checkpoints").exists()
    assert time.monotonic() - start < 60


def test_a_tower_width_the_qformer_does_not_expect_is_found_before_the_tower_is_built(assets, tmp_path):
    from blip2_ds.config import load_config
    from blip2_ds.train.build import check_run

    cfg = load_config(ROOT / "configs" / "demo.yaml", overrides(assets, tmp_path, **{"model.vision_width": 96}))
    with pytest.raises(ConfigError, match=r"model.vision_width=96 but the vision tower .* width 128"):
        check_run(cfg, ROOT / "ds_configs" / "zero2.json", world_size=1)


def test_triton_kernels_on_a_cpu_without_the_interpreter_fail_in_one_line(assets, tmp_path):
    plain_env = {k: v for k, v in env().items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--config",
                          str(ROOT / "configs" / "demo.yaml"), *overrides(assets, tmp_path), "kernels=triton"],
                         cwd=ROOT, env=plain_env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "kernels=triton needs a CUDA GPU" in lines[0], run.stderr


@pytest.mark.multiprocess
def test_a_diverging_run_stops_in_one_line_and_every_process_exits_then_resumes_before_it(assets, tmp_path):
    """Non-finite losses in a row stop the run on every rank; the data workers (which ignore SIGTERM)
    must not keep a rank waiting at exit, and the checkpoints already written stay as they were. Then
    what the message advises: back to the checkpoint before the divergence with a lower lr, which the
    resumed run applies; the checkpoint left behind moves to abandoned/."""
    # Step 1 runs at the warmup's start lr (0), step 2 at 1e30, step 3's losses are non-finite.
    process = launch(overrides(assets, tmp_path, save_every=1, max_nonfinite_steps=3, **{
        "optim.lr": 1e30, "optim.warmup_steps": 1, "data.num_workers": 2}))
    try:
        code, text = finish(process, timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # only if something is still there, after a failure
    assert code == 1, text[-3000:]
    assert "error: the loss was non-finite 3 micro batches in a row" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    checkpoints = tmp_path / "checkpoints"
    latest = checkpoints / (checkpoints / "latest").read_text().strip()
    assert (latest / "COMPLETE").is_file(), sorted(p.name for p in latest.iterdir())
    _assert_process_group_gone(process.pid)  # the launcher, both ranks and their data workers
    assert latest.name == "step_00000002" and "(step 3)" in text, text[-3000:]
    assert "step_00000002 holds the weights that gave these losses" in text, text[-3000:]

    code, text = finish(launch(overrides(assets, tmp_path, save_every=1, max_steps=4, **{
        "optim.lr": 0.002, "optim.warmup_steps": 1, "data.num_workers": 2}) + ["--resume", "step_00000001"]))
    assert code == 0, text[-3000:]
    assert "resumed with optim.lr=0.002 (the checkpoint's run had 1e+30)" in text, text[-3000:]
    records = {r["step"]: r for r in map(json.loads, (tmp_path / "train_log.jsonl").read_text().splitlines())}
    assert sorted(records) == [1, 2, 3, 4] and all(math.isfinite(records[s]["loss"]) for s in (2, 3, 4))
    assert [records[s]["lr"] for s in (2, 3)] == [pytest.approx(lr_at(s - 1, 0.002, 1, 4, 0.0)) for s in (2, 3)]
    assert (checkpoints / "abandoned" / "step_00000002" / "COMPLETE").is_file()  # moved, not deleted
    assert (checkpoints / "latest").read_text().strip() == "step_00000004"


@pytest.mark.multiprocess
def test_an_error_in_a_step_ends_the_rank_and_its_data_workers(assets, tmp_path):
    """Any exception out of the loop, here a KeyboardInterrupt delivered to the rank alone (as torchrun
    forwards a Ctrl-C, or `kill -INT`): the rank must exit, not wait at exit for data workers that
    ignore SIGTERM while the failed step's traceback keeps their loader alive (it did, forever)."""
    process = subprocess.Popen([sys.executable, str(ROOT / "launch" / "train.py"), "--config",
                                str(ROOT / "configs" / "demo.yaml"),
                                *overrides(assets, tmp_path, save_every=100, **{"data.num_workers": 2})],
                               cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        wait_for_step(tmp_path, 3, process)
        process.send_signal(signal.SIGINT)
        code, text = finish(process, timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # only if something is still there, after a failure
    assert code == -signal.SIGINT and "KeyboardInterrupt" in text, text[-3000:]
    _assert_process_group_gone(process.pid)


def _assert_process_group_gone(group: int, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    raise AssertionError(f"processes of the run (group {group}) are still alive {seconds} s after it exited")


@pytest.mark.multiprocess
def test_cpu_runs_leave_no_shared_memory_behind(assets, tmp_path):
    """DeepSpeed's CPU all-reduce buffers (one ~67 MB /dev/shm file per rank) are released."""
    from train_runs import free_port

    port = free_port()
    code, text = finish(launch(overrides(assets, tmp_path, max_steps=2, save_every=100,
                                         **{"optim.warmup_steps": 1}), port=port))
    assert code == 0, text[-3000:]
    assert "step 2/2" in text
    left = [p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")]
    assert not left, left


@pytest.mark.multiprocess
@pytest.mark.slow
def test_activation_checkpointing_trains_to_the_same_losses(assets, reference_run, tmp_path):
    """2 ranks, ZeRO-2, dropout on: recomputing the Q-Former layers in backward changes nothing."""
    code, text = finish(launch(overrides(assets, tmp_path, activation_checkpointing="true")))
    assert code == 0, text[-3000:]
    assert losses(tmp_path) == losses(reference_run)  # bitwise, every step


@pytest.mark.multiprocess
@pytest.mark.slow
def test_triton_kernels_in_the_interpreter_give_the_torch_losses(assets, tmp_path):
    """2 ranks, ZeRO-2, 4 steps: the fused kernels (Triton's interpreter) against SDPA + einsum/amax."""
    runs = {}
    for backend in ("torch", "triton"):
        output = tmp_path / backend
        # attention dropout off: the kernel draws its own masks, so only the no-dropout function is comparable
        code, text = finish(launch(overrides(assets, output, max_steps=4, save_every=100, kernels=backend,
                                             **{"model.attention_dropout": 0.0})))
        assert code == 0, text[-3000:]
        runs[backend] = losses(output)
    assert sorted(runs["triton"]) == [1, 2, 3, 4]
    for step, loss in runs["torch"].items():
        assert abs(runs["triton"][step] - loss) <= 1e-5 * abs(loss), (step, runs)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_periodic_evaluation_logs_to_tensorboard_and_leaves_training_unchanged(assets, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = {}
    for name, extra in (("plain", {}), ("eval", {"eval_every": 2, "eval_data": assets.val_pattern, "eval_samples": 12})):
        output = tmp_path / name
        code, text = finish(launch(overrides(assets, output, max_steps=4, save_every=100, **extra)))
        assert code == 0, text[-3000:]
        runs[name] = (losses(output), text)
    assert runs["eval"][0] == runs["plain"][0]  # bitwise: evaluation draws no training randomness
    assert runs["eval"][1].count("eval at step") == 2
    events = EventAccumulator(str(tmp_path / "eval" / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    recall = events.Scalars("eval/itm_t2i_r1")
    assert [e.step for e in recall] == [2, 4] and all(0.0 <= e.value <= 100.0 for e in recall)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_stage2_periodic_evaluation_logs_caption_metrics_images_and_captions(assets, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    code, text = finish(launch(overrides(assets, tmp_path, stage=2, max_steps=4, save_every=100, eval_every=4,
                                         eval_data=assets.val_pattern, eval_samples=8,
                                         **{"generation.num_beams": 2, "generation.max_new_tokens": 6})))
    assert code == 0, text[-3000:]
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    for tag in ("eval/CIDEr", "eval/Bleu_4", "eval/ROUGE_L"):
        assert [e.step for e in events.Scalars(tag)] == [4], tag
    # the LLM's remaining pad share in its length groups, per step in the log and in TensorBoard
    shares = [json.loads(line)["llm_pad_share"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert len(shares) == 4 and all(0.0 <= share < 0.5 for share in shares)
    assert events.Scalars("perf/llm_pad_share")[-1].value == pytest.approx(shares[-1], rel=1e-6)
    assert len(events.Images("eval/images")) >= 1
    assert "eval/captions/text_summary" in events.Tags()["tensors"]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_profiled_steps_write_a_trace_per_rank_and_leave_the_losses_unchanged(assets, reference_run, tmp_path):
    import gzip

    code, text = finish(launch(overrides(assets, tmp_path, profile_steps="3-4")))
    assert code == 0, text[-3000:]
    assert losses(tmp_path) == losses(reference_run)  # bitwise: the profiler only observes
    for rank in (0, 1):
        trace = tmp_path / "profile" / f"steps_3-4_rank{rank}.json.gz"
        events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
        names = {event.get("name") for event in events}
        assert {"blip2_ds.step.3", "blip2_ds.step.4", "blip2_ds.loss.itc", "blip2_ds.loss.itm"} <= names
        assert not {"blip2_ds.step.2", "blip2_ds.step.5"} & names
        table = (tmp_path / "profile" / f"steps_3-4_rank{rank}.txt").read_text()
        assert "Self CPU" in table and "aten::" in table
    assert "profiler trace of steps 3-4" in text
