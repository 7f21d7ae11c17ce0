"""Where ``input_path`` becomes the list of rasters to predict, each file once.

``input_path`` is a raster file, a folder, a glob or a ``.txt`` list; GDAL paths such as
``/vsicurl/...`` or ``/vsis3/...`` pass through untouched. The same file named twice (the same
path twice, another path to it, or a symlink) is predicted once: without this, its tiles would
be planned twice and every object written twice.

A run never reads its own results: a folder or glob match inside the run directory's result
folders (``parts/``, ``segmentation/``, ...: a recursive ``data/**/*.tif`` with
``output_dir=data/runs/x`` would otherwise pick up the class maps it wrote and fail the resume)
is skipped, and naming such a file outright is refused, since this run would overwrite it. GDAL
sidecar files (``.aux.xml``, ``.ovr``, ``.msk``) matched by a glob are skipped too, and so is a
match without a raster suffix unless the pattern names that suffix (``dir/*`` reads what ``dir``
reads; ``dir/*.ecw`` reads ECW files).
"""

from __future__ import annotations

import fnmatch
import glob
import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from mgpr.errors import InputError

log = logging.getLogger(__name__)

RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2", ".img")
#: GDAL's side files next to a raster (statistics, external overviews and masks): never inputs.
SIDECAR_SUFFIXES = (".aux.xml", ".aux", ".ovr", ".msk")
_GLOB_CHARS = set("*?[")


def _is_gdal_virtual(path: str) -> bool:
    return path.startswith("/vsi") or "://" in path


def _case_hint(pattern: str) -> str:
    """`` (but N match ignoring case, e.g. 'a.tif': globs are case-sensitive)``, or ``""``.

    A pattern written on Windows or macOS (``*.TIF`` for ``a.tif``) matches nothing on Linux.
    """
    folder = Path(pattern).parent
    if any(ch in str(folder) for ch in _GLOB_CHARS) or not folder.is_dir():
        return ""
    name = Path(pattern).name.lower()
    try:
        found = sorted(p.name for p in folder.iterdir() if fnmatch.fnmatch(p.name.lower(), name))
    except OSError:
        return ""
    if not found:
        return ""
    return f" (but {len(found)} match ignoring case, e.g. {found[0]!r}: globs are case-sensitive)"


def _raster_matches(pattern: str, matches: list[str]) -> list[str]:
    """A glob's matches that are rasters: a raster suffix, or the suffix the pattern names.

    ``dir/*`` reads what ``dir`` reads (a folder of GeoTIFFs also holds the truth GeoPackage
    mgpr-test-image writes, READMEs, shapefiles); ``dir/*.ecw`` names its format, so every match
    is kept. The rest is skipped with one line.
    """
    named = Path(pattern).suffix.lower()
    named = named if named and not any(ch in named for ch in _GLOB_CHARS) else ""
    # a pattern without a suffix (dir/*) names none: '' must not keep README, notes, ...
    allowed = {*RASTER_SUFFIXES, named} if named else set(RASTER_SUFFIXES)
    keep = [m for m in matches if Path(m).suffix.lower() in allowed]
    kept = set(keep)
    other = [Path(m).name for m in matches if m not in kept]
    if other and keep:
        log.info(
            "input_path=%r: skipping %d match(es) without a raster suffix (%s), e.g. %s",
            pattern,
            len(other),
            "/".join(RASTER_SUFFIXES),
            ", ".join(other[:3]),
        )
    if not keep:
        raise InputError(
            f"input_path={pattern!r}: the glob matches no raster ({'/'.join(RASTER_SUFFIXES)}), "
            f"only {len(other)} other file(s) such as {', '.join(repr(n) for n in other[:3])}; "
            "name another format's extension in the pattern to read it (e.g. '*.ecw')"
        )
    return keep


def _is_glob(input_path: str) -> bool:
    """A pattern to expand: glob characters, and no file or folder of that very name."""
    return any(ch in input_path for ch in _GLOB_CHARS) and not Path(input_path).exists()


