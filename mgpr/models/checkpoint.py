"""Local checkpoints: ``torch.load(weights_only=True)`` or safetensors, keys and shapes checked.

Split from :mod:`mgpr.models.weights` (which resolves a ``weights`` string and keeps the
download cache): everything here works on a file the user named, offline. No code in a
checkpoint ever runs, and nothing that does not fit loads silently: a missing, unexpected or
mis-shaped key raises :class:`~mgpr.errors.ModelError` naming up to three of each.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mgpr.errors import ModelError

logger = logging.getLogger(__name__)

#: Digits of the sha256 kept in a ``file:`` weights id.
HASH_PREFIX_LEN = 16


def file_sha256(path: str | os.PathLike[str], n: int = HASH_PREFIX_LEN) -> str:
    """Return the first ``n`` hex digits of the file's sha256 (reads the file in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:n]


def file_weights_id(path: str | os.PathLike[str]) -> str:
    """Return ``"file:<abs path>#sha256:<first 16 hex>"`` for a local checkpoint."""
    resolved = Path(path).resolve()
    return f"file:{resolved}#sha256:{file_sha256(resolved)}"


#: A terminal's escape sequences (torch's unpickling error sets bold text with ``ESC[1m``).
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def one_line(obj: object, limit: int = 200) -> str:
    """``obj`` as text on one line, cut to ``limit`` characters.

    Whitespace runs are collapsed and terminal escapes removed.
    """
    text = " ".join(_ANSI_ESCAPE.sub("", str(obj)).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: Where a training checkpoint keeps the network's state_dict, first found wins: Lightning's
#: ``state_dict``, the PyTorch tutorial's ``model_state_dict`` (beside ``optimizer_state_dict``,
#: ``epoch``, ``loss``), and ``model`` (DeiT, detectron-style and many training scripts).
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a checkpoint's tensors with ``torch.load(map_location="cpu", weights_only=True)``.

    Accepts a raw ``state_dict`` or a dict holding it under one of :data:`STATE_DICT_KEYS`,
    or a ``.safetensors`` file (read with ``safetensors.torch.load_file``, which holds tensors
    only, as fine-tuning with Hugging Face or timm saves them). Key prefixes are left alone
    (:func:`load_state_dict_checked` finds the network's, see :func:`align_keys`).

    Raises:
        ModelError: the file does not exist, cannot be unpickled safely, or holds no tensors.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelError(
            f"weights={path}: no such checkpoint file ({p.resolve()}); fix the path, or pass "
            "weights=DEFAULT or weights=none."
        )
    if p.suffix.lower() == ".safetensors":
        return _read_safetensors(p, str(path))
    try:
        obj: Any = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise ModelError(
            f"weights={path} cannot be read with torch.load(weights_only=True) "
            f"({type(err).__name__}: {one_line(err, 120)}); save it with "
            "torch.save(model.state_dict(), path)."
        ) from err
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise ModelError(
            f"weights={path} holds {type(obj).__name__}, not a state_dict; save it with "
            "torch.save(model.state_dict(), path)."
        )
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ModelError(
            f"weights={path} holds a dict without tensors (keys {list(obj)[:3]}); save it with "
            "torch.save(model.state_dict(), path)."
        )
    return tensors


def _read_safetensors(p: Path, given: str) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file's tensors (Hugging Face's format: tensors only, never code)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(p, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelError(
            f"weights={given} is not a readable .safetensors file ({type(err).__name__}: "
            f"{one_line(err, 120)}); check the file, or save it with "
            "safetensors.torch.save_file(model.state_dict(), path)."
        ) from err
    if not tensors:
        raise ModelError(f"weights={given} holds no tensors; check the file.")
    return {str(k): v for k, v in tensors.items()}


#: Leading dotted components a checkpoint's keys may carry before the model's own names
#: (``module.`` from DDP, ``model.`` from a LightningModule attribute, ``model.net.`` ...).
MAX_PREFIX_DEPTH = 3


@dataclass(frozen=True, slots=True)
class KeyAlignment:
    """A checkpoint's keys matched to a model's: what was stripped, what was left out.

    Attributes:
        state: the tensors under ``prefix``, renamed without it.
        prefix: the leading part removed from every key taken (``""``: none).
        dropped: keys outside ``prefix`` that are not network weights (``loss.weight``).
        others: keys outside ``prefix`` that look like network weights too (a second copy
            under ``ema.``): which network to load is then the user's choice, not a guess.
    """

    state: dict[str, torch.Tensor]
    prefix: str
    dropped: tuple[str, ...] = ()
    others: tuple[str, ...] = ()


def _splits(key: str) -> list[tuple[str, str]]:
    """``key`` cut after 0 to :data:`MAX_PREFIX_DEPTH` leading components: (prefix, rest)."""
    parts = key.split(".")
    return [
        (".".join(parts[:i]) + "." if i else "", ".".join(parts[i:]))
        for i in range(min(MAX_PREFIX_DEPTH, len(parts) - 1) + 1)
    ]


def _best_prefix(keys: list[str], expected: set[str]) -> str:
    """The prefix under which most keys are the model's own names (ties: the shorter one).

    Not the prefix every key shares: a Lightning checkpoint holds its network under
    ``model.`` beside the module's other state (``loss.weight`` of a weighted loss).
    """
    hits: dict[str, int] = {"": 0}
    for key in keys:
        for prefix, rest in _splits(key):
            if rest in expected:
                hits[prefix] = hits.get(prefix, 0) + 1
    return min(hits, key=lambda p: (-hits[p], len(p)))


def align_keys(state: dict[str, torch.Tensor], expected: set[str]) -> KeyAlignment:
    """Take the checkpoint's keys under the prefix that matches ``expected`` best.

    A key outside that prefix is dropped when no tail of it (up to 3 leading components off)
    is a model key: a loss's class weights, a metric's state. One that does look like the
    model's is kept in ``others``, for :func:`load_state_dict_checked` to refuse.
    """
    prefix = _best_prefix(list(state), expected)
    taken = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    outside = [k for k in state if not k.startswith(prefix)]
    others = [k for k in outside if any(rest in expected for _, rest in _splits(k))]
    dropped = [k for k in outside if k not in others]
    return KeyAlignment(taken, prefix, tuple(dropped), tuple(others))


def _first(keys: Sequence[str], n: int = 3) -> str:
    """Up to ``n`` keys, comma-separated, and how many more there are."""
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return f"{', '.join(keys[:n])}{more}"


def _aligned(state: dict[str, torch.Tensor], expected: set[str], source: str) -> KeyAlignment:
    """:func:`align_keys`, logging the prefix taken and the keys dropped.

    Raises:
        ModelError: network weights outside the prefix too (two networks in one file).
    """
    found = align_keys(state, expected)
    if found.others:
        other = _best_prefix(list(found.others), expected)
        where = f"under '{other}'" if other else "without a prefix"
        raise ModelError(
            f"weights={source} holds the model's weights under '{found.prefix}' and more "
            f"network weights {where} ({len(found.others)} keys: {_first(found.others)}), "
            "and mgpr does not guess which to load; re-save the one you want alone, e.g. "
            f"torch.save({{k.removeprefix('{found.prefix}'): v for k, v in sd.items() if "
            f"k.startswith('{found.prefix}')}}, 'sd.pth')."
        )
    if found.prefix:
        logger.info(
            "weights=%s: loading the %d keys under '%s' (prefix removed)",
            source,
            len(found.state),
            found.prefix,
        )
    if found.dropped:
        logger.info(
            "weights=%s: dropped %d key(s) outside '%s' that are not network weights: %s",
            source,
            len(found.dropped),
            found.prefix,
            _first(found.dropped),
        )
    return found


def _ignorable(key: str) -> bool:
    # BatchNorm2d has num_batches_tracked, FrozenBatchNorm2d does not; neither affects inference.
    return key.endswith("num_batches_tracked")


def load_state_dict_checked(
    module: torch.nn.Module,
    state: dict[str, torch.Tensor],
    source: str,
    model_name: str = "",
    ignore_prefixes: tuple[str, ...] = (),
) -> None:
    """Load ``state`` into ``module`` after checking every key and shape.

    Args:
        module: the network to fill (its parameters are overwritten in place).
        state: tensors by key, e.g. from :func:`read_checkpoint`.
        source: the ``weights=`` value, for the message.
        model_name: the model name, for the message.
        ignore_prefixes: checkpoint keys starting with one of these (after prefix alignment)
            are dropped, not reported: parts a trained model had that inference does not use
            (a segmentation model's ``aux_classifier.``, used only for its training loss).

    Raises:
        ModelError: naming up to 3 missing, unexpected and shape-mismatched keys each, or a
            second network outside the prefix taken (see :func:`align_keys`).
    """
    expected = module.state_dict()
    state = _aligned(state, set(expected), source).state
    if ignore_prefixes:
        state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)}
    missing = [k for k in expected if k not in state and not _ignorable(k)]
    unexpected = [k for k in state if k not in expected and not _ignorable(k)]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch (checkpoint vs model)", mismatched),
        ):
            if keys:
                parts.append(f"{len(keys)} {label}: {_first(keys)}")
        what = f"model={model_name}" if model_name else "the model"
        raise ModelError(
            f"weights={source} does not fit {what}: {'; '.join(parts)}; pass a checkpoint saved "
            "from this model's state_dict() or use weights=DEFAULT."
        )
    module.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)


