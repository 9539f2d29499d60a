#!/usr/bin/env bash
# CI: the CPU image, built and run. Rootful podman from Debian (no registry is reachable: the base is a
# debootstrap Debian, packages come from PyPI and Debian), then in the container: slidemil --version, --help
# and doctor, and `slidemil score` (non-root, model and slides read-only, no network, outputs to a mounted
# folder) compared with the same command on the host (tests/test_container.py -m container).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
    echo "ci: container: needs root (apt-get, rootful podman)" >&2
    exit 1
fi
if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v debootstrap >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >/dev/null
fi
# shellcheck source=docker/podman-env.sh
source docker/podman-env.sh
image=localhost/slidemil:cpu
start=$SECONDS

bash docker/fetch-local.sh       # the host's torch and pip's CA bundle: the image runs the host's torch
TAG=$image bash docker/build.sh cpu   # base: docker/make-base.sh (debootstrap), skipped when it exists

# --no-healthcheck: one-off commands (podman would try to start a systemd timer for the HEALTHCHECK)
run=("${PODMAN[@]}" run --rm --no-healthcheck --network=none "${LIMITS[@]}")
echo "ci: container: $("${run[@]}" "$image" --version)"
"${run[@]}" "$image" --help >/dev/null
echo "ci: container: slidemil --help exits 0"
"${run[@]}" --entrypoint python "$image" -m pip check
echo "ci: container: runs as $("${run[@]}" --entrypoint id "$image")"
echo "ci: container: HEALTHCHECK $("${PODMAN[@]}" image inspect --format '{{json .Config.Healthcheck.Test}}' "$image")"
if "${run[@]}" "$image" doctor --help >/dev/null 2>&1; then
    "${run[@]}" "$image" doctor
    # the HEALTHCHECK itself, run once in a live container (no timer: there is no systemd here)
    name=slidemil-health-$$
    "${PODMAN[@]}" run -d --name "$name" --health-interval=disable --network=none "${LIMITS[@]}" \
        --entrypoint sleep "$image" 300 >/dev/null 2> >(grep -v "systemd connection" >&2)
    status=0
    "${PODMAN[@]}" healthcheck run "$name" 2> >(grep -v "systemd connection" >&2) || status=$?
    "${PODMAN[@]}" rm -f -t 0 "$name" >/dev/null 2> >(grep -v "systemd connection" >&2)
    [ "$status" = 0 ] || { echo "ci: container: the HEALTHCHECK (slidemil doctor) fails" >&2; exit 1; }
    echo "ci: container: HEALTHCHECK healthy"
else
    echo "ci: container: this slidemil has no doctor command yet; --version above stands in for the health check"
fi

SLIDEMIL_CONTAINER_IMAGE=$image SLIDEMIL_CONTAINER_RUN="${run[*]}" HF_HUB_OFFLINE=1 \
    python3 -m pytest -q -rs -s -m container tests/test_container.py
echo "ci: container: done in $((SECONDS - start)) s"
