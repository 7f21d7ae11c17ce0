"""The schema of every ``mgpr key=value`` override, as a dataclass.

Keys are flat (``gpus=2 batch_size=16``) because the original demo's keys are flat and users'
job scripts already pass them that way. Each field's comment is its help text (``mgpr --help``
prints them). Legacy names (``image_path``, ``devices``) are aliases resolved once, in
:func:`mgpr.conf.load.normalise`.
"""

from __future__ import annotations

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore


@dataclass
class PredictConfig:
    """Everything one ``mgpr`` run needs; units are pixels unless said otherwise."""

    # --- inputs
    input_path: str | None = None  # GeoTIFF, folder, glob or .txt list of paths; unset = built-in demo
    image_path: str | None = None  # alias of input_path (the original demo's key)
    bands: list[int] | None = None  # 1-based band indexes to read, e.g. [1,2,3]; default: all / model's
    # --- tiling (pixels)
    tile_size: int = 512  # tile edge in pixels; edge tiles are padded to this size
    overlap: int = 0  # pixels shared by neighbouring tiles; detection needs >= the largest object
    # --- model
    model: str | None = None  # resnet50 | fasterrcnn | reference | null | pkg.module:build; unset = resnet50 (demo: reference)
    weights: str = "DEFAULT"  # DEFAULT | torchvision enum name | none | path to a local checkpoint
    topk: int = 5  # classification: classes kept per tile
    score_threshold: float = 0.05  # detection: boxes below this score are dropped
    nms_iou: float = 0.5  # detection: per-class IoU above which overlapping boxes are merged
    seam_ios: float = 0.5  # detection: intersection-over-smaller-box above which seam duplicates merge
    native_resolution: bool = True  # fasterrcnn: run at tile resolution (false = torchvision resize to 800 px)
    # --- run
    accelerator: str = "auto"  # auto | gpu | cpu
    gpus: int | None = None  # ranks (devices) per node; unset = all GPUs, or SLURM --ntasks-per-node
    devices: int | None = None  # alias of gpus
    num_nodes: int | None = None  # nodes; unset = 1, or SLURM --nodes
    strategy: str = "auto"  # auto (DDP when more than one rank) | ddp | any Lightning strategy name
    precision: str = "auto"  # auto | bf16-mixed | 16-mixed | 32 (| 32-true)
    batch_size: int = 8  # tiles per forward pass per rank
    workers: int = 2  # DataLoader worker processes per rank
    join_timeout_s: int = 300  # seconds to wait for every rank to join before failing
    # --- outputs
    output_dir: str | None = None  # run directory; unset = runs/slurm-<job id> or runs/<timestamp>
    overwrite: bool = False  # start afresh in an output_dir that holds another run's results
    progress: bool = True  # progress bar on rank 0; false = one log line every 30 s (batch jobs)
    profiler: str | None = None  # simple | advanced | pytorch (Lightning profilers)
    # --- demo and environment test (the original demo's keys)
    image_size: int = 2048  # demo: edge of the synthetic orthomosaic made when input_path is unset
    objects: int = 40  # demo: bright rectangles planted in the synthetic orthomosaic
    use_fake_data: bool = False  # random tiles instead of a raster: tests the environment only
    dummy_dataset_delay: float = 0.0  # seconds each fake tile takes to "load"
    dummy_dataset_count: int = 1000  # number of fake tiles
    seed: int = 0  # seed of the synthetic demo image and fake data


def register_configs() -> None:
    """Store the schema under the name ``mgpr`` so Hydra checks every override against it."""
    ConfigStore.instance().store(name="mgpr", node=PredictConfig)
