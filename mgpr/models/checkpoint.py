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
import pickletools
import re
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
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
    """``obj`` as text on one line, cut to ``limit`` characters at a word boundary.

    Whitespace runs are collapsed and terminal escapes removed.
    """
    text = " ".join(_ANSI_ESCAPE.sub("", str(obj)).split())
    if len(text) <= limit:
        return text
    cut = text[: limit - 3]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit // 2 else cut).rstrip(" ,;:") + "..."


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
    size = p.stat().st_size
    if size == 0:
        raise ModelError(
            f"weights={path} is an empty file (0 bytes); copy it again, or save the checkpoint "
            "anew with torch.save(model.state_dict(), path)."
        )
    if p.suffix.lower() == ".safetensors":
        return _read_safetensors(p, str(path))
    if _looks_like_safetensors(p, size):
        logger.info("weights=%s holds safetensors (by its content): read as such", path)
        return _read_safetensors(p, str(path))
    members = _zip_members(p)
    if members is not None and _is_torchscript(members):
        raise ModelError(
            f"weights={path} is a TorchScript archive (torch.jit.save), not a state_dict; "
            f"re-save its weights with torch.save(torch.jit.load('{path}').state_dict(), "
            "'sd.pth') and pass weights=sd.pth."
        )
    try:
        with warnings.catch_warnings():
            # torch.load warns, with a source line, before it refuses a TorchScript archive
            # or a pickle protocol it may not read; the error says what to do instead.
            warnings.filterwarnings("ignore", ".*TorchScript archive", UserWarning)
            warnings.filterwarnings("ignore", ".*pickle protocol", UserWarning)
            obj: Any = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise _unreadable(p, str(path), err, members) from err
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


#: safetensors' start: the JSON header's length (8 bytes, little-endian), then the header.
_SAFETENSORS_HEAD = 9
#: torch.save's archive since torch 1.6 is a zip file; this is its first local file header.
_ZIP_MAGIC = b"PK\x03\x04"
#: The class torch's weights-only unpickler refused, from its message.
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
#: torch's own reason inside its weights-only message (the rest is advice for torch.load).
_WEIGHTS_ONLY_REASON = re.compile(r"WeightsUnpickler error:\s*(.*?)(?:\n\n|Check the doc|$)", re.S)


def _looks_like_safetensors(p: Path, size: int) -> bool:
    """True when the file starts as safetensors does (a plausible header length, then ``{``).

    By content, not by name: a safetensors file named ``.pth`` is no pickle, and torch.load
    would only say "Unsupported operand".
    """
    with open(p, "rb") as fh:
        head = fh.read(_SAFETENSORS_HEAD)
    if len(head) < _SAFETENSORS_HEAD or head[8:9] != b"{":
        return False
    return 0 < int.from_bytes(head[:8], "little") <= size - 8


def _zip_members(p: Path) -> list[str] | None:
    """The member names of a zip archive; None when it is no readable zip.

    Reads only the central directory, so telling a TorchScript archive from a pickle costs
    no load.
    """
    try:
        with zipfile.ZipFile(p) as zf:
            return zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return None


def _member(names: list[str], name: str) -> str | None:
    """The archive member ``<folder>/name`` (torch puts every record under one folder)."""
    return next((n for n in names if n.split("/", 1)[-1] == name), None)


def _is_torchscript(names: list[str]) -> bool:
    """torch.jit.save's archive holds ``constants.pkl``; torch.save's does not (torch's test)."""
    return _member(names, "constants.pkl") is not None


def _top_level_class(p: Path, names: list[str]) -> str | None:
    """The class of the pickled object when it is an instance (``torch.save(model)``).

    Read with ``pickletools.genops`` from the first opcodes of ``data.pkl``, which runs
    nothing; None for a dict or list (they start with their own opcodes) or anything odd.
    """
    data = _member(names, "data.pkl")
    if data is None:
        return None
    try:
        with zipfile.ZipFile(p) as zf, zf.open(data) as fh:
            raw = fh.read(1 << 16)
        strings: list[str] = []
        for op, arg, _ in pickletools.genops(raw):
            if op.name == "GLOBAL":
                return str(arg).replace(" ", ".")
            if op.name == "STACK_GLOBAL" and len(strings) >= 2:
                return f"{strings[-2]}.{strings[-1]}"
            if "UNICODE" in op.name:
                strings.append(str(arg))
            elif op.name not in ("PROTO", "FRAME", "MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"):
                return None
    except Exception:  # noqa: BLE001 - a damaged pickle: no diagnosis, torch's reason stands
        return None
    return None


def _unreadable(p: Path, given: str, err: Exception, members: list[str] | None) -> ModelError:
    """The error for a file torch.load(weights_only=True) refused: its cause and its fix."""
    text = str(err)
    with open(p, "rb") as fh:
        is_zip = fh.read(4) == _ZIP_MAGIC
    if (is_zip and members is None) or "central directory" in text:
        return ModelError(
            f"weights={given} is a truncated or corrupt torch.save archive ({p.stat().st_size} "
            "bytes, its zip directory unreadable), as a copy or download cut short leaves it; "
            "copy it again."
        )
    refused = _UNSUPPORTED_GLOBAL.search(text)
    top = _top_level_class(p, members) if members is not None else None
    whole = top not in (None, "collections.OrderedDict")  # a state_dict is an OrderedDict
    if whole and (refused is None or refused.group(1) == top):
        return ModelError(
            f"weights={given} holds a whole pickled {top} (torch.save(model)), "
            "which weights_only=True does not unpickle because that could run code; if you "
            f"trust the file, re-save its weights with torch.save(torch.load('{given}', "
            "weights_only=False).state_dict(), 'sd.pth') and pass weights=sd.pth."
        )
    if refused:
        where = " beside its tensors (e.g. in hyper_parameters)" if members is not None else ""
        return ModelError(
            f"weights={given} holds an object of class {refused.group(1)}{where}, which "
            "weights_only=True does not unpickle because that could run code; if you trust the "
            "file, re-save only the weights, e.g. "
            f"torch.save(torch.load('{given}', weights_only=False)['state_dict'], 'sd.pth'), "
            "and pass weights=sd.pth."
        )
    reason = _WEIGHTS_ONLY_REASON.search(text)
    return ModelError(
        f"weights={given} cannot be read with torch.load(weights_only=True) "
        f"({type(err).__name__}: {one_line(reason.group(1) if reason else text, 160)}); "
        "check that torch.save wrote it (another framework's file must be converted first)."
    )


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