def load_checkpoint_sized(
    path: str | os.PathLike[str],
    build: Callable[[int | None], torch.nn.Module],
    head_key: str,
    default_classes: int,
    source: str,
    model_name: str,
    ignore_prefixes: tuple[str, ...] = (),
) -> tuple[torch.nn.Module, int]:
    """Build a torchvision model with the checkpoint's own class count and load the checkpoint.

    The class count is read from the head weight ``head_key`` (its first dimension: a linear
    head's (K, F) or a 1x1 convolution head's (K, F, 1, 1)), so fine-tuned heads load;
    ``build(None)`` makes the default head, ``build(n)`` one with ``n`` classes.
    ``ignore_prefixes``: see :func:`load_state_dict_checked`.

    Returns:
        The loaded module and its number of classes.
    """
    state = read_checkpoint(path)
    module = build(None)
    head = align_keys(state, set(module.state_dict())).state.get(head_key)
    num_classes = int(head.shape[0]) if head is not None and head.ndim >= 2 else default_classes
    if num_classes != default_classes:
        module = build(num_classes)
    load_state_dict_checked(module, state, source, model_name, ignore_prefixes)
    return module, num_classes


def load_checkpoint(
    path: str | os.PathLike[str], module: torch.nn.Module, model_name: str = ""
) -> str:
    """Load a local checkpoint (see :func:`read_checkpoint`) into ``module``; its weights id.

    Raises:
        ModelError: missing file, unreadable file, or keys/shapes that do not fit.
    """
    load_state_dict_checked(module, read_checkpoint(path), str(path), model_name)
    return file_weights_id(path)
