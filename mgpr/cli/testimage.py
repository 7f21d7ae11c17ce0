"""``mgpr-test-image``: write a synthetic georeferenced GeoTIFF from ``key=value`` overrides.

Example::

    mgpr-test-image image_size=10000 image_path=test_image.tif objects=50 nodata=border

Keys are the fields of :class:`mgpr.testimage.TestImageSpec` plus the original demo's
``image_size`` (square side, pixels) and ``image_path`` (output GeoTIFF, alias ``output``).
A bad key or value prints one line on stderr and exits with :data:`mgpr.errors.EXIT_USAGE`.
The result (path, size, file size, compression ratio, objects, truth path) is one line on stdout.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from mgpr.errors import EXIT_USAGE, ConfigError, MgprError
from mgpr.testimage import TestImageSpec, write_test_image

__all__ = ["app", "main", "parse_overrides"]

#: Default output path (the original demo's ``image_path``).
DEFAULT_IMAGE_PATH = "test_image.tif"
#: Keys that are not spec fields: ``key -> (type name, default, help)``.
_EXTRA_KEYS: dict[str, tuple[str, object, str]] = {
    "image_size": ("int", None, "square side, pixels; sets width and height"),
    "image_path": ("path", DEFAULT_IMAGE_PATH, "output GeoTIFF; truth goes to <stem>_truth.gpkg"),
    "output": ("path", None, "alias of image_path"),
}
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_NONE = ("none", "null", "~")


def _spec_types() -> dict[str, tuple[str, object]]:
    """Spec field name -> (type name as annotated, default)."""
    return {
        f.name: (str(f.type).replace(" ", ""), f.default) for f in dataclasses.fields(TestImageSpec)
    }


def _valid_keys() -> list[str]:
    return list(_spec_types()) + list(_EXTRA_KEYS)


def _parse_value(key: str, raw: str, type_name: str) -> object:
    """Convert one override value to the key's type, or raise a one-line :class:`ConfigError`."""
    text = raw.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    low = text.lower()
    if type_name.endswith("|None") and low in _NONE:
        return None
    base = type_name.removesuffix("|None")
    try:
        if base == "int":
            return int(text)
        if base == "float":
            return float(text)
    except ValueError:
        pass
    else:
        if base not in ("bool", "str", "path", "tuple[float,float]"):
            raise AssertionError(f"unhandled type {type_name} of key {key}")
    if base == "tuple[float,float]":
        parts = [p.strip() for p in text.strip("[]()").split(",")]
        try:
            if len(parts) == 2:
                return (float(parts[0]), float(parts[1]))
        except ValueError:
            pass
        raise ConfigError(f"{key}={raw!r} is not a [lo,hi] pair; write e.g. {key}=[0,10000].")
    if base == "bool":
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
    if base in ("str", "path"):
        if not text:
            raise ConfigError(f"{key}= is empty; give a value, e.g. {key}=<{base}>.")
        return text
    expected = {"int": "an integer", "float": "a number", "bool": "true or false"}[base]
    example = {"int": "10000" if key == "image_size" else "3", "float": "0.1", "bool": "true"}[base]
    raise ConfigError(f"{key}={raw!r} is not {expected}; write e.g. {key}={example}.")


