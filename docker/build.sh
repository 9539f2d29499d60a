#!/usr/bin/env bash
# Builds the slidemil image with podman: docker/build.sh [cpu|gpu] [more podman build options]
#   BASE_IMAGE   default localhost/debian:bookworm, made by docker/make-base.sh when missing (no registry needed)
#   TAG          default localhost/slidemil:<variant>
#   TORCH_INDEX  passed on as the build argument (e.g. https://download.pytorch.org/whl/cpu)
# Layers are cached: a second build, or the other variant, reuses what did not change.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=docker/podman-env.sh
source docker/podman-env.sh
variant=${1:-cpu}
shift || true
base=${BASE_IMAGE:-$BASE_DEBIAN}
tag=${TAG:-localhost/slidemil:$variant}
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n 1)

if [ "$base" = "$BASE_DEBIAN" ]; then
    bash docker/make-base.sh "$base"
fi
local_wheels=$(find docker/local -maxdepth 1 -name '*.whl' -printf '%f %s\n' | sort | tr '\n' ' ')
start=$SECONDS
"${PODMAN[@]}" build --format docker --network=host "${LIMITS[@]}" -f docker/Dockerfile \
    --build-arg BASE_IMAGE="$base" --build-arg VARIANT="$variant" --build-arg SLIDEMIL_VERSION="$version" \
    --build-arg LOCAL_WHEELS="$local_wheels" ${TORCH_INDEX:+--build-arg TORCH_INDEX="$TORCH_INDEX"} \
    -t "$tag" "$@" .
size=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$tag")
echo "build: $tag built in $((SECONDS - start)) s; image size $(human_size "$size") ($size bytes)"