def _expand(input_path: str) -> list[str]:
    """``input_path`` as paths: folders and globs sorted, lists in their order (resolve_inputs)."""
    if _is_gdal_virtual(input_path):
        from mgpr.geo.archives import archive_members

        return archive_members(input_path, RASTER_SUFFIXES) or [input_path]
    path = Path(input_path)
    if _is_glob(input_path):
        matches = sorted(glob.glob(input_path, recursive=True))
        matches = [m for m in matches if Path(m).is_file()]
        sidecars = [m for m in matches if m.lower().endswith(SIDECAR_SUFFIXES)]
        if sidecars:
            log.info(
                "input_path=%r: skipping %d GDAL side file(s) (%s)",
                input_path,
                len(sidecars),
                "/".join(SIDECAR_SUFFIXES),
            )
            side = set(sidecars)
            matches = [m for m in matches if m not in side]
        if not matches:
            raise InputError(
                f"input_path={input_path!r}: the glob matches no file{_case_hint(input_path)}; "
                "check the pattern"
            )
        return _raster_matches(input_path, matches)
    if not path.exists():
        parts = [p.strip() for p in input_path.split(",")]
        several = len(parts) > 1 and all(p and Path(p).expanduser().exists() for p in parts)
        raise InputError(
            f"input_path={input_path!r} does not exist; "
            + (
                f"for several inputs write a list: input_path=[{','.join(parts)}]"
                if several
                else "pass a GeoTIFF, a folder, a glob, a .txt list or a list [a.tif,b.tif]"
            )
        )
    if path.is_dir():
        found = sorted(
            str(p) for p in path.iterdir() if p.is_file() and p.suffix.lower() in RASTER_SUFFIXES
        )
        if not found:
            raise InputError(
                f"input_path={input_path!r} is a folder without rasters "
                f"({'/'.join(RASTER_SUFFIXES)}); " + _subfolder_hint(path)
            )
        return found
    if path.suffix.lower() == ".txt":
        return _read_list_file(path)
    return [input_path]


def _subfolder_hint(folder: Path) -> str:
    """How to read a folder whose rasters are all in its subfolders (flights/f1/*.tif), if so."""
    try:
        below = next(
            (
                p
                for p in folder.glob("*/**/*")
                if p.suffix.lower() in RASTER_SUFFIXES and p.is_file()
            ),
            None,
        )
    except OSError:
        below = None
    if below is None:
        return _other_images_hint(folder) or "point it at a folder of GeoTIFFs"
    return (
        f"its subfolders hold rasters (e.g. {str(below.relative_to(folder))!r}), which a folder "
        f"input does not search: read them all with input_path='{folder}/**/*.tif'"
    )


#: Image formats GDAL reads that a folder input leaves out (PNG/JPEG chips, other GIS formats):
#: a folder of them is named in the refusal with the glob that reads them.
OTHER_IMAGE_SUFFIXES = (
    ".png", ".jpg", ".jpeg", ".ecw", ".sid", ".bmp", ".gif", ".webp", ".nc", ".hdf", ".h5",
    ".asc", ".bil", ".ntf", ".kea", ".grd",
)  # fmt: skip


def _other_images_hint(folder: Path) -> str | None:
    """How to read a folder of images in a format a folder input leaves out, if it holds some."""
    try:
        files = [p for p in folder.iterdir() if p.suffix.lower() in OTHER_IMAGE_SUFFIXES]
        files = sorted(p for p in files if p.is_file())
    except OSError:
        return None
    if not files:
        return None
    counts = Counter(p.suffix for p in files)
    suffix = counts.most_common(1)[0][0]  # as spelt: a glob matches case
    example = next(p.name for p in files if p.suffix == suffix)
    return (
        f"it holds {counts[suffix]} {suffix} file(s) (e.g. {example!r}), which a folder input "
        f"does not read: name them with input_path='{folder}/*{suffix}'"
    )


