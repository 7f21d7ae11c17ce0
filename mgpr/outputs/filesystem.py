"""What filesystem the run directory is on, and which of its mount options hurt mgpr.

mgpr writes every per-rank file by rename (temp + fsync + ``os.replace``) and takes no file
locks, so it runs on NFS and Lustre as they are usually mounted. What still hurts: object-store
FUSE mounts and SMB, where a rename is a copy (not atomic); ``soft`` NFS mounts, where a server
timeout becomes an I/O error in the middle of a write; tmpfs and container overlays, where the
results vanish with the machine or the container. ``mgpr-doctor`` reports these, and each run logs
its run directory's filesystem.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

#: Where Linux lists the mounts of this process.
PROC_MOUNTS = Path("/proc/self/mounts")


@dataclass(frozen=True, slots=True)
class Mount:
    """One line of ``/proc/self/mounts``."""

    device: str
    mountpoint: str
    fstype: str
    options: tuple[str, ...]

    def option(self, name: str) -> str | None:
        """The value of ``name=value``, ``""`` for a bare flag, None when absent."""
        for opt in self.options:
            key, _, value = opt.partition("=")
            if key == name:
                return value
        return None


def _unescape(field: str) -> str:
    """``/proc/mounts`` writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mounts(text: str) -> list[Mount]:
    """Every mount in a ``/proc/mounts``-format text."""
    mounts = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        mounts.append(
            Mount(_unescape(parts[0]), _unescape(parts[1]), parts[2], tuple(parts[3].split(",")))
        )
    return mounts


def mount_of(path: Path, mounts: list[Mount]) -> Mount | None:
    """The mount holding ``path`` (absolute, symlinks resolved): the longest mount point prefix."""
    real = os.path.normpath(str(path))
    best: Mount | None = None
    for mount in mounts:
        point = mount.mountpoint.rstrip("/") or "/"
        inside = point == "/" or real == point or real.startswith(point + "/")
        if inside and (best is None or len(point) >= len(best.mountpoint.rstrip("/") or "/")):
            best = mount
    return best


def mount_warnings(mount: Mount) -> list[str]:
    """Why this mount is a poor place for a run directory (empty: fine), with the fix."""
    fs = mount.fstype
    out: list[str] = []
    if fs.startswith("fuse."):
        out.append(
            f"{fs} at {mount.mountpoint}: renames on FUSE object-store mounts (s3fs, gcsfuse, "
            "...) are copies, not atomic, and mgpr publishes every part by rename; use a local "
            "or parallel filesystem for output_dir"
        )
    if fs in ("cifs", "smb3", "smbfs"):
        out.append(
            f"{fs} at {mount.mountpoint}: SMB renames over open files fail; use a local, NFS or "
            "Lustre output_dir"
        )
    if fs.startswith("nfs") and mount.option("soft") is not None:
        out.append(
            f"{fs} at {mount.mountpoint} is mounted 'soft': a server timeout becomes an I/O error "
            "in the middle of a write; ask for a 'hard' mount or use another output_dir"
        )
    if fs == "tmpfs":
        out.append(
            f"tmpfs at {mount.mountpoint}: results live in RAM and are lost at reboot; point "
            "output_dir at a disk"
        )
    if fs == "overlay":
        out.append(
            f"overlay at {mount.mountpoint} (a container layer): results vanish with the "
            "container; mount a volume and point output_dir at it"
        )
    return out


def describe_mount(mount: Mount | None) -> str:
    """``"lustre at /scratch (flock)"``: the type, where, and the options that matter here."""
    if mount is None:
        return "unknown filesystem"
    shown = [
        o
        for o in mount.options
        if o.split("=")[0]
        in (
            "flock",
            "localflock",
            "noflock",
            "soft",
            "hard",
            "lookupcache",
            "actimeo",
            "vers",
            "ro",
        )
    ]
    return f"{mount.fstype} at {mount.mountpoint}" + (f" ({','.join(shown)})" if shown else "")


def run_dir_mount(path: Path) -> Mount | None:
    """The mount of ``path`` on this machine, or None where ``/proc`` is unavailable."""
    try:
        text = PROC_MOUNTS.read_text()
    except OSError:
        return None
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:  # the run directory may not exist yet
        probe = probe.parent
    return mount_of(Path(os.path.realpath(probe)), parse_mounts(text))
