#!/usr/bin/env bash
# The one device check of the GPU path, for a GPU machine with PyTorch and no pip access (about 7 minutes on
# one H100/H200). Usage, from the repository root:
#     bash bench/gpu_check.sh OUT_DIR [--dry-run]
# First, where PyPI can be reached: bash bench/gpu_wheels.sh .gpu-wheels (SLIDEMIL_GPU_WHEELS names another
# folder). It installs those wheels into WORK/site (nothing else is fetched; the image's packages stay as
# they are), puts the repository and that folder on PYTHONPATH, then runs bench/gpu_check.py: the
# measurements and pytest -m gpu, into OUT_DIR/gpu_check.json (rewritten after every step) with the logs
# and GPU traces beside it. WORK (slides, packages, features: a few GB) is $SLIDEMIL_CHECK_WORK, else
# ${TMPDIR:-/tmp}/slidemil-gpu-check, never under OUT_DIR. --dry-run (or a machine without a GPU) runs the
# same steps on the CPU with tiny sizes; wheels that do not fit this Python are then left out.
set -euo pipefail
OUT=${1:?usage: bash bench/gpu_check.sh OUT_DIR [--dry-run]}
shift
REPO=$(cd "$(dirname "$0")/.." && pwd)
WHEELS=${SLIDEMIL_GPU_WHEELS:-$REPO/.gpu-wheels}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=${SLIDEMIL_CHECK_WORK:-${TMPDIR:-/tmp}/slidemil-gpu-check}
mkdir -p "$WORK"
start=$(date +%s)

if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    SITE="$WORK/site"
    mkdir -p "$SITE"
    installed=yes
    if "$PYTHON" -m pip --version >/dev/null 2>&1; then
        "$PYTHON" -m pip install --quiet --no-index --no-deps --disable-pip-version-check --target "$SITE" \
            "$WHEELS"/*.whl || installed=no
    else  # no pip at all: a wheel is a zip laid out for site-packages
        for whl in "$WHEELS"/*.whl; do "$PYTHON" -m zipfile -e "$whl" "$SITE"; done
    fi
    if [ "$installed" = no ]; then
        case " $* " in
            *" --dry-run "*) echo "[gpu_check] the wheels in $WHEELS do not install on this Python (they are for" \
                                  "CPython 3.12); the dry run uses the packages installed here" ;;
            *) echo "[gpu_check] cannot install the wheels of $WHEELS" >&2; exit 1 ;;
        esac
        export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
    else
        export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
        echo "[gpu_check] installed $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE ($(( $(date +%s) - start )) s)"
    fi
else
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
    echo "[gpu_check] no wheels in $WHEELS: using the packages installed here"
fi
export HF_HUB_OFFLINE=1
"$PYTHON" -c "import openslide, imagecodecs, matplotlib, pytest, slidemil; print('[gpu_check] imports ok:', openslide.__library_version__)"
"$PYTHON" "$REPO/bench/gpu_check.py" --out "$OUT" --work "$WORK/run" "$@"
echo "[gpu_check] done in $(( $(date +%s) - start )) s: $OUT/gpu_check.json"
