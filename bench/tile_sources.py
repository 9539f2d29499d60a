"""Source-only throughput: tiles/s of each tile source (no model), with 1 and 2 reader threads.

Run by hand from the repository root (package installed, e.g. ``make install``):
``python bench/tile_sources.py [--size 8192] [--runs 5] [--threads 1 2]``.

A synthetic 20x slide (0.5 um/px, Aperio SVS with YCbCr JPEG tiles from ``slidemil.slide.synth``)
is read over a full grid in three ways: 256 px tiles aligned with the file's 256 px tiles, 224 px
tiles that are not, and 448 -> 224 px (10x equivalent, resized). As in the engine, batches of
``--batch`` tiles in grid order go round-robin to the reader threads, each with its own source,
opened before the clock starts (``open ms`` is that cost, once per slide and thread). ``thr/cpu``
columns are tiles per CPU second of the process, which other load on a shared machine does not
change as it changes wall-clock rates. Each cell is the median of ``--runs`` timed passes after one warm-up pass; on a CUDA machine the
jpeg source's nvJPEG path (``read_device``) is timed too. Prints a table; writes nothing else.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from slidemil.slide.readers import open_slide
from slidemil.slide.sources import open_tile_source
from slidemil.slide.synth import write_slide

SCENARIOS = (("256 aligned", 256, 256), ("224 unaligned", 224, 224), ("448->224 resized", 448, 224))


def make_slide(folder: Path, size: int) -> Path:
    """A positive synthetic 20x slide, ``size`` px wide."""
    path = folder / "bench20x.svs"
    write_slide(path, size=size, label=1, n_classes=2, lesion_fraction=0.03, rng=np.random.default_rng(0),
                mpp=0.5, app_mag=20)
    return path


def grid(path: Path, size_level0: int) -> np.ndarray:
    """(N, 2) top-left corners of a full non-overlapping grid, row by row."""
    with open_slide(path) as reader:
        width, height = reader.dimensions
    xs, ys = np.arange(0, width - size_level0 + 1, size_level0), np.arange(0, height - size_level0 + 1, size_level0)
    return np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2).astype(np.int64)


def reader_fn(device: str | None) -> Callable[..., object]:
    """A function(source, batch, size, out) reading one batch with the source's CPU or device path."""
    if device is None:
        return lambda src, batch, size, out: src.read(batch, size, out)

    def on_device(src, batch, size, out):
        tiles = src.read_device(batch, size, out, device)
        torch.cuda.synchronize()
        return tiles
    return on_device


def one_pass(path: Path, kind: str, coords: np.ndarray, size: int, out: int, threads: int, batch: int,
             device: str | None) -> tuple[float, float]:
    """Tiles per wall second and per CPU second of one pass with ``threads`` threads (sources opened first)."""
    batches = [coords[i:i + batch] for i in range(0, len(coords), batch)]
    read = reader_fn(device)
    errors: list[BaseException] = []
    ready = threading.Barrier(threads + 1)

    def work(worker: int) -> None:
        try:
            with open_tile_source(path, None, size, out, kind=kind) as src:
                ready.wait()
                for b in batches[worker::threads]:
                    read(src, b, size, out)
        except BaseException as exc:  # reported after the pass
            ready.abort()
            errors.append(exc)

    pool = [threading.Thread(target=work, args=(w,)) for w in range(threads)]
    for t in pool:
        t.start()
    try:
        ready.wait()
    except threading.BrokenBarrierError:
        pass
    start, cpu_start = time.perf_counter(), time.process_time()
    for t in pool:
        t.join()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    if errors:
        raise errors[0]
    return len(coords) / elapsed, len(coords) / max(cpu, 1e-9)


def open_ms(path: Path, kind: str, size: int, out: int, runs: int) -> float:
    """Median milliseconds to choose and open the source (per slide and reader thread)."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        with open_tile_source(path, None, size, out, kind=kind):
            times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192, help="slide width in px (height is 3/4)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--slide", type=Path, help="use this slide instead of making one")
    parser.add_argument("--sources", nargs="+", default=["openslide", "jpeg"], choices=["openslide", "jpeg"])
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # torchvision 0.29 decoders
    torch.set_num_threads(1)

    sources: list[tuple[str, str | None]] = [(name, None) for name in args.sources]
    if torch.cuda.is_available() and "jpeg" in args.sources:
        sources.append(("jpeg", "cuda"))
    with tempfile.TemporaryDirectory() as tmp:
        path = args.slide or make_slide(Path(tmp), args.size)
        with open_slide(path) as reader:
            print(f"slide: {path.name} {reader.dimensions[0]}x{reader.dimensions[1]} "
                  f"levels {reader.level_downsamples} mpp {reader.mpp}")
        print(f"batch {args.batch}; median of {args.runs} passes; tiles/s\n")
        header = f"{'tiles':<18}{'source':<12}" + "".join(f"{f'{n} thr':>10}" for n in args.threads)
        cpu_header = "".join(f"{f'{n} thr/cpu':>10}" for n in args.threads)
        print(header + f"{'x openslide':>14}{'open ms':>10}" + cpu_header)
        print("-" * (len(header) + 24 + len(cpu_header)))
        for name, size, out in SCENARIOS:
            coords = grid(path, size)
            base: dict[int, float] = {}
            for kind, device in sources:
                label = kind if device is None else f"{kind}-{device}"
                row, per_cpu = [], []
                for threads in args.threads:
                    one_pass(path, kind, coords, size, out, threads, args.batch, device)  # warm-up
                    rates = [one_pass(path, kind, coords, size, out, threads, args.batch, device)
                             for _ in range(args.runs)]
                    row.append(statistics.median(r[0] for r in rates))
                    per_cpu.append(statistics.median(r[1] for r in rates))
                if kind == "openslide":
                    base = dict(zip(args.threads, row))
                ratio = "/".join(f"{r / base[t]:.1f}" for t, r in zip(args.threads, row)) if base else ""
                opened = open_ms(path, kind, size, out, args.runs)
                print(f"{name:<18}{label:<12}" + "".join(f"{r:>10.0f}" for r in row) + f"{ratio:>14}{opened:>10.1f}"
                      + "".join(f"{r:>10.0f}" for r in per_cpu))
            print(f"{'':<18}({len(coords)} tiles per pass)")


if __name__ == "__main__":
    main()
