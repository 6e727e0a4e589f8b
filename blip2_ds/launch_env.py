"""Which launcher started this process, and its rank, world size, local rank and rendezvous address.

One reading of the environment for the trainer and the evaluation CLI, before any process group:

============  ==========================================================================================
launcher      recognised by / read from
============  ==========================================================================================
deepspeed     ``RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT`` (+ ``CROSS_RANK``, its marker);
              also its hostfile launcher and ``--no_ssh --node_rank`` (one launcher per node)
torchrun      the same five (+ ``TORCHELASTIC_RUN_ID``, its marker, and ``LOCAL_WORLD_SIZE``)
environment   the same five set by hand or by another launcher
slurm         an ``srun`` step (``SLURM_STEP_ID``): ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``,
              ``SLURM_LOCALID``; ``MASTER_ADDR`` from the environment or the first host of
              ``SLURM_STEP_NODELIST``; ``MASTER_PORT`` from the environment or derived from the job id
openmpi       ``OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK`` (``mpirun``, DeepSpeed's openmpi launcher) with
              ``MASTER_ADDR`` (and optionally ``MASTER_PORT``)
single        none of these: one process on a free local port
============  ==========================================================================================

A partial set (``RANK`` without ``MASTER_PORT``, a SLURM step without ``SLURM_LOCALID``) or a
contradictory one (``RANK`` set by hand inside an ``srun`` step to something else than
``SLURM_PROCID``) raises :class:`LaunchEnvError` naming the variables and the fix. So does a plain
``python launch/train.py`` in the batch script of a multi-task SLURM job: without ``srun`` it would
silently train on one of the allocated GPUs.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping

TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""What torch.distributed's env:// rendezvous and DeepSpeed's engine read."""

SLURM_PORT_BASE, SLURM_PORT_SPAN = 15000, 15000
"""A SLURM job's default port: BASE + job id mod SPAN, below Linux's ephemeral range (32768+), the
same on every node of the job and again after a requeue (the job id stays)."""


class LaunchEnvError(ValueError):
    """The launcher's variables are incomplete or contradict each other; the message says which and what to do."""


@dataclass(frozen=True)
class LaunchEnv:
    """One process's place in the job."""

    launcher: str
    """deepspeed, torchrun, environment, slurm, openmpi or single (see the module docstring)."""
    rank: int
    """Global rank, 0 .. world_size-1."""
    world_size: int
    """Number of processes (one per GPU) in the job."""
    local_rank: int
    """Rank among the processes of this node; picks the GPU when each task sees all of the node's GPUs."""
    master_addr: str
    """Host of rank 0, where the rendezvous store listens."""
    master_port: int
    """Port of the rendezvous store."""

    def export(self, environ: os._Environ | dict = os.environ) -> None:
        """Set the five variables torch's env:// rendezvous and DeepSpeed's engine read."""
        environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(self.local_rank),
                       MASTER_ADDR=self.master_addr, MASTER_PORT=str(self.master_port))


def detect(environ: Mapping[str, str] = os.environ) -> LaunchEnv:
    """Read the launcher's variables (see the module docstring); raises :class:`LaunchEnvError`."""
    present = [name for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if environ.get(name)]
    if present:
        return _from_torch_vars(environ)
    if environ.get("SLURM_STEP_ID") is not None and environ.get("SLURM_PROCID") is not None:
        return _from_slurm_step(environ)
    if environ.get("OMPI_COMM_WORLD_RANK") is not None:
        return _from_openmpi(environ)
    tasks = environ.get("SLURM_NTASKS")
    if environ.get("SLURM_JOB_ID") and tasks and tasks.isdigit() and int(tasks) > 1:
        raise LaunchEnvError(
            f"this process runs in the batch script of SLURM job {environ['SLURM_JOB_ID']} (SLURM_NTASKS={tasks}) but "
            f"not in an srun step, so it would be 1 process instead of {tasks}. Start it with `srun python ...` "
            f"(one task per GPU; see launch/slurm/), or through a launcher per node (deepspeed/torchrun).")
    port = _port(environ, "MASTER_PORT") if environ.get("MASTER_PORT") else _free_port()
    return LaunchEnv("single", 0, 1, 0, environ.get("MASTER_ADDR") or "127.0.0.1", port)


def _launcher_name(environ: Mapping[str, str]) -> str:
    if environ.get("TORCHELASTIC_RUN_ID") is not None:
        return "torchrun"
    if environ.get("CROSS_RANK") is not None:
        return "deepspeed"
    return "environment"


