"""fp16 copies of the exported graphs, with the graph's interface kept (uint8 or float32 in, float32 out).

Uses ONNX Runtime's own float16 converter (``onnxruntime.transformers.float16``, shipped with the
``onnxruntime`` wheel). ``onnxconverter-common``'s converter of the same name leaves the dynamo
exporter's ``Cast(uint8 -> float)`` at float32 and produces an invalid graph, so it is not used.
"""

from __future__ import annotations

import logging
from pathlib import Path

from slidemil.atomic import atomic_path
from slidemil.errors import ExportError
from slidemil.models.onnx import TWO_GB

log = logging.getLogger(__name__)

CONVERTER = "onnxruntime.transformers.float16"


def convert_to_fp16(src: str | Path, dst: str | Path) -> Path:
    """Write an fp16 copy of ONNX graph ``src`` to ``dst`` (atomically).

    Weights and activations become float16; inputs and outputs keep their types
    (``keep_io_types``), so the engine feeds and reads the same arrays as for the fp32 graph.

    Raises:
        ExportError: the converter failed or changed the graph's interface.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src))
    before = _interface(model)
    try:
        half = convert_float_to_float16(model, keep_io_types=True)
    except Exception as exc:  # the converter raises bare Exceptions and ValueErrors on odd graphs
        raise ExportError(f"cannot convert {src.name} to fp16: {exc}") from exc
    after = _interface(half)
    if after != before:
        raise ExportError(f"fp16 conversion of {src.name} changed its interface: {before} -> {after}")
    external = not _fits_protobuf(half) or half.ByteSize() >= TWO_GB
    with atomic_path(dst) as tmp:
        onnx.save_model(half, str(tmp), save_as_external_data=external, all_tensors_to_one_file=True,
                        location=dst.name + ".data")
    log.info("wrote %s (fp16 weights and activations, same inputs and outputs)", dst.name)
    return dst


def _interface(model: object) -> list[tuple[str, int]]:
    graph = model.graph  # type: ignore[attr-defined]
    return [(v.name, v.type.tensor_type.elem_type) for v in list(graph.input) + list(graph.output)]


def _fits_protobuf(model: object) -> bool:
    try:
        model.ByteSize()  # type: ignore[attr-defined]
    except ValueError:  # protobuf refuses to measure messages over 2 GB
        return False
    return True
