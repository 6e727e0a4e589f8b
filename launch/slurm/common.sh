# Sourced by the sbatch scripts in this folder: the job's environment, and a preemption-safe srun.
#
# Where things go (override by exporting them before sbatch; sbatch passes the environment on):
#   BLIP2_DS_ROOT  the repository (default: the folder sbatch was run from, SLURM_SUBMIT_DIR)
#   BLIP2_DS_VENV  the Python environment to activate (default: $BLIP2_DS_ROOT/.venv if it exists,
#                  else whatever `python` is on PATH: a conda env or module loaded before sbatch)
# The job's own output (all ranks, each line prefixed with its rank by srun --label) goes to the
# file the script's `#SBATCH --output` names.
set -euo pipefail

ROOT=${BLIP2_DS_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
if [ ! -f "$ROOT/launch/train.py" ]; then
  echo "error: $ROOT is not the blip2_ds repository (no launch/train.py): submit from the repository root or" \
       "export BLIP2_DS_ROOT=/path/to/blip2_ds" >&2
  exit 2
fi
cd "$ROOT"
venv=${BLIP2_DS_VENV:-$ROOT/.venv}
if [ -x "$venv/bin/python" ]; then
  export PATH="$venv/bin:$PATH"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# Nothing is fetched from a model hub on compute nodes.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

# Rendezvous: rank 0 runs on the first node of the job. The port is derived from the job id by the
# trainer (blip2_ds/launch_env.py), so it is the same on every node and again after a requeue;
# RANK/WORLD_SIZE/LOCAL_RANK are read from SLURM_PROCID/SLURM_STEP_NUM_TASKS/SLURM_LOCALID there
# too (do not export them here: srun sets the per-task values).
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
# One process per GPU, each with its share of the node's cores for the data workers and the CPU ops.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
# Since Slurm 22.05 srun no longer inherits the batch's --cpus-per-task: without this every task would get
# one core for itself and all its data workers.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-$SLURM_CPUS_PER_TASK}; fi
# NCCL: report errors instead of hanging on a dead peer; keep the log quiet unless asked.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

# srun_tasks CMD...: CMD on every task of the job, each output line prefixed with its rank.
# Not --kill-on-bad-exit: the first rank to exit 75 (checkpointed, requeue) would get the others
# killed mid-exit and the status would read 143 instead of 75 (seen on Slurm 22.05). Instead,
# --wait gives the other tasks SRUN_WAIT seconds (default 600) once one has ended: long enough for
# ranks still writing their checkpoint, short enough that a crashed rank does not leave the others
# waiting in a collective until the communication timeout.
srun_tasks() { srun --wait="${SRUN_WAIT:-600}" --label "$@"; }

log() { echo "[slurm $(date '+%F %T')] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $*"; }

