"""The test image's pixels: a pure function of global pixel coordinates and seed.

Every pixel depends only on its *global* ``(row, col)`` and ``seed`` (see :func:`render_block`),
so blocks join seamlessly and the pixels do not depend on ``block_size``. The picture is made of
fields (a rotated, domain-warped grid of cells about ``FIELD_PX`` pixels wide, each with its own
crop colour and crop-row stripes), roads and dark hedges along some cell boundaries, smooth
low-frequency variation (:func:`~mgpr.testimage.noise.value_noise`) and fine per-pixel hashed
noise. Background values lie in ``[BACKGROUND_MIN, BACKGROUND_MAX]`` = ``[8, 200]`` in every
band, so a detector thresholding "all bands >= 230" (the reference detector takes >= 245, 0.96
of 255) finds only planted objects, whose pixels are ``[OBJECT_VALUE_MIN, 255]`` in every band.
Nodata pixels are 0 in every band.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from mgpr.testimage.layout import nodata_mask
from mgpr.testimage.noise import channel_key, hash2, hash_px, value_noise
from mgpr.testimage.spec import PlantedObject, TestImageSpec

#: Lowest background value in any band (valid pixels are never 0, the nodata value).
BACKGROUND_MIN = 8
#: Highest background value in any band; planted objects are the only pixels above it.
BACKGROUND_MAX = 200
#: Lowest value of a planted object's pixel in any band (values are 245..255).
OBJECT_VALUE_MIN = 245
#: Approximate field (cell) width of the background pattern, pixels.
FIELD_PX = 420

# Field palette (R, G, B, NIR-like), background values well below BACKGROUND_MAX.
_PALETTE = np.array(
    [
        [78, 112, 52, 150],  # young crop, green
        [96, 128, 60, 160],  # grass
        [150, 140, 92, 110],  # ripe cereal
        [168, 152, 104, 100],  # stubble
        [118, 94, 70, 70],  # bare soil
        [92, 74, 58, 60],  # wet soil
        [46, 72, 40, 130],  # forest
        [128, 120, 84, 90],  # dry meadow
    ],
    dtype=np.float32,
)
_ROAD = np.array([158, 156, 150, 120], dtype=np.float32)
_HEDGE = np.array([38, 52, 34, 90], dtype=np.float32)
#: Half width of a road and of a hedge, pixels.
_ROAD_HALF_PX = 6.0
_HEDGE_HALF_PX = 2.0
# Per-band weight of the shared texture (the 4th band varies a bit differently).
_BAND_GAIN = np.array([1.0, 1.0, 0.9, 1.2], dtype=np.float32)


def _boundary(
    f: npt.NDArray[np.float32], cell_px: float
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Cell index of each pixel along one field axis and its distance to the nearest boundary.

    Args:
        f: (h, w) coordinate in cell units; overwritten with its fraction in [0, 1).
        cell_px: cell width, pixels.

    Returns:
        (cell index, distance to the nearest cell boundary in pixels, the fraction ``f``; the
        nearest boundary is the cell's upper one, ``idx + 1``, where the fraction is > 0.5).
    """
    idx = np.floor(f)
    f -= idx
    dist = np.float32(1.0) - f
    np.minimum(f, dist, out=dist)
    dist *= np.float32(cell_px)
    return idx.astype(np.intp), dist, f


