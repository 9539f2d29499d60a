"""Probes of `slidemil doctor` about the machine: Python and libraries, CPU, GPU, backends, OpenSlide.

Each probe returns rows (:class:`slidemil.doctor.Check`) and may leave facts for later probes in a
shared dict (``cuda``, ``gpus``, ``cpu_backend``, ``plan``). The backend ``auto`` picks is the
engine's own choice (``choose_backend``), and the CPU precision OpenVINO's (``cpu_supports_bf16``):
nothing here re-implements them.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

from slidemil import __version__
from slidemil.doctor.report import Check
from slidemil.runtime.openvino_runner import cache_dir, cpu_supports_bf16
from slidemil.runtime.runners import available_backends, choose_backend, cpu_threads

Facts = dict[str, Any]
ProbeSpec = tuple[str, str, Callable[[], Iterable[Check] | Check]]

LOW_DISK_GB = 10.0  # below this free in the output folder: warn
MIN_DISK_GB = 1.0  # below this: fail (a batch would stop on a full disk)
REINSTALL = "pip install -e . (from the slidemil checkout) or pip install slidemil reinstalls the dependencies"
# (row name, module, distributions that provide it, role): role "required" fails when absent.
LIBRARIES: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("torch", "torch", ("torch",), "required"),
    ("torchvision", "torchvision", ("torchvision",), "required"),
    ("timm", "timm", ("timm",), "required"),
    ("onnx", "onnx", ("onnx",), "required"),
    ("onnxruntime", "onnxruntime", ("onnxruntime", "onnxruntime-gpu"), "required"),
    ("openvino", "openvino", ("openvino",), "cpu"),
    ("nncf", "nncf", ("nncf",), "quantize"),
    ("tensorrt", "tensorrt", ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt-cu11"), "gpu"),
    ("openslide-python", "openslide", ("openslide-python",), "required"),
    ("h5py", "h5py", ("h5py",), "required"),
    ("numpy", "numpy", ("numpy",), "required"),
    ("tifffile", "tifffile", ("tifffile",), "required"),
    ("imagecodecs", "imagecodecs", ("imagecodecs",), "required"),
    ("huggingface_hub", "huggingface_hub", ("huggingface_hub", "huggingface-hub"), "required"),
)
ABSENT_HINTS = {
    "cpu": "pip install openvino (a default dependency on x86_64 Linux): the fastest CPU backend, with bf16 and int8",
    "quantize": "only `slidemil quantize` needs it: pip install 'slidemil[quantize]'",
    "gpu": "only for NVIDIA GPUs: pip install tensorrt --extra-index-url https://pypi.nvidia.com, or the GPU "
           "image of docker/Dockerfile",
}
# /proc/cpuinfo flags -> (row name, what it means for the engine). Any of the flags counts.
CPU_FEATURES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("AVX2", ("avx2",), "baseline vector unit of the fp32 kernels of OpenVINO, ONNX Runtime and torch; "
                        "without it every CPU backend runs several times slower"),
    ("AVX-512", ("avx512f",), "wider vectors: faster fp32 convolutions in OpenVINO and ONNX Runtime"),
    ("AVX-512 BF16", ("avx512_bf16",), "native bf16 dot products: --precision auto runs the OpenVINO "
                                       "backbone in bf16 (about 2x fp32)"),
    ("VNNI", ("avx512_vnni", "avx_vnni"), "int8 dot products: an int8 backbone from `slidemil quantize` runs "
                                          "about 1.8x OpenVINO bf16 (README, EPYC with AVX-512 VNNI)"),
    ("AMX", ("amx_tile", "amx_bf16", "amx_int8"), "matrix tiles (Sapphire Rapids and later): bf16 and int8 "
                                                  "backbones run faster again; OpenVINO uses them by itself"),
)
# Formats slidemil documents (README, Tiling), with the OpenSlide version that first opened each.
SLIDE_FORMATS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("Aperio SVS", (3, 0, 0)), ("Hamamatsu NDPI", (3, 4, 0)), ("Hamamatsu VMS/VMU", (3, 0, 0)),
    ("Leica SCN", (3, 3, 0)), ("MIRAX", (3, 0, 0)), ("Philips TIFF", (3, 4, 1)), ("Ventana BIF", (3, 4, 0)),
    ("Sakura SVSLIDE", (3, 4, 0)), ("generic tiled TIFF", (3, 0, 0)), ("DICOM WSI", (4, 0, 0)),
)


def probes(facts: Facts, out_dir: Path | None = None) -> list[ProbeSpec]:
    """The machine's probes in display order; later ones read the facts earlier ones leave."""
    specs: list[ProbeSpec] = [
        ("system", "python", python_row), ("system", "slidemil", slidemil_row),
        ("libraries", "libraries", library_rows),
        ("cpu", "cpu", lambda: cpu_rows(facts)),
        ("gpu", "cuda", lambda: cuda_rows(facts)),
        ("gpu", "nvjpeg", lambda: nvjpeg_row(facts)),
        ("backends", "onnxruntime providers", lambda: onnxruntime_row(facts)),
        ("backends", "openvino devices", lambda: openvino_rows(facts)),
        ("backends", "tensorrt", lambda: tensorrt_rows(facts)),
        ("backends", "backend auto (CPU)", lambda: cpu_backend_row(facts)),
        ("backends", "backend auto (GPU)", lambda: gpu_backend_row(facts)),
        ("slides", "openslide", openslide_row)]
    if out_dir is not None:
        folder = Path(out_dir)
        specs.append(("storage", "output folder", lambda: output_folder_row(folder)))
    return specs


