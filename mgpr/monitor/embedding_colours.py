"""Colours of tile embeddings for the preview: their first 3 principal components as RGB.

Why: a table of 2048 numbers per tile says nothing at a glance; the classic picture of a
feature extractor's output is the projection of its vectors on their three main directions,
shown as red, green and blue. Tiles the network sees alike get alike colours, so fields,
forest, roofs and water show up as patches if the features separate them, and a run whose
vectors are all the same (a wrong ``value_range``, a broken checkpoint) shows one flat colour.

The components are found by subspace iteration on the centred vectors (only 3 directions are
wanted: a few (N, D) x (D, 3) products, not a full SVD of a 100,000 x 2048 matrix), seeded, so
the same vectors give the same colours; each is oriented so its largest loading is positive and
stretched between its 2nd and 98th percentile. The colours are one preview's own: another
raster's preview has its own components.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

#: Subspace iterations: the colours of a clustered set settle in a few; 8 is plenty.
ITERATIONS = 8


def principal_rgb(vectors: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """(N, 3) colours in [0, 1] of (N, D) vectors (grey 0.5 where there is no spread)."""
    x = np.asarray(vectors, dtype=np.float64)
    n = x.shape[0]
    if n == 0:
        return np.zeros((0, 3))
    x = x - x.mean(axis=0)
    k = min(3, x.shape[1])
    basis = np.random.default_rng(0).standard_normal((x.shape[1], k))
    for _ in range(ITERATIONS):
        basis, _ = np.linalg.qr(x.T @ (x @ basis))
    # Order the directions by the spread along them, largest first (QR keeps no order).
    projected = x @ basis
    order = np.argsort(-projected.var(axis=0), kind="stable")
    basis, projected = basis[:, order], projected[:, order]
    signs = np.sign(basis[np.abs(basis).argmax(axis=0), np.arange(k)])
    projected *= np.where(signs == 0, 1.0, signs)
    rgb = np.full((n, 3), 0.5)
    for j in range(k):
        lo, hi = np.percentile(projected[:, j], (2, 98))
        if hi - lo > 1e-12 * max(1.0, abs(hi)):
            rgb[:, j] = np.clip((projected[:, j] - lo) / (hi - lo), 0.0, 1.0)
    return rgb
