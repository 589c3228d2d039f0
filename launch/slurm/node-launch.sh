#!/usr/bin/env bash
# One node's share of a training job: `accelerate launch` with this node's rank, forwarding SIGUSR1/SIGTERM to the
# training processes. The SLURM scripts run it once per node (under srun for several nodes); it can also be run by
# hand on every node. Arguments are those of trainer/main.py. Settings, from the environment:
#
#   ACCELERATE_CONFIG  accelerate config from launch/ (DDP or ZeRO)  default launch/gpu-ddp.yaml
#   NPROC_PER_NODE     training processes on this node               default: the GPUs Slurm gave this node, else 1
#   NUM_MACHINES       nodes in the job                              default $SLURM_NNODES, else 1
#   MACHINE_RANK       this node's rank                              default $SLURM_NODEID, else 0
#   MAIN_PROCESS_IP    address of node 0                             default 127.0.0.1 (the batch scripts set it)
#   MAIN_PROCESS_PORT  rendezvous port on node 0                     default 20000 + SLURM_JOB_ID % 20000, else 29500
#   RDZV_TIMEOUT       seconds to wait for all nodes to join         default 600
#   NETWORK_INTERFACE  interface for gloo/NCCL traffic (e.g. ib0)    default: let gloo/NCCL choose
#
# $SLURM_NODEID is read here, inside the srun'd task, so each node gets its own rank.
set -euo pipefail

die() { echo "node-launch: $*" >&2; exit 2; }

count_gpus() {
  if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
    echo "$SLURM_GPUS_ON_NODE"
  elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    nvidia-smi -L | wc -l
  else
    echo 1
  fi
}

ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-launch/gpu-ddp.yaml}
NPROC_PER_NODE=${NPROC_PER_NODE:-$(count_gpus)}
NUM_MACHINES=${NUM_MACHINES:-${SLURM_NNODES:-1}}
MACHINE_RANK=${MACHINE_RANK:-${SLURM_NODEID:-0}}
MAIN_PROCESS_IP=${MAIN_PROCESS_IP:-127.0.0.1}
MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-$((${SLURM_JOB_ID:-0} ? 20000 + ${SLURM_JOB_ID:-0} % 20000 : 29500))}
RDZV_TIMEOUT=${RDZV_TIMEOUT:-600}

[ -f "$ACCELERATE_CONFIG" ] || die "ACCELERATE_CONFIG=$ACCELERATE_CONFIG does not exist (run from the repository root)"
for var in NPROC_PER_NODE NUM_MACHINES MACHINE_RANK MAIN_PROCESS_PORT RDZV_TIMEOUT; do
  [[ ${!var} =~ ^[0-9]+$ ]] || die "$var=${!var} must be a non-negative integer"
done
[ "$NPROC_PER_NODE" -ge 1 ] && [ "$NUM_MACHINES" -ge 1 ] || die "NPROC_PER_NODE and NUM_MACHINES must be >= 1"
[ "$MACHINE_RANK" -lt "$NUM_MACHINES" ] || die "MACHINE_RANK=$MACHINE_RANK must be below NUM_MACHINES=$NUM_MACHINES"
getent ahosts "$MAIN_PROCESS_IP" >/dev/null || die "MAIN_PROCESS_IP=$MAIN_PROCESS_IP does not resolve to an address"
if [ -n "${NETWORK_INTERFACE:-}" ]; then
  [ -e "/sys/class/net/$NETWORK_INTERFACE" ] || die "NETWORK_INTERFACE=$NETWORK_INTERFACE is not an interface of $(hostname)"
  export GLOO_SOCKET_IFNAME=$NETWORK_INTERFACE NCCL_SOCKET_IFNAME=$NETWORK_INTERFACE
fi

launch=(
  accelerate launch --config_file "$ACCELERATE_CONFIG"
  --num_machines "$NUM_MACHINES" --machine_rank "$MACHINE_RANK"
  --num_processes $((NUM_MACHINES * NPROC_PER_NODE))
  --main_process_ip "$MAIN_PROCESS_IP" --main_process_port "$MAIN_PROCESS_PORT"
  --rdzv_conf "timeout=$RDZV_TIMEOUT"
  trainer/main.py "$@"
)
echo "node-launch: node $MACHINE_RANK/$NUM_MACHINES on $(hostname): ${launch[*]}"

# The launcher's children are the training processes; they checkpoint on SIGUSR1/SIGTERM. The launcher itself
# would die on SIGUSR1, so it is not signalled, and it starts with SIGUSR1 ignored: under srun, Slurm signals every
# process of the step, the launcher included (it died with 138 while its ranks were saving). The ranks inherit
# the ignored SIGUSR1 until the trainer installs its handler.
forward() { pkill "-$1" -P "$launcher" || true; }

# torch reports a failed rendezvous deep in a traceback; say in one line what went wrong.
explain() {
  local joined
  joined=$(grep -o '[0-9]*/[0-9]* clients joined' "$errors" | tail -n 1 || true)
  if [ -n "$joined" ]; then
    echo "node-launch: node $MACHINE_RANK: only ${joined% clients joined} nodes reached the rendezvous at" \
      "$MAIN_PROCESS_IP:$MAIN_PROCESS_PORT within RDZV_TIMEOUT=${RDZV_TIMEOUT}s; start all $NUM_MACHINES nodes with" \
      "the same NUM_MACHINES and MAIN_PROCESS_IP" >&2
  elif grep -qE 'client socket has (failed to connect|timed out)' "$errors"; then
    echo "node-launch: node $MACHINE_RANK: cannot reach the main process at $MAIN_PROCESS_IP:$MAIN_PROCESS_PORT" \
      "within RDZV_TIMEOUT=${RDZV_TIMEOUT}s; MAIN_PROCESS_IP must be node 0's address" >&2
  fi
}

errors=$(mktemp)
trap 'rm -f "$errors"' EXIT
exec {stderr_copy}> >(tee "$errors" >&2)
tee_pid=$!
(
  trap '' USR1
  exec "${launch[@]}"
) 2>&"$stderr_copy" &
launcher=$!
trap 'forward USR1' USR1
trap 'forward TERM' TERM
status=0
while true; do
  wait "$launcher" && status=0 || status=$?
  kill -0 "$launcher" 2>/dev/null || break # else wait was interrupted by a signal: keep waiting
done
exec {stderr_copy}>&-
wait "$tee_pid" || true
[ "$status" -eq 0 ] || explain
exit "$status"
