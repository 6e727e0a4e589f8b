# Sourced by stage1.sbatch / stage2.sbatch after common.sh: launch/train.py on every task, preemptible.
#   source train_job.sh DEFAULT_CONFIG [train.py arguments ...]
#
#   RUN_DIR       the run folder: checkpoints/, train_log.jsonl, tensorboard/ (default:
#                 $BLIP2_DS_ROOT/runs/<job name>-<job id>; a requeued job keeps its id, hence its folder)
#   DS_CONFIG     the DeepSpeed JSON (default ds_configs/zero2.json)
#   MAX_REQUEUES  how often the job may requeue itself (default 50): a run that fails the same way
#                 after every resume must not loop forever
RUN_DIR=${RUN_DIR:-$ROOT/runs/${SLURM_JOB_NAME:-job}-${SLURM_JOB_ID}}
export RUN_DIR
mkdir -p "$RUN_DIR"


REQUEUE_EXIT_CODE=75  # blip2_ds/train/loop.py: the trainer saved a checkpoint after a signal

# run_preemptible CMD...: runs CMD on every task (srun_tasks) so that a USR1/TERM sent to this batch shell (the
# `--signal=B:USR1@N` warning before the time limit, or `scancel --batch --signal=USR1`) reaches
# every task; the tasks finish their step, checkpoint and exit with 75, and the job is requeued (it
# then resumes from `latest`: the scripts pass --resume auto). Any other exit status is the job's.
run_preemptible() {
  local pid status seen signals=0
  # scancel --signal without --batch/--full signals the job's steps (the tasks), not this shell;
  # killing srun instead would turn into SIGKILL for the tasks.
  trap 'signals=$((signals + 1)); log "signal received: asking every task to checkpoint and stop";
        scancel --signal=USR1 "$SLURM_JOB_ID"' USR1 TERM
  srun_tasks "$@" &
  pid=$!
  while :; do
    seen=$signals
    status=0
    wait "$pid" || status=$?
    # A trap interrupts `wait` (status > 128) while srun still runs: wait again for its real status.
    [ "$signals" = "$seen" ] && break
  done
  trap - USR1 TERM
  if [ "$status" = "$REQUEUE_EXIT_CODE" ]; then
    if [ "${SLURM_RESTART_COUNT:-0}" -ge "${MAX_REQUEUES:-50}" ]; then
      log "the tasks checkpointed, but the job was already requeued ${SLURM_RESTART_COUNT} times (MAX_REQUEUES):" \
          "not requeueing; resubmit to continue from the checkpoint"
      return "$status"
    fi
    log "the tasks checkpointed (exit $status): requeueing; the job resumes from its latest checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  log "srun exited with $status"
  return "$status"
}

default_config=$1
shift
if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then
  # A requeued job continues from its own latest checkpoint: a --resume TAG given at submission (going back to
  # an earlier checkpoint) applied to the first start only, or every requeue would go back there again.
  args=()
  while [ $# -gt 0 ]; do
    case $1 in
      --resume) shift; [ $# -gt 0 ] && shift ;;
      --resume=*) shift ;;
      *) args+=("$1"); shift ;;
    esac
  done
  set -- ${args[@]+"${args[@]}"}
fi
config_args=()
case " $* " in
  *" --config "*|*" --config="*) ;;
  *) config_args=(--config "$default_config") ;;
esac
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
log "training in $RUN_DIR on $SLURM_JOB_NUM_NODES node(s), $SLURM_NTASKS task(s); rendezvous $MASTER_ADDR"
# output_dir comes first so that an output_dir=... argument still wins; --resume auto continues the
# run from its latest checkpoint after a requeue and starts fresh the first time.
run_preemptible python launch/train.py --ds "$DS_CONFIG" "${config_args[@]}" --resume auto \
  "output_dir=$RUN_DIR" "$@"
