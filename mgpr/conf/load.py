"""Turn a YAML config file plus ``key=value`` overrides into one validated :class:`PredictConfig`.

This is the only place where Hydra's ``DictConfig`` exists. Hydra's compose API builds it: the
schema (stored in the ConfigStore), then the file (``-cp DIR -cn NAME`` reads ``DIR/NAME.yaml``),
then the overrides, each merge checked against the schema's types. It is converted to the
dataclass once, legacy keys are mapped to their new names, and every value is range-checked, so
every function below the CLI receives typed values. Errors are :class:`ConfigError` with one line
naming the key, the value seen (and the file) and a valid alternative (the closest key, for a
misspelling).
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mgpr.conf.schema import SCHEMA_NAME, PredictConfig
from mgpr.errors import ConfigError

#: ``precision`` values. Half precision is autocast only (``*-mixed``): it keeps box decoding,
#: NMS and the NaN check in float32 (:mod:`mgpr.models.amp`); Lightning's ``bf16-true`` /
#: ``16-true`` / ``64`` cast the weights but not mgpr's float32 input, and torchvision's
#: detectors failed at the first convolution with them.
PRECISIONS = ("auto", "bf16-mixed", "16-mixed", "32", "32-true")
#: Spellings Lightning 1.x took (and its docs still show), read as their mixed names.
PRECISION_ALIASES = {"bf16": "bf16-mixed", "16": "16-mixed", "fp16": "16-mixed", "fp32": "32"}
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
COMPILE_CHOICES = ("auto", "true", "false")
#: ``tta`` values (views in :data:`mgpr.models.tta.VIEWS`); ``none`` runs each tile once.
TTA_MODES = ("none", "flips", "d4")
#: ``tta_fusion`` values: how a detector's views' boxes become one set (:mod:`mgpr.models.tta`).
TTA_FUSIONS = ("nms", "wbf")
PREVIEW_CHOICES = ("auto", "all", "none")
#: ``strategy`` values: mgpr's ranks are processes with one whole model each, started by
#: Lightning's launcher or by ``srun`` (the claims, the run lock and the parts rely on it), so
#: spawn-based and sharding strategies (``ddp_spawn``, ``fsdp``, ``deepspeed``) are refused.
STRATEGIES = ("auto", "ddp", "single_device")
#: Classes kept per tile at most: ``class_id_k``, ``label_k`` and ``score_k`` for each, and
#: SQLite (the GeoPackage) holds 2000 columns; topk=1000 failed at the merge.
MAX_TOPK = 100
#: ``profiler`` values besides none (:func:`mgpr.monitor.profiler.make_profiler`).
PROFILERS = ("simple", "advanced", "pytorch")
#: ``output_format`` values; conf/ sits below outputs/, so a test keeps this equal to
#: :func:`mgpr.outputs.formats.output_formats`.
OUTPUT_FORMATS = ("gpkg", "parquet", "both")
_KEY_RE = re.compile(r"^[+~]{0,2}([A-Za-z_][A-Za-z0-9_.]*)=(.*)$", re.S)


def config_keys() -> list[str]:
    """Names of every valid ``mgpr`` key, in schema order."""
    return [f.name for f in dataclasses.fields(PredictConfig)]


def closest_key(key: str) -> str | None:
    """The valid key nearest to a misspelt one, or None when nothing is close."""
    matches = difflib.get_close_matches(key, config_keys(), n=1, cutoff=0.5)
    return matches[0] if matches else None


#: ``seam`` values (segmentation, :mod:`mgpr.geo.seams`).
SEAMS: tuple[str, ...] = ("crop", "blend")


def _unknown_key(key: str, where: str) -> ConfigError:
    hint = closest_key(key)
    suggestion = f"did you mean `{hint}`?" if hint else "run `mgpr --help` for the keys"
    return ConfigError(f"unknown config key `{key}` in {where}; {suggestion}")


def _check_override_keys(overrides: Sequence[str]) -> None:
    """Reject malformed overrides and unknown keys before Hydra sees them (clearer messages)."""
    keys = set(config_keys())
    for i, item in enumerate(overrides):
        match = _KEY_RE.match(item)
        if match is None:
            following = " ".join(overrides[i + 1 : i + 3])  # `key = value`: "= value"
            raise ConfigError(
                f"argument {item!r} is not a key=value override; "
                + _override_hint(item, following, keys)
            )
        key = match.group(1)
        if key not in keys:
            raise _unknown_key(key, repr(item))


def _override_hint(item: str, following: str, keys: set[str]) -> str:
    """What the user probably meant by an argument that is not ``key=value``."""
    key, colon, value = item.partition(":")
    if item in keys and following.startswith("="):
        after = following[1:].strip().split(" ")[0]
        return f"write `{item}={after or '<value>'}` without spaces around ="
    if item in keys:
        return f"give it a value: `{item}=<value>` (run `mgpr --help` for the keys)"
    if colon and key in keys:
        return f"write `{key}={value.strip()}` (key: value is a config file's spelling)"
    from mgpr.geo.inputs import RASTER_SUFFIXES

    suffix = Path(item).suffix.lower()
    looks_like_path = suffix in (*RASTER_SUFFIXES, ".txt") or Path(item).exists()
    if looks_like_path:
        return f"to predict it write `mgpr input_path={item}`"
    return "write e.g. `mgpr tile_size=512` (run `mgpr --help` for the keys)"


#: ConfigStore name of the primary config composed for a file: schema, then the file.
_WITH_FILE = "mgpr_with_file"


def config_file(config_path: str | None, config_name: str | None) -> Path | None:
    """The YAML file ``-cp DIR -cn NAME`` names: ``DIR/NAME.yaml``, DIR relative to the cwd.

    ``-cn`` alone reads ``./NAME.yaml``; NAME may end in ``.yaml``.

    Raises:
        ConfigError: ``-cp`` without ``-cn``, or no such file (naming the path).
    """
    if config_name is None:
        if config_path is not None:
            raise ConfigError(
                f"-cp {config_path} needs -cn NAME too: mgpr reads DIR/NAME.yaml "
                "(e.g. mgpr -cp conf -cn ortho)"
            )
        return None
    name = config_name if config_name.endswith(".yaml") else f"{config_name}.yaml"
    path = (Path(config_path or ".").expanduser() / name).absolute()
    if "@" in path.stem:  # Hydra's defaults-list syntax (config@package)
        raise ConfigError(f"config file {path}: rename it without '@' (Hydra's package syntax)")
    if not path.is_file():
        raise ConfigError(
            f"config file {path} does not exist (-cp {config_path or '.'} -cn {config_name}); "
            "fix -cp DIR / -cn NAME (the file is DIR/NAME.yaml)"
        )
    return path


def read_config_file(path: Path) -> dict[str, Any]:
    """The file's top-level ``key: value`` pairs, every key checked against the schema.

    A ``defaults`` list (Hydra's) is allowed and left to Hydra.

    Raises:
        ConfigError: not YAML, not a mapping, or an unknown key (with the closest one).
    """
    import yaml
    from omegaconf import OmegaConf

    try:
        data = OmegaConf.to_container(OmegaConf.load(path))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} holds a {type(data).__name__}, not `key: value` lines "
            "(e.g. `tile_size: 512`)"
        )
    keys = set(config_keys()) | {"defaults"}
    for key in data:
        if key not in keys:
            raise _unknown_key(str(key), f"config file {path}")
    return {str(k): v for k, v in data.items()}


def _compose(overrides: Sequence[str], file: Path | None = None) -> PredictConfig:
    """Build the dataclass through Hydra so types are checked against the schema.

    Without a file the primary config is the schema itself; with one, a stored config whose
    defaults list is ``[schema, file, _self_]``, so the file's values are merged onto the schema
    (and type-checked by it) and the overrides come last.
    """
    from hydra import compose, initialize, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    import mgpr.conf  # noqa: F401  (registers the schema)

    GlobalHydra.instance().clear()
    try:
        if file is None:
            with initialize(version_base=None, config_path=None):
                cfg = compose(config_name=SCHEMA_NAME, overrides=list(overrides))
        else:
            node = {"defaults": [SCHEMA_NAME, file.stem, "_self_"]}
            ConfigStore.instance().store(name=_WITH_FILE, node=node)
            with initialize_config_dir(config_dir=str(file.parent), version_base=None):
                cfg = compose(config_name=_WITH_FILE, overrides=list(overrides))
        obj = OmegaConf.to_object(cfg)
    except Exception as exc:  # Hydra/OmegaConf wrap type errors in several exception types
        raise ConfigError(_explain_compose_error(exc, overrides, file)) from None
    finally:
        GlobalHydra.instance().clear()
    assert isinstance(obj, PredictConfig)
    return obj


def _explain_compose_error(exc: Exception, overrides: Sequence[str], file: Path | None) -> str:
    """One line naming the override (or file key) Hydra rejected and the type it expects."""
    text = str(exc)
    types = {f.name: str(f.type) for f in dataclasses.fields(PredictConfig)}
    in_file = re.match(r"In '([^']*)'", text)
    missing = re.search(r"Could not (?:load|find) '([^']+)'", text)
    if file is not None and missing:  # the file's defaults list names a config not beside it
        return (
            f"config file {file}: its defaults list names {missing.group(1)!r}, which is no "
            f"config in {file.parent}; mgpr merges the file onto its own keys, so no defaults "
            f"list is needed: remove `- {missing.group(1)}` (another file of {file.parent} is "
            "named without .yaml)"
        )
    if file is not None and in_file and in_file.group(1) == file.stem:
        full_key = re.search(r"full_key: (\S+)", text)
        key = full_key.group(1).split(".")[0] if full_key else "?"
        value = read_config_file(file).get(key)
        expected = types.get(key, "?").replace(" | None", " or null")
        fix = " (`weights: none` for random weights)" if key == "weights" else ""
        return (
            f"config file {file}: `{key}: {'null' if value is None else value}` does not fit "
            f"key `{key}`, which expects {expected}{fix}"
        )
    if "LexerNoViableAlt" in text:  # a character Hydra's grammar reads only inside quotes
        found = _unquoted_character(text, overrides)
        if found is not None:
            item, odd = found
            key, _, value = item.partition("=")
            if value.startswith("["):
                first = value.strip("[]").split(",")[0]
                example = f"'{key}=[\"{first}\",...]'"
                what = "the value or each name that holds it"
            else:
                example = f"'{key}=\"{value}\"'"
                what = "the value"
            return (
                f"{item!r}: Hydra reads {odd!r} only inside quotes; quote {what}, e.g. {example} "
                "(single quotes for the shell, double quotes for Hydra)"
            )
    for item in overrides:
        match = _KEY_RE.match(item)
        if match and f"'{match.group(1)}'" in text or (match and match.group(1) in text):
            key = match.group(1)
            expected = types.get(key, "?").replace(" | None", " or null")
            return f"{item!r}: the value does not fit key `{key}`, which expects {expected}"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"invalid overrides {' '.join(overrides)!r}: {first}"


#: Keys whose empty value is a mistake, with the fix.
EMPTY_VALUE_FIXES = {
    "input_path": "give a raster, folder, glob or list, or leave the key out for the demo image",
    "image_path": "give a raster, or leave the key out",
    "weights": "give weights=DEFAULT, weights=none (random) or a checkpoint path",
    "output_dir": "give a folder, or leave the key out for runs/<time stamp>",
    "aoi": "give a polygon file, or leave the key out",
    "model": "give a model name (mgpr --help lists them), or leave the key out",
}


def _unquoted_character(text: str, overrides: Sequence[str]) -> tuple[str, str] | None:
    """The override and the character Hydra's lexer stopped at (its caret), if it is one.

    Hydra's message is ``LexerNoViableAltException: <override>`` over a caret line; letters
    outside ASCII, ``~``, ``#``, ``'``, ``&``, ``;`` and ``!`` stop it unless quoted.
    """
    lines = text.splitlines()
    prefix = "LexerNoViableAltException: "
    if len(lines) < 2 or not lines[0].startswith(prefix) or "^" not in lines[1]:
        return None
    item = lines[0][len(prefix) :]
    pos = lines[1].index("^") - len(prefix)
    if item not in overrides or not 0 <= pos < len(item):
        return None
    return item, item[pos]


def normalise(cfg: PredictConfig) -> PredictConfig:
    """Map legacy keys to their new names and check every value's range.

    ``image_path`` becomes ``input_path`` and ``devices`` becomes ``gpus``; giving both spellings
    with different values is an error rather than a silent choice.
    """
    cfg = dataclasses.replace(cfg)
    for key, fix in EMPTY_VALUE_FIXES.items():
        value = getattr(cfg, key)
        if isinstance(value, str) and not value.strip():
            # a script's unset variable (input_path=$ORTHO): '' read the current folder,
            # weights= ran random weights
            raise ConfigError(
                f"{key}= is empty (an unset shell variable, as in {key}=$VAR?); {fix}"
            )
    if cfg.image_path is not None:
        if cfg.input_path is not None and cfg.input_path != cfg.image_path:
            raise ConfigError(
                f"input_path={cfg.input_path!r} and its alias image_path={cfg.image_path!r} "
                "disagree; pass only one of them"
            )
        cfg.input_path = cfg.image_path
    cfg.image_path = None
    if cfg.devices is not None:
        if cfg.gpus is not None and cfg.gpus != cfg.devices:
            raise ConfigError(
                f"gpus={cfg.gpus} and its alias devices={cfg.devices} disagree; pass only one"
            )
        cfg.gpus = cfg.devices
    cfg.devices = None
    if isinstance(cfg.weights, str) and cfg.weights.lower() in {"none", "null", ""}:
        cfg.weights = "none"
    # The shell expands ~ and $VAR only unquoted on the command line: in a config file
    # (input_path: $SCRATCH/ortho.tif), or quoted, they reached mgpr as is, and
    # output_dir='~/runs' made a folder literally named "~" in the current directory. An unset
    # variable stays as written, so the path's error names it.
    cfg.input_path = _input_paths(cfg.input_path)
    for name in ("input_path", "output_dir", "weights", "aoi"):
        value = getattr(cfg, name)
        if isinstance(value, list):
            setattr(cfg, name, [_expand_user_vars(v) for v in value])
        elif isinstance(value, str):
            setattr(cfg, name, _expand_user_vars(value))
    cfg.compile = str(cfg.compile).lower()  # `compile=true` arrives as the bool True
    cfg.tta = normalise_tta(cfg.tta)  # `tta=false` arrives as the bool False
    cfg.tta_fusion = str(cfg.tta_fusion).strip().lower()
    if cfg.tta_fusion not in TTA_FUSIONS:
        raise ConfigError(
            f"tta_fusion={cfg.tta_fusion!r} is not supported; use tta_fusion=nms (each "
            "object's best view) or tta_fusion=wbf (weighted box fusion)"
        )
    precision = str(cfg.precision).lower()
    cfg.precision = PRECISION_ALIASES.get(precision, precision)  # `precision=16` is the int 16
    _check_ranges(cfg)
    return cfg


def _expand_user_vars(value: str) -> str:
    if value.startswith("~") or "$" in value:
        return os.path.expanduser(os.path.expandvars(value))
    return value


def _input_paths(value: object) -> str | list[str] | None:
    """``input_path`` as one path string, or a list of them (``[a.tif,dir/]``, a YAML list).

    A one-item list is that path, so a run's fingerprint and messages do not depend on the
    spelling; anything but strings in the list is refused.
    """
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list | tuple):
        if not value:
            raise ConfigError(
                "input_path=[] lists no input; give at least one path, e.g. "
                "input_path=[a.tif,b.tif]"
            )
        bad = [v for v in value if not isinstance(v, str) or not v.strip()]
        if bad:
            raise ConfigError(
                f"input_path lists {bad[0]!r}, which is not a path; write each input as a path, "
                "e.g. input_path=[a.tif,tiles/]"
            )
        paths = [str(v) for v in value]
        return paths[0] if len(paths) == 1 else paths
    raise ConfigError(
        f"input_path={value!r} is not a path; give a GeoTIFF, a folder, a glob, a .txt list "
        "or a list of them, e.g. input_path=[a.tif,b.tif]"
    )


def normalise_tta(value: object) -> str:
    """The ``tta`` key as one of :data:`TTA_MODES` (``false``/``off`` = ``none``); else refused."""
    text = str(value).strip().lower() if value is not None else "none"
    if text in ("false", "off", "no", "0", ""):
        return "none"
    if text in ("true", "on", "yes", "1"):
        raise ConfigError(
            f"tta={text} does not say which views; use tta=flips (4 views: mirrored "
            "left-right, top-bottom and both) or tta=d4 (8: every quarter turn, mirrored or not)"
        )
    if text not in TTA_MODES:
        raise ConfigError(f"tta={value!r} is not supported; use one of {', '.join(TTA_MODES)}")
    return text


def _at_least(name: str, value: float | int | None, minimum: float, fix: str) -> None:
    if value is not None and value < minimum:
        raise ConfigError(f"{name}={value} is out of range: it must be >= {minimum}; {fix}")


def _check_ranges(cfg: PredictConfig) -> None:
    from mgpr.geo.tiling import validate_tiling

    validate_tiling(cfg.tile_size, cfg.overlap)
    _at_least("batch_size", cfg.batch_size, 1, "try batch_size=8")
    _at_least("workers", cfg.workers, 0, "use workers=0 to read in the main process")
    _at_least("gpus", cfg.gpus, 1, "leave gpus unset to use every GPU")
    _at_least("num_nodes", cfg.num_nodes, 1, "leave num_nodes unset to take it from SLURM")
    _at_least("topk", cfg.topk, 1, "try topk=5")
    if cfg.topk > MAX_TOPK:
        raise ConfigError(
            f"topk={cfg.topk} is out of range: it must be <= {MAX_TOPK} (each kept class is 3 "
            "columns of the output table, and a GeoPackage holds at most 2000); try topk=5"
        )
    _at_least("max_detections", cfg.max_detections, 1, "try max_detections=100")
    _at_least("image_size", cfg.image_size, 1, "try image_size=2048")
    _at_least("objects", cfg.objects, 0, "try objects=40")
    _at_least("dummy_dataset_delay", cfg.dummy_dataset_delay, 0, "try dummy_dataset_delay=0.1")
    _at_least("dummy_dataset_count", cfg.dummy_dataset_count, 1, "try dummy_dataset_count=1000")
    _at_least("join_timeout_s", cfg.join_timeout_s, 1, "try join_timeout_s=300")
    _at_least("simplify", cfg.simplify, 0, "try simplify=0.5 (pixels), or 0 for exact edges")
    for name in ("score_threshold", "nms_iou", "seam_ios"):
        value = getattr(cfg, name)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{name}={value} is out of range: it must be within [0, 1]")
    if cfg.seam not in SEAMS:
        raise ConfigError(f"seam={cfg.seam!r} is not supported; use one of {', '.join(SEAMS)}")
    if cfg.seam == "blend":
        from mgpr.geo.seams import validate_blend

        validate_blend(cfg.tile_size, cfg.overlap)
    if cfg.precision not in PRECISIONS:
        half = str(cfg.precision).removesuffix("-true")
        why = (
            f": mgpr runs half precision as autocast, which keeps box coordinates in float32 "
            f"(precision={half}-mixed)"
            if str(cfg.precision).endswith("-true") and half in ("bf16", "16")
            else ": float64 compute is not offered (precision=32 is full precision)"
            if str(cfg.precision).startswith("64") or "double" in str(cfg.precision)
            else ""
        )
        raise ConfigError(
            f"precision={cfg.precision!r} is not supported{why}; use one of {', '.join(PRECISIONS)}"
        )
    if cfg.strategy not in STRATEGIES:
        raise ConfigError(
            f"strategy={cfg.strategy!r} is not supported: mgpr runs each rank as its own process "
            "with the whole model (DDP); use strategy=auto (DDP when more than one rank), ddp "
            "or single_device (one rank)"
        )
    if cfg.profiler is not None and str(cfg.profiler).strip().lower() not in (
        "",
        "none",
        "null",
        *PROFILERS,
    ):
        raise ConfigError(
            f"profiler={cfg.profiler!r} is not known; use one of: none, {', '.join(PROFILERS)}"
        )
    if cfg.compile not in COMPILE_CHOICES:
        raise ConfigError(
            f"compile={cfg.compile!r} is not supported; use one of {', '.join(COMPILE_CHOICES)}"
        )
    if cfg.previews not in PREVIEW_CHOICES:
        raise ConfigError(
            f"previews={cfg.previews!r} is not supported; use one of {', '.join(PREVIEW_CHOICES)}"
        )
    if cfg.accelerator not in ACCELERATORS:
        raise ConfigError(
            f"accelerator={cfg.accelerator!r} is not supported; "
            f"use one of {', '.join(ACCELERATORS)}"
        )
    if cfg.output_format not in OUTPUT_FORMATS:
        raise ConfigError(
            f"output_format={cfg.output_format!r} is not supported; "
            f"use one of {', '.join(OUTPUT_FORMATS)}"
        )
    _check_gsd(cfg)
    _check_output_crs(cfg)
    if cfg.aoi is not None and cfg.aoi.strip().lower() in ("", "none", "null"):
        cfg.aoi = None
    if cfg.aoi is not None and cfg.use_fake_data:
        raise ConfigError(
            f"aoi={cfg.aoi!r} needs rasters, and use_fake_data=true reads none; unset one of them"
        )
    cfg.value_range = check_value_range(cfg.value_range)
    if cfg.bands is not None:
        cfg.bands = check_band_list(list(cfg.bands))
    _check_mean_std(cfg)


#: A mean or std above this is in 0..255 units, not the scaled input's [0, 1].
_UNIT_LIMIT = 1.5


def _check_mean_std(cfg: PredictConfig) -> None:
    """``mean``/``std``: both or neither, one finite value per band, std > 0, in [0, 1] units.

    The normalisation runs on the scaled input ([0, 1] after ``value_range``), as torchvision's
    ``Normalize`` does; statistics copied from a 0..255 training script (mean=[123.7,116.3,
    103.5]) would push every tile far outside what the model saw.
    """
    if cfg.mean is None and cfg.std is None:
        return
    if cfg.mean is None or cfg.std is None:
        given, missing = ("mean", "std") if cfg.std is None else ("std", "mean")
        raise ConfigError(
            f"{given} is given without {missing}: the normalisation (x - mean) / std needs both, "
            f"one value per band, e.g. mean=[0.485,0.456,0.406] std=[0.229,0.224,0.225]"
        )
    values: dict[str, list[float]] = {}
    for name in ("mean", "std"):
        raw = getattr(cfg, name)
        try:
            values[name] = [float(v) for v in raw]
        except (TypeError, ValueError):
            raise ConfigError(
                f"{name}={list(raw)} is not a list of numbers; give one per band, e.g. "
                f"{name}=[0.5,0.5,0.5]"
            ) from None
        if not values[name] or not all(math.isfinite(v) for v in values[name]):
            raise ConfigError(f"{name}={list(raw)} needs one finite number per band")
    mean, std = values["mean"], values["std"]
    if len(mean) != len(std):
        raise ConfigError(
            f"mean has {len(mean)} value(s) and std {len(std)}; give one of each per band"
        )
    if any(v <= 0 for v in std):
        raise ConfigError(f"std={std} must be above 0 in every band (it divides)")
    if max(abs(v) for v in mean + std) > _UNIT_LIMIT:
        scaled = lambda vs: "[" + ",".join(f"{v / 255:.4g}" for v in vs) + "]"  # noqa: E731
        raise ConfigError(
            f"mean={mean} std={std} look like 0..255 units; mgpr normalises the scaled [0, 1] "
            f"input (after value_range): give mean={scaled(mean)} std={scaled(std)}"
        )
    cfg.mean, cfg.std = mean, std


def _check_output_crs(cfg: PredictConfig) -> None:
    """``output_crs``: a CRS pyproj knows (kept as written; the merge reads it)."""
    if cfg.output_crs is None:
        return
    if cfg.output_crs.strip().lower() in ("", "none", "null"):
        cfg.output_crs = None
        return
    from pyproj.exceptions import CRSError

    from mgpr.geo.reproject import crs_wkt_of

    try:
        crs_wkt_of(cfg.output_crs)
    except CRSError:
        raise ConfigError(
            f"output_crs={cfg.output_crs!r} is not a CRS pyproj knows; use an EPSG code such as "
            "EPSG:4326 (WGS 84) or EPSG:3857, or a WKT/PROJ string"
        ) from None


def _check_gsd(cfg: PredictConfig) -> None:
    """``gsd`` > 0 and finite (metres), ``resampling`` one of GDAL's RasterIO methods."""
    from mgpr.geo.model_grid import RESAMPLINGS

    if cfg.gsd is not None and not (math.isfinite(cfg.gsd) and cfg.gsd > 0):
        raise ConfigError(
            f"gsd={cfg.gsd} is out of range: it must be > 0 metres per pixel (e.g. gsd=0.10 "
            "for a model trained at 10 cm), or unset to run at each raster's own resolution"
        )
    cfg.resampling = str(cfg.resampling).lower()
    if cfg.resampling not in RESAMPLINGS:
        raise ConfigError(
            f"resampling={cfg.resampling!r} is not supported; use one of {', '.join(RESAMPLINGS)}"
        )


def check_band_list(bands: list[Any]) -> list[int | str]:
    """``bands=`` entries as 1-based ints or band names; one line for anything else."""
    out: list[int | str] = []
    for b in bands:
        if isinstance(b, bool) or not isinstance(b, int | str):
            out = []
            break
        if isinstance(b, str) and b.strip().isdigit():
            b = int(b.strip())
        if isinstance(b, int) and b < 1 or isinstance(b, str) and not b.strip():
            out = []
            break
        out.append(b.strip() if isinstance(b, str) else b)
    if not out:
        raise ConfigError(
            f"bands={bands} is invalid: give 1-based band indexes or band names, "
            "e.g. bands=[1,2,3] or bands=[red,green,blue]"
        )
    return out


_VALUE_RANGE_FIX = (
    "write value_range=[lo,hi] (all bands, e.g. [0,3000]), value_range=[[lo,hi],[lo,hi],...] "
    "(one pair per band), value_range=auto, or one of these per dtype: "
    "'value_range={uint16:[0,4095],float32:auto}'"
)

#: The raster dtypes ``value_range`` may be keyed by (those mgpr reads:
#: :data:`mgpr.geo.values.CARRIERS`, kept apart so loading the config needs no numpy).
VALUE_RANGE_DTYPES = (
    "uint8",
    "int8",
    "uint16",
    "int16",
    "uint32",
    "int32",
    "float16",
    "float32",
    "float64",
)

#: One dtype's ``value_range``: ``"auto"`` or ``[[lo, hi], ...]`` (one pair = every band).
RangeSpec = str | list[list[float]]


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_value_range(value: object) -> RangeSpec | dict[str, RangeSpec] | None:
    """``value_range`` as None, ``"auto"``, ``[[lo, hi], ...]`` or those per raster dtype.

    The per-dtype form (``{uint16: [0, 4095], float32: auto}``) is for input sets that mix
    dtypes, whose raw values mean different things: one range for all would map a uint8
    raster's 0..255 onto 6 % of a 12-bit range. A dtype it does not name keeps its default
    (uint8: [0, 255]; any other is refused when a raster of it is read).

    Raises:
        ConfigError: anything else, a pair with ``lo >= hi``, or a dtype mgpr does not read;
            one line with the fix.
    """
    if value is None:
        return None
    if isinstance(value, dict):
        if not value:
            raise ConfigError(f"value_range={{}} names no dtype; {_VALUE_RANGE_FIX}")
        out: dict[str, RangeSpec] = {}
        for dtype, spec in value.items():
            name = str(dtype).strip().lower()
            if name not in VALUE_RANGE_DTYPES:
                raise ConfigError(
                    f"value_range={_show(value)} names dtype {dtype!r}, which is not a raster "
                    f"dtype mgpr reads; key it by one of {', '.join(VALUE_RANGE_DTYPES)}"
                )
            if name in out:
                raise ConfigError(f"value_range={_show(value)} names dtype {name} twice")
            if spec is None or isinstance(spec, dict):
                raise ConfigError(
                    f"value_range={_show(value)}: {name}'s value {_show(spec)} is not a range; "
                    f"{_VALUE_RANGE_FIX}"
                )
            one = _check_one_range(spec, value)
            assert one is not None
            out[name] = one
        return dict(sorted(out.items()))  # one spelling per meaning: run.json compares it
    return _check_one_range(value, value)


def _check_one_range(value: object, whole: object) -> RangeSpec | None:
    """One ``value_range`` (all rasters', or one dtype's): ``"auto"`` or ``[[lo, hi], ...]``."""
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return "auto"
        raise ConfigError(f"value_range={_given(whole)} is not a range; {_VALUE_RANGE_FIX}")
    if not isinstance(value, list | tuple) or not value:
        raise ConfigError(f"value_range={_given(whole)} is not a range; {_VALUE_RANGE_FIX}")
    pairs = [value] if all(not isinstance(v, list | tuple) for v in value) else list(value)
    out = []
    for pair in pairs:
        if not isinstance(pair, list | tuple) or len(pair) != 2 or not all(map(_number, pair)):
            raise ConfigError(
                f"value_range={_show(whole)} is invalid: {_show(pair)} is not a [lo,hi] pair of "
                f"finite numbers; {_VALUE_RANGE_FIX}"
            )
        lo, hi = float(pair[0]), float(pair[1])
        if not lo < hi:
            raise ConfigError(
                f"value_range={_show(whole)} is invalid: lo={pair[0]} must be below hi={pair[1]}; "
                f"{_VALUE_RANGE_FIX}"
            )
        out.append([lo, hi])
    return out


def _given(value: object) -> str:
    """A ``value_range`` as the user wrote it: a word quoted, numbers and lists bare."""
    return repr(value) if isinstance(value, str | int | float) else _show(value)


def _show(value: object) -> str:
    """A config value as one would type it: ``[0,3000]``, ``{uint16:[0,4095]}``."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_show(v)}" for k, v in value.items()) + "}"
    return str(value).replace(" ", "")


#: String keys holding paths: their values are quoted for Hydra when they contain its syntax.
_PATH_KEYS = ("input_path", "image_path", "output_dir", "weights", "aoi", "output_crs")
_HYDRA_SYNTAX = re.compile(r"[\s()\[\]{}=,:]")


#: Path keys that take a list of paths too.
_LIST_PATH_KEYS = ("input_path",)


def _is_path_list(value: str) -> bool:
    """``[a.tif,b.tif]`` is a list of paths, unless a file or glob match has that very name.

    A glob's character class such as ``tiles/[ab]*.tif`` does not start and end with brackets;
    ``[ab]`` alone could be either and is a list unless it matches a file.
    """
    if not (value.startswith("[") and value.endswith("]")):
        return False
    return not Path(value).exists() and not glob.glob(value)


def _quote_name_values(overrides: Sequence[str]) -> list[str]:
    """Keep ``model=null``/``weights=null`` and paths with Hydra syntax characters as strings.

    Hydra reads a bare ``null`` as None; for these two keys the word is a name. A path key whose
    value holds ``( ) [ ] { } = , :`` or spaces is single-quoted, so ``output_dir=runs/a(1)``
    and ``input_path=tiles/[ab]*.tif`` mean those paths.
    """
    out = []
    for item in overrides:
        key, _, value = item.partition("=")
        if key.lstrip("+~") in ("model", "weights") and value.lower() in ("null", "none"):
            item = f"{key}='{value.lower()}'"
        elif key.lstrip("+~") in _LIST_PATH_KEYS and _is_path_list(value):
            pass  # [a.tif,b.tif]: Hydra's list syntax, several inputs
        elif (
            key.lstrip("+~") in _PATH_KEYS
            and _HYDRA_SYNTAX.search(value)
            and value[:1] not in ("'", '"')
            and "'" not in value
            and "\\" not in value
        ):
            # A path such as ortho(1).tif, a,b/ or tiles/[ab]*.tif is a path, not Hydra syntax.
            item = f"{key}='{value}'"
        out.append(item)
    return out


def load_config(
    overrides: Sequence[str], config_path: str | None = None, config_name: str | None = None
) -> PredictConfig:
    """Parse, type-check and normalise a config file and ``key=value`` overrides.

    Args:
        overrides: ``key=value`` arguments; they win over the file.
        config_path: ``-cp``: the file's directory (relative to the cwd); None = the cwd.
        config_name: ``-cn``: the file's name (``.yaml`` optional); None = no file.

    Raises:
        ConfigError: one line: an unknown key (naming the file, for a file's), a value of the
            wrong type, a value out of range, or a missing file.
    """
    _check_override_keys(overrides)
    file = config_file(config_path, config_name)
    if file is not None:
        read_config_file(file)  # our one-line errors for YAML syntax and unknown keys first
    return normalise(_compose(_quote_name_values(overrides), file))


def explicit_keys(
    overrides: Sequence[str], config_path: str | None = None, config_name: str | None = None
) -> set[str]:
    """Keys the user set, in the config file or as overrides (legacy spellings included)."""
    keys = {item.split("=", 1)[0].lstrip("+~") for item in overrides}
    file = config_file(config_path, config_name)
    if file is not None:
        keys |= set(read_config_file(file)) - {"defaults"}
    return keys


def config_yaml(cfg: PredictConfig) -> str:
    """``--cfg job``: every key of the resolved config as YAML (readable again with -cn)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def describe_keys() -> str:
    """Help text: every key with its default and its help, from the schema's field metadata."""
    from mgpr.conf.schema import SECTIONS

    lines = []
    for field in dataclasses.fields(PredictConfig):
        if field.name in SECTIONS:
            lines += ["", SECTIONS[field.name].upper()]
        default = field.default_factory() if callable(field.default_factory) else field.default
        text = "null" if default is None else str(default)
        shown = f"{field.name}={text.lower() if isinstance(default, bool) else text}"
        lines.append(f"  {shown:<28} {field.metadata['help']}")
    return "\n".join(lines)
