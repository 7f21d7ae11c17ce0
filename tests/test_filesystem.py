"""The run directory's filesystem: /proc/mounts parsing and the mount options that hurt mgpr."""

from __future__ import annotations

from pathlib import Path

from mgpr.outputs.filesystem import (
    describe_mount,
    mount_of,
    mount_warnings,
    parse_mounts,
    run_dir_mount,
)

MOUNTS = """\
overlay / overlay rw,relatime,lowerdir=/l,upperdir=/u,workdir=/w 0 0
tmpfs /dev/shm tmpfs rw,nosuid,nodev 0 0
10.0.0.5@o2ib:/scratch /scratch lustre rw,flock,lazystatfs 0 0
nas:/export/home /home nfs4 rw,relatime,vers=4.2,soft,proto=tcp 0 0
nas:/export/proj /proj nfs rw,vers=3,hard,lookupcache=all 0 0
bucket /mnt/s3 fuse.s3fs rw,nosuid,nodev 0 0
//srv/share /mnt/my\\040share cifs rw,vers=3.0 0 0
"""


def _mount(path: str):
    return mount_of(Path(path), parse_mounts(MOUNTS))


def test_the_longest_mount_point_holds_the_path() -> None:
    assert _mount("/scratch/user/runs/x").fstype == "lustre"
    assert _mount("/scratchpad").fstype == "overlay"  # a prefix of the name is not a parent
    assert _mount("/home/u").option("vers") == "4.2"
    assert _mount("/mnt/my share/runs").fstype == "cifs"  # \\040 is a space


def test_what_is_fine_and_what_is_not() -> None:
    assert mount_warnings(_mount("/scratch/runs")) == []  # lustre, no flock needed
    assert mount_warnings(_mount("/proj/runs")) == []  # hard NFS
    assert describe_mount(_mount("/scratch/runs")) == "lustre at /scratch (flock)"
    (soft,) = mount_warnings(_mount("/home/u/runs"))
    assert "mounted 'soft'" in soft and "hard" in soft
    (fuse,) = mount_warnings(_mount("/mnt/s3/runs"))
    assert "not atomic" in fuse
    assert "RAM" in mount_warnings(_mount("/dev/shm/runs"))[0]
    assert "container" in mount_warnings(_mount("/root/runs"))[0]
    assert "SMB" in mount_warnings(_mount("/mnt/my share/x"))[0]


def test_this_machine_reports_its_own_mount(tmp_path: Path) -> None:
    mount = run_dir_mount(tmp_path / "not" / "yet" / "there")
    assert mount is not None and mount.fstype
    assert describe_mount(mount).startswith(mount.fstype)


def test_doctor_prints_a_filesystem_line(tmp_path: Path) -> None:
    from mgpr.cli.doctor import check_filesystem

    lines = [f.line() for f in check_filesystem(tmp_path)]
    assert lines and all("filesystem:" in line for line in lines)
