#!/usr/bin/env bash
# Start a one-node local Slurm for the test suite (Debian's slurm-wlm + munge).
#
# Idempotent: when a controller already answers (`scontrol ping`) and its node is up it does nothing;
# otherwise it installs what is missing, writes the configuration, and starts only the daemons that
# are not running.
# The PIDs of the daemons it started go to $SLIDEMIL_SLURM_STATE/pids so that stop_slurm.sh stops
# only those. Quiet on success; on failure it prints the reason (and the relevant log) and exits 1.
#
# Environment:
#   SLIDEMIL_SLURM_STATE   state folder (default /var/lib/slidemil-slurm)
#   SLIDEMIL_SLURM_TIMEOUT seconds to wait for the node to become idle (default 60)
#   SLIDEMIL_SLURM_FORCE=1 overwrite a slurm.conf that this script did not write
set -u -o pipefail

STATE=${SLIDEMIL_SLURM_STATE:-/var/lib/slidemil-slurm}
TIMEOUT=${SLIDEMIL_SLURM_TIMEOUT:-60}
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
MARKER="# written by slidemil tests/slurm/start_slurm.sh"
PARTITION=debug

die() {
    echo "start_slurm.sh: $*" >&2
    exit 1
}

show_log() { # show the tail of a log file on stderr
    [ -r "$1" ] && { echo "--- last lines of $1:" >&2; tail -n 20 "$1" >&2; }
    return 0
}

node_state() { sinfo -h -N -o '%T' 2>/dev/null | head -n 1; }

# Already up (this script's earlier run, or a real Slurm): nothing to do.
# (`scontrol ping` answers at once; sinfo retries a silent controller for ~10 s)
if command -v scontrol >/dev/null 2>&1 && timeout 10 scontrol ping >/dev/null 2>&1; then
    case "$(node_state)" in
        idle* | mix* | alloc* | comp*) exit 0 ;;
    esac
fi

[ "$(id -u)" -eq 0 ] || die "must run as root to install and start munge and slurm (uid is $(id -u))"
if [ -e "$CONF" ] && ! grep -qF "$MARKER" "$CONF" && [ "${SLIDEMIL_SLURM_FORCE:-0}" != 1 ]; then
    die "$CONF exists and was not written by this script; set SLIDEMIL_SLURM_FORCE=1 to overwrite it"
fi
mkdir -p "$STATE" || die "cannot create state folder $STATE"
LOG=$STATE/start.log
: >"$LOG"

record_pid() { # name pid
    echo "$1 $2" >>"$STATE/pids"
}

# --- packages -------------------------------------------------------------------------------------
need_install=0
for bin in munged munge slurmctld slurmd sinfo sbatch scontrol squeue; do
    command -v "$bin" >/dev/null 2>&1 || need_install=1
done
if [ "$need_install" -eq 1 ]; then
    command -v apt-get >/dev/null 2>&1 || die "slurm/munge are not installed and apt-get is unavailable"
    # Keep the packages' maintainer scripts from starting daemons we would not know about.
    made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && made_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt_install() {
        timeout 600 apt-get install -y -q --no-install-recommends slurm-wlm munge >>"$LOG" 2>&1
    }
    rc=0
    if ! apt_install; then # stale or missing package lists: update once and retry
        timeout 300 apt-get update -q >>"$LOG" 2>&1
        apt_install || rc=$?
    fi
    [ "$made_policy" -eq 1 ] && rm -f /usr/sbin/policy-rc.d
    if [ "$rc" -ne 0 ]; then
        show_log "$LOG"
        die "apt-get install slurm-wlm munge failed (exit $rc)"
    fi
    for bin in munged munge slurmctld slurmd sinfo sbatch scontrol squeue; do
        command -v "$bin" >/dev/null 2>&1 || die "$bin is still missing after installing slurm-wlm and munge"
    done
fi

# --- munge ----------------------------------------------------------------------------------------
id munge >/dev/null 2>&1 || die "user munge does not exist (is the munge package installed?)"
KEY=/etc/munge/munge.key
if [ ! -s "$KEY" ]; then
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile="$KEY" --force >>"$LOG" 2>&1 || die "mungekey --create failed"
    else
        dd if=/dev/urandom of="$KEY" bs=1024 count=1 status=none || die "cannot write $KEY"
    fi
    { chown munge:munge /etc/munge "$KEY" && chmod 700 /etc/munge && chmod 400 "$KEY"; } ||
        die "cannot set owner/mode of $KEY"