def python_row() -> Check:
    v = sys.version_info
    status = "ok" if v >= (3, 10) else "fail"
    return Check("system", "python", status,
                 f"{platform.python_version()} ({platform.python_implementation()}) {sys.executable}; "
                 f"{platform.platform()}", hint="" if status == "ok" else "slidemil needs Python >= 3.10",
                 data={"version": platform.python_version(), "executable": sys.executable,
                       "platform": platform.platform(), "machine": platform.machine()})


def slidemil_row() -> Check:
    where = Path(sys.modules["slidemil"].__file__ or "?").parent
    return Check("system", "slidemil", "ok", f"{__version__} at {where}",
                 data={"version": __version__, "path": str(where)})


def dist_version(dists: Iterable[str]) -> tuple[str | None, str | None]:
    """(distribution, version) of the first installed distribution of ``dists``, or (None, None)."""
    for name in dists:
        try:
            return name, metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None, None


def module_present(module: str) -> bool:
    """Whether ``module`` can be imported (found, and not blocked by a None entry in ``sys.modules``)."""
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def library_rows() -> list[Check]:
    rows = []
    for name, module, dists, role in LIBRARIES:
        dist, version = dist_version(dists)
        present = module_present(module)
        data = {"module": module, "distribution": dist, "version": version, "importable": present, "role": role}
        if present:
            rows.append(Check("libraries", name, "ok", f"{version or 'version unknown'}"
                              + (f" ({dist})" if dist and dist != name else ""), data=data))
        elif role == "required":
            rows.append(Check("libraries", name, "fail", "not importable" + (f" (dist {dist} {version})" if dist else ""),
                              hint=REINSTALL, data=data))
        else:
            found = f"not importable (distribution {dist} {version} is installed)" if dist else "not installed"
            rows.append(Check("libraries", name, "info", found, hint=ABSENT_HINTS[role], data=data))
    both = [d for d in ("onnxruntime", "onnxruntime-gpu") if dist_version([d])[0]]
    if len(both) == 2:
        rows.append(Check("libraries", "onnxruntime packages", "warn", "onnxruntime and onnxruntime-gpu are both "
                          "installed: they overwrite each other's files",
                          hint="pip uninstall -y onnxruntime onnxruntime-gpu, then install one of them"))
    return rows


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (Linux), or None where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_rows(facts: Facts) -> list[Check]:
    threads = cpu_threads()
    rows = [Check("cpu", "cpu", "ok", f"{cpu_model()}; {threads} core(s) given to this process of "
                  f"{os.cpu_count()} ({platform.machine()})",
                  data={"model": cpu_model(), "threads": threads, "cpu_count": os.cpu_count()})]
    flags = cpu_flags()
    facts["cpu_flags"] = sorted(flags) if flags is not None else None
    if flags is None:
        return rows + [Check("cpu", "cpu features", "info", "no /proc/cpuinfo on this system: features unknown",
                             hint="the backends still pick their kernels by themselves")]
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686")
    for name, wanted, meaning in CPU_FEATURES:
        found = sorted(flags & set(wanted))
        status = "ok" if found else ("warn" if name == "AVX2" and x86 else "info")
        detail = ("yes" if found else "no") + f": {meaning}"
        hint = "" if found else ("a CPU with AVX2 (2013 or later) scores several times faster" if status == "warn"
                                 else "absent: the engine uses the next best path by itself")
        rows.append(Check("cpu", f"cpu {name}", status, detail, hint=hint, data={"flags": found}))
    return rows


