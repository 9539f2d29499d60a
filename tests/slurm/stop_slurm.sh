#!/usr/bin/env bash
# Stop the daemons that start_slurm.sh started (and only those), newest first.
# Daemons that were already running before start_slurm.sh are not in its state file and stay up.
# Quiet on success; prints the reason and exits 1 when a daemon does not stop.
set -u -o pipefail

STATE=${SLIDEMIL_SLURM_STATE:-/var/lib/slidemil-slurm}
PIDS=$STATE/pids
[ -s "$PIDS" ] || exit 0

ours() { # pid name: alive and still the daemon we started (guards against PID reuse)
    [ -r "/proc/$1/comm" ] && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ]
}

failed=0
# A controller we started serves only the tests: cancel what they left queued or running, so that no
# job step outlives slurmd and no job comes back from the saved state at the next start.
ctld_pid=$(awk '$1 == "slurmctld" {print $2}' "$PIDS" | tail -n 1)
if [ -n "$ctld_pid" ] && ours "$ctld_pid" slurmctld; then
    jobs=$(squeue -h -o %A 2>/dev/null | sort -u)
    if [ -n "$jobs" ]; then
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null
        for _ in $(seq 100); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
    fi
fi
# reverse order: slurmd, slurmctld, munged
while read -r name pid; do
    [ -n "$pid" ] || continue
    ours "$pid" "$name" || continue
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 100); do ours "$pid" "$name" || break; sleep 0.1; done
    if ours "$pid" "$name"; then
        kill -KILL "$pid" 2>/dev/null
        sleep 0.5
        if ours "$pid" "$name"; then
            echo "stop_slurm.sh: $name (pid $pid) does not stop" >&2
            failed=1
        fi
    fi
done < <(tac "$PIDS")

if [ "$failed" -eq 0 ]; then
    rm -f "$PIDS"
    # pid files of the daemons we stopped
    for f in /run/slurm/slurmd.pid /run/slurm/slurmctld.pid; do
        [ -s "$f" ] && ! kill -0 "$(cat "$f")" 2>/dev/null && rm -f "$f"
    done
fi
exit "$failed"
