#!/usr/bin/env bash
# A one-machine Slurm cluster (munge + slurmctld + slurmd) for trying the launch/slurm/ scripts without a cluster.
#
#   sudo launch/local-slurm.sh start    # installs the Debian packages if missing, starts the daemons
#   eval "$(launch/local-slurm.sh env)" # SLURM_CONF for sbatch/squeue/scancel in this shell
#   sudo launch/local-slurm.sh stop     # stops the daemons and deletes the state directory
#
# Everything (config, state, spool, logs) lives in LOCAL_SLURM_DIR (default /tmp/cyclegan-local-slurm); nothing under
# /etc is changed. One node, "localhost", with all CPUs of this machine, in one partition "local".
set -euo pipefail

DIR=${LOCAL_SLURM_DIR:-/tmp/cyclegan-local-slurm}
CONF=$DIR/slurm.conf

die() { echo "local-slurm: $*" >&2; exit 1; }

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null &&
    command -v munged >/dev/null && return
  command -v apt-get >/dev/null || die "slurmctld/slurmd/munge are missing and apt-get is not available to install them"
  echo "local-slurm: installing slurmctld slurmd slurm-client munge (Debian packages)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
}

write_conf() {
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
  cat >"$CONF" <<EOF
ClusterName=local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
MinJobAge=3600
KillWait=60
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=localhost CPUs=$(nproc) State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  if pgrep -x munged >/dev/null; then return; fi
  [ -s /etc/munge/munge.key ] || die "/etc/munge/munge.key is missing (reinstall the munge package)"
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge/munge.key
  chmod 0755 /run/munge
  chmod 0400 /etc/munge/munge.key
  runuser -u munge -- munged
}

wait_for_node() {
  for _ in $(seq 1 60); do
    if SLURM_CONF=$CONF sinfo -h -N -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then return; fi
    sleep 0.5
  done
  die "slurmd did not register with slurmctld within 30 s; see $DIR/log/slurmctld.log and $DIR/log/slurmd.log"
}

start() {
  [ "$(id -u)" -eq 0 ] || die "start needs root (it starts munged, slurmctld and slurmd)"
  install_packages
  if [ -f "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
    echo "local-slurm: already running (SLURM_CONF=$CONF)"
    return
  fi
  write_conf
  start_munge
  SLURM_CONF=$CONF slurmctld -i
  SLURM_CONF=$CONF slurmd -N localhost
  wait_for_node
  echo "local-slurm: running; use it with: export SLURM_CONF=$CONF"
}

stop() {
  for daemon in slurmd slurmctld; do
    if [ -f "$DIR/$daemon.pid" ]; then
      kill "$(cat "$DIR/$daemon.pid")" 2>/dev/null || true
    fi
  done
  for _ in $(seq 1 20); do
    pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || break
    sleep 0.5
  done
  pkill -x slurmd 2>/dev/null || true
  pkill -x slurmctld 2>/dev/null || true
  rm -rf "$DIR"
  echo "local-slurm: stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) die "usage: $0 start|stop|env" ;;
esac
