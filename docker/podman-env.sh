# shellcheck shell=bash
# Podman as CI runs it (sourced by docker/*.sh and .ci/container.sh). Rootful podman on a host whose cgroups
# crun refuses (hybrid cgroup v1): runc with cgroupfs. `podman run` must be given the ulimits (runc cannot raise
# the defaults podman asks for here). Override with SLIDEMIL_PODMAN="podman" where the defaults work.
# shellcheck disable=SC2206,SC2034
PODMAN=(${SLIDEMIL_PODMAN:-podman --runtime runc --cgroup-manager=cgroupfs})
# shellcheck disable=SC2034
LIMITS=(--ulimit nofile=20000:20000 --ulimit nproc=4096:4096)
# shellcheck disable=SC2034
BASE_DEBIAN=${BASE_DEBIAN:-localhost/debian:bookworm}

human_size() {  # bytes -> "1.23 GB"
    awk -v b="$1" 'BEGIN { printf "%.2f GB", b / 1e9 }'
}
