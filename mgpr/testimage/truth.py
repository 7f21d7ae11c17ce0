"""The ground truth of a test image: its planted objects, as a GeoPackage beside the image.

``<stem>_truth.gpkg``, layer ``objects``: one polygon per object (its pixel box's map footprint)
with the pixel box as attribute fields, so :func:`read_truth` gives back the exact boxes.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from mgpr.errors import InputError
from mgpr.testimage.spec import PlantedObject, TestImageSpec, map_transform

#: Name of the truth layer in the GeoPackage.
TRUTH_LAYER = "objects"


def truth_path_for(path: str | Path) -> Path:
    """Truth GeoPackage path for an image: ``<dir>/<image stem>_truth.gpkg``."""
    p = Path(path)
    return p.with_name(f"{p.stem}_truth.gpkg")


def write_truth(tmp: Path, spec: TestImageSpec, objects: tuple[PlantedObject, ...]) -> None:
    """Write the objects' map footprints and pixel boxes to a GeoPackage at ``tmp``.

    The caller renames ``tmp`` onto :func:`truth_path_for` once the image is written too.
    """
    import shapely
    from pyogrio.raw import write as ogr_write

    transform = map_transform(spec)
    polys = []
    for o in objects:
        x0, y0 = transform @ (o.col_min, o.row_min)  # pixel corners -> map
        x1, y1 = transform @ (o.col_max, o.row_max)
        polys.append(shapely.box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)))
    geometry = shapely.to_wkb(np.array(polys, dtype=object))
    fields = ["id", "row_min", "col_min", "row_max", "col_max", "on_seam"]
    data = [np.array([getattr(o, f) for o in objects], dtype=np.int64) for f in fields[:-1]]
    data.append(np.array([o.on_seam for o in objects], dtype=bool))
    with warnings.catch_warnings():
        # crs=None is deliberate (pixel-only image); pyogrio warns about it.
        warnings.filterwarnings("ignore", message="'crs' was not provided", category=UserWarning)
        ogr_write(
            str(tmp),
            geometry,
            data,
            fields,
            layer=TRUTH_LAYER,
            driver="GPKG",
            geometry_type="Polygon",
            crs=spec.crs,
        )


def read_truth(truth_path: str | Path) -> list[PlantedObject]:
    """Read the planted objects back from a truth GeoPackage (layer ``objects``).

    Args:
        truth_path: the ``<stem>_truth.gpkg`` written by :func:`write_test_image`.

    Returns:
        The objects sorted by id (pixel boxes from the attribute fields).

    Raises:
        InputError: when the file is missing or has no ``objects`` layer.
    """
    from pyogrio.errors import DataLayerError, DataSourceError
    from pyogrio.raw import read as ogr_read

    p = Path(truth_path)
    if not p.is_file():
        raise InputError(
            f"truth file {str(p)!r} does not exist; write it with mgpr-test-image objects=N."
        )
    try:
        meta, _, _, field_data = ogr_read(str(p), layer=TRUTH_LAYER, read_geometry=False)
    except (DataLayerError, DataSourceError) as exc:
        raise InputError(
            f"truth file {str(p)!r} has no readable layer {TRUTH_LAYER!r} ({exc}); "
            "rewrite it with mgpr-test-image objects=N."
        ) from exc
    cols = dict(zip(list(meta["fields"]), field_data, strict=True))
    objs = [
        PlantedObject(
            id=int(cols["id"][i]),
            row_min=int(cols["row_min"][i]),
            col_min=int(cols["col_min"][i]),
            row_max=int(cols["row_max"][i]),
            col_max=int(cols["col_max"][i]),
            on_seam=bool(cols["on_seam"][i]),
        )
        for i in range(len(field_data[0]) if field_data else 0)
    ]
    return sorted(objs, key=lambda o: o.id)
