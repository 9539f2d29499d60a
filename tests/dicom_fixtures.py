"""Test helper: write a multi-file DICOM WSI series (one file per pyramid level) from a real DICOM.

Level 0 is the real single-level file copied as is; each further level is a new instance of the same
series (same Series/Study/FrameOfReference UIDs, a new SOPInstanceUID) whose pixels are the level
above downsampled 2x with area interpolation, cut into the same tile size and JPEG-encoded frame by
frame (TILED_FULL, row-major tiles), with the pixel spacing doubled. Only tests use this module.
"""

from __future__ import annotations

import copy
import io
import math
import shutil
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

# Chroma subsampling of PIL's JPEG encoder per DICOM photometric interpretation of the source
# (YBR_FULL_422 means 4:2:2; anything else we write as 4:4:4 YBR_FULL).
_PIL_SUBSAMPLING = {"YBR_FULL_422": 1}


def _frames(ds, n_frames: int):
    """The encapsulated frames of ``ds`` (pydicom 3 and 2.4 spell this differently)."""
    try:
        from pydicom.encaps import generate_frames
    except ImportError:  # pydicom < 3
        from pydicom.encaps import generate_pixel_data_frame
        return generate_pixel_data_frame(ds.PixelData, n_frames)
    return generate_frames(ds.PixelData, number_of_frames=n_frames)


def read_total_pixel_matrix(ds) -> np.ndarray:
    """The whole level of a TILED_FULL DICOM WSI instance as RGB uint8 (rows, columns, 3)."""
    tile_h, tile_w = int(ds.Rows), int(ds.Columns)
    width, height = int(ds.TotalPixelMatrixColumns), int(ds.TotalPixelMatrixRows)
    across, down = math.ceil(width / tile_w), math.ceil(height / tile_h)
    n_frames = int(ds.NumberOfFrames)
    assert n_frames == across * down, f"expected {across * down} frames (one focal plane), got {n_frames}"
    canvas = np.full((down * tile_h, across * tile_w, 3), 255, dtype=np.uint8)
    for index, frame in enumerate(_frames(ds, n_frames)):
        tile = np.asarray(Image.open(io.BytesIO(frame)).convert("RGB"))
        row, col = divmod(index, across)
        canvas[row * tile_h:(row + 1) * tile_h, col * tile_w:(col + 1) * tile_w] = tile
    return canvas[:height, :width]


def encode_tiles(rgb: np.ndarray, tile_h: int, tile_w: int, subsampling: int, quality: int = 90) -> list[bytes]:
    """Cut ``rgb`` into row-major tiles (edge tiles padded with white) and JPEG-encode each."""
    height, width = rgb.shape[:2]
    frames = []
    for y in range(0, height, tile_h):
        for x in range(0, width, tile_w):
            tile = np.full((tile_h, tile_w, 3), 255, dtype=np.uint8)
            part = rgb[y:y + tile_h, x:x + tile_w]
            tile[:part.shape[0], :part.shape[1]] = part
            buf = io.BytesIO()
            Image.fromarray(tile).save(buf, format="JPEG", quality=quality, subsampling=subsampling)
            frames.append(buf.getvalue())
    return frames


def downsampled_level(ds, pixels: np.ndarray):
    """A new instance of ``ds``'s series holding ``pixels`` downsampled 2x; returns (dataset, pixels)."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import generate_uid

    height, width = pixels.shape[:2]
    new_w, new_h = width // 2, height // 2
    small = cv2.resize(pixels, (new_w, new_h), interpolation=cv2.INTER_AREA)
    subsampling = _PIL_SUBSAMPLING.get(str(ds.PhotometricInterpretation), 0)
    frames = encode_tiles(small, int(ds.Rows), int(ds.Columns), subsampling)

    out = copy.deepcopy(ds)
    _new_instance_uid(out, generate_uid())
    out.InstanceNumber = int(getattr(ds, "InstanceNumber", 1) or 1) + 1
    out.ImageType = ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
    out.TotalPixelMatrixColumns, out.TotalPixelMatrixRows = new_w, new_h
    out.NumberOfFrames = len(frames)
    out.PixelData = encapsulate(frames)
    if str(ds.PhotometricInterpretation) not in _PIL_SUBSAMPLING:
        out.PhotometricInterpretation = "YBR_FULL"
    measures = out.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    measures.PixelSpacing = [float(v) * 2 for v in measures.PixelSpacing]
    for name in ("LossyImageCompressionRatio", "LossyImageCompressionMethod", "RepresentativeFrameNumber"):
        if name in out:
            delattr(out, name)
    return out, small


def write_pyramid_series(source: Path, folder: Path, levels: int = 2, names: list[str] | None = None) -> list[Path]:
    """Write a ``levels``-level DICOM WSI series into ``folder``, one file per level.

    Args:
        source: a real single-level TILED_FULL DICOM WSI with JPEG frames (copied as level 0).
        folder: where to write; created if needed.
        levels: number of pyramid levels.
        names: file names per level; default ``level_<i>.dcm``.

    Returns:
        The written files, level 0 first.
    """
    import pydicom

    folder.mkdir(parents=True, exist_ok=True)
    names = names or [f"level_{i}.dcm" for i in range(levels)]
    paths = [folder / name for name in names]
    shutil.copyfile(source, paths[0])
    ds = pydicom.dcmread(source)
    pixels = read_total_pixel_matrix(ds)
    for path in paths[1:]:
        ds, pixels = downsampled_level(ds, pixels)
        ds.save_as(path)
    return paths


def _new_instance_uid(ds, uid: str) -> None:
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid


def renew_series(paths: list[Path]) -> str:
    """Rewrite ``paths`` in place as one new series (new Series and SOP Instance UIDs); returns the UID."""
    import pydicom
    from pydicom.uid import generate_uid

    series_uid = generate_uid()
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = series_uid
        _new_instance_uid(ds, generate_uid())
        ds.save_as(path)
    return series_uid


def add_label(level: Path, target: Path, width: int = 160) -> Path:
    """Write a LABEL image of ``level``'s series to ``target``: its pixels shrunk to one JPEG frame.

    OpenSlide reads associated images (label, overview) as a single frame of the whole image.
    """
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(level)
    pixels = read_total_pixel_matrix(ds)
    height = max(1, round(pixels.shape[0] * width / pixels.shape[1]))
    small = cv2.resize(pixels, (width, height), interpolation=cv2.INTER_AREA)
    subsampling = _PIL_SUBSAMPLING.get(str(ds.PhotometricInterpretation), 0)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LABEL", "NONE"]
    _new_instance_uid(ds, generate_uid())
    ds.Rows, ds.Columns = height, width
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = width, height
    ds.NumberOfFrames = 1
    ds.PixelData = encapsulate(encode_tiles(small, height, width, subsampling))
    ds.save_as(target)
    return target
