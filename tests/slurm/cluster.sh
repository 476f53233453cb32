#!/usr/bin/env bash
# A real two-node SLURM cluster on this machine, for the launcher tests: Debian's slurmctld plus two
# slurmd daemons (node1, node2) on distinct localhost ports, munge authentication.
#   bash tests/slurm/cluster.sh start   # installs the packages if needed; prints the SLURM_CONF to export
#   bash tests/slurm/cluster.sh stop
# Needs root (it writes /etc/hosts and starts daemons). State lives in $GPTFORGE_SLURM_DIR.
set -euo pipefail
DIR=${GPTFORGE_SLURM_DIR:-/tmp/gptforge-slurm}
CONF=$DIR/slurm.conf
cmd=${1:-start}

stop() {
  for pidfile in "$DIR"/*.pid; do
    [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  sleep 1
}

if [ "$cmd" = stop ]; then stop; exit 0; fi
[ "$cmd" = start ] || { echo "usage: $0 start|stop" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "cluster.sh: needs root" >&2; exit 1; }

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v munged >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
fi
grep -qE '^127\.0\.0\.1\s.*\bnode1\b' /etc/hosts || echo "127.0.0.1 node1 node2" >> /etc/hosts

stop
mkdir -p "$DIR/ctld" "$DIR/node1" "$DIR/node2" "$DIR/munge"
chmod 755 "$DIR/munge"  # clients need to reach the socket; the key itself is 0400
[ -f "$DIR/munge/munge.key" ] || { dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none; chmod 400 "$DIR/munge/munge.key"; }
mkdir -p /run/munge
munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
  --pid-file="$DIR/munged.pid" --log-file="$DIR/munged.log" --seed-file="$DIR/munge/seed"

CPUS=$(nproc)
MEM=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 4 ))
cat > "$CONF" <<CONF
ClusterName=gptforge-test
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=16817
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
LaunchParameters=use_interactive_step
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
KillWait=30
NodeName=node1 NodeAddr=127.0.0.1 Port=17001 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
NodeName=node2 NodeAddr=127.0.0.1 Port=17002 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
export SLURM_CONF=$CONF
slurmctld -f "$CONF"
slurmd -f "$CONF" -N node1
slurmd -f "$CONF" -N node2
for _ in $(seq 60); do
  if [ "$(timeout 5 sinfo -h -N -o '%T' 2>/dev/null | grep -c '^idle' || true)" -ge 2 ]; then
    echo "SLURM_CONF=$CONF"
    exit 0
  fi
  sleep 1
done
echo "cluster.sh: the nodes did not come up; see $DIR/*.log" >&2
timeout 5 sinfo -N >&2 || true
exit 1
