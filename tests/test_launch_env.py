"""Rank discovery (blip2_ds/launch_env.py): every launcher's variables, and partial or contradictory ones.

The SLURM variable sets below are those Slurm 22.05 exported on the local cluster of test_slurm.py
(the batch shell has SLURM_PROCID/SLURM_NTASKS but no SLURM_STEP_ID; an srun step has both).
"""
import subprocess
import sys

import pytest
from conftest import ROOT

from blip2_ds.launch_env import SLURM_PORT_BASE, LaunchEnvError, detect, first_host

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "node7",
            "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "none", "GROUP_RANK": "1"}
DEEPSPEED = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29501",
             "CROSS_RANK": "0", "CROSS_SIZE": "1", "LOCAL_SIZE": "2"}
BATCH_SHELL = {"SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "gpu[007-008]", "SLURM_NTASKS": "16",
               "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NNODES": "2"}
SRUN_STEP = {**BATCH_SHELL, "SLURM_STEP_ID": "0", "SLURM_STEPID": "0", "SLURM_PROCID": "9", "SLURM_LOCALID": "1",
             "SLURM_NODEID": "1", "SLURM_STEP_NUM_TASKS": "16", "SLURM_STEP_NODELIST": "gpu[007-008]",
             "SLURM_STEP_TASKS_PER_NODE": "8(x2)"}


def test_torchrun_and_deepspeed_launchers():
    env = detect(TORCHRUN)
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (
        "torchrun", 3, 4, 1, "node7", 29500)
    assert detect(DEEPSPEED).launcher == "deepspeed"
    plain = {k: DEEPSPEED[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    assert detect(plain).launcher == "environment"


def test_srun_step_reads_slurm_variables():
    env = detect(SRUN_STEP)
    assert (env.launcher, env.rank, env.world_size, env.local_rank) == ("slurm", 9, 16, 1)
    assert env.master_addr == "gpu007"  # the first node of the step
    assert env.master_port == SLURM_PORT_BASE + 1234
    exported = {}
    env.export(exported)
    assert exported == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu007",
                        "MASTER_PORT": str(SLURM_PORT_BASE + 1234)}
    given = detect({**SRUN_STEP, "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "12345"})  # the sbatch script's choice wins
    assert (given.master_addr, given.master_port) == ("10.0.0.7", 12345)
    big_id = detect({**SRUN_STEP, "SLURM_JOB_ID": "987654321"}).master_port
    assert SLURM_PORT_BASE <= big_id < 32768  # below the ephemeral range


def test_single_process():
    env = detect({})
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.master_addr) == ("single", 0, 1, 0, "127.0.0.1")
    assert 0 < env.master_port < 65536
    # the batch script of a one-task job may run the trainer directly
    assert detect({**BATCH_SHELL, "SLURM_NTASKS": "1"}).launcher == "single"


def test_openmpi():
    env = detect({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                  "MASTER_ADDR": "n1"})
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.master_addr) == ("openmpi", 5, 8, 1, "n1")
    with pytest.raises(LaunchEnvError, match="MASTER_ADDR"):
        detect({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0"})


@pytest.mark.parametrize("environ, message", [
    ({"RANK": "0", "WORLD_SIZE": "2"}, r"LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set"),
    ({k: v for k, v in TORCHRUN.items() if k != "MASTER_PORT"}, r"MASTER_PORT not set"),
    ({**TORCHRUN, "RANK": "4"}, r"RANK=4 is not in 0\.\.WORLD_SIZE-1"),
    ({**TORCHRUN, "LOCAL_RANK": "2"}, r"LOCAL_RANK=2 is impossible"),
    ({**TORCHRUN, "WORLD_SIZE": "four"}, r"WORLD_SIZE='four' is not a non-negative integer"),
    ({**TORCHRUN, "MASTER_PORT": "70000"}, r"MASTER_PORT=70000 is not a TCP port"),
    ({k: v for k, v in SRUN_STEP.items() if k != "SLURM_LOCALID"}, r"incomplete SLURM environment.*SLURM_LOCALID"),
    ({**SRUN_STEP, "SLURM_PROCID": "16"}, r"SLURM_PROCID=16 is not in 0\.\.SLURM_STEP_NUM_TASKS-1"),
    ({**BATCH_SHELL}, r"batch script of SLURM job 1234 \(SLURM_NTASKS=16\) but not in an srun step.*srun python"),
    ({**SRUN_STEP, "SLURM_STEP_NODELIST": "gpu[007", "SLURM_JOB_NODELIST": "gpu[007"}, r"cannot read the SLURM node"),
])
def test_partial_or_bad_environments_are_clear_errors(environ, message):
    with pytest.raises(LaunchEnvError, match=message):
        detect(environ)


def test_hand_set_ranks_must_agree_with_the_srun_step():
    agreeing = {**SRUN_STEP, "RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu007",
                "MASTER_PORT": "20000"}
    assert detect(agreeing).rank == 9
    with pytest.raises(LaunchEnvError, match=r"contradictory launcher environment: RANK=3 but SLURM_PROCID=9"):
        detect({**agreeing, "RANK": "3"})
    with pytest.raises(LaunchEnvError, match=r"RANK=7 but SLURM_PROCID=9; WORLD_SIZE=8 but SLURM_STEP_NUM_TASKS=16"):
        detect({**agreeing, "WORLD_SIZE": "8", "RANK": "7", "LOCAL_RANK": "1"})
    # one torchrun per node under `srun --ntasks-per-node=1`: SLURM counts launchers, torchrun counts ranks
    per_node = {**SRUN_STEP, "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0", **TORCHRUN}
    assert detect(per_node).rank == 3


@pytest.mark.parametrize("nodelist, first", [
    ("vm", "vm"), ("gpu[003-010,012],cpu1", "gpu003"), ("a,b[1-2]", "a"), ("n[7]", "n7"),
    ("rack[1-2]-n[01-04]", "rack1-n01"), ("node-[0009-0012]", "node-0009"), ("10.0.0.1", "10.0.0.1"),
])
def test_first_host_of_a_slurm_node_list(nodelist, first):
    assert first_host(nodelist) == first


@pytest.mark.parametrize("nodelist", ["", "x[", "a[]"])
def test_unreadable_node_lists(nodelist):
    with pytest.raises(LaunchEnvError, match="set MASTER_ADDR"):
        first_host(nodelist)


def test_trainer_refuses_a_partial_environment_in_one_line_before_any_work(assets, tmp_path):
    from train_runs import env as train_env, overrides

    env = {**train_env(), "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    run = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / "demo.yaml"),
                          *overrides(assets, tmp_path / "run")], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("error: incomplete launcher environment"), run.stderr[-2000:]
    assert "MASTER_ADDR, MASTER_PORT not set" in lines[0]
    assert not (tmp_path / "run").exists()
