"""The project's own sbatch scripts on a real SLURM scheduler (Debian's Slurm + munge, started here).

launch/slurm/local_cluster.sh installs the packages if needed and starts a controller and a
compute daemon on this machine (2 CPU "nodes' worth" of tasks, no GPU); they are stopped again by
their pid files at the end. Needs root (the daemons, munge's key); skipped otherwise.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT
from train_runs import env as train_env, losses, overrides

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

CLUSTER_SCRIPT = ROOT / "launch" / "slurm" / "local_cluster.sh"
# What the CPU test cluster can give: one node, two tasks of one core, no GPUs.
CPU_JOB = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=20"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the SLURM tests start slurmctld, slurmd and munged, which needs root")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("SLURM is not installed and this machine has no apt-get to install Debian's packages")
    folder = tmp_path_factory.mktemp("slurm")
    start = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start", str(folder)], capture_output=True, text=True,
                           timeout=600)
    assert start.returncode == 0, f"the local SLURM cluster did not start:\n{start.stdout}\n{start.stderr}"
    try:
        yield {**train_env(), "SLURM_CONF": str(folder / "slurm.conf"), "BLIP2_DS_VENV": sys.prefix}
    finally:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop", str(folder)], timeout=120)


def submit(env: dict, script: str, *args, options=(), **variables) -> str:
    run = subprocess.run(["sbatch", "--parsable", *options, str(ROOT / "launch" / "slurm" / script), *map(str, args)],
                         cwd=ROOT, env={**env, **variables}, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip().split(";")[0]


def job(env: dict, job_id: str) -> dict:
    """scontrol's record of the job (kept MinJobAge=300 s after it ends)."""
    text = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", text))


def wait_until_done(env: dict, job_id: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = job(env, job_id)
        state = record.get("JobState")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return record
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not end in {timeout} s: {job(env, job_id)}")


def job_output(path: Path) -> str:
    return path.read_text() if path.is_file() else f"(no job output at {path})"


def train_args(assets, **extra) -> list[str]:
    # The sbatch script sets output_dir (RUN_DIR); the test's data, towers and step counts come after.
    return ["--config", "configs/demo.yaml", *[a for a in overrides(assets, Path("unused"), **extra)
                                                if not a.startswith("output_dir=")]]


@pytest.fixture(scope="module")
def slurm_run(cluster, assets, tmp_path_factory):
    """stage1.sbatch, uninterrupted: the demo config on 2 CPU tasks through srun."""
    folder = tmp_path_factory.mktemp("slurm_run")
    job_id = submit(cluster, "stage1.sbatch", *train_args(assets), options=[*CPU_JOB, f"--output={folder}/%x-%j.out"],
                    RUN_DIR=folder / "run")
    record = wait_until_done(cluster, job_id)
    output = job_output(folder / f"blip2-stage1-{job_id}.out")
    return folder / "run", record, output


def test_stage1_sbatch_trains_checkpoints_and_logs_like_the_deepspeed_launcher(slurm_run, reference_run):
    run, record, output = slurm_run
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), output[-4000:]
    assert "2 task(s)" in output and "0: step 30/30" in output  # srun --label: rank 0's lines
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000030"
    assert (run / "checkpoints" / "step_00000030" / "rank_00001.json").is_file()  # both tasks saved
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    # srun's ranks (from SLURM_PROCID/SLURM_STEP_NUM_TASKS/SLURM_LOCALID) are the launcher's ranks
    assert losses(run) == losses(reference_run)


def test_preempted_job_checkpoints_requeues_and_resumes_to_the_same_losses(cluster, assets, reference_run, tmp_path):
    run = tmp_path / "run"
    job_id = submit(cluster, "stage1.sbatch", *train_args(assets, save_every=100),
                    options=[*CPU_JOB, f"--output={tmp_path}/%x-%j.out"], RUN_DIR=run)
    log = run / "train_log.jsonl"
    deadline = time.monotonic() + 300
    while not (log.is_file() and len(log.read_text().splitlines()) >= 8):
        assert time.monotonic() < deadline and job(cluster, job_id).get("JobState") in ("PENDING", "RUNNING"), \
            job_output(tmp_path / f"blip2-stage1-{job_id}.out")[-4000:]
        time.sleep(0.2)
    # What the scheduler does before a time limit (--signal=B:USR1@300) or a preemption notice.
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], env=cluster, check=True)
    record = wait_until_done(cluster, job_id)  # requeued, eligible again after cred_expire (10 s here)
    output = job_output(tmp_path / f"blip2-stage1-{job_id}.out")
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == ("COMPLETED", "0:0", "1"), output[-4000:]
    assert "signal received: asking every task to checkpoint" in output
    assert output.count("exiting with 75") == 2  # both ranks saved
    assert "requeueing; the job resumes from its latest checkpoint" in output
    saved = re.search(r"resumed from step (\d+)", output)
    assert saved and 8 <= int(saved.group(1)) < 30, output[-4000:]
    assert losses(run) == losses(reference_run)  # every step, bitwise


