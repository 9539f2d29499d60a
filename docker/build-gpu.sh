#!/usr/bin/env bash
# Builds the GPU image (VARIANT=gpu) with podman and shows what it holds: packages, CUDA libraries, the
# onnxruntime providers. It does not need a GPU to build, and this runs nothing on one.
#   BASE_IMAGE: default the debootstrap Debian (docker/make-base.sh): the CUDA runtime comes from the pip wheels.
#   Use an NGC TensorRT image (nvcr.io/nvidia/tensorrt:<release>-py3) for TensorRT.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=docker/podman-env.sh
source docker/podman-env.sh
image=${TAG:-localhost/slidemil:gpu}

TAG=$image bash docker/build.sh gpu "$@"
run=("${PODMAN[@]}" run --rm -i --no-healthcheck --network=none "${LIMITS[@]}" --entrypoint python "$image")
echo "== pip list"
"${run[@]}" -m pip list --format=freeze
echo "== inside"
"${run[@]}" - <<'PY'
import glob, importlib.metadata as md, os, subprocess, sys

import torch  # loads torch's CUDA libraries (the nvidia-* wheels) process-wide, as slidemil's own imports do
import onnxruntime as ort

names = {d.metadata["Name"].lower() for d in md.distributions()}
print(f"python {sys.version.split()[0]}; torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN "
      f"{torch.backends.cudnn.version()}); onnxruntime-gpu {md.version('onnxruntime-gpu')}; "
      f"onnxruntime (the CPU package) installed: {'onnxruntime' in names}")
print("onnxruntime providers:", ort.get_available_providers())
loaded = {os.path.basename(line.split()[-1]) for line in open("/proc/self/maps") if ".so" in line}
system = ("libc.", "libm.", "libdl.", "libpthread.", "librt.", "libgcc_s.", "libstdc++.", "ld-linux", "linux-vdso")
capi = os.path.dirname(ort.__file__) + "/capi"
for provider in ("cuda", "tensorrt"):
    lib = f"{capi}/libonnxruntime_providers_{provider}.so"
    ldd = subprocess.run(["ldd", lib], capture_output=True, text=True).stdout
    needed = [line.split()[0] for line in ldd.splitlines() if "=>" in line and not line.split()[0].startswith(system)]
    missing = [n for n in needed if n not in loaded and "not found" in ldd.split(n, 1)[1].splitlines()[0]]
    print(f"{os.path.basename(lib)} needs {needed}; not in the image: {missing or 'none'}")
site = os.path.dirname(os.path.dirname(torch.__file__))
libs = sorted(glob.glob(f"{site}/nvidia/**/lib*.so*", recursive=True))
size = sum(os.path.getsize(p) for p in glob.glob(f"{site}/nvidia/**/*", recursive=True) if os.path.isfile(p))
print(f"CUDA libraries from the nvidia-* wheels: {len(libs)} files, {size / 1e9:.2f} GB, loaded by `import torch`: "
      f"{sorted(n for n in loaded if any(n == os.path.basename(p) for p in libs))}")
print("torch.cuda.is_available():", torch.cuda.is_available(), "(libcuda.so.1, the driver, comes from the host at run "
      "time: --gpus all / --device nvidia.com/gpu=all / apptainer --nv)")
PY
