#!/usr/bin/env bash
# Fills docker/local (see its README.md) for the image build:
# - this machine's torch and torchvision: the installed versions, taken from pip's configured sources (a local
#   wheel folder or index where there is one); docker/Dockerfile prefers and pins them, so the image runs the
#   host's torch without downloading it. Their own dependencies (the CUDA wheels of PyPI's torch) come from PyPI.
# - pip's CA bundle (PIP_CERT or pip config's cert), where one is set: a proxy that intercepts TLS.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
dest=docker/local
mapfile -t specs < <("$python" - <<'PY'
import importlib.metadata as md
for name in ("torch", "torchvision"):
    print(f"{name}=={md.version(name)}")
PY
)
# other versions of the two would pin conflicting versions: drop them
for spec in "${specs[@]}"; do
    name=${spec%%==*} version=${spec#*==}
    for f in "$dest/$name"-*.whl; do
        [ -e "$f" ] || continue
        case "${f##*/}" in "$name-$version-"*) ;; *) echo "fetch-local: removing $f"; rm -f "$f" ;; esac
    done
done
"$python" -m pip download --quiet --no-deps --dest "$dest" "${specs[@]}" 2> >(grep -v "is ignored: it is neither" >&2)
echo "fetch-local: ${specs[*]} in $dest"

cert=${PIP_CERT:-$("$python" -m pip config get global.cert 2>/dev/null || true)}
if [ -n "$cert" ] && [ -f "$cert" ]; then
    cp "$cert" "$dest/cert.pem"
    echo "fetch-local: pip's CA bundle $cert -> $dest/cert.pem"
else
    rm -f "$dest/cert.pem"
fi