def test_eval_sbatch_evaluates_the_trained_checkpoint(cluster, slurm_run, assets, tmp_path):
    run, _, _ = slurm_run
    result = tmp_path / "retrieval.json"
    job_id = submit(cluster, "eval.sbatch", "retrieval", "--checkpoint", run, "--shards", assets.val_pattern,
                    "--k", 4, "--out", result, options=[*CPU_JOB, f"--output={tmp_path}/%x-%j.out"])
    record = wait_until_done(cluster, job_id)
    output = job_output(tmp_path / f"blip2-eval-{job_id}.out")
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), output[-4000:]
    metrics = json.loads(result.read_text())["metrics"]
    assert 0.0 <= metrics["itc_i2t_r1"] <= 100.0 and "2 task(s)" in output


@pytest.mark.parametrize("how, expected", [
    ("srun_with_contradicting_rank", "contradictory launcher environment: RANK=5 but SLURM_PROCID="),
    ("batch_shell_without_srun", "not in an srun step, so it would be 1 process instead of 2"),
])
def test_wrong_launches_inside_a_job_fail_in_one_line(cluster, assets, tmp_path, how, expected):
    train = f"python launch/train.py --config configs/demo.yaml {' '.join(overrides(assets, tmp_path / 'run'))}"
    command = {"srun_with_contradicting_rank": f"srun env RANK=5 WORLD_SIZE=8 LOCAL_RANK=1 MASTER_ADDR=x MASTER_PORT=1 {train}",
               "batch_shell_without_srun": train}[how]
    script = tmp_path / "job.sbatch"
    script.write_text(f"#!/bin/bash\nexport PATH={Path(sys.executable).parent}:$PATH\n{command}\n")
    run = subprocess.run(["sbatch", "--parsable", *CPU_JOB, f"--output={tmp_path}/out-%j.txt", str(script)],
                         cwd=ROOT, env=cluster, capture_output=True, text=True, timeout=60, check=True)
    job_id = run.stdout.strip()
    record = wait_until_done(cluster, job_id, timeout=300)
    output = job_output(tmp_path / f"out-{job_id}.txt")
    assert record["ExitCode"] == "2:0", output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert errors and all(expected in line for line in errors), output[-3000:]
    assert not (tmp_path / "run").exists()


def test_stage2_sbatch_trains_the_language_model_stage(cluster, assets, tmp_path):
    job_id = submit(cluster, "stage2.sbatch", *train_args(assets, stage=2, max_steps=4, save_every=4),
                    options=[*CPU_JOB, f"--output={tmp_path}/%x-%j.out"], RUN_DIR=tmp_path / "run")
    record = wait_until_done(cluster, job_id)
    output = job_output(tmp_path / f"blip2-stage2-{job_id}.out")
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), output[-4000:]
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3, 4]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000004"


def test_sbatch_scripts_request_gpus_signals_and_requeue():
    for name in ("stage1.sbatch", "stage2.sbatch", "eval.sbatch", "common.sh", "train_job.sh", "local_cluster.sh"):
        check = subprocess.run(["bash", "-n", str(ROOT / "launch" / "slurm" / name)], capture_output=True, text=True)
        assert check.returncode == 0, f"{name}: {check.stderr}"
    for name in ("stage1.sbatch", "stage2.sbatch"):
        options = re.findall(r"^#SBATCH (\S+)", (ROOT / "launch" / "slurm" / name).read_text(), re.M)
        for wanted in ("--nodes=", "--ntasks-per-node=", "--gpus-per-node=", "--signal=B:USR1@", "--requeue",
                       "--open-mode=append"):
            assert any(o.startswith(wanted) for o in options), (name, wanted)
        per_node = {o.split("=")[0]: o.split("=")[1] for o in options if "=" in o}
        assert per_node["--ntasks-per-node"] == per_node["--gpus-per-node"]  # one task per GPU


@pytest.mark.parametrize("restart, kept", [(0, True), (2, False)])
def test_a_submitted_resume_tag_applies_to_the_first_start_only(tmp_path, restart, kept):
    """`sbatch stage1.sbatch --resume step_X` goes back to step_X once; a requeued job continues from its own
    latest checkpoint (--resume auto) instead of going back to step_X again on every requeue."""
    out = tmp_path / "srun_args"
    script = (f'log() {{ :; }}; srun_tasks() {{ printf "%s\\n" "$@" > {out}; }}; '
              f'source {ROOT}/launch/slurm/train_job.sh configs/stage1_vitg.yaml --resume step_00000020 '
              f'"data.train=my data/{{000..009}}.tar" --resume=step_00000010')
    run = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60, env={
        **os.environ, "ROOT": str(tmp_path), "SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "t", "RUN_DIR": str(tmp_path / "run"),
        "SLURM_RESTART_COUNT": str(restart)})
    assert run.returncode == 0, run.stderr
    args = out.read_text().splitlines()
    assert "data.train=my data/{000..009}.tar" in args and args[args.index("--resume") + 1] == "auto"
    assert ("step_00000020" in args and "--resume=step_00000010" in args) == kept, args