def parse_overrides(overrides: list[str]) -> tuple[Path, TestImageSpec]:
    """Turn ``key=value`` overrides into the output path and a validated spec.

    Args:
        overrides: e.g. ``["image_size=10000", "image_path=test_image.tif"]``; a leading ``+`` or
            ``++`` (Hydra's append/force syntax) is accepted and ignored.

    Returns:
        (output GeoTIFF path, spec).

    Raises:
        ConfigError: for a malformed override, an unknown or repeated key, or a bad value.
    """
    types = _spec_types()
    valid = _valid_keys()
    values: dict[str, object] = {}
    for item in overrides:
        key, sep, raw = item.lstrip("+").partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"argument {item!r} is not key=value; write e.g. image_size=10000 "
                "(see mgpr-test-image --help)."
            )
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}?" if close else "valid keys: " + ", ".join(valid)
            raise ConfigError(f"unknown key {key!r}; {hint} (see mgpr-test-image --help)")
        if key in values:
            raise ConfigError(f"key {key!r} is given twice; keep one {key}=... override.")
        type_name = types[key][0] if key in types else _EXTRA_KEYS[key][0]
        values[key] = _parse_value(key, raw, type_name)
    if "image_path" in values and "output" in values:
        raise ConfigError("image_path= and output= are both given; keep one (they are aliases).")
    out = values.pop("image_path", None) or values.pop("output", None) or DEFAULT_IMAGE_PATH
    values.pop("output", None)
    if Path(str(out)).suffix.lower() not in (".tif", ".tiff"):
        raise ConfigError(
            f"image_path={out} does not end in .tif or .tiff, but the file is a GeoTIFF; "
            f"name it e.g. image_path={Path(str(out)).with_suffix('.tif')}"
        )
    size = values.pop("image_size", None)
    if size is not None:
        clash = [k for k in ("width", "height") if k in values]
        if clash:
            raise ConfigError(
                f"image_size={size} and {clash[0]}= are both given; use image_size= for a square "
                "or width=/height=, not both."
            )
        values["width"] = values["height"] = size
    kwargs: dict[str, Any] = values
    return Path(str(out)), TestImageSpec(**kwargs)


def _help_text() -> str:
    lines = [
        "Write a synthetic georeferenced GeoTIFF (orthomosaic-like, optionally with planted "
        "bright objects and their truth GeoPackage) from key=value overrides, e.g. "
        "mgpr-test-image image_size=10000 image_path=test_image.tif objects=50",
        "",
        "Keys (default):",
        "",
        "\b",
    ]
    for key, (type_name, help_) in {k: (v[0], v[2]) for k, v in _EXTRA_KEYS.items()}.items():
        default = _EXTRA_KEYS[key][1]
        lines.append(f"  {key}: {type_name} ({'none' if default is None else default}) {help_}")
    for key, (type_name, default) in _spec_types().items():
        lines.append(f"  {key}: {type_name} ({'none' if default is None else default})")
    lines.append("")
    lines.append(
        "Choices: compress=deflate|zstd|lzw|none, nodata=none|border|rect, "
        "nodata_mode=value|mask|alpha, dtype=uint8|uint16|int16|float32, crs=<EPSG code>|none. "
        "value_range=[lo,hi]: what the 8-bit content is stretched to (default per dtype: "
        "uint16 [0,10000], int16 [-1000,10000], float32 [0,1]); nodata values: 0, -32768, NaN "
        "(nodata_value=255 for white nodata); hidden_objects=N: objects under the mask/alpha. "
        "Bools: true|false."
    )
    return "\n".join(lines)


app = typer.Typer(
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.command(help=_help_text())
def run(
    overrides: Annotated[
        list[str] | None,
        typer.Argument(metavar="KEY=VALUE...", help="overrides such as image_size=10000"),
    ] = None,
) -> None:
    """Parse the overrides, write the image, print one result line."""
    try:
        path, spec = parse_overrides(list(overrides or []))
        result = write_test_image(path, spec)
    except MgprError as exc:
        typer.echo(f"mgpr-test-image: error: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    truth = str(result.truth_path) if result.truth_path else "none"
    alpha = spec.nodata_mode == "alpha"  # one more band, whatever the nodata region
    bands = f"{spec.bands + 1} ({spec.bands} + alpha)" if alpha else f"{spec.bands}"
    typer.echo(
        f"{result.path}: {spec.width}x{spec.height}x{bands} {spec.dtype}, "
        f"{result.file_bytes / 1e6:.1f} MB, compression ratio {result.compression_ratio:.2f}, "
        f"{len(result.objects)} objects, truth {truth}"
    )


def main() -> None:
    """Console-script entry point (``mgpr-test-image``)."""
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s: %(message)s"
    )
    app()


if __name__ == "__main__":
    main()
