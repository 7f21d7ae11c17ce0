"""The summary a run prints on rank 0: what ran, tiles, throughput, outputs and notes.

Split from :mod:`mgpr.run.finish`, which builds ``summary.json``; this module only turns that
dict into the lines a user reads at the end of the job log (``  output       ...``), so the
wording lives in one place and the dict's keys stay the contract.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["print_summary"]


def _output_lines(s: dict[str, Any]) -> list[str]:
    """``output`` lines: the main file with its counts, then every other output.

    Segmentation writes a class map per input; with several, the first line names how many
    and where, as ``records`` counts the pixels of them all (it named the first map alone).
    ``output_crs`` applies to vector layers, never to class maps, so it is said of the layers.
    """
    outputs = s.get("outputs") or [s["output"]]
    layers = "".join(f"; layer {k}: {v}" for k, v in s["layers"].items())
    if s.get("task") != "segmentation":
        into = f" in {s['output_crs']}" if s.get("output_crs") else ""
        head = f"{s['output']} ({s['records']} records{layers}){into}"
        rest = outputs[1:]
    else:
        into = f" in {s['output_crs']}" if s.get("output_crs") and layers else ""
        first = Path(s["output"])
        maps = [p for p in outputs if Path(p).parent == first.parent and p.endswith(".tif")]
        maps = [p for p in maps if not p.endswith("_prob.tif")]
        pixels = f"{s['records']} class-map pixels"
        classes = s.get("classes") or {}
        classified = sum(int(c.get("pixels") or 0) for c in classes.values() if isinstance(c, dict))
        if classes and classified < s["records"]:  # the rest is nodata (255 in the map)
            pixels += f", {classified} classified, {s['records'] - classified} nodata"
        if len(maps) > 1:
            head = f"{len(maps)} class maps in {first.parent}/ ({pixels}"
            rest = outputs
        else:
            head = f"{s['output']} ({pixels}"
            rest = outputs[1:]
        head += f"{layers}{into})"
    maps_folder = Path(s["output"]).parent if s.get("task") == "segmentation" else None
    rest = _fewer_outputs(rest, maps_folder)
    return [f"  output       {head}"] + [f"               {p}" for p in rest]


#: Output paths the summary lists in full; past that, per-input files are cut to a few of each.
OUTPUTS_SHOWN = 10
#: Per-input files of one kind (class maps, previews) listed when they are cut.
PER_INPUT_SHOWN = 3


def _fewer_outputs(outputs: list[str], maps_folder: Path | None) -> list[str]:
    """``outputs`` to list: all of them, or a few of each kind of per-input file.

    A folder of 20,000 chips has 20,000 class maps (and with ``previews=all`` as many
    previews): then every output that is not one input's own (a class map in
    ``maps_folder``, a ``preview_*.png``) is listed, the first few of each of those kinds,
    and a line counting the rest (every path is in summary.json).
    """
    if len(outputs) <= OUTPUTS_SHOWN:
        return outputs
    kinds: dict[str, list[str]] = {"class maps": [], "previews": []}
    listed: list[str] = []
    for path in outputs:
        p = Path(path)
        if maps_folder is not None and p.parent == maps_folder:
            kinds["class maps"].append(path)
        elif p.name.startswith("preview") and p.suffix == ".png":
            kinds["previews"].append(path)
        else:
            listed.append(path)
    for kind, paths in kinds.items():
        listed += paths[:PER_INPUT_SHOWN]
        if len(paths) > PER_INPUT_SHOWN:
            folder = Path(paths[0]).parent
            listed.append(
                f"... and {len(paths) - PER_INPUT_SHOWN} more {kind} in {folder}/ "
                "(every path: summary.json outputs)"
            )
    return listed


#: Classes the summary line names; the rest are counted, and all are in summary.json.
CLASSES_SHOWN = 5


def _classes_line(s: dict[str, Any]) -> str | None:
    """The ``classes`` line: what the layers and class maps hold per label, most first.

    ``car 1,234, truck 56`` (detections), ``top-1 of 9 tiles: forest 7, field 2``
    (classification), ``by ground area: background 5.91 ha (93.4%), ...`` (class maps in a
    CRS) or ``by pixels: background 1,234 (93.4%), ...`` (class maps without one).
    """
    classes: dict[str, dict[str, float]] = s.get("classes") or {}
    if not classes:
        return None
    if s.get("task") == "segmentation":
        areas = {k: v.get("area_m2") for k, v in classes.items()}
        by_area = all(a is not None for a in areas.values()) and sum(areas.values()) > 0
        size = {
            k: float((areas[k] if by_area else v.get("pixels")) or 0) for k, v in classes.items()
        }
        total = sum(size.values()) or 1.0
        ranked = sorted(classes, key=lambda k: -size[k])
        show = _hectares if by_area else (lambda n: f"{n:,.0f}")
        parts = [f"{k} {show(size[k])} ({size[k] / total:.1%})" for k in ranked]
        head = "by ground area: " if by_area else "by pixels: "
    else:
        parts = [f"{k} {int(v['count']):,}" for k, v in classes.items()]
        head = (
            f"top-1 of {sum(int(v['count']) for v in classes.values()):,} tiles: "
            if s.get("task") == "classification"
            else ""
        )
    more = len(parts) - CLASSES_SHOWN
    return (
        head
        + ", ".join(parts[:CLASSES_SHOWN])
        + (f" (+{more} more: summary.json classes)" if more > 0 else "")
    )


def _hectares(m2: float) -> str:
    """``5.91 ha`` from one hectare up, else ``106 m2`` (ASCII: a job log may not be UTF-8)."""
    return f"{m2 / 1e4:,.3g} ha" if m2 >= 1e4 else f"{m2:,.0f} m2"


def print_summary(s: dict[str, Any], report_text: str) -> None:
    """Print the summary block of ``summary.json``'s dict ``s``, then the run report's table."""
    lines = ["", "mgpr summary"]
    if s.get("random_weights") and s["model"] not in ("reference", "null"):
        lines.append(
            f"  WARNING: {s['model']} ran with RANDOM weights (weights=none): "
            "predictions are meaningless"
        )
    lines.append(
        f"  model        {s['model']} ({s['task']}), weights {s['weights']}, "
        f"precision {s['precision']}"
        + (f", {s['compile']['used']}" if s.get("compile") else "")
        + (
            f", tta {s['tta']['mode']} ({s['tta']['views']} views"
            + (", boxes by wbf" if s["tta"].get("fusion") == "wbf" else "")
            + ")"
            if s.get("tta")
            else ""
        )
    )
    lines.append(f"  ranks        {s['world_size']} on {s['num_nodes']} node(s), {s['strategy']}")
    earlier = s.get("tiles_earlier_runs")
    lines.append(
        f"  tiles        {s['tiles_total']} planned: {s['tiles_predicted']} predicted, "
        f"{s['tiles_skipped_nodata']} skipped (nodata), {s['tiles_failed']} failed"
        + (f", {s['tiles_missing']} MISSING" if s.get("tiles_missing") else "")
        + (f"; {s['tiles_this_run']} in this run, {earlier} by earlier runs" if earlier else "")
    )
    if s.get("tiles_this_run") == 0 and earlier:
        lines.append(
            "  throughput   none: earlier runs finished every tile, this one merged; "
            f"whole command {s['wall_s']:.0f} s"
        )
    elif s.get("tiles_per_s") is not None:
        model = s.get("model_tiles_per_s")
        lines.append(
            f"  throughput   {s['tiles_per_s']:.1f} tiles/s"
            + (
                f" ({model:.1f} tiles/s through the model, the rest nodata or failed)"
                if model is not None and model < 0.99 * s["tiles_per_s"]
                else ""
            )
            + f" over {s['predict_loop_s']:.1f} s of prediction on {s['world_size']} rank(s); "
            f"whole command {s['wall_s']:.0f} s"
        )
    if s.get("phases"):
        from mgpr.monitor.phases import phases_line

        lines.append(
            f"  time         {phases_line(s['phases'])} (whole command {s['wall_s']:.1f} s)"
        )
    if s.get("output"):
        lines += _output_lines(s)
    classes = _classes_line(s)
    if classes:
        lines.append(f"  classes      {classes}")
    vectors = s.get("embedding")
    if vectors:
        lines.append(
            f"  embeddings   {vectors['dim']} {vectors['dtype']} features per tile "
            f"(column {vectors['column']})"
        )
    capped = s.get("tiles_at_box_cap")
    if capped:
        cap = s.get("max_detections")
        lines.append(
            f"  WARNING: {capped} of {s['tiles_predicted']} predicted tiles hold {cap} boxes, "
            f"the max_detections cap: the model may have found more there; for dense scenes "
            f"re-run with max_detections={cap * 3} and overwrite=true (another run: the cap "
            f"decides what a tile holds)"
        )
    for path in (s.get("empty_inputs") or [])[:3]:
        lines.append(
            f"  WARNING: every tile of {path} is nodata, so nothing was predicted there; check "
            "its nodata value and mask (gdalinfo)"
        )
    if len(s.get("empty_inputs") or []) > 3:
        lines.append(f"           and {len(s['empty_inputs']) - 3} more inputs (summary.json)")
    area = s.get("aoi")
    if area:
        outside = area.get("inputs_outside") or []
        lines.append(
            f"  aoi          {area['path']} ({area['crs']}): {s['tiles_total']} tiles touch it, "
            f"{area.get('tiles_outside', 0)} outside not read"
            + (f", {len(outside)} input(s) outside left out" if outside else "")
        )
    if s.get("duplicates_removed"):
        lines.append(f"  seams        {s['duplicates_removed']} duplicate boxes removed")
    if s.get("duplicates_across_inputs"):
        lines.append(
            f"  overlaps     {s['duplicates_across_inputs']} boxes found again where inputs "
            "overlap, removed"
        )
    if s.get("pixel_coordinates"):
        lines.append(f"  no CRS       {len(s['pixel_coordinates'])} input(s) in pixel coordinates")
    if s.get("no_crs"):
        lines.append(
            f"  no CRS       {len(s['no_crs'])} input(s) in their geotransform's coordinates, "
            "CRS unnamed"
        )
    resolution = s.get("resolution") or {}
    if resolution.get("gsd") is not None:
        grids = [
            f"x{g['factor'][0]:g}"
            + ("" if g["factor"][0] == g["factor"][1] else f"/{g['factor'][1]:g}")
            + f" ({g['resampling']}) on {Path(p).name}"
            for p, g in resolution["inputs"].items()
        ]
        more = f", +{len(grids) - 3} more in summary.json" if len(grids) > 3 else ""
        lines.append(
            f"  gsd          {resolution['gsd']:g} m per model pixel: "
            + ", ".join(grids[:3])
            + more
        )
    values = s.get("values") or {}
    if values.get("value_range") is not None:
        first = next(iter(values["inputs"].values()), None)
        shown = f", first input {_ranges(first['range'])}" if first else ""
        clipped = values.get("clipped")
        if clipped:
            shown += f"; clipped {clipped['below']:.1%} below lo, {clipped['above']:.1%} above hi"
        lines.append(f"  values       value_range={_ranges(values['value_range'])}{shown}")
    if s.get("failed_tiles"):
        lines.append(
            f"  failed       see {s['run_dir']}/failed_tiles.csv; first: "
            f"{s['failed_tiles'][0]['tile']}: {s['failed_tiles'][0]['reason']}"
        )
    check = s.get("demo_check")
    if check and "mismatched_pixels" in check:  # segmentation: pixels against planted objects
        lines.append(
            f"  demo check   {'OK' if check['ok'] else 'MISMATCH'}: "
            f"{check['object_pixels_found']}/{check['object_pixels']} object pixels of "
            f"{check['planted']} planted objects classed bright, "
            f"{check['false_bright_pixels']} false bright pixels"
        )
    elif check:
        ok = check["found"] == check["planted"] and check["duplicates"] == 0
        lines.append(
            f"  demo check   {'OK' if ok else 'MISMATCH'}: found {check['found']}/"
            f"{check['planted']} planted objects ({check['on_seam']} on tile seams), "
            f"{check['duplicates']} duplicates, "
            f"{check['unmatched_detections']} false detections, max footprint error "
            f"{check['max_footprint_error_px']:.2f} px"
        )
    profiles = s.get("profiles") or []
    for i, path in enumerate(profiles[:3]):
        lines.append(f"  {'profile' if i == 0 else '':<12} {path}")
    if len(profiles) > 3:
        lines.append(f"               and {len(profiles) - 3} more (summary.json profiles)")
    lines.append(f"  summary      {s['run_dir']}/summary.json")
    print("\n".join(lines))
    if report_text:
        print(report_text)


def _ranges(value: Any) -> str:
    """``[[0.0035, 0.1729], ...]`` from ranges with float noise (0.003500000000000003)."""
    if isinstance(value, dict):  # value_range keyed by dtype
        return "{" + ", ".join(f"{k}: {_ranges(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_ranges(v) for v in value) + "]"
    return f"{value:.6g}" if isinstance(value, float) else str(value)
