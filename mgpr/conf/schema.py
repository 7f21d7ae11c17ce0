"""The schema of every ``mgpr`` config key, as a dataclass (Hydra structured config).

Keys are flat (``gpus=2 batch_size=16``) because the original demo's keys are flat and users'
job scripts already pass them that way. Each key is one ``name: type = key(default, help)``
line: the help text is field metadata, which ``mgpr --help`` prints, and :data:`SECTIONS` names
the heading printed before a key. Legacy names (``image_path``, ``devices``) are aliases
resolved once, in :func:`mgpr.conf.load.normalise`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore


def key(default: Any, help: str) -> Any:
    """A schema field: its default and its one-line ``mgpr --help`` text (field metadata)."""
    if isinstance(default, list | dict):
        value = default
        return dataclasses.field(default_factory=lambda: value.copy(), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass
class PredictConfig:
    """Everything one ``mgpr`` run needs; units are pixels unless said otherwise.

    Pixels of ``tile_size``/``overlap`` are MODEL pixels: the raster's own without ``gsd``,
    ``gsd`` metres each with it (:mod:`mgpr.geo.model_grid`).
    """

    # inputs
    input_path: Any = key(
        None,
        "GeoTIFF, folder, glob or .txt list of paths, or a list of those [a.tif,dir/]; unset = "
        "built-in demo",
    )
    image_path: str | None = key(None, "alias of input_path (the original demo's key)")
    bands: list[Any] | None = key(
        None,
        "bands to read: 1-based indexes [4,3,2] or names [red,green,blue] / [B8,B4,B3] (colour "
        "interpretation or description); default: red,green,blue if tagged, else 1..n",
    )
    value_range: Any = key(
        None,
        "raw values -> model's [0,1]: [lo,hi] | [[lo,hi],...] per band | auto (2-98 %) | "
        "per dtype '{uint16:[lo,hi],float32:auto}'; unset: uint8 [0,255], other dtypes refused",
    )
    aoi: str | None = key(
        None,
        "area of interest: polygon file (GeoPackage, GeoJSON, Shapefile; any CRS); only tiles "
        "touching it are read, results whose centre is outside it dropped; unset = everything",
    )
    # resolution and tiling (model pixels: the raster's own, or gsd metres each)
    gsd: float | None = key(
        None,
        "metres per pixel the model expects (its training resolution), e.g. 0.10; rasters are "
        "read resampled to it (projected CRS in metres needed); unset = each raster's own",
    )
    resampling: str = key(
        "auto",
        "gsd reads: auto (average when downsampling, bilinear when upsampling) | average | "
        "bilinear | cubic | cubic_spline | lanczos | nearest | mode",
    )
    tile_size: int = key(512, "tile edge in model pixels; edge tiles are padded to this size")
    overlap: int = key(
        0, "model pixels shared by neighbouring tiles; detection needs >= the largest object"
    )
    # model
    model: str | None = key(
        None,
        "a built-in model (MODELS below) or an import path pkg.module:build; "
        "unset = the default model (quick start: the reference detector)",
    )
    weights: str = key(
        "DEFAULT", "DEFAULT | torchvision weights name | none | path to a local checkpoint"
    )
    categories: list[Any] | None = key(
        None,
        "class names by class id, [background,tree] (a fine-tuned checkpoint's classes; "
        "detection: id 0 is torchvision's background); unset = the model's own",
    )
    mean: list[float] | None = key(
        None,
        "per-band mean of the model's training input, [0,1] units, with std: (x - mean) / std "
        "replaces the model's own normalisation (torchvision: ImageNet's); unset = the model's",
    )
    std: list[float] | None = key(
        None, "per-band standard deviation of the model's training input, [0,1] units, with mean"
    )
    topk: int = key(5, "classification: classes kept per tile (at most 100: 3 columns each)")
    max_detections: int | None = key(
        None,
        "detection: boxes kept per tile at most, best scores first (reference: largest); "
        "unset = 100 for fasterrcnn/reference, every box a user's model returns",
    )
    score_threshold: float = key(0.05, "detection: boxes below this score are dropped")
    nms_iou: float = key(0.5, "detection: per-class IoU above which overlapping boxes are merged")
    seam_ios: float = key(
        0.5, "detection: intersection-over-smaller-box above which seam duplicates merge"
    )
    native_resolution: bool = key(
        True, "fasterrcnn: run at tile resolution (false = torchvision resize to 800 px)"
    )
    seam: str = key(
        "crop", "segmentation: crop (each pixel from the one tile owning it) | blend (cosine)"
    )
    probabilities: bool = key(
        False, "segmentation: also write <stem>_prob.tif, one uint8 band per class (p x 255)"
    )
    vectorize: bool = key(
        False, "segmentation: also write the class map as polygons (layer segments, output_format)"
    )
    simplify: float = key(
        0.0,
        "traced outlines (maskrcnn objects, vectorize=true segments) simplified to within this "
        "many pixels, shared edges kept; 0 = exact pixel edges",
    )
    tta: str = key(
        "none",
        "test-time augmentation: each tile also flipped and turned, class probabilities averaged "
        "(detection: boxes fused by NMS or WBF, tta_fusion): none | flips (4 views) | d4 (8); "
        "4x / 8x the compute",
    )
    tta_fusion: str = key(
        "nms",
        "detection with tta: nms (each object's best view's box) | wbf (weighted box fusion: "
        "the views' boxes averaged by score, scores scaled by the share of views that found it, "
        "then held to score_threshold)",
    )
    # run
    accelerator: str = key("auto", "auto | gpu | cpu")
    gpus: int | None = key(
        None, "ranks (devices) per node; unset = all GPUs, or SLURM --ntasks-per-node"
    )
    devices: int | None = key(None, "alias of gpus")
    num_nodes: int | None = key(None, "nodes; unset = 1, or SLURM --nodes")
    strategy: str = key(
        "auto", "auto (DDP when more than one rank) | ddp | single_device (one rank)"
    )
    precision: str = key("auto", "auto | bf16-mixed | 16-mixed | 32 (| 32-true)")
    batch_size: int = key(8, "tiles per forward pass per rank")
    compile: str = key(
        "auto", "true | false | auto (torch.compile; auto = GPU runs of >= 5000 batches per rank)"
    )
    workers: int = key(2, "DataLoader worker processes per rank")
    join_timeout_s: int = key(300, "seconds to wait for every rank to join before failing")
    # outputs
    output_dir: str | None = key(
        None,
        "run directory; unset = runs/slurm-<job id> (SLURM), runs/lsf-<job id> (LSF) or a new "
        "runs/<timestamp>",
    )
    output_format: str = key(
        "gpkg", "gpkg (one GeoPackage, for QGIS) | parquet (GeoParquet 1.1 per layer) | both"
    )
    output_crs: str | None = key(
        None,
        "vector layers in this one CRS (EPSG:4326, EPSG:3857, WKT, PROJ): every input's features "
        "reprojected into one layer; unset = each input's own CRS, one layer per CRS",
    )
    overwrite: bool = key(False, "start afresh in an output_dir that holds another run's results")
    previews: str = key(
        "auto", "preview PNGs: auto (one per input, the first 12 inputs at most) | all | none"
    )
    progress: bool = key(
        True, "progress bar on rank 0; false = one log line every 30 s (batch jobs)"
    )
    profiler: str | None = key(None, "simple | advanced | pytorch (Lightning profilers)")
    # demo and environment test (the original demo's keys)
    image_size: int = key(
        2048, "demo: edge of the synthetic orthomosaic made when input_path is unset"
    )
    objects: int = key(40, "demo: bright rectangles planted in the synthetic orthomosaic")
    use_fake_data: bool = key(False, "random tiles instead of a raster: tests the environment only")
    dummy_dataset_delay: float = key(0.0, 'seconds each fake tile takes to "load"')
    dummy_dataset_count: int = key(1000, "number of fake tiles")
    seed: int = key(0, "seed of the synthetic demo image and fake data")


#: ``mgpr --help`` headings: the key each section starts with -> its title.
SECTIONS: dict[str, str] = {
    "input_path": "inputs",
    "gsd": "resolution and tiling (model pixels)",
    "model": "model",
    "accelerator": "run",
    "output_dir": "outputs",
    "image_size": "demo and environment test (the original demo's keys)",
}


#: The schema's name in Hydra's ConfigStore: the first entry of every composed defaults list. Not
#: ``mgpr``, so that a user's ``mgpr.yaml`` is not mistaken for it (Hydra's deprecated automatic
#: schema matching of same-named configs).
SCHEMA_NAME = "mgpr_schema"


def register_configs() -> None:
    """Store the schema in the ConfigStore so Hydra checks every file key and override."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=PredictConfig)
