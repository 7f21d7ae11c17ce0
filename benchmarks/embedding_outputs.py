"""Embedding layers: what D float32 per tile cost to write, store and read: GeoPackage, GeoParquet.

A 10 Gpx orthomosaic in 224 px tiles is ~200,000 tiles; at 2048 float32 features each that is
1.6 GB of vectors before any compression, so the layer's size and write time are the run's
merge. This writes ``--n`` tile footprints with ``--dim`` features each (half-normal values,
like the averages of ReLU activations: incompressible mantissas, as real features are) through
the run's own writers (:class:`~mgpr.outputs.gpkg.GpkgWriter` with one BLOB per tile,
:class:`~mgpr.outputs.geoparquet.GeoParquetWriter` with a list column), then reads the vectors
back as one (N, D) array (sqlite3 + numpy.frombuffer; pyarrow), and prints per format: write +
commit seconds, file MB, bytes per tile, read seconds.

    uv run python benchmarks/embedding_outputs.py [--n 20000] [--dim 2048]
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from mgpr.outputs.geoparquet import GeoParquetWriter
from mgpr.outputs.gpkg import GpkgWriter
from mgpr.outputs.vector import FeatureBatch

TILE_M = 22.4  # 224 px tiles at 0.1 m


def synthetic(n: int, dim: int, seed: int = 0) -> FeatureBatch:
    """``n`` tile footprints on a square grid in UTM 33N with (n, dim) float32 vectors."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n)))
    k = np.arange(n)
    row, col = k // side, k % side
    x0, y1 = 500_000.0 + col * TILE_M, 5_800_000.0 - row * TILE_M
    x1, y0 = x0 + TILE_M, y1 - TILE_M
    rings = np.stack(
        [np.stack([x0, x1, x1, x0, x0], 1), np.stack([y0, y0, y1, y1, y0], 1)], 2
    ).astype(np.float64)
    fields = {
        "source": np.array(["/data/ortho.tif"] * n, dtype=object),
        "tile_row": row.astype(np.int64),
        "tile_col": col.astype(np.int64),
        "tile_key": np.array(
            [f"/data/ortho.tif::r{r}c{c}" for r, c in zip(row, col, strict=True)], object
        ),
        "embedding": np.abs(rng.standard_normal((n, dim))).astype(np.float32),
    }
    return FeatureBatch(rings, fields)


def main() -> None:
    """Write and read the synthetic layer in each format; print one line per format."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=2048)
    args = parser.parse_args()
    batch = synthetic(args.n, args.dim)
    raw_mb = args.n * args.dim * 4 / 1e6
    print(f"{args.n} tiles x {args.dim} float32 = {raw_mb:.0f} MB of vectors")
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        for name, writer, path in (
            ("gpkg", GpkgWriter(run, "predictions"), run / "predictions.gpkg"),
            ("parquet", GeoParquetWriter(run, "predictions"), run / "embeddings.parquet"),
        ):
            start = time.perf_counter()
            writer.write("embeddings", "EPSG:32633", batch)
            writer.commit()
            write_s = time.perf_counter() - start
            start = time.perf_counter()
            if name == "gpkg":
                with sqlite3.connect(path) as db:
                    blobs = db.execute("SELECT embedding FROM embeddings ORDER BY fid").fetchall()
                vectors = np.frombuffer(b"".join(b for (b,) in blobs), "<f4")
            else:
                table = pq.read_table(path, columns=["embedding"])
                vectors = table["embedding"].combine_chunks().flatten().to_numpy()
            read_s = time.perf_counter() - start
            vectors = vectors.reshape(args.n, args.dim)
            assert np.array_equal(vectors, batch.fields["embedding"])
            size = path.stat().st_size
            print(
                f"{name:8s} write {write_s:6.2f} s  {size / 1e6:8.1f} MB "
                f"({size / args.n:,.0f} B/tile, {size / 1e6 / raw_mb:.2f}x raw)  "
                f"read {read_s:5.2f} s"
            )


if __name__ == "__main__":
    main()
