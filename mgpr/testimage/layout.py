"""Where things lie in a test image: the nodata region, the tile seams, the planted objects.

Pure geometry in raster pixels (rows, columns; boxes half-open), no IO.

Planted objects (``objects=N``) are bright rectangles of ``object_min_px..object_max_px`` pixels
per side. A share ``seam_share`` of them straddles a tile seam of the tile grid
``tile_size``/``overlap`` (tile ``k`` starts at ``k * stride`` with ``stride = tile_size -
overlap``; an object straddles the seam at ``s = k * stride`` when ``row_min < s < row_max`` or
``col_min < s < col_max``); the others straddle none, so each lies inside one tile. When any
object is on a seam, object sides are clipped to ``overlap`` (with a warning) so every object
lies whole inside at least one tile: an object of side ``L <= overlap`` crossing ``k * stride``
lies inside ``[(k-1) * stride, k * stride + overlap)``, tile ``k-1``. Objects keep a gap of at
least :data:`OBJECT_GAP_PX` pixels from each other, from the raster edge and from the nodata
region.

Hidden objects (``hidden_objects=N``, with ``nodata_mode=mask|alpha``) lie wholly inside the
nodata region, :data:`OBJECT_GAP_PX` pixels from its edge and from each other: in the top strip
of the border, or in the rectangle (:func:`place_hidden_objects`).

Nodata. ``nodata="border"`` blanks a band of :func:`border_width_px` pixels around the raster,
``nodata="rect"`` blanks the rectangle ``rows [H/4, 3H/4) x cols [W/2, 9W/10)`` (large enough to
contain whole 256-pixel tiles of a 1024 image).
"""

from __future__ import annotations

import logging

import numpy as np
import numpy.typing as npt

from mgpr.errors import ConfigError
from mgpr.testimage.spec import PlantedObject, TestImageSpec

log = logging.getLogger(__name__)

#: Minimum gap, in pixels, between an object and another object, the raster edge or nodata.
OBJECT_GAP_PX = 4