def _read_list_file(path: Path) -> list[str]:
    """A ``.txt`` list's rasters: each line a file, a folder or a glob, relative to the list."""
    out: list[str] = []
    # utf-8-sig: a list saved by a Windows editor starts with a byte-order mark (CRLF is fine)
    for lineno, raw in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if _is_gdal_virtual(line):
            out.append(line)
            continue
        item = Path(line).expanduser()
        if not item.is_absolute():
            item = path.parent / item
        if item.is_file() and item.suffix.lower() == ".txt":
            raise InputError(
                f"{path}:{lineno} names another list, {line!r}; a list names rasters, folders "
                "or globs (for several lists: input_path=[a.txt,b.txt])"
            )
        if item.is_dir() or (_is_glob(str(item)) and not item.is_file()):
            try:
                out += _expand(str(item))
            except InputError as exc:
                raise InputError(f"{path}:{lineno}: {exc}") from None
            continue
        if not item.is_file():
            raise InputError(
                f"{path}:{lineno} names {line!r}, which does not exist; fix or remove that line"
            )
        out.append(str(item))
    if not out:
        raise InputError(f"input_path={str(path)!r} lists no raster; add one path per line")
    return out


def resolve_inputs(input_path: str | Sequence[str], written: Sequence[Path] = ()) -> list[str]:
    """Expand ``input_path`` into raster paths, each file once, in a stable order.

    Args:
        input_path: a raster file, a folder (its ``*.tif``/``*.tiff``/... files, not recursive),
            a glob pattern, or a ``.txt`` file listing one file, folder or glob per line
            (``#`` comments and blank lines ignored; relative paths are relative to the list
            file); or a list of those, expanded one by one in its order.
        written: folders this run writes its results into (absolute); see the module docstring.

    Returns:
        The paths as given or found; a later name of a file already listed is dropped with one
        warning line naming both.

    Raises:
        InputError: when the path is missing, the folder is empty, the glob matches nothing, a
            listed file is missing (naming the file and its line), or an input lies in one of
            the ``written`` folders.
    """
    items = [input_path] if isinstance(input_path, str) else list(input_path)
    folders = [Path(w).resolve() for w in written]
    paths: list[str] = []
    for item in items:
        found = _expand(item)
        paths += _without_own_results(item, found, folders) if folders else found
    return drop_duplicate_files(paths)


def _inside(path: str, folders: Sequence[Path], parents: dict[str, Path]) -> Path | None:
    """The folder of ``folders`` that holds ``path`` (symlinks resolved), or None.

    ``parents`` caches each folder's resolved path: a file that is no symlink resolves to its
    resolved folder plus its name, so a folder of 100,000 chips costs one ``lstat`` a file
    instead of a ``Path.resolve`` (~90 us a file, 9 s at 100,000).
    """
    if _is_gdal_virtual(path):
        return None
    head, name = os.path.split(path)
    if not name or name in (".", "..") or os.path.islink(path):
        real = Path(path).resolve()
    else:
        parent = parents.get(head)
        if parent is None:
            parent = parents[head] = Path(head or ".").resolve()
        real = parent / name
    return next((f for f in folders if real.is_relative_to(f)), None)


def _without_own_results(input_path: str, paths: list[str], written: list[Path]) -> list[str]:
    """Drop a glob's matches inside the run's result folders; refuse anything else there."""
    is_glob = _is_glob(input_path)
    kept: list[str] = []
    skipped = 0
    parents: dict[str, Path] = {}
    for path in paths:
        folder = _inside(path, written, parents)
        if folder is None:
            kept.append(path)
        elif is_glob:
            skipped += 1
        else:
            raise InputError(
                f"input {path!r} lies in {str(folder)!r}, a folder this run writes its results "
                "into; copy it elsewhere or choose another output_dir"
            )
    if skipped:
        log.warning(
            "input_path=%r: skipping %d match(es) inside this run's own result folders (%s)",
            input_path,
            skipped,
            ", ".join(str(w) for w in written),
        )
    if not kept:
        raise InputError(
            f"input_path={input_path!r} matches only this run's own results; "
            "point it at the input rasters or choose another output_dir"
        )
    return kept


