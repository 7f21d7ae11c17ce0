"""Weights: torchvision names, ``none``, local checkpoints, the download cache.

A ``weights`` string is one of:

* ``"none"`` (any case): random initialisation; adapters set ``random_weights=True``.
* ``"DEFAULT"`` or a member name of the model's torchvision weights enum, bare
  (``"IMAGENET1K_V2"``) or qualified (``"ResNet50_Weights.IMAGENET1K_V2"``), looked up with
  torchvision's ``get_model_weights`` / ``get_weight``: downloaded once into
  the torch hub cache, ``<TORCH_HOME>/hub/checkpoints`` (``TORCH_HOME`` defaults to
  ``~/.cache/torch``), and read from there afterwards.
* a path to a local checkpoint, read with ``torch.load(weights_only=True)`` (no code runs;
  reading and key checks live in :mod:`mgpr.models.checkpoint`).

Nothing ever falls back to random weights silently: a missing file, a checkpoint that does not
fit, or a download that fails raises :class:`~mgpr.errors.ModelError` with the fix.

Multi-rank runs: let rank 0 call :func:`fetch_weights` first and the other ranks wait until
:func:`weights_cached` is True; the file appears atomically (torch.hub downloads to a temporary
name and renames it).
"""

from __future__ import annotations

import logging
import os
import re
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import torch
from torchvision.models import WeightsEnum, get_model_weights, get_weight

from mgpr.errors import ModelError
from mgpr.models.base import numbered_categories
from mgpr.models.checkpoint import (
    file_sha256,
    file_weights_id,
    load_checkpoint,
    load_checkpoint_sized,
    one_line,
)
from mgpr.models.registry import model_entry

__all__ = [
    "WeightsSpec",
    "build_torchvision_model",
    "checkpoint_dir",
    "fetch_weights",
    "file_sha256",
    "file_weights_id",
    "load_checkpoint",
    "load_torchvision",
    "require_no_weights",
    "resolve_weights",
    "weights_cache_file",
    "weights_cached",
    "weights_enum_class",
]

logger = logging.getLogger(__name__)

#: torch.hub's convention: a cached file ``name-<hash prefix>.ext`` carries its sha256 prefix.
_HASH_REGEX = re.compile(r"-([a-f0-9]*)\.")


def weights_enum_class(name: str) -> type[WeightsEnum] | None:
    """The torchvision weights enum of built-in model ``name`` (None: nothing to download).

    It is ``get_model_weights(<the registry entry's torchvision_builder>)``.
    """
    entry = model_entry(name)
    if entry is None or entry.torchvision_builder is None:
        return None
    return get_model_weights(entry.torchvision_builder)


@dataclass(frozen=True, slots=True)
class WeightsSpec:
    """A ``weights`` string resolved for one model.

    Attributes:
        kind: ``"none"`` (random), ``"torchvision"`` (an enum member) or ``"file"`` (a checkpoint).
        weights_id: ``"none"``, the enum member's name (``"ResNet50_Weights.IMAGENET1K_V2"``) or
            ``"file:<abs path>#sha256:<first 16 hex>"``.
        enum: the torchvision enum member when ``kind == "torchvision"``.
        path: the absolute checkpoint path when ``kind == "file"``.
    """

    kind: Literal["none", "torchvision", "file"]
    weights_id: str
    enum: WeightsEnum | None = None
    path: Path | None = None


def enum_member(enum_cls: type[WeightsEnum], weights: str) -> WeightsEnum | None:
    """The member named ``DEFAULT``, ``IMAGENET1K_V2`` or a full enum name (``get_weight``).

    Any case; a qualified name must name the model's own enum (else None, as for no member).
    """
    text = weights.strip()
    enum_name, dot, member = text.rpartition(".")
    if dot and enum_name.lower() != enum_cls.__name__.lower():
        return None
    if not member.replace("_", "").isalnum():
        return None
    try:
        found = get_weight(f"{enum_cls.__name__}.{member.upper()}")
    except (KeyError, ValueError):
        return None
    return found if isinstance(found, enum_cls) else None


def _looks_like_path(weights: str) -> bool:
    path_like = os.sep in weights or "/" in weights or weights.startswith("~")
    return path_like or weights.endswith((".pth", ".pt", ".ckpt", ".bin", ".tar"))


