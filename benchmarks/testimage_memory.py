"""Time and peak memory of writing one synthetic test image
(mgpr.testimage.write_test_image).

Run in a fresh process (peak RSS is the whole process's ``ru_maxrss``), e.g.::

    uv run python benchmarks/testimage_memory.py --size 8192
    uv run python benchmarks/testimage_memory.py --size 40000 --dir /tmp

The image goes into a temporary directory that is removed afterwards (``--keep`` keeps it).
Prints one ``key=value`` line per figure on stdout.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from mgpr.testimage import TestImageSpec, write_test_image


def _rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv: list[str] | None = None) -> int:
    """Write one image and print seconds, MB/s of raw pixels, file size, ratio and peak RSS."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192, help="width = height, pixels")
    parser.add_argument("--bands", type=int, default=3)
    parser.add_argument("--compress", default="deflate", help="deflate|zstd|lzw|none")
    parser.add_argument("--objects", type=int, default=0)
    parser.add_argument("--overviews", action="store_true")
    parser.add_argument("--num-threads", type=int, default=0, help="GDAL threads, 0 = all CPUs")
    parser.add_argument("--dir", default=None, help="parent of the temp dir (default: system tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the image, print its path")
    args = parser.parse_args(argv)

    spec = TestImageSpec(
        width=args.size,
        height=args.size,
        bands=args.bands,
        compress=args.compress,
        objects=args.objects,
        overviews=args.overviews,
        num_threads=args.num_threads,
    )
    rss_before = _rss_mib()
    tmp = Path(tempfile.mkdtemp(prefix="mgpr-testimage-", dir=args.dir))
    try:
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        result = write_test_image(tmp / "bench.tif", spec)
        seconds = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"size={spec.width}x{spec.height}x{spec.bands} compress={spec.compress}")
    print(f"seconds={seconds:.1f} cpu_seconds={cpu:.1f}")
    print(f"raw_MB_per_s={result.raw_bytes / 1e6 / seconds:.1f}")
    print(f"raw_MB={result.raw_bytes / 1e6:.1f} file_MB={result.file_bytes / 1e6:.1f}")
    print(f"compression_ratio={result.compression_ratio:.2f}")
    print(f"rss_after_imports_MiB={rss_before:.0f} peak_rss_MiB={_rss_mib():.0f}")
    if args.keep:
        print(f"path={result.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