def _from_torch_vars(environ: Mapping[str, str]) -> LaunchEnv:
    launcher = _launcher_name(environ)
    missing = [name for name in TORCH_VARS if not environ.get(name)]
    if missing:
        given = ", ".join(f"{n}={environ[n]}" for n in TORCH_VARS if environ.get(n))
        raise LaunchEnvError(
            f"incomplete launcher environment: {given} but {', '.join(missing)} not set. Launch through deepspeed, "
            f"torchrun or srun (which set all of {', '.join(TORCH_VARS)}), set the missing ones, or unset "
            f"RANK/WORLD_SIZE/LOCAL_RANK to run a single process.")
    rank, world, local = (_int(environ, n) for n in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    local_world = _int(environ, "LOCAL_WORLD_SIZE") if environ.get("LOCAL_WORLD_SIZE") else world
    _check_ranks(rank, world, local, local_world, "RANK", "WORLD_SIZE", "LOCAL_RANK")
    if launcher == "environment" and environ.get("SLURM_STEP_ID") is not None:
        _check_against_slurm(environ, rank, world, local)
    return LaunchEnv(launcher, rank, world, local, environ["MASTER_ADDR"], _port(environ, "MASTER_PORT"))


def _check_against_slurm(environ: Mapping[str, str], rank: int, world: int, local: int) -> None:
    """RANK & co. set by hand inside an srun step must describe the same task as SLURM's own variables.

    (Launchers started by srun, one per node, set their own markers and are not checked: there
    SLURM's variables count launchers, not ranks.)
    """
    pairs = (("RANK", rank, "SLURM_PROCID"), ("WORLD_SIZE", world, "SLURM_STEP_NUM_TASKS"),
             ("LOCAL_RANK", local, "SLURM_LOCALID"))
    clashes = [f"{name}={value} but {slurm_name}={environ[slurm_name]}" for name, value, slurm_name in pairs
               if (environ.get(slurm_name) or "").isdigit() and int(environ[slurm_name]) != value]
    if clashes:
        raise LaunchEnvError(
            f"contradictory launcher environment: {'; '.join(clashes)} in this srun step. Do not export "
            f"RANK/WORLD_SIZE/LOCAL_RANK in the sbatch script (the trainer reads SLURM's own), or start one "
            f"deepspeed/torchrun launcher per node with `srun --ntasks-per-node=1`.")


def _from_slurm_step(environ: Mapping[str, str]) -> LaunchEnv:
    world_name = "SLURM_STEP_NUM_TASKS" if environ.get("SLURM_STEP_NUM_TASKS") else "SLURM_NTASKS"
    missing = [n for n in ("SLURM_PROCID", world_name, "SLURM_LOCALID", "SLURM_JOB_ID") if not environ.get(n)]
    if not environ.get("MASTER_ADDR") and not (environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")):
        missing.append("SLURM_STEP_NODELIST (or MASTER_ADDR)")
    if missing:
        raise LaunchEnvError(
            f"incomplete SLURM environment: this is an srun step (SLURM_STEP_ID={environ['SLURM_STEP_ID']}) but "
            f"{', '.join(missing)} not set. Run the trainer as the task of `srun` itself (not through a wrapper that "
            f"filters the environment), or set {', '.join(TORCH_VARS)} yourself.")
    rank, world, local = (_int(environ, n) for n in ("SLURM_PROCID", world_name, "SLURM_LOCALID"))
    _check_ranks(rank, world, local, world, "SLURM_PROCID", world_name, "SLURM_LOCALID")
    addr = environ.get("MASTER_ADDR") or first_host(environ.get("SLURM_STEP_NODELIST") or environ["SLURM_JOB_NODELIST"])
    if environ.get("MASTER_PORT"):
        port = _port(environ, "MASTER_PORT")
    else:
        port = SLURM_PORT_BASE + _int(environ, "SLURM_JOB_ID") % SLURM_PORT_SPAN
    return LaunchEnv("slurm", rank, world, local, addr, port)


def _from_openmpi(environ: Mapping[str, str]) -> LaunchEnv:
    names = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "MASTER_ADDR")
    missing = [n for n in names if not environ.get(n)]
    if missing:
        raise LaunchEnvError(
            f"incomplete Open MPI environment: {', '.join(missing)} not set. Pass the address of rank 0's host "
            f"with `mpirun -x MASTER_ADDR=... -x MASTER_PORT=...`.")
    rank, world, local = (_int(environ, n) for n in names[:3])
    _check_ranks(rank, world, local, world, *names[:3])
    port = _port(environ, "MASTER_PORT") if environ.get("MASTER_PORT") else 29500
    return LaunchEnv("openmpi", rank, world, local, environ["MASTER_ADDR"], port)


def _check_ranks(rank: int, world: int, local: int, local_world: int, rank_name: str, world_name: str,
                 local_name: str) -> None:
    if world < 1 or not 0 <= rank < world:
        raise LaunchEnvError(f"{rank_name}={rank} is not in 0..{world_name}-1 ({world_name}={world}).")
    if not 0 <= local < max(local_world, 1) or local > rank:
        raise LaunchEnvError(f"{local_name}={local} is impossible for {rank_name}={rank} of {world_name}={world}.")


def _int(environ: Mapping[str, str], name: str) -> int:
    value = environ[name].strip()
    if not re.fullmatch(r"\d+", value):
        raise LaunchEnvError(f"{name}={environ[name]!r} is not a non-negative integer.")
    return int(value)


def _port(environ: Mapping[str, str], name: str) -> int:
    port = _int(environ, name)
    if not 1 <= port <= 65535:
        raise LaunchEnvError(f"{name}={port} is not a TCP port (1..65535).")
    return port


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list: ``gpu[003-010,012],cpu1`` -> ``gpu003``,
    ``rack[1-2]-n[01-04]`` -> ``rack1-n01`` (zero padding kept; what ``scontrol show hostnames`` lists first)."""
    text, depth, end = nodelist.strip(), 0, None
    for index, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            break
        if char == "," and depth == 0:
            end = index
            break
    head = text[:end]
    host = re.sub(r"\[(\d+)[^\]]*\]", r"\1", head)
    if not host or depth not in (0, 1) or re.search(r"[\[\],\s]", host):
        raise LaunchEnvError(f"cannot read the SLURM node list {nodelist!r}; set MASTER_ADDR to rank 0's host.")
    return host
