"""The synthetic orthomosaic generator (a user-facing tool, and every test's data).

Georeferenced GeoTIFFs that look and compress like a real orthomosaic, with bright objects
planted at known pixel boxes (some across tile seams) and a known nodata region, so a test can
check a run's results against the truth. One module per job:

- :mod:`~mgpr.testimage.spec`: :class:`TestImageSpec` (validated), :class:`PlantedObject`,
  :class:`TestImageResult`;
- :mod:`~mgpr.testimage.layout`: the nodata region, the tile seams and object placement (pure);
- :mod:`~mgpr.testimage.noise` and :mod:`~mgpr.testimage.render`: the pixels, a pure function
  of global pixel coordinates and seed;
- :mod:`~mgpr.testimage.writer`: :func:`write_test_image`, the block-streamed GeoTIFF;
- :mod:`~mgpr.testimage.truth`: the ``<stem>_truth.gpkg`` ground truth;
- :mod:`~mgpr.testimage.damage`: :func:`corrupt_block`, a deliberately unreadable block.
"""

from mgpr.testimage.damage import corrupt_block
from mgpr.testimage.layout import (
    OBJECT_GAP_PX,
    border_width_px,
    nodata_mask,
    place_hidden_objects,
    place_objects,
    seam_positions,
)
from mgpr.testimage.render import BACKGROUND_MAX, BACKGROUND_MIN, OBJECT_VALUE_MIN, render_block
from mgpr.testimage.spec import PlantedObject, TestImageResult, TestImageSpec
from mgpr.testimage.truth import read_truth, truth_path_for
from mgpr.testimage.writer import write_test_image

__all__ = [
    "BACKGROUND_MAX",
    "BACKGROUND_MIN",
    "OBJECT_GAP_PX",
    "OBJECT_VALUE_MIN",
    "PlantedObject",
    "TestImageResult",
    "TestImageSpec",
    "border_width_px",
    "corrupt_block",
    "nodata_mask",
    "place_hidden_objects",
    "place_objects",
    "read_truth",
    "render_block",
    "seam_positions",
    "truth_path_for",
    "write_test_image",
]
