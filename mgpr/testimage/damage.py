"""Damage a test image on purpose, to test how a run handles an unreadable block."""

from __future__ import annotations

from pathlib import Path

from mgpr.errors import ConfigError


def corrupt_block(path: str | Path, block_row: int, block_col: int) -> int:
    """Overwrite the compressed bytes of one internal block with garbage, in place.

    Simulates a damaged file (bad sector, truncated copy): the header stays valid, so the
    raster opens, but decoding that block fails while every other block reads. The block's
    byte range comes from GDAL's ``BLOCK_OFFSET_<col>_<row>`` / ``BLOCK_SIZE_<col>_<row>``
    items of the ``TIFF`` metadata domain; every band's block is damaged (one block for all
    bands with pixel interleaving).

    Args:
        path: a tiled GeoTIFF (e.g. from :func:`write_test_image` with compression).
        block_row: block index along rows (0-based; block ``r`` covers rows
            ``r * block_height ..``).
        block_col: block index along columns (0-based).

    Returns:
        Bytes overwritten.

    Raises:
        ConfigError: the block does not exist in the file.
    """
    import rasterio

    ranges: set[tuple[int, int]] = set()
    with rasterio.open(path) as src:
        for bidx in src.indexes:
            offset = src.get_tag_item(f"BLOCK_OFFSET_{block_col}_{block_row}", "TIFF", bidx=bidx)
            size = src.get_tag_item(f"BLOCK_SIZE_{block_col}_{block_row}", "TIFF", bidx=bidx)
            if offset is None or size is None or int(size) == 0:
                raise ConfigError(
                    f"block_row={block_row}, block_col={block_col} is not a block of {str(path)!r} "
                    f"(blocks of {src.block_shapes[0]} pixels); pick indexes inside the raster."
                )
            ranges.add((int(offset), int(size)))
    written = 0
    with open(path, "r+b") as fh:
        for offset, size in sorted(ranges):
            fh.seek(offset)
            fh.write(bytes([0xFF, 0x00] * (size // 2) + [0xFF] * (size % 2)))
            written += size
    return written
