"""The device stage of the tile pipeline, run on the CPU: readers fetch compressed tiles, one decode thread
decodes, assembles, shifts and resizes them as torch tensors. It must give the CPU path's pixels.

Tolerance: fetching, decoding (libjpeg on the CPU), assembly and the sub-pixel shift (pixman's integer
arithmetic) are bit-identical to ``JpegTileSource.read``; only a resize differs, by at most one grey
level on a few per cent of pixels: ``area_resize`` applies OpenCV's own INTER_AREA weights as float32
matrix products, and OpenCV sums the same weights in another order, so a value within float rounding
of a half rounds the other way. On a GPU nvJPEG adds about one grey level (its IDCT and chroma
upsampling are not libjpeg's); that is checked by the gpu tests.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from slidemil.errors import SlideReadError
from slidemil.runtime import device_pipeline
from slidemil.runtime.device_pipeline import DecodeState, DeviceDecoder, fetch
from slidemil.runtime.pipeline import PipelineConfig, TilePipeline
from slidemil.slide import jpeg_device
from slidemil.slide.grid import grid_from_coords
from slidemil.slide.jpeg_device import assemble, decode_streams
from slidemil.slide.jpeg_source import JpegTileSource
from slidemil.slide.sources import ReaderTileSource
from slidemil.slide.table import SlideEntry, load_slides
from slidemil.slide.tiling import TilePlan, TilingConfig

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CMU = "CMU-1-Small-Region.svs"  # 2220 x 2967, RGB JPEG tiles of 240 px (Aperio)
CPU = torch.device("cpu")


def _coords(width: int, height: int, n: int, seed: int) -> np.ndarray:
    """Random level-0 corners, some off the image (white there) and some past its far edges."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(-150, width, n), rng.integers(-150, height, n)], axis=1)


def _device_read(src: JpegTileSource, coords: np.ndarray, size: int, out: int) -> torch.Tensor:
    encoded = src.fetch(coords, size, out)
    assert encoded is not None
    return assemble(encoded, decode_streams(encoded.streams, CPU), CPU)


@pytest.mark.parametrize(("size", "out"), [(240, 240), (256, 256), (480, 240), (120, 224)])
def test_device_assembly_equals_the_cpu_read_on_aperio_tiles(real_data, size, out):
    with JpegTileSource(real_data / CMU) as src:
        coords = _coords(2220, 2967, 12, seed=size)
        got = _device_read(src, coords, size, out)
        want = torch.from_numpy(src.read(coords, size, out))
    diff = (got.int() - want.int()).abs()
    assert got.dtype == torch.uint8 and got.shape == (12, out, out, 3)
    if size == out or size == 2 * out:  # no resize, or an integer ratio (whole-pixel area windows)
        assert int(diff.max()) == 0
    else:
        assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.05


def test_device_assembly_equals_the_cpu_read_on_aligned_and_shifted_tiles(synth_slide):
    path, _ = synth_slide  # 256-px file tiles at 0.5 mpp, a 4096-px pyramid
    with JpegTileSource(path) as src:
        aligned = np.array([[0, 0], [256, 512], [3840, 2816], [1024, 1024]])
        assert torch.equal(_device_read(src, aligned, 256, 256), torch.from_numpy(src.read(aligned, 256, 256)))
        # a downsampled level read at fractional level coordinates: the 7-bit sub-pixel shift
        odd = np.array([[333, 517], [1001, 3], [2047, 2049]])
        diff = _device_read(src, odd, 1000, 250).int() - torch.from_numpy(src.read(odd, 1000, 250)).int()
        assert int(diff.abs().max()) <= 1 and float((diff != 0).float().mean()) < 0.05


def _stream_tiles(pipeline: TilePipeline, entries: list[SlideEntry]) -> dict[str, list[tuple[int, np.ndarray]]]:
    got: dict[str, list[tuple[int, np.ndarray]]] = {}
    for stream in pipeline.run(entries):
        got[stream.entry.slide_id] = [(start, tiles.numpy() if isinstance(tiles, torch.Tensor) else tiles)
                                      for start, tiles in stream.batches()]
    return got


