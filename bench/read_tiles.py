"""Reader throughput: 256 px tiles/s of the slide reader (OpenSlide) on a synthetic 20x slide, 1 and 2 threads.

Run by hand from the repository root: ``python bench/read_tiles.py [--size 8192] [--runs 5]``. It is
``bench/tile_sources.py`` restricted to the OpenSlide source (medians of ``--runs`` passes; the
``thr/cpu`` columns are tiles per CPU second, robust to other load on a shared machine).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tile_sources import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:] + ["--sources", "openslide"])
