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
#   MIN_NODES          elastic: keep training while at least this many nodes are up       default NUM_MACHINES
#   MAX_RESTARTS       elastic: worker-group restarts after failures before giving up      default 3
#   LAST_CALL_TIMEOUT  elastic: once MIN_NODES have joined, seconds to wait for the others default 30
#
# $SLURM_NODEID is read here, inside the srun'd task, so each node gets its own rank.
#
# Elastic mode (MIN_NODES < NUM_MACHINES) launches with torchrun instead of accelerate launch, because accelerate
# launch passes only a fixed node count to torchrun: `torchrun --nnodes MIN_NODES:NUM_MACHINES --rdzv-backend c10d`
# with the rendezvous on node 0. When a node dies, the other nodes' workers fail their next collective, their agents
# restart them (up to MAX_RESTARTS times) with the nodes still up, and the trainer resumes from the newest intact
# checkpoint on the smaller world size; a node that comes back makes the agents restart the workers again at the
# next monitor tick (the trainer takes the SIGTERM as a preemption: it checkpoints first), and the job grows back.
# Node ranks are assigned by the rendezvous, so MACHINE_RANK is not used; node 0 hosts the rendezvous and must stay
# up. The backend comes from the training config (distributed.backend), not from ACCELERATE_CONFIG.
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
MIN_NODES=${MIN_NODES:-$NUM_MACHINES}
MAX_RESTARTS=${MAX_RESTARTS:-3}
LAST_CALL_TIMEOUT=${LAST_CALL_TIMEOUT:-30}

[ -f "$ACCELERATE_CONFIG" ] || die "ACCELERATE_CONFIG=$ACCELERATE_CONFIG does not exist (run from the repository root)"
for var in NPROC_PER_NODE NUM_MACHINES MACHINE_RANK MAIN_PROCESS_PORT RDZV_TIMEOUT MIN_NODES MAX_RESTARTS LAST_CALL_TIMEOUT; do
  [[ ${!var} =~ ^[0-9]+$ ]] || die "$var=${!var} must be a non-negative integer"
done
[ "$NPROC_PER_NODE" -ge 1 ] && [ "$NUM_MACHINES" -ge 1 ] || die "NPROC_PER_NODE and NUM_MACHINES must be >= 1"
[ "$MACHINE_RANK" -lt "$NUM_MACHINES" ] || die "MACHINE_RANK=$MACHINE_RANK must be below NUM_MACHINES=$NUM_MACHINES"
[ "$MIN_NODES" -ge 1 ] && [ "$MIN_NODES" -le "$NUM_MACHINES" ] || die "MIN_NODES=$MIN_NODES must be between 1 and NUM_MACHINES=$NUM_MACHINES"
elastic=$([ "$MIN_NODES" -lt "$NUM_MACHINES" ] && echo 1 || echo 0)
if [ "$elastic" = 1 ] && grep -qE '^distributed_type: *(DEEPSPEED|FSDP)' "$ACCELERATE_CONFIG"; then
  die "elastic mode (MIN_NODES=$MIN_NODES) launches with torchrun, which does not read ACCELERATE_CONFIG=$ACCELERATE_CONFIG; use a DDP config and choose the backend with distributed.backend=deepspeed or fsdp2 in the training config"
fi
getent ahosts "$MAIN_PROCESS_IP" >/dev/null || die "MAIN_PROCESS_IP=$MAIN_PROCESS_IP does not resolve to an address"
if [ -n "${NETWORK_INTERFACE:-}" ]; then
  [ -e "/sys/class/net/$NETWORK_INTERFACE" ] || die "NETWORK_INTERFACE=$NETWORK_INTERFACE is not an interface of $(hostname)"
  export GLOO_SOCKET_IFNAME=$NETWORK_INTERFACE NCCL_SOCKET_IFNAME=$NETWORK_INTERFACE
fi

