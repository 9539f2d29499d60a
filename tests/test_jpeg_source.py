"""The JPEG tile source against OpenSlide: real Aperio RGB JPEG, synthetic YCbCr slides, tiled TIFFs."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import torch

from slidemil.errors import SlideOpenError, SlideReadError
from slidemil.slide.jpeg_source import JpegTileSource, area_resize
from slidemil.slide.jpeg_tiff import ADOBE_RGB_SEGMENT, rgb_jpeg, scan_flaw
from slidemil.slide.readers import open_slide
from slidemil.slide.sources import ReaderTileSource, open_tile_source

# torchvision 0.29 marks its image decoders deprecated (in favour of TorchCodec) on every call.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CMU = "CMU-1-Small-Region.svs"


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients with fine noise: every JPEG block and chroma sample matters."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([xx * 255 // width, yy * 255 // height, (xx + 2 * yy) % 256], -1).astype(np.uint8)
    img = cv2.GaussianBlur(img, (0, 0), 3)
    noise = rng.integers(-20, 21, img.shape)
    return np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8)


def _write_tiff(path: Path, img: np.ndarray, photometric: str = "ycbcr", levels: int = 3,
                subsampling: tuple[int, int] = (2, 2), level_compression: tuple[str, ...] = (),
                optimize: bool = False) -> Path:
    """A generic tiled TIFF pyramid (256 px tiles), each level half the previous (OpenSlide 'generic-tiff').

    ``optimize``: JPEG tiles with their own optimised Huffman tables instead of the standard ones.
    """
    with tifffile.TiffWriter(path) as tw:
        for i in range(levels):
            compression = level_compression[i] if i < len(level_compression) else "jpeg"
            kw = dict(tile=(256, 256), photometric="rgb", metadata=None, subfiletype=1 if i else 0,
                      compression=compression)
            if compression == "jpeg":
                kw["compressionargs"] = {"outcolorspace": photometric, "optimize": optimize}
                kw["subsampling"] = subsampling
            tw.write(img, **kw)
            img = cv2.resize(img, (img.shape[1] // 2, img.shape[0] // 2), interpolation=cv2.INTER_AREA)
    return path


@pytest.fixture(scope="module")
def tiffs(tmp_path_factory) -> dict[str, Path]:
    """701 x 603 pyramids (partial edge tiles; level downsamples 2.003 and 4.01): YCbCr 2x2 and 1x1, RGB."""
    out = tmp_path_factory.mktemp("jpeg_tiffs")
    img = _image(603, 701)
    return {
        "ycbcr22": _write_tiff(out / "ycbcr22.tiff", img, "ycbcr", subsampling=(2, 2)),
        "ycbcr11": _write_tiff(out / "ycbcr11.tiff", img, "ycbcr", subsampling=(1, 1)),
        "rgb": _write_tiff(out / "rgb.tiff", img, "rgb"),
    }


def _both(path: Path, coords: np.ndarray, size: int, out: int) -> tuple[np.ndarray, np.ndarray]:
    coords = np.asarray(coords, dtype=np.int64)
    with JpegTileSource(path) as src, open_slide(path) as reader:
        return src.read(coords, size, out), reader.read_tiles(coords, size, out)


def _grid(width: int, height: int, step: int, start: int = 0) -> np.ndarray:
    return np.array([(x, y) for y in range(start, height, step) for x in range(start, width, step)], dtype=np.int64)


def _random_coords(width: int, height: int, n: int, seed: int, margin: int = 120) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.c_[rng.integers(-margin, width, n), rng.integers(-margin, height, n)]


# -- identity with OpenSlide ------------------------------------------------------------------

def test_cmu_every_file_tile_is_identical(real_data):
    path = real_data / CMU
    page = tifffile.TiffFile(path).pages[0]
    assert (page.tilewidth, page.tilelength, page.photometric, page.compression) == (240, 240, 2, 7)
    coords = _grid(2220, 2967, 240)
    assert len(coords) == 130  # 10 x 13 file tiles, edge tiles included
    ours, theirs = _both(path, coords, 240, 240)
    assert np.array_equal(ours, theirs)


def test_cmu_unaligned_and_edge_tiles_are_identical(real_data):
    coords = np.vstack([_random_coords(2220, 2967, 40, seed=1), [[2100, 2900], [2219, 2966], [-5, -7], [3000, 10]]])
    for size in (240, 300):
        ours, theirs = _both(real_data / CMU, coords, size, size)
        assert np.array_equal(ours, theirs), size


@pytest.mark.parametrize("kind", ["ycbcr22", "ycbcr11", "rgb"])
def test_tiled_tiff_level0_identical_aligned_and_not(tiffs, kind):
    aligned = _grid(701, 603, 256)
    ours, theirs = _both(tiffs[kind], aligned, 256, 256)
    assert np.array_equal(ours, theirs)
    unaligned = np.vstack([_grid(701, 603, 224, start=37), _random_coords(701, 603, 20, seed=2)])
    ours, theirs = _both(tiffs[kind], unaligned, 224, 224)
    assert np.array_equal(ours, theirs)


def test_synthetic_aperio_slide_identical_on_both_levels(synth_slide):
    path, _ = synth_slide
    with open_slide(path) as reader:
        assert reader.vendor == "aperio" and reader.level_downsamples == [1.0, 4.0]
    ours, theirs = _both(path, _grid(4096, 3072, 512, start=256)[::3], 256, 256)  # level 0
    assert np.array_equal(ours, theirs)
    ours, theirs = _both(path, _grid(4096, 3072, 1024)[::2], 1024, 256)  # level 1, aligned
    assert np.array_equal(ours, theirs)


def test_resized_tiles_within_tolerance(real_data, tiffs):
    # Level 0 only, 512 -> 256 with cv2 INTER_AREA on both sides.
    ours, theirs = _both(real_data / CMU, _random_coords(2220, 2967, 12, seed=3), 512, 256)
    assert np.abs(ours.astype(int) - theirs).mean() <= 1
    # Coarser levels with fractional level coordinates (downsample 2.003, 4.01): OpenSlide interpolates.
    coords = _random_coords(701, 603, 16, seed=4)
    for size, out in ((512, 256), (600, 150), (1024, 256), (100, 224)):
        ours, theirs = _both(tiffs["ycbcr22"], coords, size, out)
        diff = np.abs(ours.astype(int) - theirs)
        assert diff.mean() <= 1 and diff.max() <= 3, (size, out, diff.mean(), diff.max())


def test_non_jpeg_level_falls_back_to_openslide(tmp_path):
    path = _write_tiff(tmp_path / "mixed.tiff", _image(300, 400), levels=2, level_compression=("jpeg", "lzw"))
    assert JpegTileSource.supports(path, 256, 256)
    assert not JpegTileSource.supports(path, 512, 256)  # read from the LZW level
    ours, theirs = _both(path, np.array([[0, 0], [100, 50]]), 512, 256)
    assert np.array_equal(ours, theirs)


# -- choice of source -------------------------------------------------------------------------

def test_supports_only_jpeg_tiled_svs_and_tiff(real_data, tiffs, tmp_path):
    assert JpegTileSource.supports(real_data / CMU, 240, 240)
    assert JpegTileSource.supports(tiffs["rgb"], 256, 256)
    lzw = tmp_path / "lzw.tiff"
    tifffile.imwrite(lzw, _image(300, 300), tile=(256, 256), compression="lzw", photometric="rgb")
    for path in (real_data / "boxes.tiff", lzw, real_data / "bone-marrow-jpeg.dcm",
                 real_data / "he-tile-1000.png", real_data / "unopenable.tiff", tmp_path / "absent.svs"):
        assert not JpegTileSource.supports(path, 256, 256), path.name
    with pytest.raises(SlideOpenError, match="boxes.tiff"):
        JpegTileSource(real_data / "boxes.tiff")


def test_auto_prefers_jpeg_where_it_can(real_data):
    with open_tile_source(real_data / CMU, None, 240, 240, kind="auto") as src:
        assert isinstance(src, JpegTileSource) and src.source_name == "jpeg"
    for name in ("boxes.tiff", "bone-marrow-jpeg.dcm"):
        with open_tile_source(real_data / name, 1.0, 64, 64, kind="auto") as src:
            assert isinstance(src, ReaderTileSource), name
    with open_tile_source(real_data / CMU, None, 240, 240, kind="jpeg") as src:
        assert isinstance(src, JpegTileSource)


# -- corrupt data -----------------------------------------------------------------------------

def test_corrupt_tile_is_a_read_error_naming_the_file(fixture_copy):
    path = fixture_copy(CMU)
    page = tifffile.TiffFile(path).pages[0]
    offset = int(page.dataoffsets[5])
    with open(path, "r+b") as f:  # overwrite the tile's marker segments after SOI
        f.seek(offset + 2)
        f.write(bytes(range(7, 207)))
    with JpegTileSource(path) as src:
        src.read(np.array([[0, 0]]), 240, 240)  # other tiles still read
        with pytest.raises(SlideReadError, match=f"{path.name}.*tile 5"):
            src.read(np.array([[0, 0], [5 * 240, 0]]), 240, 240)


def test_unreadable_fixture_and_truncated_file_are_read_errors(real_data, tiffs, tmp_path):
    with JpegTileSource(real_data / "unreadable.svs") as src:
        with pytest.raises(SlideReadError, match="unreadable.svs"):
            src.read(np.array([[0, 0]]), 16, 16)
    path = tmp_path / "cut.tiff"
    shutil.copy(tiffs["ycbcr22"], path)
    with tifffile.TiffFile(path, mode="r+b") as tif:  # level 0's last tile now runs past the end of the file
        counts = tif.pages[0].tags["TileByteCounts"]
        counts.overwrite([*counts.value[:-1], 10**7])
    with JpegTileSource(path) as src:
        src.read(np.array([[0, 0]]), 256, 256)
        with pytest.raises(SlideReadError, match="cut.tiff.*truncated"):
            src.read(np.array([[600, 500]]), 256, 256)
    with open(path, "r+b") as f:  # a cut file: OpenSlide refuses it already at open, as the reader does
        f.truncate(path.stat().st_size // 2)
    with pytest.raises(SlideOpenError, match="cut.tiff"):
        JpegTileSource(path)


def _scan_start(tile: bytes) -> int:
    """Where a JPEG tile's entropy-coded data begin (after its start-of-scan header)."""
    sos = tile.index(b"\xff\xda")
    return sos + 2 + int.from_bytes(tile[sos + 2:sos + 4], "big")