def resolve_weights(name: str, weights: str) -> WeightsSpec:
    """Resolve a ``weights`` string for a built-in model.

    Order: ``none``; a torchvision enum name (``DEFAULT`` included); an existing file; anything
    else is an error (a path that does not exist, or an unknown name).

    Args:
        name: built-in model name (``"resnet50"``, ``"fasterrcnn"``, ...).
        weights: the ``weights=`` value.

    Raises:
        ModelError: the path does not exist, or the name is not a known weights name.
    """
    if weights.strip().lower() == "none":
        return WeightsSpec(kind="none", weights_id="none")
    enum_cls = weights_enum_class(name)
    if enum_cls is not None:
        member = enum_member(enum_cls, weights)
        if member is not None:
            return WeightsSpec(kind="torchvision", weights_id=str(member), enum=member)
    path = Path(weights).expanduser()
    if path.is_file():
        return WeightsSpec(kind="file", weights_id=file_weights_id(path), path=path.resolve())
    if _looks_like_path(weights) or path.exists():
        raise ModelError(
            f"weights={weights} for model={name}: no such checkpoint file ({path.resolve()}); "
            "fix the path, or pass weights=DEFAULT or weights=none."
        )
    names = ["DEFAULT", "none", "<local checkpoint path>"]
    if enum_cls is not None:
        names[1:1] = [m.name for m in enum_cls]
    raise ModelError(
        f"weights={weights} is not a weights name for model={name} nor an existing file; "
        f"use one of {', '.join(names)}."
    )


def require_no_weights(name: str, weights: str) -> None:
    """Accept only ``none``/``DEFAULT`` for a model without weights (``reference``, ``null``).

    Raises:
        ModelError: any other value (it would be silently ignored otherwise).
    """
    if weights.strip().lower() not in ("none", "default"):
        raise ModelError(
            f"weights={weights} given for model={name}, which has no weights; use weights=none."
        )


