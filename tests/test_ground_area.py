"""Polygon areas on the ground (``area_m2``), in projections whose metre is not a ground metre."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from conftest import web_mercator_y
from pyproj import CRS

from mgpr.geo.ground_area import box_ground_areas_m2, ground_areas_m2


def _wkt(code: str) -> str:
    return CRS.from_user_input(code).to_wkt()


def _square(x: float, y: float, side: float, hole: float = 0.0) -> shapely.Polygon:
    shell = shapely.box(x, y, x + side, y + side)
    if not hole:
        return shell
    c = side / 2
    inner = shapely.box(x + c - hole / 2, y + c - hole / 2, x + c + hole / 2, y + c + hole / 2)
    return shapely.Polygon(shell.exterior.coords, [inner.exterior.coords[::-1]])


def test_utm_web_mercator_and_degrees_give_ground_square_metres() -> None:
    # UTM 33N on its central meridian at 45 N: scale 0.9996, so 100 x 100 planar m are larger.
    utm = ground_areas_m2(np.array([_square(500000, 4983000, 100.0)]), _wkt("EPSG:32633"))
    assert utm[0] == pytest.approx(1e4 / 0.9996**2, rel=2e-5)
    # Web Mercator at 60 N stretches 2x each way: 200 x 200 "m" are 100 x 100 m on the ground.
    merc = ground_areas_m2(
        np.array([_square(1113195.0, web_mercator_y(60.0), 200.0)]), _wkt("EPSG:3857")
    )
    assert merc[0] == pytest.approx(1e4, rel=5e-3)
    # 0.001 x 0.001 degrees at the equator: 111.32 m x 110.57 m on WGS 84.
    deg = ground_areas_m2(np.array([_square(10.0, 0.0, 0.001)]), _wkt("EPSG:4326"))
    assert deg[0] == pytest.approx(111.3195 * 110.5743, rel=1e-4)


def test_holes_count_against_the_area_and_orientation_does_not_matter() -> None:
    wkt = _wkt("EPSG:32633")
    with_hole = _square(500000, 4983000, 100.0, hole=50.0)
    clockwise = shapely.orient_polygons(with_hole, exterior_cw=True)
    got = ground_areas_m2(np.array([with_hole, clockwise]), wkt)
    np.testing.assert_allclose(got, (1e4 - 2500) / 0.9996**2, rtol=2e-5)


def test_no_crs_gives_nan() -> None:
    assert np.isnan(ground_areas_m2(np.array([_square(0, 0, 10.0)]), None)).all()
    assert ground_areas_m2(np.empty(0, dtype=object), _wkt("EPSG:32633")).shape == (0,)


@pytest.mark.parametrize(
    ("code", "x", "y", "side"),
    [
        ("EPSG:32633", 500000.0, 4983000.0, 30.0),  # UTM 33N, 45 N on the central meridian
        ("EPSG:32633", 320000.0, 6650000.0, 30.0),  # 60 N, 3 degrees off it
        ("EPSG:3857", 1113195.0, 8399737.9, 60.0),  # Web Mercator at 60 N: scale 2
        ("EPSG:4326", 15.0, 45.0, 3e-4),  # degrees
        ("EPSG:4326", -70.0, -80.0, 3e-4),
    ],
)
def test_box_areas_agree_with_the_geodesic_area(code: str, x: float, y: float, side: float) -> None:
    """The vectorised local form for boxes equals the per-polygon geodesic sum to 1e-6."""
    from mgpr.geo.ground_area import box_ground_areas_m2

    boxes = [shapely.box(x + i * side, y, x + (i + 0.5) * side, y + side) for i in range(3)]
    rings = np.array([np.asarray(b.exterior.coords)[::-1] for b in boxes])  # any orientation
    got = box_ground_areas_m2(rings, _wkt(code))
    want = ground_areas_m2(np.array(boxes, dtype=object), _wkt(code))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert np.isnan(box_ground_areas_m2(rings, None)).all()


LOCAL_METRES = (
    'LOCAL_CS["site grid",LOCAL_DATUM["site",0],UNIT["metre",1],'
    'AXIS["Easting",EAST],AXIS["Northing",NORTH]]'
)
LOCAL_FEET = LOCAL_METRES.replace('UNIT["metre",1]', 'UNIT["US survey foot",0.304800609601219]')


@pytest.mark.parametrize(("wkt", "m2"), [(LOCAL_METRES, 200.0), (LOCAL_FEET, 200.0 * 0.3048006**2)])
def test_a_local_engineering_crs_is_a_plane_in_its_units(wkt: str, m2: float) -> None:
    """A site grid has no datum to reach longitude/latitude: area_m2 was NaN although its axes
    are metres (or feet); its plane is the ground."""
    from mgpr.geo.ground_area import local_plane_m2_per_unit2

    box = shapely.box(1000.0, 2000.0, 1020.0, 2010.0)  # 20 x 10 units
    rings = np.asarray(box.exterior.coords, dtype=np.float64)[None]
    assert ground_areas_m2(np.array([box], dtype=object), wkt)[0] == pytest.approx(m2, rel=1e-6)
    assert box_ground_areas_m2(rings, wkt)[0] == pytest.approx(m2, rel=1e-6)
    assert local_plane_m2_per_unit2("EPSG:32633") is None  # projected: the ellipsoid's area
    assert local_plane_m2_per_unit2("EPSG:4326") is None
