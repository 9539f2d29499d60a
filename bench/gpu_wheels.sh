#!/usr/bin/env bash
# Download, here (with PyPI access), the wheels that bench/gpu_check.sh installs on the GPU machine, which has
# no pip access: CPython 3.12, manylinux x86_64. Usage: bash bench/gpu_wheels.sh DIR   (e.g. .gpu-wheels,
# git-ignored; a device run takes it with carry: [".gpu-wheels"]). Keeps DIR under 64 MiB.
#
# The GPU image has Python 3.12, torch (CUDA), torchvision, timm, onnx, onnxruntime (CPU), h5py, opencv,
# tifffile and pandas, with their own dependencies (numpy, pillow, safetensors, pyyaml, tqdm, packaging,
# python-dateutil, ...). Of pyproject's dependencies the check then needs (the lists below are checked
# against pyproject.toml, so that a new dependency is not forgotten):
#   openslide-python, openslide-bin  reading the slides (SVS)
#   imagecodecs                      JPEG tiles written by the synthetic slides (tifffile's encoder)
#   matplotlib (+ contourpy cycler fonttools kiwisolver pyparsing)  heatmap overlays of slidemil score
#   pytest (+ pluggy iniconfig pygments), pytest-timeout  pytest -m gpu
# and not, on its code paths: onnxscript (the check exports with the legacy exporter), openvino (CPU
# backend), scikit-learn and scipy (evaluate, report, calibration, smoothed heatmaps), tensorboard (the
# check trains with it off), pydicom (DICOM slides).
set -euo pipefail
DIR=${1:?usage: bash bench/gpu_wheels.sh DIR}
PYTHON=${PYTHON:-python3}
cd "$(dirname "$0")/.."

IMAGE_HAS="torch torchvision timm onnx onnxruntime h5py opencv-python-headless tifffile pandas numpy safetensors tqdm pyyaml"
DOWNLOAD="openslide-python openslide-bin imagecodecs matplotlib"
NOT_NEEDED="onnxscript openvino scikit-learn scipy tensorboard pydicom"
EXTRA="contourpy cycler fonttools kiwisolver pyparsing pytest pluggy iniconfig pygments pytest-timeout"

IMAGE_HAS="$IMAGE_HAS" DOWNLOAD="$DOWNLOAD" NOT_NEEDED="$NOT_NEEDED" "$PYTHON" - <<'PY'
import os, re, sys, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
names = {re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].strip().lower() for d in deps}
known = set(" ".join(os.environ[k] for k in ("IMAGE_HAS", "DOWNLOAD", "NOT_NEEDED")).split())
if names - known:
    sys.exit(f"bench/gpu_wheels.sh: pyproject.toml depends on {sorted(names - known)}: say in this script "
             "whether the GPU image has it, the check needs it (DOWNLOAD) or not (NOT_NEEDED)")
PY

mkdir -p "$DIR"
"$PYTHON" -m pip download --quiet --only-binary=:all: --no-deps --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 \
    -d "$DIR" $DOWNLOAD $EXTRA
total=$(du -cb "$DIR"/*.whl | tail -1 | cut -f1)
ls -l "$DIR"/*.whl | awk '{printf "%10d  %s\n", $5, $9}'
echo "total: $total bytes ($((total / 1048576)) MiB) in $DIR"
if [ "$total" -ge $((64 * 1048576)) ]; then
    echo "bench/gpu_wheels.sh: $DIR holds 64 MiB or more: a device run cannot carry it" >&2
    exit 1
fi
