"""Folders and globs inside a local zip or tar archive, as GDAL paths (``/vsizip/``, ``/vsitar/``).

GDAL reads one raster inside an archive by its path (``/vsizip/orthos.zip/2024/a.tif``), but
it has no folder listing mgpr could use (rasterio does not expose ``VSIReadDir``), so
``input_path=/vsizip/orthos.zip/2024`` or ``'/vsizip/orthos.zip/*.tif'`` was refused as "not a
readable raster". A local archive's members are listed here with Python's own readers: a
folder inside it reads as a folder does (its rasters, not its subfolders), a glob as a glob
(``*`` also crosses ``/`` inside an archive), the archive alone as its top folder. Archives
behind another GDAL path (``/vsizip//vsicurl/...``) pass through as they are.
"""

from __future__ import annotations

import fnmatch
import re
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from mgpr.errors import InputError

#: ``/vsizip/<archive>.zip[/<inside>]`` and ``/vsitar/<archive>.tar[.gz]``: prefix, archive, rest.
_ARCHIVE = re.compile(
    r"^(/vsizip/|/vsitar/)(.+?\.(?:zip|tar|tar\.gz|tgz))(?:/(.*))?$", re.IGNORECASE
)
_GLOB_CHARS = set("*?[")


def archive_members(input_path: str, suffixes: tuple[str, ...]) -> list[str] | None:
    """The GDAL paths ``input_path`` names inside a local archive, or None.

    None when it names one member (or is no local archive path): then it is read as it is.

    Args:
        input_path: a ``/vsizip/`` or ``/vsitar/`` path.
        suffixes: raster suffixes a folder reads (a glob naming an extension keeps its own).

    Raises:
        InputError: the folder or glob holds no raster of the archive, naming what it holds.
    """
    archive = local_archive(input_path)
    if archive is None:
        return None
    match = _ARCHIVE.match(input_path)
    assert match is not None
    prefix, inside = match.group(1), (match.group(3) or "").strip("/")
    names = _member_names(Path(archive), zip_file=prefix.lower() == "/vsizip/")
    if inside in names:
        return None  # one member: GDAL reads it
    globbed = any(ch in inside for ch in _GLOB_CHARS)
    if globbed:
        named = PurePosixPath(inside).suffix.lower()
        keep = (*suffixes, named) if named and not set(named) & _GLOB_CHARS else suffixes
        found = [n for n in names if fnmatch.fnmatchcase(n, inside)]
    else:
        keep = suffixes
        found = [n for n in names if _folder(n) == inside]
    rasters = sorted(n for n in found if PurePosixPath(n).suffix.lower() in keep)
    if not rasters:
        held = sorted(n for n in names if PurePosixPath(n).suffix.lower() in suffixes)
        example = f", e.g. {prefix}{archive}/{held[0]}" if held else ""
        if globbed:
            what = "the glob matches no raster"
        elif PurePosixPath(inside).suffix.lower() in suffixes:
            what = "no member of that name is"  # a file named inside it: a typo
        else:
            what = "the folder holds no raster"
        raise InputError(
            f"input_path={input_path!r}: {what} in {archive} ({len(held)} raster(s) "
            f"in the whole archive{example}); name a folder, glob or file inside it"
        )
    return [f"{prefix}{archive}/{n}" for n in rasters]


def local_archive(path: str) -> str | None:
    """The local archive file a ``/vsizip/`` or ``/vsitar/`` path reads from, else None.

    Its size and modification time stand for the member's (a resume then notices a replaced
    archive; GDAL paths have no ``stat`` of their own).
    """
    match = _ARCHIVE.match(path)
    if not match or match.group(2).startswith("/vsi") or not Path(match.group(2)).is_file():
        return None
    return match.group(2)


def _folder(member: str) -> str:
    """The folder of an archive member (``""`` at the top)."""
    parent = str(PurePosixPath(member).parent)
    return "" if parent == "." else parent


def _member_names(archive: Path, zip_file: bool) -> set[str]:
    """Every file member's name in the archive (folders left out)."""
    try:
        if zip_file:
            with zipfile.ZipFile(archive) as z:
                return {i.filename for i in z.infolist() if not i.is_dir()}
        with tarfile.open(archive) as t:
            return {m.name for m in t.getmembers() if m.isfile()}
    except (OSError, zipfile.BadZipFile, tarfile.TarError) as exc:
        raise InputError(
            f"{archive} cannot be read as an archive ({type(exc).__name__}: {exc}); check the file"
        ) from None