def test_pipeline_decoding_on_the_device_gives_the_cpu_pipelines_batches(synth_cohort):
    cohort, _ = synth_cohort
    entries = load_slides(cohort / "slides")[:2]
    cfg = PipelineConfig(batch_size=8, workers=2, queue_batches=2, device_batches=2)
    with TilePipeline(cfg, TilingConfig()) as pipeline:
        on_cpu = _stream_tiles(pipeline, entries)
    with TilePipeline(cfg, TilingConfig(), decode_device="cpu") as pipeline:
        kinds = set()
        for stream in pipeline.run(entries):
            for _, tiles in stream.batches():
                kinds.add((type(tiles).__name__, str(tiles.device), str(tiles.dtype)))
    assert kinds == {("Tensor", "cpu", "torch.uint8")}
    with TilePipeline(cfg, TilingConfig(), decode_device="cpu") as pipeline:
        on_device = _stream_tiles(pipeline, entries)
    assert on_cpu.keys() == on_device.keys() and all(len(v) > 1 for v in on_cpu.values())
    for sid in on_cpu:
        assert [s for s, _ in on_cpu[sid]] == [s for s, _ in on_device[sid]]
        for (_, a), (_, b) in zip(on_cpu[sid], on_device[sid]):
            np.testing.assert_array_equal(a, b)


def _fixed_plan(coords: np.ndarray, size: int, level0: tuple[int, int], mpp: float = 0.5):
    grid = grid_from_coords(coords, size, size, level0, mpp)
    return lambda entry: TilePlan(tissue=None, thumbnail=None, grid=grid, attrs=None)  # type: ignore[arg-type]


def test_slides_without_jpeg_tiles_are_decoded_on_the_cpu_with_a_log_line(real_data, caplog):
    entry = SlideEntry("he", real_data / "he-tile-1000.png", mpp=0.5)  # a plain PNG: no JPEG tiles to fetch
    coords = np.array([[0, 0], [256, 0], [512, 512], [744, 744]])
    cfg = PipelineConfig(batch_size=3, workers=1, queue_batches=2)
    with TilePipeline(cfg, TilingConfig(), _fixed_plan(coords, 256, (1000, 1000))) as pipeline:
        want = _stream_tiles(pipeline, [entry])["he"]
    with caplog.at_level(logging.INFO, logger="slidemil.runtime.device_pipeline"), \
            TilePipeline(cfg, TilingConfig(), _fixed_plan(coords, 256, (1000, 1000)), decode_device="cpu") as pipeline:
        got = _stream_tiles(pipeline, [entry])["he"]
    assert [s for s, _ in got] == [0, 3]
    for (_, a), (_, b) in zip(want, got):
        np.testing.assert_array_equal(a, b)
    assert "he-tile-1000.png: the openslide tile source has no JPEG tiles to decode on the device" in caplog.text
    assert caplog.text.count("no JPEG tiles") == 1  # once per slide, not per batch


def test_a_corrupt_tile_fails_its_slide_and_the_next_slide_is_read(fixture_copy, real_data):
    import tifffile
    bad = fixture_copy(CMU)
    offset = int(tifffile.TiffFile(bad).pages[0].dataoffsets[5])
    with open(bad, "r+b") as f:  # garbage over the tile's marker segments
        f.seek(offset + 2)
        f.write(bytes(range(7, 207)))
    coords = np.array([[0, 0], [240, 0], [5 * 240, 0], [0, 240], [240, 240]])
    cfg = PipelineConfig(batch_size=2, workers=2, queue_batches=2, device_batches=1)
    entries = [SlideEntry("bad", bad), SlideEntry("good", real_data / CMU)]
    with TilePipeline(cfg, TilingConfig(), _fixed_plan(coords, 240, (2220, 2967)), decode_device="cpu") as pipeline:
        streams = pipeline.run(entries)
        first = next(streams)
        with pytest.raises(SlideReadError, match=rf"{bad.name}.*tile 5"):
            for _ in first.batches():
                pass
        first.drain()
        second = next(streams)
        assert [start for start, _ in second.batches()] == [0, 2, 4]
        assert next(streams, None) is None


