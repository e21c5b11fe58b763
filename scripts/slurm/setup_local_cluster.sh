#!/bin/bash
# A one-node SLURM cluster on 127.0.0.1, to try the job files of this folder (and for tests/test_slurm.py).
#   sudo scripts/slurm/setup_local_cluster.sh          # install (Debian packages), configure, start
#   sinfo; sbatch ...; squeue
#   sudo scripts/slurm/setup_local_cluster.sh --stop   # stop the daemons this script started
# Needs root: it installs packages, writes /etc/slurm/slurm.conf and /etc/munge/munge.key (only when
# absent), and starts munged, slurmctld and slurmd in the background (no systemd needed).
# Choices that make SLURM work inside a container: proctrack/linuxproc (no cgroups), task/none (no CPU
# binding), select/cons_tres over this machine's CPUs, one partition `debug` holding the one node.
# Exits 0 when `sinfo` shows the node idle; otherwise prints why and exits non-zero.
set -euo pipefail

STATE=${KD_SLURM_STATE:-/var/tmp/kd-slurm}   # spool, state and logs of this cluster
# The node's name must resolve: Lightning's MASTER_ADDR is the first name of SLURM_NODELIST.
NODE=$(hostname -s)

stop_daemons() {
    for pidfile in "$STATE"/slurmd.pid "$STATE"/slurmctld.pid; do
        [[ -f $pidfile ]] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    for _ in $(seq 1 20); do
        pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || return 0
        sleep 0.5
    done
}
if [[ ${1:-} == --stop ]]; then
    stop_daemons
    exit 0
fi
if [[ $(id -u) != 0 ]]; then
    echo "setup_local_cluster.sh: must run as root (installs packages, starts daemons)" >&2
    exit 2
fi

if ! command -v slurmctld >/dev/null || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null \
        || { apt-get update >/dev/null && apt-get install -y --no-install-recommends \
            slurmctld slurmd slurm-client munge >/dev/null; } \
        || { echo "setup_local_cluster.sh: apt-get could not install SLURM" >&2; exit 3; }
fi

# munge: a key, then the daemon as the munge user (it refuses to run as root).
if [[ ! -s /etc/munge/munge.key ]]; then
    if command -v mungekey >/dev/null; then mungekey --create --force; else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge 2>/dev/null || true
chmod 0400 /etc/munge/munge.key
mkdir -p /run/munge && chown munge:munge /run/munge
if ! munge -n >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged --force
    sleep 1
fi
munge -n | unmunge >/dev/null

mkdir -p "$STATE"/ctld "$STATE"/d
# Not `nproc`: it honours OMP_NUM_THREADS, and a shell with OMP_NUM_THREADS=1 would declare a 1-CPU node
# on which no 2-task job can ever start.
CPUS=$(getconf _NPROCESSORS_ONLN)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512 ))
mkdir -p /etc/slurm
OLD_CONF=$(cat /etc/slurm/slurm.conf 2>/dev/null || true)
cat > /etc/slurm/slurm.conf <<EOF
# Written by kd-lightning scripts/slurm/setup_local_cluster.sh: one node on loopback.
ClusterName=kdlocal
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
SlurmctldTimeout=30
SlurmdTimeout=30
MinJobAge=600
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
# Debian's packages look for the file where they were built to (either location).
[[ -e /etc/slurm-llnl ]] || ln -s /etc/slurm /etc/slurm-llnl 2>/dev/null || true
# Daemons started from another configuration (say, another CPU count) would keep it: restart them.
if [[ $OLD_CONF != "$(cat /etc/slurm/slurm.conf)" ]]; then
    stop_daemons
fi

if ! scontrol ping 2>/dev/null | grep -q UP; then
    slurmctld -c   # -c: forget jobs of an earlier cluster in $STATE
fi
if ! pgrep -F "$STATE"/slurmd.pid >/dev/null 2>&1; then
    slurmd -N "$NODE"
fi
for _ in $(seq 1 30); do
    if sinfo -h -N -o '%T' 2>/dev/null | grep -Eq '^(idle|mixed|allocated)'; then
        sinfo
        exit 0
    fi
    scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
    sleep 1
done
echo "setup_local_cluster.sh: the node did not come up; logs in $STATE" >&2
sinfo >&2 || true
tail -n 20 "$STATE"/slurmctld.log "$STATE"/slurmd.log >&2 || true
exit 1
