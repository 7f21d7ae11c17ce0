"""Keys given for another task than the model's are named, each with why it does nothing."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from conftest import run_mgpr_inprocess

from mgpr.conf.schema import PredictConfig
from mgpr.run.unused_keys import unused_key_lines


def test_each_key_of_another_task_is_named_and_defaults_never_are() -> None:
    cfg = PredictConfig(probabilities=True, vectorize=True, topk=3, score_threshold=0.3)
    given = {"probabilities", "vectorize", "topk", "score_threshold"}
    lines = unused_key_lines(cfg, "detection", given)
    assert [line.split(" ")[0] for line in lines] == [
        "probabilities=true",
        "vectorize=true",
        "topk=3",
    ]
    assert all(
        line.endswith("this run's model is a detection model, so it does nothing") for line in lines
    )
    assert unused_key_lines(cfg, "detection", set()) == []  # defaults and unset keys: nothing
    every = {f.name for f in dataclasses.fields(PredictConfig)}  # a saved config.yaml names all
    assert unused_key_lines(PredictConfig(), "embedding", every) == []
    (line,) = unused_key_lines(PredictConfig(topk=3), "embedding", every)
    assert line.endswith("this run's model is an embedding model, so it does nothing")
    seg = PredictConfig(output_crs="EPSG:4326", simplify=1.0)
    (crs, simplify) = unused_key_lines(seg, "segmentation", {"output_crs", "simplify"})
    assert crs.startswith("output_crs=EPSG:4326 reprojects the vector layers; a segmenter without")
    assert simplify.startswith("simplify=1 simplifies traced outlines")
    vectors = PredictConfig(output_crs="EPSG:4326", simplify=1.0, vectorize=True)
    assert unused_key_lines(vectors, "segmentation", {"output_crs", "simplify", "vectorize"}) == []
    assert unused_key_lines(seg, "classification", {"simplify"})[0].endswith(
        "this classification run traces none, so it does nothing"
    )


def test_a_detection_run_warns_of_a_segmenters_keys(make_image, tmp_path: Path, capsys) -> None:
    img = make_image(width=256, height=256, objects=2)
    args = (f"input_path={img.path}", "model=reference", "tile_size=256", "workers=0")
    assert run_mgpr_inprocess(*args, "probabilities=true", f"output_dir={tmp_path / 'r'}") == 0
    out = capsys.readouterr()
    said = out.out + out.err
    assert "probabilities=true writes a segmenter's class probabilities; this run's model" in said