if [ "$elastic" = 1 ]; then
  # Node 0 hosts the rendezvous store; torch would decide by matching MAIN_PROCESS_IP to the host's name, which
  # fails where the name resolves to another interface.
  is_host=$([ "$MACHINE_RANK" = 0 ] && echo true || echo false)
  # The workers find rank 0 at its node's address, which torch takes from the host name unless told: with
  # NETWORK_INTERFACE, the address of that interface.
  local_addr=()
  if [ -n "${NETWORK_INTERFACE:-}" ]; then
    address=$(ip -4 -o addr show dev "$NETWORK_INTERFACE" | awk 'NR == 1 { split($4, a, "/"); print a[1] }')
    [ -n "$address" ] || die "NETWORK_INTERFACE=$NETWORK_INTERFACE has no IPv4 address"
    local_addr=(--local-addr "$address")
  fi
  # torch 2.13 shares the rendezvous store with the workers and keeps its address from the first round; a node
  # that joins later then waits for keys of its round that nobody writes. Without sharing, each round publishes
  # rank 0's address afresh (the workers start their own store).
  export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
  launch=(
    torchrun --nnodes "$MIN_NODES:$NUM_MACHINES" --nproc-per-node "$NPROC_PER_NODE"
    --rdzv-backend c10d --rdzv-endpoint "$MAIN_PROCESS_IP:$MAIN_PROCESS_PORT" --rdzv-id "${SLURM_JOB_ID:-cyclegan}"
    --rdzv-conf "join_timeout=$RDZV_TIMEOUT,last_call_timeout=$LAST_CALL_TIMEOUT,is_host=$is_host"
    --max-restarts "$MAX_RESTARTS" --monitor-interval 1 ${local_addr[@]+"${local_addr[@]}"}
    trainer/main.py "$@"
  )
  echo "node-launch: elastic node ($MIN_NODES to $NUM_MACHINES nodes) on $(hostname): ${launch[*]}"
else
  launch=(
    accelerate launch --config_file "$ACCELERATE_CONFIG"
    --num_machines "$NUM_MACHINES" --machine_rank "$MACHINE_RANK"
    --num_processes $((NUM_MACHINES * NPROC_PER_NODE))
    --main_process_ip "$MAIN_PROCESS_IP" --main_process_port "$MAIN_PROCESS_PORT"
    --rdzv_conf "timeout=$RDZV_TIMEOUT"
    trainer/main.py "$@"
  )
  echo "node-launch: node $MACHINE_RANK/$NUM_MACHINES on $(hostname): ${launch[*]}"
fi

# The launcher's children are the training processes; they checkpoint on SIGUSR1/SIGTERM. The launcher itself
# would die on SIGUSR1, so it is not signalled, and it starts with SIGUSR1 ignored: under srun, Slurm signals every
# process of the step, the launcher included (it died with 138 while its ranks were saving). The ranks inherit
# the ignored SIGUSR1 until the trainer installs its handler.
# In elastic mode the agent itself gets SIGTERM: it stops its workers with SIGTERM (the trainer checkpoints; the
# agent allows 30 s before SIGKILL) and ends, where a worker that exits after a checkpoint would be restarted.
forward() {
  if [ "$elastic" = 1 ]; then
    kill -TERM "$launcher" 2>/dev/null || true
  else
    pkill "-$1" -P "$launcher" || true
  fi
}

# torch reports a failed rendezvous deep in a traceback; say in one line what went wrong.
explain() {
  local joined
  joined=$(grep -o '[0-9]*/[0-9]* clients joined' "$errors" | tail -n 1 || true)
  if [ -n "$joined" ]; then
    echo "node-launch: node $MACHINE_RANK: only ${joined% clients joined} nodes reached the rendezvous at" \
      "$MAIN_PROCESS_IP:$MAIN_PROCESS_PORT within RDZV_TIMEOUT=${RDZV_TIMEOUT}s; start all $NUM_MACHINES nodes with" \
      "the same NUM_MACHINES and MAIN_PROCESS_IP" >&2
  elif grep -q 'RendezvousTimeoutError' "$errors"; then
    echo "node-launch: fewer than MIN_NODES=$MIN_NODES nodes reached the elastic rendezvous at" \
      "$MAIN_PROCESS_IP:$MAIN_PROCESS_PORT within RDZV_TIMEOUT=${RDZV_TIMEOUT}s" >&2
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