def checkpoint_dir() -> Path:
    """Return the torch hub checkpoint cache, ``torch.hub.get_dir()/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _torch_home_hint() -> str:
    hub = Path(torch.hub.get_dir())
    return f"TORCH_HOME={hub.parent}" if hub.name == "hub" else f"torch.hub dir {hub}"


def weights_cache_file(name: str, weights: str) -> Path | None:
    """Where torch.hub keeps the file for these weights: the basename of the enum's URL.

    None for ``none``, a local path, a model without a weights enum and an invalid weights
    string (building the model reports it). No network, no check that the file exists.
    """
    enum_cls = weights_enum_class(name)
    member = None if enum_cls is None else enum_member(enum_cls, weights)
    if member is None:
        return None
    return checkpoint_dir() / Path(urlparse(str(member.url)).path).name


def weights_cached(name: str, weights: str) -> bool:
    """True when building ``name`` with ``weights`` needs no download (ranks > 0 poll this).

    True for ``none``, local files, models without a weights enum, and torchvision weights whose
    file is already in :func:`checkpoint_dir`.
    """
    target = weights_cache_file(name, weights)
    return target is None or target.is_file()


#: Seconds any one network operation of a download (connect, one read) may block. torch.hub
#: sets no timeout, so on a node whose firewall drops packets a download would hang instead of
#: failing with the "run mgpr-fetch-weights" message.
DOWNLOAD_SOCKET_TIMEOUT_S = 30.0


def _download(url: str, dst: Path, hash_prefix: str | None, progress: bool) -> None:
    """Download ``url`` to ``dst`` (temporary name, then rename); the seam tests patch."""
    import socket

    dst.parent.mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_SOCKET_TIMEOUT_S)
    try:
        torch.hub.download_url_to_file(url, str(dst), hash_prefix, progress=progress)
    finally:
        socket.setdefaulttimeout(previous)


def fetch_weights(name: str, weights: str = "DEFAULT", *, progress: bool = False) -> Path | None:
    """Make sure the torchvision weights file is in the cache, downloading it if needed.

    Args:
        name: built-in model name.
        weights: ``DEFAULT`` or an enum member name.
        progress: show torch.hub's progress bar (on stderr).

    Returns:
        The cached file, or None when these weights need no download (``none``, a local file).

    Raises:
        ModelError: the download failed (offline, proxy, hash mismatch); the message names the
            cache directory and how to pre-fetch.
    """
    target = weights_cache_file(name, weights)
    if target is None or target.is_file():
        return target
    spec = resolve_weights(name, weights)
    assert spec.enum is not None
    match = _HASH_REGEX.search(target.name)
    logger.info("downloading %s weights %s to %s", name, spec.weights_id, target)
    try:
        _download(spec.enum.url, target, match.group(1) if match else None, progress)
    except (urllib.error.URLError, OSError, ConnectionError, RuntimeError) as err:
        reason = getattr(err, "reason", None) or err
        fetch = f"mgpr-fetch-weights {name}" + (
            "" if weights.strip().upper() == "DEFAULT" else f" --weights {weights}"
        )
        raise ModelError(
            f"weights={weights} for {name} are not in the cache ({target.parent}) and cannot be "
            f"downloaded ({one_line(reason)}); on a machine with internet run `{fetch}` "
            f"({_torch_home_hint()}) or pass weights=<local .pth>."
        ) from err
    return target


def load_torchvision(builder: Any, model_name: str, weights: str, **kwargs: Any) -> torch.nn.Module:
    """Build a torchvision model with pretrained weights, fetching them into the cache first.

    torchvision reads the hub file with ``torch.load(weights_only=False)``; the build runs with
    ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` (torch's switch), so a cached file that holds code (a
    shared ``TORCH_HOME``) is refused like a local checkpoint, never run.

    Args:
        builder: the torchvision builder, e.g. ``torchvision.models.resnet50``.
        model_name: built-in model name.
        weights: ``DEFAULT`` or an enum member name (as the user wrote it, for messages).
        **kwargs: passed to the builder.

    Raises:
        ModelError: offline and not cached, or the cached file cannot be read.
    """
    spec = resolve_weights(model_name, weights)
    assert spec.enum is not None
    cached = fetch_weights(model_name, weights)
    previous = os.environ.get(_FORCE_WEIGHTS_ONLY)
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    try:
        return builder(weights=spec.enum, progress=False, **kwargs)  # type: ignore[no-any-return]
    except Exception as err:  # noqa: BLE001 - the weights_only unpickler raises many types
        raise ModelError(
            f"weights={weights} for {model_name}: the cached file {cached} cannot be loaded "
            f"({type(err).__name__}: {one_line(err, 120)}); delete it and run "
            f"`mgpr-fetch-weights {model_name} --weights {spec.enum.name}`."
        ) from err
    finally:
        os.environ.pop(_FORCE_WEIGHTS_ONLY)
        if previous is not None:
            os.environ[_FORCE_WEIGHTS_ONLY] = previous


#: torch.load reads it at every call; "1" means weights_only=True whatever the caller passes.
_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def build_torchvision_model(
    model_name: str,
    weights: str,
    builder: Any,
    head_key: str,
    default_categories: tuple[str, ...],
    output_noun: str,
    ignore_prefixes: tuple[str, ...] = (),
    **kwargs: Any,
) -> tuple[WeightsSpec, torch.nn.Module, tuple[str, ...] | None]:
    """A torchvision model for any ``weights`` value, and the category names of its outputs.

    ``DEFAULT``/an enum member: pretrained (fetched into the cache first), the enum's categories.
    ``none``: random weights (warned), ``default_categories`` so the output schema stays that of
    a real run. A checkpoint path: the class count read from ``head_key`` (fine-tuned heads
    load); ``default_categories`` when the count matches them, else the class ids as names
    (``"0"``, ``"1"``, ...: a fine-tuned head's count must be known, e.g. for the class map's
    dtype and its probability bands).

    Args:
        model_name: built-in model name (messages, registry).
        weights: the user's ``weights`` value.
        builder: the torchvision builder, e.g. ``torchvision.models.resnet50``.
        head_key: state-dict key of the classification head's weight.
        default_categories: the ``DEFAULT`` weights' category names.
        output_noun: what the outputs are, for the random-weights warning ("predictions").
        ignore_prefixes: checkpoint keys the model does not need (``aux_classifier.``), see
            :func:`~mgpr.models.checkpoint.load_state_dict_checked`.
        **kwargs: passed to the builder.

    Raises:
        ModelError: bad weights name, missing/unfit checkpoint, or weights not downloadable.
    """
    spec = resolve_weights(model_name, weights)
    categories: tuple[str, ...] | None = default_categories
    if spec.kind == "torchvision":
        assert spec.enum is not None
        module = load_torchvision(builder, model_name, weights, **kwargs)
        categories = tuple(spec.enum.meta["categories"])
    elif spec.kind == "none":
        module = builder(weights=None, **kwargs)
        logger.warning(
            "%s runs with random weights (weights=none): %s are meaningless",
            model_name,
            output_noun,
        )
    else:
        assert spec.path is not None
        default_classes = len(default_categories)
        module, num_classes = load_checkpoint_sized(
            spec.path,
            lambda n: builder(weights=None, num_classes=n or default_classes, **kwargs),
            head_key,
            default_classes,
            str(weights),
            model_name,
            ignore_prefixes,
        )
        if num_classes != default_classes:
            categories = numbered_categories(num_classes)
    return spec, module, categories