fi
for d in /run/munge /var/lib/munge /var/log/munge; do
    { mkdir -p "$d" && chown munge:munge "$d"; } || die "cannot prepare $d"
done
chmod 755 /run/munge

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if ! munge_ok; then
    rm -f /run/munge/munged.pid
    if command -v runuser >/dev/null 2>&1; then
        runuser -u munge -- munged >>"$LOG" 2>&1 || { show_log /var/log/munge/munged.log; die "munged failed to start"; }
    else
        su -s /bin/sh munge -c munged >>"$LOG" 2>&1 || { show_log /var/log/munge/munged.log; die "munged failed to start"; }
    fi
    for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
    munge_ok || { show_log /var/log/munge/munged.log; die "munged started but munge -n | unmunge fails"; }
    [ -s /run/munge/munged.pid ] && record_pid munged "$(cat /run/munge/munged.pid)"
fi

# --- configuration --------------------------------------------------------------------------------
HOST=$(hostname -s) || die "hostname -s failed"
CPUS=$(nproc)
MEM_TOTAL=$(free -m | awk '/^Mem:/ {print $2}')
MARGIN=$((MEM_TOTAL / 10 > 1024 ? 1024 : MEM_TOTAL / 10))
REAL_MEM=$((MEM_TOTAL - MARGIN))
[ "$REAL_MEM" -gt 0 ] || die "cannot read the machine's memory from free -m"

mkdir -p "$CONF_DIR" /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm /run/slurm ||
    die "cannot create slurm folders"
JOBCOMP=/var/log/slurm/jobcomp.log

cat >"$CONF.tmp" <<EOF
$MARKER
# One node ($HOST, $CPUS CPUs, ${REAL_MEM} MB), one partition ($PARTITION). For tests only.
ClusterName=slidemil-test
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job waits cred_expire seconds before it may start again (default 120)
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$JOBCOMP
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=10
Waittime=0
MessageTimeout=10
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$REAL_MEM State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
mv "$CONF.tmp" "$CONF" || die "cannot write $CONF"

CGROUP_CONF=$CONF_DIR/cgroup.conf
if [ ! -e "$CGROUP_CONF" ] || grep -qF "$MARKER" "$CGROUP_CONF" || [ "${SLIDEMIL_SLURM_FORCE:-0}" = 1 ]; then
    printf '%s\n# cgroup/v2 refuses hybrid cgroup mounts (gVisor, some containers); v1 is never used by\n# proctrack/linuxproc + task/none but slurmd loads the plugin at start.\nCgroupPlugin=cgroup/v1\nIgnoreSystemd=yes\n' \
        "$MARKER" >"$CGROUP_CONF" || die "cannot write $CGROUP_CONF"
fi

# --- daemons --------------------------------------------------------------------------------------
pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if ! pid_alive /run/slurm/slurmctld.pid; then
    slurmctld >>"$LOG" 2>&1 || { show_log /var/log/slurm/slurmctld.log; die "slurmctld failed to start"; }
    for _ in $(seq 50); do pid_alive /run/slurm/slurmctld.pid && break; sleep 0.1; done
    pid_alive /run/slurm/slurmctld.pid || { show_log /var/log/slurm/slurmctld.log; die "slurmctld exited at start"; }
    record_pid slurmctld "$(cat /run/slurm/slurmctld.pid)"
fi
if ! pid_alive /run/slurm/slurmd.pid; then
    slurmd >>"$LOG" 2>&1 || { show_log /var/log/slurm/slurmd.log; die "slurmd failed to start"; }
    for _ in $(seq 50); do pid_alive /run/slurm/slurmd.pid && break; sleep 0.1; done
    pid_alive /run/slurm/slurmd.pid || { show_log /var/log/slurm/slurmd.log; die "slurmd exited at start"; }
    record_pid slurmd "$(cat /run/slurm/slurmd.pid)"
fi

# --- wait for the node ----------------------------------------------------------------------------
deadline=$((SECONDS + TIMEOUT))
state=""
while [ "$SECONDS" -lt "$deadline" ]; do
    state=$(node_state)
    case "$state" in
        idle*) exit 0 ;;
        down* | drain* | fail*)
            # a node left DOWN by an earlier run (e.g. after a reboot) comes back with RESUME
            scontrol update nodename="$HOST" state=resume >>"$LOG" 2>&1 ;;
    esac
    sleep 0.5
done
show_log /var/log/slurm/slurmctld.log
show_log /var/log/slurm/slurmd.log
die "node $HOST is not idle after ${TIMEOUT}s (sinfo state: '${state:-no answer}')"
