#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine (controller + one compute daemon), for trying the
# sbatch scripts locally and for the test suite (tests/test_slurm.py). Needs root and Debian/Ubuntu.
#
#   bash launch/slurm/local_cluster.sh start DIR   install slurm + munge if missing, start the daemons
#   bash launch/slurm/local_cluster.sh stop DIR    stop them (by their pid files) and leave DIR's logs
#
# DIR holds slurm.conf, state, spool, logs and pid files; jobs then need SLURM_CONF=DIR/slurm.conf.
# CRED_EXPIRE (default 10 s, Slurm's default 120 s) is how long a requeued job waits before it restarts.
# No cgroups or systemd are needed (proctrack/linuxproc, task/none).
set -euo pipefail
action=${1:?usage: local_cluster.sh start|stop DIR}
dir=$(mkdir -p "${2:?usage: local_cluster.sh start|stop DIR}" && cd "$2" && pwd)

MUNGE_PID=/run/munge/munged.pid

stop() {
  for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$MUNGE_PID"; do
    if [ -s "$pidfile" ]; then
      pid=$(cat "$pidfile")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$pidfile"
    fi
  done
}

if [ "$action" = stop ]; then stop; exit 0; fi
[ "$action" = start ] || { echo "error: unknown action '$action' (start|stop)" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "error: starting a local SLURM cluster needs root" >&2; exit 3; }

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  packages="slurmctld slurmd slurm-client munge"
  apt-get install -y -q --no-install-recommends $packages >"$dir/apt.log" 2>&1 \
    || { apt-get update -q >>"$dir/apt.log" 2>&1 && apt-get install -y -q --no-install-recommends $packages >>"$dir/apt.log" 2>&1; } \
    || { echo "error: could not install $packages (see $dir/apt.log)" >&2; exit 3; }
fi

host=$(hostname -s)
getent hosts "$host" >/dev/null || echo "127.0.0.1 $host" >> /etc/hosts

# munge: its key must belong to the munge user, mode 400, and munged must run as that user.
mkdir -p /run/munge /etc/munge && chown munge:munge /run/munge
[ -s /etc/munge/munge.key ] || mungekey --create --keyfile /etc/munge/munge.key >/dev/null 2>&1 \
  || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
stop  # a previous start in the same DIR
mkdir -p "$dir/state" "$dir/spool" "$dir/log"
# munged runs as the munge user, which may not reach DIR (pytest's folders are mode 700): its pid
# and log files live beside its socket in /run/munge (one munged per machine anyway).
runuser -u munge -- /usr/sbin/munged --pid-file="$MUNGE_PID" --socket=/run/munge/munge.socket.2 \
  --log-file=/run/munge/munged.log
for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
munge -n | unmunge >/dev/null || { echo "error: munged did not start (see /run/munge/munged.log)" >&2; exit 3; }

cat > "$dir/slurm.conf" <<CONF
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits out the credential lifetime before it may start again (default 120 s).
AuthInfo=cred_expire=${CRED_EXPIRE:-10}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
KillWait=30
NodeName=$host CPUs=$(nproc) RealMemory=1000 State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$dir/slurm.conf"
slurmctld -f "$SLURM_CONF" -i
slurmd -f "$SLURM_CONF"
for _ in $(seq 100); do
  scontrol show node "$host" 2>/dev/null | grep -q "State=IDLE" && { echo "$SLURM_CONF"; exit 0; }
  sleep 0.2
done
echo "error: the SLURM node did not become IDLE (see $dir/log/)" >&2
scontrol show node "$host" >&2 || true
exit 3
