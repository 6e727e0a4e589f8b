"""Multi-node without SLURM: one launcher per node (no ssh), here two "nodes" on one machine over loopback.

Each launcher runs 1 rank; together they must train exactly like one node with 2 ranks (the
``reference_run`` fixture: the deepspeed launcher with --num_gpus 2), step for step.
"""
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from train_runs import DEEPSPEED, env, free_port, losses, overrides

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def launcher_command(launcher: str, node_rank: int, port: int, hostfile: Path) -> list[str]:
    if launcher == "deepspeed":
        # the hostfile names the nodes and their slots; --no_ssh: this launcher starts only its own node's ranks
        return [DEEPSPEED, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node_rank),
                "--master_addr", "127.0.0.1", "--master_port", str(port)]
    return [TORCHRUN, "--nnodes", "2", "--node_rank", str(node_rank), "--nproc_per_node", "1",
            "--master_addr", "127.0.0.1", "--master_port", str(port)]


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_two_single_rank_nodes_train_like_one_node_with_two_ranks(assets, reference_run, tmp_path, launcher):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    output, port = tmp_path / "run", free_port()
    train = [str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / "demo.yaml"),
             *overrides(assets, output)]
    nodes = [subprocess.Popen([*launcher_command(launcher, rank, port, hostfile), *train], cwd=ROOT, env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for rank in (0, 1)]
    results = [node.communicate(timeout=600) for node in nodes]
    for node, (text, _) in zip(nodes, results):
        assert node.returncode == 0, text[-4000:]
    assert "step 30/30" in results[0][0]  # node 0 holds rank 0, which logs
    assert (output / "checkpoints" / "step_00000030" / "rank_00001.json").is_file()  # rank 1 saved from node 1
    assert losses(output) == losses(reference_run)