def cuda_rows(facts: Facts) -> list[Check]:
    import torch

    facts["cuda"] = bool(torch.cuda.is_available())
    built = torch.version.cuda
    driver = nvidia_driver_version()
    if not facts["cuda"]:
        facts["gpus"] = []
        status, hint = "info", "none needed for CPU scoring"
        if driver and built:
            status, hint = "warn", ("a driver is loaded but torch sees no GPU: check CUDA_VISIBLE_DEVICES, and that "
                                    f"the driver supports CUDA {built} (nvidia-smi)")
        elif driver and not built:
            status, hint = "warn", "a GPU driver is loaded but torch is a CPU build: install a CUDA build of torch"
        return [Check("gpu", "cuda", status, f"no CUDA GPU visible to torch (torch built for CUDA {built or 'none'}; "
                      f"driver {driver or 'none'})", hint=hint, data={"available": False, "torch_cuda": built,
                                                                         "driver": driver})]
    cudnn = torch.backends.cudnn.version()
    rows = [Check("gpu", "cuda", "ok", f"{torch.cuda.device_count()} GPU(s); driver {driver or 'unknown'}, CUDA "
                  f"runtime {built}, cuDNN {cudnn}", data={"available": True, "driver": driver, "torch_cuda": built,
                                                           "cudnn": cudnn})]
    facts["gpus"] = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        facts["gpus"].append(props.name)
        rows.append(Check("gpu", f"gpu {i}", "ok", f"{props.name}, compute capability {props.major}.{props.minor}, "
                          f"{total / 2**30:.1f} GiB ({free / 2**30:.1f} GiB free)",
                          data={"name": props.name, "capability": f"{props.major}.{props.minor}",
                                "total_gib": round(total / 2**30, 2), "free_gib": round(free / 2**30, 2)}))
    return rows