def test_a_level_whose_device_colours_fail_is_decoded_on_the_cpu(real_data, monkeypatch, caplog):
    # nvJPEG's check runs on CUDA only; here the decoder is told it is on one and the check is made to fail
    monkeypatch.setattr(jpeg_device, "colour_error", lambda decoded, stream: 40.0)
    state = DecodeState()
    decoder = DeviceDecoder("cpu", state)
    decoder.cuda = True
    coords = np.array([[0, 0], [300, 300]])
    with JpegTileSource(real_data / CMU) as src:
        want = torch.from_numpy(src.read(coords, 240, 240))
        with caplog.at_level(logging.WARNING):
            got = decoder(fetch(src, src.path, coords, 240, 240, state, pin=False))
        assert torch.equal(got, want)
        assert "differs from libjpeg by 40.0 grey levels on level 0" in caplog.text
        # the readers now decode that level on the CPU: they hand over pixels, not compressed tiles
        again = fetch(src, src.path, coords, 240, 240, state, pin=False)
        assert isinstance(again, np.ndarray)
        np.testing.assert_array_equal(again, want.numpy())
        assert torch.equal(decoder(again), want)


def test_a_batch_the_device_decoder_refuses_is_read_on_the_cpu(real_data, monkeypatch, caplog):
    def refuse(streams, device):
        raise RuntimeError("nvjpegDecodeBatched failed: NVJPEG_STATUS_BAD_JPEG")
    monkeypatch.setattr(jpeg_device, "decode_streams", refuse)
    coords = np.array([[10, 20], [900, 1200]])
    with JpegTileSource(real_data / CMU) as src, caplog.at_level(logging.WARNING):
        got = DeviceDecoder("cpu", DecodeState())(fetch(src, src.path, coords, 240, 240, DecodeState(), pin=False))
        assert torch.equal(got, torch.from_numpy(src.read(coords, 240, 240)))
    assert "NVJPEG_STATUS_BAD_JPEG" in caplog.text and "reading the batch on the CPU" in caplog.text


def test_readers_only_fetch_bytes(real_data, monkeypatch):
    """Stage 1 decodes nothing: a fetched batch is the file tiles' JPEG streams, a few KB each."""
    calls = []
    monkeypatch.setattr(jpeg_device, "decode_streams", lambda s, d: calls.append(len(s)) or [])
    with JpegTileSource(real_data / CMU) as src:
        encoded = fetch(src, src.path, np.array([[0, 0], [120, 120]]), 240, 240, DecodeState(), pin=False)
    assert calls == [] and isinstance(encoded, jpeg_device.EncodedTiles)
    assert list(encoded.indices) == [0, 1, 10, 11]  # tile numbers under the two regions (10 tiles across)
    assert all(s.dtype == torch.uint8 and s.dim() == 1 for s in encoded.streams)
    assert encoded.nbytes < 4 * 240 * 240 * 3 / 5  # compressed


def test_prepare_device_decode_does_nothing_on_the_cpu():
    device_pipeline.prepare_device_decode("cpu")


def test_reader_source_has_no_fetch(real_data):
    with ReaderTileSource(Path(real_data / "he-tile-1000.png"), mpp=0.5) as src:
        assert not hasattr(src, "fetch")


# --- on a GPU ---------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_batched_nvjpeg_pipeline_matches_the_cpu_pipeline(synth_cohort, real_data):
    cohort, _ = synth_cohort
    entries = load_slides(cohort / "slides")[:2]
    cfg = PipelineConfig(batch_size=64, workers=2)
    with TilePipeline(cfg, TilingConfig()) as pipeline:
        on_cpu = _stream_tiles(pipeline, entries)
    with TilePipeline(cfg, TilingConfig(), decode_device="cuda") as pipeline:
        for stream in pipeline.run(entries):
            for start, tiles in stream.batches():
                assert tiles.device.type == "cuda" and tiles.dtype == torch.uint8
                ref = torch.from_numpy(dict(on_cpu[stream.entry.slide_id])[start]).cuda()
                # nvJPEG's IDCT and chroma upsampling are not libjpeg's: about one grey level apart
                assert (tiles.int() - ref.int()).abs().float().mean() <= 1.5
    with JpegTileSource(real_data / CMU) as src:  # Aperio RGB JPEG (Adobe transform 0), resized
        coords = _coords(2220, 2967, 32, seed=3)
        encoded = src.fetch(coords, 448, 224)
        got = DeviceDecoder("cuda", DecodeState())(encoded)
        ref = torch.from_numpy(src.read(coords, 448, 224)).cuda()
        assert got.shape == ref.shape and (got.int() - ref.int()).abs().float().mean() <= 1.5