#: Where to write a model mgpr has no builder for (a checkpoint of another network).
_OWN_BUILDER = 'model=pkg.module:build (README, "Models")'
#: A torchvision ResNet block's convolution: ``layer<1-4>.<block>.conv<1-3>.weight``.
_RESNET_CONV = re.compile(r"(?:^|\.)layer([1-4])\.(\d+)\.conv([1-3])\.weight$")
#: torchvision's ResNet depths by blocks per layer and block type (bottleneck: conv3).
_RESNET_DEPTHS = {
    (2, 2, 2, 2, False): 18,
    (3, 4, 6, 3, False): 34,
    (3, 4, 6, 3, True): 50,
    (3, 4, 23, 3, True): 101,
    (3, 8, 36, 3, True): 152,
}


def _resnet_kind(state: Mapping[str, torch.Tensor]) -> str | None:
    """Which torchvision ResNet the keys describe, from block counts and block shapes.

    ``"ResNet-18 (2-2-2-2 basic blocks)"``; ``ResNeXt`` when the first block's 3x3 convolution is
    grouped, ``wide ResNet`` when it is 128 wide; None when the keys are no ResNet's. Cheap
    (key names and shapes only), so a wrong-architecture message can name the likely one.
    """
    blocks, bottleneck, first = [0, 0, 0, 0], False, {}
    for key, value in state.items():
        found = _RESNET_CONV.search(key)
        if found is None:
            continue
        layer, block, conv = int(found[1]) - 1, int(found[2]), int(found[3])
        blocks[layer] = max(blocks[layer], block + 1)
        bottleneck |= conv == 3
        if layer == 0 and block == 0:
            first[conv] = tuple(value.shape)
    depth = _RESNET_DEPTHS.get((*blocks, bottleneck))
    if depth is None:
        return None
    name = f"ResNet-{depth}"
    if bottleneck and len(first.get(2, ())) == 4 and first[2][0] != first[2][1]:
        name = f"ResNeXt-{depth}"
    elif bottleneck and first.get(1, (0,))[0] == 128:
        name = f"wide ResNet-{depth}"
    kind = "bottleneck" if bottleneck else "basic"
    return f"{name} ({'-'.join(map(str, blocks))} {kind} blocks)"


def _band_counts(
    expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], bad: list[str]
) -> tuple[int, int] | None:
    """(checkpoint, model) input bands when the first convolution's width is the only misfit.

    A fine-tune on RGB+NIR changes nothing but that dimension of the first 4-D weight.
    """
    conv = next((k for k, v in expected.items() if v.ndim == 4), None)
    if conv is None or bad != [conv]:
        return None
    theirs, ours = state[conv].shape, expected[conv].shape
    if len(theirs) != 4 or theirs[0] != ours[0] or theirs[2:] != ours[2:]:
        return None
    return int(theirs[1]), int(ours[1])


def _misfit_advice(
    expected: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    missing: list[str],
    unexpected: list[str],
    bad: list[str],
    what: str,
) -> str:
    """Why a checkpoint does not fit, and a fix that keeps the user's training.

    Never "use weights=DEFAULT": that throws the fine-tune away.
    """
    bands = None if missing or unexpected else _band_counts(expected, state, bad)
    if bands is not None:
        return (
            f"the checkpoint was trained on {bands[0]} input bands and {what} takes "
            f"{bands[1]}: a {bands[0]}-band model needs your own builder that widens the first "
            f"convolution to {bands[0]} bands and loads this file, run as {_OWN_BUILDER}"
        )
    theirs, ours = _resnet_kind(state), _resnet_kind(expected)
    if theirs is not None and ours is not None and theirs != ours:
        return (
            f"it looks like a {theirs} checkpoint and {what} is a {ours}: load it with your "
            f"own builder of that network, {_OWN_BUILDER}"
        )
    if missing and not unexpected and not bad:
        return (
            "the checkpoint holds only part of the network (a backbone alone, a save cut "
            "short): pass one saved from the whole model's state_dict()"
        )
    return (
        f"it was saved from another network than {what}: pass a checkpoint of {what}'s "
        f"architecture, or load this one with your own builder, {_OWN_BUILDER}"
    )


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
    bad = [k for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or bad:
        parts = []
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            (
                "shape mismatch (checkpoint vs model)",
                [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in bad],
            ),
        ):
            if keys:
                parts.append(f"{len(keys)} {label}: {_first(keys)}")
        what = f"model={model_name}" if model_name else "the model"
        advice = _misfit_advice(expected, state, missing, unexpected, bad, what)
        raise ModelError(f"weights={source} does not fit {what}: {'; '.join(parts)}; {advice}.")
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