def render_block(
    spec: TestImageSpec,
    row_off: int,
    col_off: int,
    height: int,
    width: int,
    objects: tuple[PlantedObject, ...] = (),
    hidden: tuple[PlantedObject, ...] = (),
) -> npt.NDArray[np.uint8]:
    """Render one window of the image; a pure function of global pixel coordinates and seed.

    The background is built from: rotated, domain-warped field cells (``FIELD_PX`` pixels wide;
    per-cell colour, brightness and crop-row stripes looked up in small per-block tables),
    roads and hedges along cell boundary lines (each whole line is a road with probability 1/4,
    otherwise a hedge), two octaves of smooth value noise and per-pixel hashed noise.

    Args:
        spec: the image spec (``bands``, ``seed``, ``nodata``, raster size).
        row_off: first row of the window, pixels.
        col_off: first column of the window, pixels.
        height: window height, pixels.
        width: window width, pixels.
        objects: planted objects to paint (those not touching the window are skipped).
        hidden: objects inside the nodata region, painted over its 0s (``hidden_objects``).

    Returns:
        (bands, height, width) uint8: background in [8, 200], objects in [245, 255], nodata 0
        (but for hidden objects).
    """
    seed = spec.seed
    h, w = height, width
    f32 = np.float32
    rows = np.arange(row_off, row_off + h, dtype=f32)
    cols = np.arange(col_off, col_off + w, dtype=f32)
    # Rotated, domain-warped coordinates, in field-cell units along u and v.
    angle = 0.15 + 0.5 * (channel_key(seed, 1) % 1000) / 1000.0
    cell_u, cell_v = float(FIELD_PX), FIELD_PX * 1.37
    ca, sa = math.cos(angle), math.sin(angle)
    amp = 140.0
    fu = value_noise(row_off, col_off, h, w, 512, channel_key(seed, 2))
    fu *= f32(amp / cell_u)
    fu += (rows * f32(ca / cell_u))[:, None] + (cols * f32(sa / cell_u))[None, :]
    fv = value_noise(row_off, col_off, h, w, 512, channel_key(seed, 3))
    fv *= f32(amp / cell_v)
    fv += (cols * f32(ca / cell_v))[None, :] - (rows * f32(sa / cell_v))[:, None]
    # Stripe phase (crop rows) before fu/fv are reduced to boundary distances.
    phase_u = fu * f32(cell_u)
    phase_v = fv * f32(cell_v)
    iu, du, fu = _boundary(fu, cell_u)
    iv, dv, fv = _boundary(fv, cell_v)
    # Per-cell tables over the few cells in this block; index k = (iu - u0) * nv + (iv - v0).
    u0, v0 = int(iu.min()), int(iv.min())
    nu, nv = int(iu.max()) - u0 + 1, int(iv.max()) - v0 + 1
    cu = np.arange(u0, u0 + nu, dtype=np.int64)
    cv = np.arange(v0, v0 + nv, dtype=np.int64)
    cell_hash = hash2(cu[:, None], cv[None, :], channel_key(seed, 4)).ravel()
    n_cells = nu * nv
    road_id, hedge_id = n_cells, n_cells + 1
    colour = (cell_hash % np.uint64(len(_PALETTE))).astype(np.intp)
    tone = ((cell_hash >> np.uint64(24)) % np.uint64(41)).astype(f32) - f32(20.0)
    base = np.empty((n_cells + 2, 4), dtype=f32)  # per-cell band values, + road, + hedge
    base[:n_cells] = _PALETTE[colour] + tone[:, None]
    base[road_id], base[hedge_id] = _ROAD, _HEDGE
    stripe_amp = np.zeros(n_cells + 2, dtype=f32)
    stripe_amp[:n_cells] = 7.0
    stripe_along_u = ((cell_hash >> np.uint64(8)) & np.uint64(1)).astype(bool)
    period = 5.0 + ((cell_hash >> np.uint64(16)) % np.uint64(7)).astype(f32)
    stripe_freq = np.zeros(n_cells + 2, dtype=f32)
    stripe_freq[:n_cells] = f32(2 * math.pi) / period
    # Roads and hedges along boundary lines; a whole line is a road with probability 1/4. Only
    # the few pixels within _ROAD_HALF_PX of a line are looked at (flat indices).
    lu = np.arange(u0, u0 + nu + 1, dtype=np.int64)
    lv = np.arange(v0, v0 + nv + 1, dtype=np.int64)
    road_u_tab = (hash2(lu, np.zeros(1, np.int64), channel_key(seed, 8)) % np.uint64(4)) == 0
    road_v_tab = (hash2(lv, np.zeros(1, np.int64), channel_key(seed, 9)) % np.uint64(4)) == 0
    marks = []  # (flat pixel indices, is road) per axis
    for i_cell, dist, frac, first, tab in (
        (iu, du, fu, u0, road_u_tab),
        (iv, dv, fv, v0, road_v_tab),
    ):
        near = np.flatnonzero(dist < f32(_ROAD_HALF_PX))
        line = i_cell.ravel()[near] - first + (frac.ravel()[near] > f32(0.5))
        is_road = tab[line]
        is_hedge = dist.ravel()[near] < f32(_HEDGE_HALF_PX)
        marks.append((near[is_hedge & ~is_road], near[is_road]))
    k = iu  # flat cell index, in place: (iu - u0) * nv + (iv - v0)
    k -= u0
    k *= nv
    k += iv
    k -= v0
    k_flat = k.ravel()
    for hedge_px, _ in marks:
        k_flat[hedge_px] = hedge_id
    for _, road_px in marks:  # roads win over hedges
        k_flat[road_px] = road_id
    # Crop-row stripes: along u or v depending on the cell.
    along_u_px = np.take(np.append(stripe_along_u, [False, False]), k)
    stripes = np.where(along_u_px, phase_u, phase_v)
    stripes *= np.take(stripe_freq, k)
    np.sin(stripes, out=stripes)
    stripes *= np.take(stripe_amp, k)
    # Smooth variation: two octaves of value noise, about [-21, 21].
    texture = value_noise(row_off, col_off, h, w, 96, channel_key(seed, 5))
    texture += value_noise(row_off, col_off, h, w, 24, channel_key(seed, 6)) * f32(0.5)
    texture -= f32(0.75)
    texture *= f32(28.0)
    texture += stripes
    # Fine texture: per-pixel hashed noise, triangular in [-8, 8] from hash bytes 0 and 1, and
    # an independent 0..7 per band (sensor noise) from the nibbles of bytes 2 and 3.
    px = hash_px(row_off, col_off, h, w, channel_key(seed, 7))
    # Bytes in little-endian order on every platform (a no-op view on little-endian machines).
    px_bytes = px.astype("<u4", copy=False).view(np.uint8).reshape(h, w, 4)
    noise = px_bytes[..., 0].astype(f32)
    noise += px_bytes[..., 1]
    noise *= f32(16.0 / 510.0)
    noise -= f32(8.0)
    texture += noise
    out = np.empty((spec.bands, h, w), dtype=np.uint8)
    band = np.empty((h, w), dtype=f32)
    top = f32(BACKGROUND_MAX - 7)
    for b in range(spec.bands):
        np.take(base[:, b], k, out=band)
        if _BAND_GAIN[b] == 1.0:
            band += texture
        else:
            band += texture * _BAND_GAIN[b]
        np.minimum(band, top, out=band)
        np.maximum(band, f32(BACKGROUND_MIN), out=band)
        out[b] = band
        sensor = px_bytes[..., 2 + b // 2] >> np.uint8(4 * (b % 2))
        sensor &= np.uint8(7)
        out[b] += sensor
    _paint_objects(out, row_off, col_off, objects, px)
    if spec.nodata != "none":
        out[:, nodata_mask(spec, row_off, col_off, h, w)] = 0
        _paint_objects(out, row_off, col_off, hidden, px)
    return out


def _paint_objects(
    out: npt.NDArray[np.uint8],
    row_off: int,
    col_off: int,
    objects: tuple[PlantedObject, ...],
    px_hash: npt.NDArray[np.uint32],
) -> None:
    """Paint the objects touching the window: every band ``245 + hash % 11`` (245..255)."""
    _, h, w = out.shape
    for obj in objects:
        r0, r1 = max(obj.row_min - row_off, 0), min(obj.row_max - row_off, h)
        c0, c1 = max(obj.col_min - col_off, 0), min(obj.col_max - col_off, w)
        if r0 >= r1 or c0 >= c1:
            continue
        hh = px_hash[r0:r1, c0:c1]
        for b in range(out.shape[0]):
            vals = (hh >> np.uint32(7 * b + 3)) % np.uint32(11)
            out[b, r0:r1, c0:c1] = vals.astype(np.uint8) + np.uint8(OBJECT_VALUE_MIN)


def stretch_block(
    block: npt.NDArray[np.uint8], spec: TestImageSpec, nodata_px: npt.NDArray[np.bool_] | None
) -> npt.NDArray[np.generic]:
    """The rendered 8-bit block in ``spec.dtype``: ``lo + v / 255 * (hi - lo)`` per pixel.

    Integers are rounded to nearest, so ``(value - lo) / (hi - lo)`` is ``v / 255`` within
    ``0.5 / (hi - lo)``: objects stay >= 245/255 and backgrounds <= 200/255 of the range.

    Args:
        block: (bands, h, w) uint8 from :func:`render_block`.
        spec: ``dtype`` and ``value_range`` (see :class:`~mgpr.testimage.spec.TestImageSpec`).
        nodata_px: (h, w) True where the pixel is nodata; set to ``spec.effective_nodata_value``
            after valid pixels equal to it were moved one level towards the middle of the
            dtype's range (None: no nodata value; they stay at the stretch of 0, i.e. ``lo``, as
            under ``nodata_mode="mask"``).
    """
    lo, hi = spec.effective_value_range
    if spec.dtype == "uint8" and (lo, hi) == (0.0, 255.0):
        out: npt.NDArray[np.generic] = block
        if nodata_px is not None:
            out = block.copy()
    elif spec.dtype == "float32":
        out = block.astype(np.float32)
        out *= np.float32((hi - lo) / 255.0)
        out += np.float32(lo)
    else:
        wide = block.astype(np.float64) * ((hi - lo) / 255.0) + lo
        out = np.rint(wide, out=wide).astype(spec.dtype)
    if nodata_px is not None:
        nv = spec.effective_nodata_value
        if not np.isnan(nv):
            clash = out == out.dtype.type(nv)
            if clash.any():
                mid = 0.0 if spec.dtype in ("int16", "float32") else np.iinfo(spec.dtype).max / 2
                out[clash] = nv - 1 if nv > mid else nv + 1
        if nodata_px.any():
            out[:, nodata_px] = nv
    return out
