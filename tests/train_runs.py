"""Training runs as users start them (the deepspeed launcher on CPU ranks) and what they leave behind.

Shared by test_train.py, test_slurm.py and test_multinode.py; the session fixtures ``assets`` (small
demo assets) and ``reference_run`` (30 uninterrupted steps on 2 ranks) live in conftest.py.
"""
import json
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, subprocess_env

DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))
STEPS = 30


def overrides(assets, output_dir: Path, **extra) -> list[str]:
    values = {
        "model.vocab_size": assets.info["qformer_vocab_size"],
        "pretrained.tokenizer_path": assets.tokenizer, "vision.model_config": assets.vision_config,
        "vision.checkpoint": assets.vision_checkpoint, "language.path": assets.llm,
        "data.train": assets.train_pattern, "data.batch_size": 8, "data.num_workers": 1,
        "max_steps": STEPS, "save_every": 5, "keep_last": 2, "log_every": 5, "optim.warmup_steps": 3, "precision": "fp32",
        "output_dir": output_dir, **extra,
    }
    return [f"{key}={value}" for key, value in values.items()]


def env() -> dict:
    return {**subprocess_env(), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(args: list[str], ranks: int = 2, port: int | None = None) -> subprocess.Popen:
    command = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(port or free_port()), str(ROOT / "launch" / "train.py"),
               "--config", str(ROOT / "configs" / "demo.yaml"), *args]
    return subprocess.Popen(command, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(process: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def losses(output_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines() if line]
    return {r["step"]: r["loss"] for r in records}


def wait_for_step(output_dir: Path, step: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"training ended early:\n{process.stdout.read()}")
        log = output_dir / "train_log.jsonl"
        if log.is_file() and any(json.loads(l)["step"] >= step for l in log.read_text().splitlines() if l.strip()):
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout} s")
