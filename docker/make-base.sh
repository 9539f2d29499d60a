#!/usr/bin/env bash
# A Debian bookworm base image made without a container registry: debootstrap minbase, imported into
# podman as localhost/debian:bookworm (or $1). Skipped when the image exists (REBUILD_BASE=1 rebuilds it).
# Needs root and debootstrap (apt-get install -y podman runc debootstrap). About a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=docker/podman-env.sh
source docker/podman-env.sh
image=${1:-$BASE_DEBIAN}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}

if "${PODMAN[@]}" image exists "$image" && [ -z "${REBUILD_BASE:-}" ]; then
    echo "make-base: $image exists"
    exit 0
fi
start=$SECONDS
rootfs=$(mktemp -d /var/tmp/slidemil-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >/dev/null
cat > "$rootfs/etc/apt/sources.list" <<SOURCES
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb $security bookworm-security main
SOURCES
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
tar --numeric-owner -C "$rootfs" -c . \
    | "${PODMAN[@]}" import --change 'CMD ["/bin/bash"]' --message "debootstrap --variant=minbase bookworm" - "$image" >/dev/null
echo "make-base: $image made in $((SECONDS - start)) s ($(human_size "$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$image")"))"
