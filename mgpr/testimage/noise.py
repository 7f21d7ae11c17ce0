"""Counter-based hashing and value noise: random numbers as pure functions of pixel coordinates.

Every value depends only on integer coordinates and a key, never on the order of evaluation,
so any window of the image renders the same pixels whatever the block size (SplitMix64 and
lowbias32 finalisers; bilinear-interpolated value noise with a smoothstep weight).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def mix64(h: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """SplitMix64 finaliser, in place; uniform 64-bit output for any distinct input."""
    h ^= h >> _S30
    h *= _M2
    h ^= h >> _S27
    h *= _M3
    h ^= h >> _S31
    return h


def hash2(i: npt.NDArray[np.int64], j: npt.NDArray[np.int64], key: int) -> npt.NDArray[np.uint64]:
    """Hash of integer lattice points (``i`` broadcast against ``j``) and a key, uint64.

    Used on small arrays only (lattices, per-field tables); per-pixel noise uses :func:`hash_px`.
    """
    with np.errstate(over="ignore"):
        hi = mix64(i.astype(np.uint64) * _M1 + np.uint64(key & 0xFFFFFFFFFFFFFFFF))
        h = hi ^ (j.astype(np.uint64) * _M3)
        return mix64(h)


def hash_px(row_off: int, col_off: int, h: int, w: int, key: int) -> npt.NDArray[np.uint32]:
    """Per-pixel 32-bit hash of global ``(row, col)`` and a key (lowbias32 finaliser), (h, w)."""
    rows = np.arange(row_off, row_off + h, dtype=np.uint64) * np.uint64(0x9E3779B1)
    cols = np.arange(col_off, col_off + w, dtype=np.uint64) * np.uint64(0x85EBCA77)
    mask = np.uint64(0xFFFFFFFF)
    r32 = ((rows + np.uint64(key & 0xFFFFFFFF)) & mask).astype(np.uint32)
    c32 = (mix64(cols ^ np.uint64(key >> 32)) & mask).astype(np.uint32)
    x = r32[:, None] ^ c32[None, :]
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def unit(h: npt.NDArray[np.uint64]) -> npt.NDArray[np.float32]:
    """Map uint64 hashes to float32 in [0, 1)."""
    return (h >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / (1 << 24))


def channel_key(seed: int, channel: int) -> int:
    """A 64-bit key for one independent random channel of ``seed``."""
    return int(mix64(np.array([seed * 1000003 + channel], dtype=np.uint64))[0])


def _lattice_1d(
    off: int, n: int, scale: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.intp], npt.NDArray[np.float32]]:
    """Lattice indices covering ``[off, off + n)`` and each pixel's cell and smooth weight."""
    pos = np.arange(off, off + n, dtype=np.int64)
    cell = pos // scale
    first = int(cell[0])
    lattice = np.arange(first, int(cell[-1]) + 2, dtype=np.int64)
    t = ((pos - cell * scale).astype(np.float32) + np.float32(0.5)) / np.float32(scale)
    t = t * t * (np.float32(3.0) - np.float32(2.0) * t)  # smoothstep: no visible lattice lines
    return lattice, (cell - first).astype(np.intp), t


def value_noise(
    row_off: int, col_off: int, h: int, w: int, scale: int, key: int
) -> npt.NDArray[np.float32]:
    """Value noise in [0, 1): random lattice values every ``scale`` pixels, interpolated.

    Separable: the (nr, nc) lattice is interpolated along columns to (nr, w), then along rows to
    (h, w), so the cost is about three operations per pixel.
    """
    li, ci, ti = _lattice_1d(row_off, h, scale)
    lj, cj, tj = _lattice_1d(col_off, w, scale)
    grid = unit(hash2(li[:, None], lj[None, :], key))
    along_c = grid[:, cj] * (np.float32(1.0) - tj) + grid[:, cj + 1] * tj
    out: npt.NDArray[np.float32] = along_c[ci] * (np.float32(1.0) - ti)[:, None]
    out += along_c[ci + 1] * ti[:, None]
    return out
