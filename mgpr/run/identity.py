"""What makes a run *this* run: its fingerprint (``run.json``) and its resolved ``config.yaml``."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mgpr.conf.schema import PredictConfig
from mgpr.models.registry import max_detections_for


def fingerprint(
    cfg: PredictConfig,
    model_name: str,
    weights_id: str,
    rasters: Sequence[Any],
    bands: dict[str, list[int]],
    value_ranges: dict[str, Any] | None = None,
    aoi_sha256: str | None = None,
) -> dict[str, Any]:
    """Everything that changes a tile's result: model, weights, tiling, inputs, bands, values.

    ``weights_sha256`` is the content hash of ``weights=`` when it names a local file (a custom
    model's checkpoint is otherwise known by its path only: overwriting the file must not resume
    with mixed weights); None for names such as ``DEFAULT`` or ``none``.

    ``value_ranges`` (each raster's :class:`~mgpr.geo.values.ValueRange`; None = raw values):
    the key as given and each raster's resolved ``[lo, hi]`` pairs, so a resume with another
    range (or another ``auto`` result) is refused.

    ``gsd`` and ``resampling`` (the key, and per input the model grid: factors, size and the
    resolved resampling) are None without ``gsd``, as in a ``run.json`` written before the key
    existed, so such a run still resumes.

    ``aoi`` (``aoi=``: the area's content hash, :attr:`mgpr.geo.aoi.AreaOfInterest.digest`) is
    absent without the key, as in a ``run.json`` written before it existed: a resume with
    another area is refused (other tiles planned, other results kept), re-saving the same area
    is not another area.
    """
    out = {
        "model": model_name,
        "weights": weights_id,
        "weights_sha256": weights_content_hash(cfg.weights),
        "tile_size": cfg.tile_size,
        "overlap": cfg.overlap,
        "topk": cfg.topk,
        "score_threshold": cfg.score_threshold,
        # Unset: 100 for a built-in model (as run.json recorded before the key could be unset),
        # None for a user's model (no cap).
        "max_detections": max_detections_for(model_name, cfg.max_detections),
        "native_resolution": cfg.native_resolution,
        "value_range": cfg.value_range if value_ranges is not None else "raw",
        "gsd": cfg.gsd,
        "resampling": cfg.resampling if cfg.gsd is not None else None,
        "inputs": [
            {
                **_input_identity(r, bands[r.path], overviews_read=cfg.gsd is not None),
                "value_range": value_ranges[r.path].pairs() if value_ranges else "raw",
                "model_grid": model_grid_identity(r) if cfg.gsd is not None else None,
            }
            for r in rasters
        ],
    }
    if cfg.tta != "none":
        # other class scores, other fused boxes; absent without, as before the key existed
        out["tta"] = cfg.tta
        out["tta_nms_iou"] = cfg.nms_iou  # detection: where the views' boxes merge
        if cfg.tta_fusion != "nms":  # absent for nms, as before the key existed
            out["tta_fusion"] = cfg.tta_fusion
    if aoi_sha256 is not None:
        out["aoi"] = aoi_sha256  # the area, wherever its file lies
    if cfg.mean is not None:
        # another normalisation, other outputs; absent without, as before the keys existed
        out["normalisation"] = {"mean": list(cfg.mean), "std": list(cfg.std or [])}
    if cfg.seam != "crop":
        # Parts of another seam hold other payloads (stacks, not cores): no resume across seams.
        # Absent for crop, as in a run.json written before seam=blend existed.
        out["seam"] = cfg.seam
    elif cfg.probabilities:
        # Cropped parts hold probabilities only when the run asked for them: a resume that
        # adds probabilities=true would assemble a _prob.tif without the finished tiles.
        # Absent when false, as in a run.json written before the key was part of it. (Blended
        # parts always hold them.)
        out["probabilities"] = True
    return out


def model_grid_identity(info: Any) -> dict[str, Any]:
    """A raster's model grid (``gsd=``): factors (native px per model px), size, resampling."""
    return {
        "factor": [info.factor_x, info.factor_y],
        "width": info.width,
        "height": info.height,
        "resampling": info.resampling,
    }


def _input_identity(info: Any, bands: list[int], overviews_read: bool) -> dict[str, Any]:
    """Path, size and mtime of a local input; size, ETag and Last-Modified of a URL.

    ``sources`` lists the other files GDAL reads for it (a VRT's sources, an external mask or
    overview file) with their sizes and mtimes; absent when there are none, as in a ``run.json``
    written before the key existed, so a plain GeoTIFF's run still resumes. An external
    ``.ovr`` counts only when ``overviews_read`` (``gsd`` reads may come from overviews):
    otherwise building overviews between a run and its resume, for QGIS or the preview,
    changes no tile.
    """
    ident: dict[str, Any] = {
        "path": info.path,
        "bytes": info.file_bytes,
        "mtime": info.mtime,
        "bands": bands,
    }
    sources = [f for f in info.source_files if overviews_read or not f[0].lower().endswith(".ovr")]
    if sources:
        ident["sources"] = _sources_identity(sources)
    if info.file_bytes is None and info.path.startswith("/vsicurl/"):
        from mgpr.geo.inputs import remote_identity

        remote = remote_identity(info.path)
        ident.update(bytes=remote["bytes"], etag=remote["etag"], mtime=remote["last_modified"])
    return ident


#: Above this many source files a VRT's sources are recorded as a count and one digest.
SOURCES_LISTED = 256


def _sources_identity(files: Sequence[tuple[str, Any, Any]]) -> Any:
    """Each source as a record, or a count and one digest for a VRT over thousands of files.

    As records, a refused resume names the source that changed; the digest is a SHA-256 of
    every (path, bytes, mtime), so ``run.json`` stays small.
    """
    records = [{"path": p, "bytes": b, "mtime": m} for p, b, m in files]
    if len(records) <= SOURCES_LISTED:
        return records
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()
    return {"count": len(records), "sha256": digest}


def weights_content_hash(weights: str | None) -> str | None:
    """sha256 prefix of ``weights`` when it is a local file, else None."""
    if not weights or weights.lower() in ("none", "default"):
        return None
    path = Path(weights).expanduser()
    if not path.is_file():
        return None
    from mgpr.models.weights import file_sha256

    return file_sha256(path)


def save_resolved_config(run_dir: Path, cfg: PredictConfig, model_name: str) -> None:
    """``config.yaml``: every key as this run used it (aliases resolved, model chosen)."""
    from omegaconf import OmegaConf

    resolved = dataclasses.replace(cfg, model=model_name)
    text = OmegaConf.to_yaml(OmegaConf.structured(resolved))
    tmp = run_dir / f".config.yaml.tmp-{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, run_dir / "config.yaml")
