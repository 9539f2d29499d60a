"""The device stage of the tile pipeline: tiles decoded where the model runs, no pixels over the bus.

With ``TilePipeline(..., decode_device=...)`` (the planner's ``ExecutionPlan.decode_on_device``) a
batch goes through three stages:

1. reader threads (``fetch``): file I/O only. For a JPEG-tiled level (Aperio SVS, generic tiled
   TIFF) they read the compressed file tiles the batch covers with their tables (a few KB each) and
   screen their bytes (``JpegTileSource.fetch``). Any other slide (another format, a level that is not
   JPEG, ``--tile-source openslide``, a level whose nvJPEG colours failed the check) is decoded on the
   CPU by the reader as before, once logged per slide, and its pixels are pinned for the upload.
2. one decode thread (``DeviceDecoder``), on its own CUDA stream: batched nvJPEG
   (``decode_jpeg(list, device="cuda")``), assembly, sub-pixel shift and area resize on the device
   (``slide.jpeg_device``), or the upload of a CPU-decoded batch from pinned memory. It waits for its
   stream before handing the batch on, so a consumer may use the tensor on any stream (runners record
   their own stream on it); its next batch is decoded while the model runs the current one.
3. the runner: a uint8 NHWC tensor already on its device (``TorchRunner`` uses it as is; TensorRT
   copies it device to device; ONNX Runtime CUDA binds its pointer).

On ``decode_device="cpu"`` the same stages run on the CPU (torch tensors, libjpeg), which is how the
CPU test suite covers them.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slidemil.slide.jpeg_source import GPU_COLOUR_CHECK_TOLERANCE
from slidemil.slide.sources import TileSource, open_tile_source

log = logging.getLogger(__name__)

Fetched = Any  # EncodedTiles (still compressed), or a uint8 (B, H, W, 3) numpy array / pinned tensor


class DecodeState:
    """What the readers and the decoder of one pipeline share: levels to decode on the CPU (nvJPEG's colours
    failed there), and the slides whose CPU decoding was already logged. Thread-safe."""

    def __init__(self) -> None:
        self._cpu_levels: dict[str, set[int]] = {}
        self._logged: set[str] = set()
        self._lock = threading.Lock()

    def cpu_levels(self, path: Path) -> frozenset[int]:
        with self._lock:
            return frozenset(self._cpu_levels.get(str(path), ()))

    def decode_on_cpu(self, path: Path, level: int) -> None:
        with self._lock:
            self._cpu_levels.setdefault(str(path), set()).add(level)

    def log_once(self, key: str, message: str, *args: object, level: int = logging.INFO) -> None:
        with self._lock:
            if key in self._logged:
                return
            self._logged.add(key)
        log.log(level, message, *args)


def fetch(source: TileSource, path: Path, coords: np.ndarray, size_level0: int, out_px: int, state: DecodeState,
          pin: bool) -> Fetched:
    """Stage 1, on a reader thread: a batch's compressed tiles, or its pixels decoded on the CPU (pinned
    for the upload where ``pin``). ``path``: the slide's file (``source`` reads it)."""
    fetch_encoded = getattr(source, "fetch", None)
    if fetch_encoded is not None:
        encoded = fetch_encoded(coords, size_level0, out_px, cpu_levels=state.cpu_levels(path))
        if encoded is not None:
            return encoded
        state.log_once(f"{path}:level", "%s: tiles of this size come from a level that is not decoded on the device "
                       "(not JPEG-tiled, or nvJPEG's colours differ there); decoding them on the CPU", path.name)
    else:
        state.log_once(str(path), "%s: the %s tile source has no JPEG tiles to decode on the device; decoding on "
                       "the CPU", path.name, source.source_name)
    pixels = source.read(coords, size_level0, out_px)
    return torch.from_numpy(pixels).pin_memory() if pin else pixels


class DeviceDecoder:
    """Stage 2: decoded, assembled uint8 (B, H, W, 3) tiles on ``device``, ready for any stream.

    Args:
        device: "cuda", "cuda:N" or "cpu" (the same stages on the CPU).
        state: shared with the readers (levels whose nvJPEG colours failed the check).
    """

    def __init__(self, device: str | torch.device, state: DecodeState) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.state = state
        self._checked: set[tuple[str, int]] = set()
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None

    def __call__(self, item: Fetched) -> torch.Tensor:
        if self._stream is None:
            return self._decode(item)
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            tiles = self._decode(item)
        self._stream.synchronize()  # ready: the consumer's stream need not wait on this one
        return tiles

    def _decode(self, item: Fetched) -> torch.Tensor:
        from slidemil.slide.jpeg_device import EncodedTiles, assemble, decode_streams

        if not isinstance(item, EncodedTiles):  # decoded on the CPU by the reader
            pixels = item if isinstance(item, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(item))
            return pixels.to(self.device, non_blocking=True)
        try:
            decoded = decode_streams(item.streams, self.device)
        except RuntimeError as exc:  # a stream nvJPEG refuses: the CPU path finds and names the bad tile
            log.warning("%s: decoding on %s failed (%s); reading the batch on the CPU", item.path.name, self.device,
                        str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
            return self._read_on_cpu(item)
        want = (3, item.level.tile_h, item.level.tile_w)
        if any(tuple(t.shape) != want for t in decoded):
            return self._read_on_cpu(item)  # which raises SlideReadError naming the tile
        if self.cuda and decoded and self._colours_differ(item, decoded[0]):
            return self._read_on_cpu(item)
        return assemble(item, decoded, self.device)

    def _colours_differ(self, item: Any, first: torch.Tensor) -> bool:
        """Compare one nvJPEG tile with libjpeg once per slide and level (as ``JpegTileSource`` does):
        nvJPEG may not honour the Adobe transform flag of RGB JPEG (tens of grey levels off)."""
        from slidemil.slide.jpeg_device import colour_error

        key = (str(item.path), item.level_index)
        if key in self._checked:
            return False
        self._checked.add(key)
        error = colour_error(first, item.streams[0])
        if error <= GPU_COLOUR_CHECK_TOLERANCE:
            return False
        log.warning("%s: nvJPEG differs from libjpeg by %.1f grey levels on level %d; decoding it on the CPU",
                    item.path.name, error, item.level_index)
        self.state.decode_on_cpu(item.path, item.level_index)
        return True

    def _read_on_cpu(self, item: Any) -> torch.Tensor:
        with open_tile_source(item.path, item.mpp, item.size_level0, item.out_px, "jpeg") as source:
            pixels = source.read(item.coords, item.size_level0, item.out_px)
        return torch.from_numpy(pixels).to(self.device)


def prepare_device_decode(device: str | torch.device) -> None:
    """Start-up work of the device stage, done once before the first slide: nvJPEG's initialisation."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    import cv2

    ok, data = cv2.imencode(".jpg", np.full((16, 16, 3), 128, np.uint8))
    if ok:
        from slidemil.slide.jpeg_device import decode_streams

        decode_streams([torch.from_numpy(data.reshape(-1).copy())], device)
        torch.cuda.synchronize(device)


__all__ = ["DecodeState", "DeviceDecoder", "fetch", "prepare_device_decode"]