def border_width_px(spec: TestImageSpec) -> int:
    """Width of the nodata border for ``nodata="border"``, pixels: ``max(1, min(H, W) // 16)``."""
    return max(1, min(spec.height, spec.width) // 16)


def _nodata_rect(spec: TestImageSpec) -> tuple[int, int, int, int]:
    """Blank rectangle of ``nodata="rect"``: ``(row_min, col_min, row_max, col_max)``, half-open."""
    h, w = spec.height, spec.width
    return h // 4, w // 2, (3 * h) // 4, (9 * w) // 10


def nodata_mask(
    spec: TestImageSpec,
    row_off: int = 0,
    col_off: int = 0,
    height: int | None = None,
    width: int | None = None,
) -> npt.NDArray[np.bool_]:
    """Return where the nodata region lies in a window of the raster.

    Args:
        spec: the image spec.
        row_off: first row of the window, pixels.
        col_off: first column of the window, pixels.
        height: window height, pixels; default the rest of the raster.
        width: window width, pixels; default the rest of the raster.

    Returns:
        (height, width) bool, True where the pixel is nodata (0 in every band).
    """
    h = spec.height - row_off if height is None else height
    w = spec.width - col_off if width is None else width
    rows = np.arange(row_off, row_off + h)
    cols = np.arange(col_off, col_off + w)
    if spec.nodata == "border":
        b = border_width_px(spec)
        r_out = (rows < b) | (rows >= spec.height - b)
        c_out = (cols < b) | (cols >= spec.width - b)
        return r_out[:, None] | c_out[None, :]
    if spec.nodata == "rect":
        r0, c0, r1, c1 = _nodata_rect(spec)
        return ((rows >= r0) & (rows < r1))[:, None] & ((cols >= c0) & (cols < c1))[None, :]
    return np.zeros((h, w), dtype=bool)


def seam_positions(length: int, spec: TestImageSpec) -> npt.NDArray[np.int64]:
    """Seam positions along one axis where an object can straddle, pixels.

    Seams are ``k * stride`` for ``k >= 1``; only those strictly inside the band that keeps
    :data:`OBJECT_GAP_PX` from the raster edge count (a seam within the edge gap cannot carry an
    object).

    Args:
        length: raster height (rows) or width (columns), pixels.
        spec: the image spec (``tile_size``, ``overlap``, ``object_min_px``).

    Returns:
        (K,) int64, ascending.
    """
    seams = np.arange(spec.stride, length, spec.stride, dtype=np.int64)
    return seams[(seams > OBJECT_GAP_PX) & (seams < length - OBJECT_GAP_PX)]


def _straddles(lo: int, hi: int, seams: npt.NDArray[np.int64]) -> bool:
    """Whether the half-open span ``[lo, hi)`` has a seam strictly inside (``lo < s < hi``)."""
    i = int(np.searchsorted(seams, lo, side="right"))
    return i < len(seams) and int(seams[i]) < hi


def place_objects(spec: TestImageSpec) -> tuple[PlantedObject, ...]:
    """Choose the planted objects' boxes; deterministic from ``spec`` (and its ``seed``).

    ``round_half_up(objects * seam_share)`` objects straddle a seam (rows, columns or both), the
    others straddle none. Sides are uniform in ``object_min_px..object_max_effective_px``.
    Each box keeps :data:`OBJECT_GAP_PX` pixels from every other box, the raster edge and the
    nodata region (rejection sampling, 500 tries per object).

    Args:
        spec: the image spec.

    Returns:
        The objects, ids ``0..objects-1``.

    Raises:
        ConfigError: when the objects do not fit (too many, or too large for the raster).
    """
    n = spec.objects
    if n == 0:
        return ()
    if spec.object_max_effective_px < spec.object_max_px:
        log.warning(
            "object_max_px=%d is larger than overlap=%d; clipping object sides to %d pixels so "
            "every object lies whole inside a tile.",
            spec.object_max_px,
            spec.overlap,
            spec.overlap,
        )
    lo_px, hi_px = spec.object_min_px, spec.object_max_effective_px
    n_seam = spec.seam_objects
    seams_r = seam_positions(spec.height, spec)
    seams_c = seam_positions(spec.width, spec)
    gap = OBJECT_GAP_PX
    if n_seam and not (len(seams_r) or len(seams_c)):
        raise ConfigError(
            f"seam_share={spec.seam_share} asks for objects on tile seams but a "
            f"{spec.height}x{spec.width} raster has no seam for tile_size={spec.tile_size}, "
            f"overlap={spec.overlap}; set seam_share=0 or a smaller tile_size."
        )
    rng = np.random.default_rng([spec.seed, 0x0B1EC7])
    # Forbidden boxes expanded by the gap: nodata rect (border is handled by the margin).
    margin = gap + (border_width_px(spec) if spec.nodata == "border" else 0)
    boxes = np.empty((n + 1, 4), dtype=np.int64)  # row_min, col_min, row_max, col_max (+ gap)
    n_boxes = 0
    if spec.nodata == "rect":
        r0, c0, r1, c1 = _nodata_rect(spec)
        if r1 > r0 and c1 > c0:
            boxes[0] = (r0 - gap, c0 - gap, r1 + gap, c1 + gap)
            n_boxes = 1
    placed: list[PlantedObject] = []

    def span(length: int, side: int, seams: npt.NDArray[np.int64], on: bool) -> int | None:
        """Start of a span of ``side`` pixels inside ``[margin, length - margin)``."""
        lo, hi = margin, length - margin - side  # inclusive range of starts
        if hi < lo:
            return None
        if on:
            if not len(seams):
                return None
            s = int(seams[rng.integers(len(seams))])
            lo, hi = max(lo, s - side + 1), min(hi, s - 1)
            if hi < lo:
                return None
        return int(rng.integers(lo, hi + 1))

    for i in range(n):
        on_seam = i < n_seam
        for _ in range(500):
            oh, ow = (int(v) for v in rng.integers(lo_px, hi_px + 1, size=2))
            if on_seam:
                axes = ("r", "c", "rc")[int(rng.integers(3))]
                if not len(seams_r):
                    axes = "c"
                elif not len(seams_c):
                    axes = "r"
            else:
                axes = ""
            r = span(spec.height, oh, seams_r, "r" in axes)
            c = span(spec.width, ow, seams_c, "c" in axes)
            if r is None or c is None:
                continue
            on_r = _straddles(r, r + oh, seams_r)
            on_c = _straddles(c, c + ow, seams_c)
            if (on_r or on_c) != on_seam:
                continue
            b = boxes[:n_boxes]
            hit = (
                (b[:, 0] < r + oh + gap) & (b[:, 2] > r) & (b[:, 1] < c + ow + gap) & (b[:, 3] > c)
            )
            if n_boxes and bool(hit.any()):
                continue
            boxes[n_boxes] = (r, c, r + oh + gap, c + ow + gap)
            n_boxes += 1
            placed.append(PlantedObject(i, r, c, r + oh, c + ow, on_seam))
            break
        else:
            raise ConfigError(
                f"objects={n} do not fit a {spec.height}x{spec.width} raster (placed {i}; sides "
                f"{lo_px}..{hi_px} px, gap {gap} px, nodata={spec.nodata}); set fewer objects, "
                "smaller object_max_px or a larger width/height."
            )
    return tuple(placed)


def _hidden_area(spec: TestImageSpec) -> tuple[int, int, int, int]:
    """Where hidden objects go: the nodata rectangle, or the border's top strip (half-open)."""
    if spec.nodata == "rect":
        return _nodata_rect(spec)
    return 0, 0, border_width_px(spec), spec.width


def place_hidden_objects(spec: TestImageSpec) -> tuple[PlantedObject, ...]:
    """Objects wholly inside the nodata region (``hidden_objects``); deterministic from ``seed``.

    Sides are uniform in ``object_min_px..object_max_px``, clipped to what fits the region with
    :data:`OBJECT_GAP_PX` pixels to its edge; ids continue after the visible objects', and
    ``on_seam`` is False (seams do not matter: none of them may be reported). Their own random
    stream: the visible objects are the same with or without them.

    Raises:
        ConfigError: when they do not fit the region.
    """
    n = spec.hidden_objects
    if n == 0:
        return ()
    gap = OBJECT_GAP_PX
    r0, c0, r1, c1 = _hidden_area(spec)
    fit = min(r1 - r0, c1 - c0) - 2 * gap
    hi_px = min(spec.object_max_px, fit)
    lo_px = spec.object_min_px
    rng = np.random.default_rng([spec.seed, 0x41DDE7])
    placed: list[PlantedObject] = []
    for i in range(n):
        for _ in range(500 if hi_px >= lo_px else 0):
            oh, ow = (int(v) for v in rng.integers(lo_px, hi_px + 1, size=2))
            r = int(rng.integers(r0 + gap, r1 - gap - oh + 1))
            c = int(rng.integers(c0 + gap, c1 - gap - ow + 1))
            if any(
                p.row_min < r + oh + gap
                and r < p.row_max + gap
                and p.col_min < c + ow + gap
                and c < p.col_max + gap
                for p in placed
            ):
                continue
            placed.append(PlantedObject(spec.objects + i, r, c, r + oh, c + ow, False))
            break
        else:
            raise ConfigError(
                f"hidden_objects={n} do not fit the nodata region ({r1 - r0}x{c1 - c0} px, "
                f"sides {lo_px}..{spec.object_max_px} px, gap {gap} px; placed {i}); set fewer "
                "hidden_objects, a smaller object_min_px or a larger raster."
            )
    return tuple(placed)
