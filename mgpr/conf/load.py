"""Turn ``key=value`` overrides into one validated :class:`PredictConfig`.

This is the only place where Hydra's ``DictConfig`` exists: it is converted to the dataclass once,
legacy keys are mapped to their new names, and every value is range-checked, so every function
below the CLI receives typed values. Errors are :class:`ConfigError` with one line naming the key,
the value seen and a valid alternative (the closest key, for a misspelling).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Sequence

from mgpr.conf.schema import PredictConfig
from mgpr.errors import ConfigError

PRECISIONS = ("auto", "bf16-mixed", "16-mixed", "32", "32-true", "bf16-true", "16-true", "64")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
_KEY_RE = re.compile(r"^[+~]{0,2}([A-Za-z_][A-Za-z0-9_.]*)=(.*)$", re.S)


def config_keys() -> list[str]:
    """Names of every valid ``mgpr`` key, in schema order."""
    return [f.name for f in dataclasses.fields(PredictConfig)]


def closest_key(key: str) -> str | None:
    """The valid key nearest to a misspelt one, or None when nothing is close."""
    matches = difflib.get_close_matches(key, config_keys(), n=1, cutoff=0.5)
    return matches[0] if matches else None


def _check_override_keys(overrides: Sequence[str]) -> None:
    """Reject malformed overrides and unknown keys before Hydra sees them (clearer messages)."""
    keys = set(config_keys())
    for item in overrides:
        match = _KEY_RE.match(item)
        if match is None:
            raise ConfigError(
                f"argument {item!r} is not a key=value override; write e.g. `mgpr tile_size=512` "
                "(run `mgpr --help` for the keys)"
            )
        key = match.group(1)
        if key not in keys:
            hint = closest_key(key)
            suggestion = f"did you mean `{hint}`?" if hint else "run `mgpr --help` for the keys"
            raise ConfigError(f"unknown config key `{key}` in {item!r}; {suggestion}")


def _compose(overrides: Sequence[str]) -> PredictConfig:
    """Build the dataclass through Hydra so types are checked against the schema."""
    from hydra import compose, initialize
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    import mgpr.conf  # noqa: F401  (registers the schema)

    GlobalHydra.instance().clear()
    try:
        with initialize(version_base=None, config_path=None):
            cfg = compose(config_name="mgpr", overrides=list(overrides))
        obj = OmegaConf.to_object(cfg)
    except Exception as exc:  # Hydra/OmegaConf wrap type errors in several exception types
        raise ConfigError(_explain_compose_error(exc, overrides)) from None
    finally:
        GlobalHydra.instance().clear()
    assert isinstance(obj, PredictConfig)
    return obj


def _explain_compose_error(exc: Exception, overrides: Sequence[str]) -> str:
    """One line naming the override Hydra rejected and the type the key expects."""
    text = str(exc)
    types = {f.name: str(f.type) for f in dataclasses.fields(PredictConfig)}
    for item in overrides:
        match = _KEY_RE.match(item)
        if match and f"'{match.group(1)}'" in text or (match and match.group(1) in text):
            key = match.group(1)
            expected = types.get(key, "?").replace(" | None", " or null")
            return f"{item!r}: the value does not fit key `{key}`, which expects {expected}"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"invalid overrides {' '.join(overrides)!r}: {first}"


def normalise(cfg: PredictConfig) -> PredictConfig:
    """Map legacy keys to their new names and check every value's range.

    ``image_path`` becomes ``input_path`` and ``devices`` becomes ``gpus``; giving both spellings
    with different values is an error rather than a silent choice.
    """
    cfg = dataclasses.replace(cfg)
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
    if cfg.model is not None and cfg.model.lower() == "none":
        raise ConfigError(
            "model=none is not a model; use model=null for the near-zero-cost "
            "model, or one of resnet50, fasterrcnn, reference"
        )
    _check_ranges(cfg)
    return cfg


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
    _at_least("max_detections", cfg.max_detections, 1, "try max_detections=100")
    _at_least("image_size", cfg.image_size, 1, "try image_size=2048")
    _at_least("objects", cfg.objects, 0, "try objects=40")
    _at_least("dummy_dataset_delay", cfg.dummy_dataset_delay, 0, "try dummy_dataset_delay=0.1")
    _at_least("dummy_dataset_count", cfg.dummy_dataset_count, 1, "try dummy_dataset_count=1000")
    _at_least("join_timeout_s", cfg.join_timeout_s, 1, "try join_timeout_s=300")
    for name in ("score_threshold", "nms_iou", "seam_ios"):
        value = getattr(cfg, name)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{name}={value} is out of range: it must be within [0, 1]")
    if cfg.precision not in PRECISIONS:
        raise ConfigError(
            f"precision={cfg.precision!r} is not supported; use one of {', '.join(PRECISIONS)}"
        )
    if cfg.accelerator not in ACCELERATORS:
        raise ConfigError(
            f"accelerator={cfg.accelerator!r} is not supported; "
            f"use one of {', '.join(ACCELERATORS)}"
        )
    if cfg.bands is not None:
        if len(cfg.bands) == 0 or any(b < 1 for b in cfg.bands):
            raise ConfigError(
                f"bands={cfg.bands} is invalid: band indexes are 1-based, e.g. bands=[1,2,3]"
            )


#: String keys holding paths: their values are quoted for Hydra when they contain its syntax.
_PATH_KEYS = ("input_path", "image_path", "output_dir", "weights")
_HYDRA_SYNTAX = re.compile(r"[\s()\[\]{}=,:]")


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


def load_config(overrides: Sequence[str]) -> PredictConfig:
    """Parse, type-check and normalise ``key=value`` overrides into a PredictConfig."""
    _check_override_keys(overrides)
    return normalise(_compose(_quote_name_values(overrides)))


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
