#!/usr/bin/env bash
# Runs one training attempt of a Slurm batch job and requeues the job when the training was preempted:
#
#   launch/slurm/preemptible.sh LAUNCHER... -- TRAINER_ARGS...
#   e.g. launch/slurm/preemptible.sh srun --ntasks-per-node=1 launch/slurm/node-launch.sh -- --config configs/x.yaml
#
# The batch scripts exec it, so it receives the batch shell's signals: SIGUSR1 (from --signal=B:USR1@T or
# `scancel --signal=USR1 --batch`) and SIGTERM are passed to LAUNCHER, whose training processes save a checkpoint,
# write RUN_DIR/PREEMPTED and exit. Then `scontrol requeue` puts the job back in the queue; the next attempt
# (SLURM_RESTART_COUNT + 1) resumes from that checkpoint in the same run directory and the same W&B run.
# A rank whose watchdog found the training hung (train.hang_timeout_s) wrote RUN_DIR/HUNG and its stacks under
# RUN_DIR/diagnostics/: the job is requeued the same way (Slurm's MaxBatchRequeue bounds a job that always hangs).
# The flight recorder of torch's collectives (on by default, trainer.runtime.watchdog) is dumped there too: by the
# watchdog with its stacks, and on GPUs by NCCL's own watchdog when a collective times out.
# Each attempt's output also goes to RUN_DIR/logs/slurm-JOBID-restartN.log.
set -euo pipefail

die() { echo "preemptible: $*" >&2; exit 2; }

launcher=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do launcher+=("$1"); shift; done
[ $# -gt 0 ] && [ ${#launcher[@]} -gt 0 ] || die "usage: $0 LAUNCHER... -- TRAINER_ARGS..."
shift
args=("$@")
restart=${SLURM_RESTART_COUNT:-0}
if [ "$restart" -gt 0 ]; then
  args+=(train.resume=auto) # a requeued attempt always continues the run, whatever the first one was told
fi
run_dir=$(python -m trainer.config --get train.run_dir "${args[@]}") || die "cannot read train.run_dir from: ${args[*]}"
mkdir -p "$run_dir/logs" "$run_dir/diagnostics"
rm -f "$run_dir/HUNG" # an earlier attempt's: only this attempt's hang requeues it
export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
export TORCH_NCCL_DEBUG_INFO_TEMP_FILE=${TORCH_NCCL_DEBUG_INFO_TEMP_FILE:-$run_dir/diagnostics/nccl-trace-rank}
log="$run_dir/logs/slurm-${SLURM_JOB_ID:-0}-restart$restart.log"
echo "preemptible: job ${SLURM_JOB_ID:-?} attempt $restart on $(hostname) at $(date -Is); run $run_dir; log $log"

signalled=""
on_signal() {
  signalled=$1
  echo "preemptible: SIG$1 received; asking the training to save a checkpoint and stop"
  kill "-$1" "$child" 2>/dev/null || true
}
"${launcher[@]}" "${args[@]}" > >(tee -a "$log") 2>&1 &
child=$!
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM
status=0
while true; do
  wait "$child" && status=0 || status=$?
  kill -0 "$child" 2>/dev/null || break # else wait was interrupted by a signal: keep waiting
done

if [ -f "$run_dir/HUNG" ]; then
  echo "preemptible: the training hung ($(head -c 300 "$run_dir/HUNG")); stacks in $run_dir/diagnostics;" \
    "requeueing job ${SLURM_JOB_ID:-?}" | tee -a "$log"
  scontrol requeue "${SLURM_JOB_ID:?not inside a Slurm job}"
  exit 0
fi
if [ -f "$run_dir/PREEMPTED" ] || { [ -n "$signalled" ] && [ "$status" -ne 0 ]; }; then
  step=$(cat "$run_dir/PREEMPTED" 2>/dev/null || echo "none saved")
  echo "preemptible: preempted at step $step; requeueing job ${SLURM_JOB_ID:-?}" | tee -a "$log"
  scontrol requeue "${SLURM_JOB_ID:?not inside a Slurm job}"
  exit 0
fi
echo "preemptible: training exited with status $status" | tee -a "$log"
exit "$status"