def file_identity(path: str) -> tuple[str, ...]:
    """What makes two names the same file.

    Device and inode for local files (symlinks and other paths to one file agree), the path
    string for GDAL virtual paths (their server is not asked).
    """
    if _is_gdal_virtual(path):
        return ("vsi", path.rstrip("/"))
    st = os.stat(path)  # follows symlinks
    return ("file", str(st.st_dev), str(st.st_ino))


def drop_duplicate_files(paths: list[str]) -> list[str]:
    """Keep the first name of each file; warn once for each later name of the same file."""
    seen: dict[tuple[str, ...], str] = {}
    kept: list[str] = []
    for path in paths:
        ident = file_identity(path)
        if ident in seen:
            log.warning(
                "input %s is the same file as %s (listed twice); predicting it once",
                path,
                seen[ident],
            )
            continue
        seen[ident] = path
        kept.append(path)
    return kept


def spelled_as_before(paths: list[str], earlier: Sequence[str]) -> list[str]:
    """``paths`` with each file that ``earlier`` (a resumed run's inputs) named spelled as there.

    A tile's identity is its raster's path as given (:class:`~mgpr.geo.tiling.TileId`), so
    ``input_path=/data/a.tif`` after ``input_path=a.tif`` (or ``./a.tif``, or a symlink to it)
    would otherwise be another run's input: the resume refused, or its tiles predicted again.
    Files are matched by device and inode (:func:`file_identity`), each earlier name resolved
    from the current directory; an earlier name that is missing from here, and every GDAL
    virtual path, matches nothing and keeps the refusal's message.
    """
    known: dict[tuple[str, ...], str] = {}
    for name in earlier:
        if _is_gdal_virtual(name):
            continue
        try:
            known.setdefault(file_identity(name), name)
        except OSError:
            continue
    if not known:
        return paths
    out: list[str] = []
    for path in paths:
        try:
            before = None if _is_gdal_virtual(path) else known.get(file_identity(path))
        except OSError:
            before = None
        if before is not None and before != path:
            log.info(
                "input %s is the file the run in output_dir named %s: resumed under that name",
                path,
                before,
            )
            path = before
        out.append(path)
    return out


def remote_identity(path: str, timeout_s: float = 10.0) -> dict[str, str | int | None]:
    """Size, ETag and Last-Modified of a ``/vsicurl/`` input, from an HTTP HEAD request.

    A remote raster has no local size or mtime, so without this a run over a URL would resume
    against a replaced file. Other GDAL virtual paths (``/vsis3/``, ``/vsigs/``: signed requests)
    and servers that do not answer give Nones: the run then goes on with the path alone.

    Returns:
        ``{"bytes": int | None, "etag": str | None, "last_modified": str | None}``.
    """
    unknown: dict[str, str | int | None] = {"bytes": None, "etag": None, "last_modified": None}
    prefix = "/vsicurl/"
    if not path.startswith(prefix):
        return unknown
    url = path[len(prefix) :]
    if not url.startswith(("http://", "https://")):
        return unknown
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, method="HEAD")
    try:
        # A fresh opener reads the proxy variables now; urlopen's global one keeps those of
        # whoever called it first in this process (torch.hub, for one).
        opener = urllib.request.build_opener()
        with opener.open(request, timeout=timeout_s) as response:
            headers = response.headers
    except (urllib.error.URLError, OSError, ValueError) as exc:
        log.info("no HEAD answer for %s (%s): its identity is its URL only", url, exc)
        return unknown
    length = headers.get("Content-Length")
    return {
        "bytes": int(length) if length and length.isdigit() else None,
        "etag": headers.get("ETag"),
        "last_modified": headers.get("Last-Modified"),
    }