def nvidia_driver_version() -> str | None:
    """The NVIDIA kernel driver's version (Linux /proc), or None."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    for word in text.split():
        parts = word.split(".")
        if len(parts) >= 2 and all(p.isdigit() for p in parts):
            return word
    return None


def nvjpeg_row(facts: Facts) -> Check:
    if not facts.get("cuda"):
        return Check("gpu", "nvjpeg", "info", "no GPU: JPEG tiles are decoded on the CPU (libjpeg-turbo)")
    import cv2
    import numpy as np
    import torch
    from torchvision.io import decode_jpeg

    ok, data = cv2.imencode(".jpg", np.full((16, 16, 3), 128, np.uint8))
    assert ok
    image = decode_jpeg(torch.from_numpy(data.reshape(-1).copy()), device="cuda")
    return Check("gpu", "nvjpeg", "ok", f"torchvision decode_jpeg runs on the GPU ({tuple(image.shape)} decoded): "
                 "JPEG-tiled slides are decoded with nvJPEG")


def onnxruntime_row(facts: Facts) -> Check:
    import onnxruntime as ort

    providers = list(ort.get_available_providers())
    facts["ort_providers"] = providers
    if facts.get("cuda") and "CUDAExecutionProvider" not in providers:
        return Check("backends", "onnxruntime providers", "info", ", ".join(providers) + " (no CUDA provider)",
                     hint="pip install 'slidemil[gpu]' (onnxruntime-gpu in place of onnxruntime) for ONNX Runtime on "
                          "the GPU", data={"providers": providers})
    return Check("backends", "onnxruntime providers", "ok", ", ".join(providers), data={"providers": providers})


def openvino_rows(facts: Facts) -> list[Check]:
    if not module_present("openvino"):
        return [Check("backends", "openvino devices", "info", "OpenVINO is not installed", hint=ABSENT_HINTS["cpu"])]
    import openvino as ov

    core = ov.Core()
    rows = []
    for device in core.available_devices:
        name = core.get_property(device, "FULL_DEVICE_NAME")
        caps = list(core.get_property(device, "OPTIMIZATION_CAPABILITIES"))
        rows.append(Check("backends", f"openvino {device}", "ok", f"{name}: {', '.join(caps)}",
                          data={"device": device, "name": name, "capabilities": caps}))
    bf16 = cpu_supports_bf16()
    facts["openvino_bf16"] = bf16
    rows.append(Check("backends", "openvino precision", "ok" if bf16 else "info",
                      "bf16 (the CPU plugin reports BF16): --precision auto compiles the backbone in bf16" if bf16
                      else "fp32 (the CPU plugin reports no BF16)",
                      hint="" if bf16 else "a CPU with AVX-512 BF16 or AMX runs bf16 backbones about 2x faster; an "
                                           "int8 backbone (slidemil quantize) helps where the CPU has VNNI",
                      data={"bf16": bf16}))
    writable = os.access(_existing(cache_dir()), os.W_OK)
    rows.append(Check("backends", "openvino cache", "ok" if writable else "warn", f"{cache_dir()}"
                      + ("" if writable else " is not writable: every run compiles the backbone again"),
                      hint="" if writable else "set XDG_CACHE_HOME to a writable folder"))
    return rows


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def tensorrt_rows(facts: Facts) -> list[Check]:
    """TensorRT imported for real (the libraries section says whether it is installed at all)."""
    if not module_present("tensorrt"):
        return []
    import tensorrt as trt

    return [Check("backends", "tensorrt", "ok", f"TensorRT {trt.__version__} imports"
                  + ("" if facts.get("cuda") else " (no GPU here to run engines)"), data={"version": trt.__version__})]


def cpu_backend_row(facts: Facts) -> Check:
    available = available_backends("cpu")
    name = choose_backend("auto", "cpu")
    facts["cpu_backend"] = name
    precision = ("bf16" if cpu_supports_bf16() else "fp32") if name == "openvino" else "fp32"
    described = f"{name} (CPU, {precision})"
    facts.setdefault("plan", None if facts.get("cuda") else described)
    detail = f"{described}; available here, fastest first: {', '.join(available)}"
    if name == "openvino":
        return Check("backends", "backend auto (CPU)", "ok", detail + "; an int8 backbone runs where the package has one",
                     data={"backend": name, "precision": precision, "available": available})
    status = "info" if facts.get("cuda") else "warn"
    return Check("backends", "backend auto (CPU)", status, detail + " (OpenVINO is not available)",
                 hint=ABSENT_HINTS["cpu"], data={"backend": name, "precision": precision, "available": available})


def gpu_backend_row(facts: Facts) -> Check:
    if not facts.get("cuda"):
        return Check("backends", "backend auto (GPU)", "info", "no CUDA GPU: --device auto scores on the CPU")
    available = available_backends("cuda")
    name = choose_backend("auto", "cuda")
    note = ("; TensorRT runs where the package has an engine built on this GPU (slidemil build-engine), else "
            + (available[1] if len(available) > 1 else "nothing")) if name == "tensorrt" else ""
    facts["gpu_backend"] = name
    facts["plan"] = f"{name} (GPU)"
    return Check("backends", "backend auto (GPU)", "ok", f"{name}{note}; available: {', '.join(available)}",
                 data={"backend": name, "available": available})


def openslide_row() -> Check:
    import openslide

    library = str(openslide.__library_version__)
    numbers = tuple(int(p) for p in library.split(".")[:3] if p.isdigit())
    opens = [name for name, since in SLIDE_FORMATS if numbers >= since]
    missing = [name for name, since in SLIDE_FORMATS if numbers < since]
    detail = f"OpenSlide {library} (openslide-python {openslide.__version__}) opens: {', '.join(opens)}"
    data = {"library": library, "python": openslide.__version__, "formats": opens, "missing": missing}
    if missing:
        return Check("slides", "openslide", "warn", detail + f"; not: {', '.join(missing)}",
                     hint="pip install -U openslide-bin (OpenSlide >= 4.0 reads DICOM WSI)", data=data)
    return Check("slides", "openslide", "ok", detail + "; plain PNG/JPEG/TIFF through slidemil's own reader", data=data)


# -- output folder ------------------------------------------------------------------------------

def output_folder_row(out_dir: Path) -> Check:
    """Exists (or can be created), writable, and free space (warn under LOW_DISK_GB, fail under MIN_DISK_GB)."""
    name = "output folder"
    if out_dir.exists() and not out_dir.is_dir():
        return Check("storage", name, "fail", f"{out_dir} exists and is not a folder", hint="choose another --out")
    base = out_dir
    while not base.exists() and base.parent != base:
        base = base.parent
    missing = base != out_dir
    if not _can_write(base):
        return Check("storage", name, "fail", f"{base} is not writable by this user",
                     hint="choose an --out this user can write, or fix the folder's permissions",
                     data={"path": str(out_dir), "exists": not missing})
    free_gb = shutil.disk_usage(base).free / 1e9
    data = {"path": str(out_dir), "exists": not missing, "checked": str(base), "free_gb": round(free_gb, 2)}
    where = f"{out_dir} does not exist yet (score creates it in {base}); " if missing else f"{out_dir}: "
    detail = where + f"writable, {free_gb:.1f} GB free"
    if free_gb < MIN_DISK_GB:
        return Check("storage", name, "fail", detail, hint=f"free space on that disk or choose another --out: under "
                     f"{MIN_DISK_GB:g} GB a batch stops at the first slide that does not fit", data=data)
    if free_gb < LOW_DISK_GB:
        return Check("storage", name, "warn", detail, hint=f"under {LOW_DISK_GB:g} GB free: a large cohort may fill "
                     "the disk (GeoJSON grows with the tiles of each slide); free space or choose another --out",
                     data=data)
    return Check("storage", name, "info" if missing else "ok", detail,
                 hint="it is created by the first command that writes to it" if missing else "", data=data)


def _can_write(folder: Path) -> bool:
    """Whether a file can be created in ``folder`` (tried, then removed)."""
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".slidemil-doctor-"):
            return True
    except OSError:
        return False