def _zero_scan(tile: bytes) -> bytes:
    """The scan data zeroed up to the end-of-image marker (as a zeroed range of a file leaves them)."""
    start = _scan_start(tile)
    return tile[:start] + bytes(len(tile) - start - 2) + tile[-2:]


def _cut_scan(tile: bytes) -> bytes:
    """The scan data cut in half and closed with an end-of-image marker; zeros fill the rest of the tile."""
    cut = (_scan_start(tile) + len(tile)) // 2
    return tile[:cut] + b"\xff\xd9" + bytes(len(tile) - cut - 2)


@pytest.fixture(scope="module")
def damaged(tiffs, tmp_path_factory) -> Path:
    """The YCbCr pyramid with three bad level-0 tiles (3 x 3 of them, 256 px).

    Tile 1's scan data are zeroed and tile 5's cut short, both still closed by EOI: torchvision decodes
    them to wrong pixels without an error (libjpeg only warns, on stderr). OpenSlide fails on tile 5 and
    returns wrong pixels for tile 1 (its image is complete before its zeros end). Tile 7's byte count is
    cut in half (no EOI): torchvision fails on it too.
    """
    path = tmp_path_factory.mktemp("damaged") / "damaged.tiff"
    shutil.copy(tiffs["ycbcr22"], path)
    with tifffile.TiffFile(path, mode="r+b") as tif:
        page = tif.pages[0]
        offsets, counts = page.dataoffsets, page.databytecounts
        for index, damage in ((1, _zero_scan), (5, _cut_scan)):
            tif.filehandle.seek(offsets[index])
            tile = tif.filehandle.read(counts[index])
            tif.filehandle.seek(offsets[index])
            tif.filehandle.write(damage(tile))
        page.tags["TileByteCounts"].overwrite([*counts[:7], counts[7] // 2, *counts[8:]])
    return path


@pytest.mark.parametrize(("tile", "problem"), [
    (1, r"a run of 32\+ zero bytes in its scan data .*, and the decoder never reaches the end of its data"),
    (5, r"its last 8 x 8 block is the uniform grey .*, and OpenSlide fails on it \(Corrupt JPEG data: .+\)"),
    (7, r"torchvision cannot decode it .*; OpenSlide fails on it too \(.+\)"),
])
def test_damaged_tile_is_a_read_error_saying_what_to_do(damaged, tile, problem):
    x, y = 256 * (tile % 3), 256 * (tile // 3)
    message = (rf"damaged\.tiff: JPEG tile {tile} of level 0 \(file offset \d+, \d+ bytes\) is corrupt: {problem}\. "
               r"Copy the slide again from its source \(compare checksums\) or re-scan the glass slide$")
    with JpegTileSource(damaged) as src:
        with pytest.raises(SlideReadError, match=message):
            src.read(np.array([[x, y]]), 256, 256)  # the file tile itself
    with JpegTileSource(damaged) as src:
        with pytest.raises(SlideReadError, match=f"tile {tile} of level 0"):
            src.read(np.array([[0, 0], [x - 100, y]]), 200, 200)  # a batch, one tile straddling it
    with JpegTileSource(damaged) as src:  # the tensor pipeline decodes through the same checks
        with pytest.raises(SlideReadError, match=f"tile {tile} of level 0"):
            src.read_device(np.array([[x, y]]), 256, 256, "cpu")


def test_sound_tiles_of_a_damaged_slide_stay_identical_to_openslide(damaged):
    aligned = np.array([[256 * (i % 3), 256 * (i // 3)] for i in (0, 2, 3, 4, 6, 8)])
    ours, theirs = _both(damaged, aligned, 256, 256)
    assert np.array_equal(ours, theirs)
    unaligned = np.array([[10, 30], [0, 300], [20, 340], [-40, 500], [300, 300], [520, 550]])  # on tiles 0, 3, 4, 6, 8
    ours, theirs = _both(damaged, unaligned, 200, 200)
    assert np.array_equal(ours, theirs)


def test_sound_tiles_that_look_damaged_are_cleared(tmp_path, monkeypatch):
    # With optimised Huffman tables a flat tile is all zero bits, and a tile may end in flat grey 128:
    # both bear the marks the screens look for, and a closer look clears them.
    img = _image(512, 512, seed=1)
    img[:256, :256] = 255  # tile 0: flat white
    img[512 - 48:, 256 - 48:256] = 128  # tile 2 ends in flat mid-grey
    path = _write_tiff(tmp_path / "flat.tiff", img, levels=1, optimize=True)
    flagged: list[int] = []
    original = JpegTileSource._confirm

    def recording(self, level_index, level, index, stream, flaw):
        flagged.append(index)
        return original(self, level_index, level, index, stream, flaw)

    monkeypatch.setattr(JpegTileSource, "_confirm", recording)
    ours, theirs = _both(path, _grid(512, 512, 256), 256, 256)
    assert flagged == [0, 2]
    assert np.array_equal(ours, theirs)
    assert (ours[0] == 255).all() and (ours[2][-8:, -8:] == 128).all()


def test_scan_screen_marks():
    import imagecodecs
    tile = imagecodecs.jpeg8_encode(_image(64, 64), level=90)
    assert scan_flaw(tile) is None
    start = _scan_start(tile)
    assert "zero bytes" in scan_flaw(_zero_scan(tile))
    assert "marker 0xFFC4" in scan_flaw(tile[:start + 20] + b"\xff\xc4" + tile[start + 22:])
    assert scan_flaw(tile[:start + 20] + b"\xff\x00\xff\xd3" + tile[start + 24:]) is None  # stuffed FF, RST3
    assert "end-of-image" in scan_flaw(tile[:-2])
    assert "start-of-scan" in scan_flaw(tile[:start - 10])


# -- decoding, caching, device pipeline -------------------------------------------------------

def test_each_file_tile_decoded_once_per_pass(tiffs, monkeypatch):
    coords = _grid(701 - 150, 603 - 150, 150, start=20)  # 4 x 3 output tiles straddling 3 x 2 file tiles
    decoded: list[int] = []
    with JpegTileSource(tiffs["ycbcr22"]) as src:
        original = src._decode

        def counting(level_index, level, indices, device):
            decoded.extend(indices)
            return original(level_index, level, indices, device)

        monkeypatch.setattr(src, "_decode", counting)
        for start in range(0, len(coords), 4):
            src.read(coords[start:start + 4], 150, 150)
    assert sorted(decoded) == [0, 1, 2, 3, 4, 5]


def test_reader_threads_share_decoded_tiles(tiffs, monkeypatch):
    # The engine deals batches round-robin to threads that each open a source: no tile is decoded twice.
    path, coords = tiffs["ycbcr11"], _grid(701 - 150, 603 - 150, 150, start=20)
    batches = [coords[i:i + 2] for i in range(0, len(coords), 2)]
    decoded: list[int] = []
    lock = threading.Lock()
    original = JpegTileSource._decode

    def counting(self, level_index, level, indices, device):
        with lock:
            decoded.extend(indices)
        return original(self, level_index, level, indices, device)

    monkeypatch.setattr(JpegTileSource, "_decode", counting)
    results: dict[int, np.ndarray] = {}

    # As in the engine, each thread's source stays open until the whole slide is read.
    sources = [JpegTileSource(path) for _ in range(3)]

    def work(worker: int, threads: int) -> None:
        for k in range(worker, len(batches), threads):
            results[k] = sources[worker].read(batches[k], 150, 150)

    pool = [threading.Thread(target=work, args=(w, 3)) for w in range(3)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    for src in sources:
        src.close()
    assert sorted(decoded) == [0, 1, 2, 3, 4, 5]
    with open_slide(path) as reader:
        assert np.array_equal(np.concatenate([results[k] for k in range(len(batches))]),
                              reader.read_tiles(coords, 150, 150))


@pytest.mark.timeout(60)
def test_a_failed_decode_does_not_block_other_threads(fixture_copy):
    path = fixture_copy(CMU)
    offset = int(tifffile.TiffFile(path).pages[0].dataoffsets[1])
    with open(path, "r+b") as f:
        f.seek(offset + 2)
        f.write(bytes(range(7, 207)))
    errors: list[Exception] = []
    start = threading.Barrier(2)

    def work() -> None:
        with JpegTileSource(path) as src:
            start.wait()
            try:
                src.read(np.array([[120, 0], [360, 0]]), 240, 240)  # both straddle the corrupt tile 1
            except SlideReadError as exc:
                errors.append(exc)

    pool = [threading.Thread(target=work) for _ in range(2)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert len(errors) == 2 and all("tile 1" in str(e) for e in errors)


def test_rgb_jpeg_marks_components_as_rgb():
    import imagecodecs
    jfif = imagecodecs.jpeg8_encode(_image(16, 16), level=90)  # JFIF APP0, YCbCr
    out = rgb_jpeg(jfif)
    assert out.startswith(b"\xff\xd8" + ADOBE_RGB_SEGMENT)
    assert out.count(b"JFIF\x00") == 0 and out.count(b"Adobe") == 1
    assert len(out) == len(jfif) + len(ADOBE_RGB_SEGMENT) - 18  # the 18-byte JFIF segment is gone


def test_device_pipeline_on_cpu_matches_read(real_data, tiffs):
    # The tensor pipeline of read_device (assembly, sub-pixel shift, area resize), run on the CPU.
    cpu = torch.device("cpu")
    with JpegTileSource(real_data / CMU) as src:
        coords = _random_coords(2220, 2967, 10, seed=5)
        assert torch.equal(src._read_torch(coords, 240, 240, cpu), torch.from_numpy(src.read(coords, 240, 240)))
        tiles = src.read_device(coords, 240, 240, "cpu")
        assert tiles.dtype == torch.uint8 and tiles.shape == (10, 240, 240, 3)
    with JpegTileSource(tiffs["ycbcr22"]) as src:
        coords = _random_coords(701, 603, 10, seed=6)
        for size, out in ((1024, 256), (443, 224), (100, 224)):
            diff = (src._read_torch(coords, size, out, cpu).int() - torch.from_numpy(src.read(coords, size, out)).int())
            assert diff.abs().max() <= 1, (size, out)


@pytest.mark.parametrize(("n", "m"), [(443, 224), (512, 256), (100, 224)])
def test_area_resize_matches_opencv(n, m):
    batch = np.random.default_rng(n).integers(0, 256, (2, n, n, 3), dtype=np.uint8)
    ours = area_resize(torch.from_numpy(batch), m).numpy().astype(int)
    ref = np.stack([cv2.resize(t, (m, m), interpolation=cv2.INTER_AREA) for t in batch])
    assert np.abs(ours - ref).max() <= 1


@pytest.mark.gpu
def test_nvjpeg_tiles_on_the_device_match_the_cpu(real_data, synth_slide):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    for path, size, out in ((real_data / CMU, 240, 240), (real_data / CMU, 448, 224), (synth_slide[0], 256, 256),
                            (synth_slide[0], 1024, 256)):
        with JpegTileSource(path) as src:
            coords = _random_coords(2000, 2000, 64, seed=7)
            tiles = src.read_device(coords, size, out, "cuda")
            assert tiles.device.type == "cuda" and tiles.dtype == torch.uint8 and tiles.shape == (64, out, out, 3)
            ref = torch.from_numpy(src.read(coords, size, out)).cuda()
            # nvJPEG's IDCT and chroma upsampling are not libjpeg's: about one grey level apart.
            assert (tiles.int() - ref.int()).abs().float().mean() <= 1.5, (path.name, size, out)
