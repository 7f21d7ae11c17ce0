"""The vector-writer seam: layers in batches, nothing in the run directory before commit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyogrio
import pytest

from mgpr.errors import ConfigError
from mgpr.outputs.formats import output_formats, vector_writers
from mgpr.outputs.gpkg import GpkgWriter
from mgpr.outputs.vector import FeatureBatch

WKT_32633 = (
    'PROJCS["WGS 84 / UTM zone 33N",GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID["WGS 84",6378137,'
    '298.257223563]],PRIMEM["Greenwich",0],UNIT["degree",0.0174532925199433]],'
    'PROJECTION["Transverse_Mercator"],PARAMETER["latitude_of_origin",0],'
    'PARAMETER["central_meridian",15],PARAMETER["scale_factor",0.9996],'
    'PARAMETER["false_easting",500000],PARAMETER["false_northing",0],UNIT["metre",1],'
    'AUTHORITY["EPSG","32633"]]'
)


def _squares(xs: list[float], label: str) -> FeatureBatch:
    rings = np.array(
        [[[x, 0.0], [x + 1, 0.0], [x + 1, 1.0], [x, 1.0], [x, 0.0]] for x in xs], dtype=np.float64
    ).reshape(-1, 5, 2)
    return FeatureBatch(
        rings,
        {
            "score": np.linspace(0.5, 0.9, len(xs)),
            "label": np.array([label] * len(xs), dtype=object),
        },
    )


def test_gpkg_layers_written_in_batches_appear_only_at_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = tmp_path / "node-local"
    local.mkdir()
    monkeypatch.setenv("TMPDIR", str(local))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    run = tmp_path / "run"
    run.mkdir()
    writer = GpkgWriter(run, "predictions")
    writer.write("detections", WKT_32633, _squares([0, 2], "a"))
    writer.write("detections", WKT_32633, _squares([4], "b"))
    writer.write("detections_other", None, _squares([], "c"))
    assert list(run.iterdir()) == []  # built on node-local disk, not in the run directory
    assert any(local.iterdir())
    paths = writer.commit()
    assert paths == [run / "predictions.gpkg"]
    assert sorted(p.name for p in run.iterdir()) == ["predictions.gpkg"]
    assert list(local.iterdir()) == []  # temporaries removed
    layers = {name for name, _ in pyogrio.list_layers(paths[0])}
    assert layers == {"detections", "detections_other"}
    info = pyogrio.read_info(paths[0], layer="detections")
    assert info["features"] == 3
    assert "32633" in info["crs"]
    meta, _, _, field_data = pyogrio.raw.read(paths[0], layer="detections")
    assert list(field_data[list(meta["fields"]).index("label")]) == ["a", "a", "b"]


def test_abort_leaves_the_run_directory_untouched(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "predictions.gpkg").write_bytes(b"earlier result")
    writer = GpkgWriter(run, "predictions")
    writer.write("detections", None, _squares([0], "a"))
    writer.abort()
    assert (run / "predictions.gpkg").read_bytes() == b"earlier result"
    assert writer.commit() == []


def test_feature_batch_checks_its_shape() -> None:
    with pytest.raises(ValueError, match="rings of shape"):
        FeatureBatch(np.zeros((2, 4, 2)), {})
    with pytest.raises(ValueError, match="column 'score' has 1 rows, not 2"):
        FeatureBatch(np.zeros((2, 5, 2)), {"score": np.zeros(1)})
    both = FeatureBatch.concat([_squares([0], "a"), _squares([1, 2], "b")])
    assert len(both) == 3 and list(both.fields["label"]) == ["a", "b", "b"]


def test_unknown_output_format_is_one_line(tmp_path: Path) -> None:
    assert "gpkg" in output_formats() and "both" in output_formats()
    with pytest.raises(ConfigError, match="output_format=shp is not a known output format"):
        vector_writers("shp", tmp_path)
    assert [w.format_name for w in vector_writers("both", tmp_path)][0] == "gpkg"


def test_config_accepts_exactly_the_writers_output_formats() -> None:
    """conf/ sits below outputs/ and keeps its own list: it must not drift from the writers."""
    from mgpr.conf.load import OUTPUT_FORMATS, load_config

    assert OUTPUT_FORMATS == output_formats() == ("gpkg", "parquet", "both")
    assert load_config([]).output_format == "gpkg"
    assert load_config(["output_format=both"]).output_format == "both"
    with pytest.raises(ConfigError, match="output_format='shp' is not supported; use one of gpkg"):
        load_config(["output_format=shp"])
