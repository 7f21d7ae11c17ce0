#!/usr/bin/env bash
# Wheels of the dependencies a bare GPU machine lacks, for its Python, in folders < 60 MiB each.
#
#   bash benchmarks/gpu_wheels.sh PYVER DEST      # e.g. bash benchmarks/gpu_wheels.sh 3.12 gpu-wheels
#
# The GPU machines lent to this project (issue #17) have torch, torchvision, lightning,
# nvidia-ml-py, matplotlib, scipy, psutil, typer, pytest and hypothesis (so numpy, click, attrs,
# packaging, pyparsing too) but no network; this downloads, on a machine that has one, the rest:
# rasterio, pyogrio, pyproj, shapely, hydra-core, omegaconf, pyarrow, antlr4-python3-runtime and
# their small dependencies (affine, certifi, cligj, click-plugins, PyYAML), at the versions uv.lock
# pins for that Python, as manylinux x86_64 wheels (pip download --only-binary=:all:).
# antlr4-python3-runtime 4.9.3 (what omegaconf 2.3 needs) exists on PyPI only as an sdist: it
# is pure Python, so it is built into a py3-none-any wheel here.
#
# The wheels end up in DEST/part-1, DEST/part-2, ... each under 60 MiB, so each part fits in one
# device call's carry (64 MiB); benchmarks/gpu_checks.sh installs whatever parts it finds.
# DEST must be git-ignored (gpu-wheels/ is) so the wheels never enter a commit.
set -euo pipefail
pyver=${1:?usage: gpu_wheels.sh PYVER DEST}
dest=${2:?usage: gpu_wheels.sh PYVER DEST}
here=$(cd "$(dirname "$0")/.." && pwd)
pip=(${PIP:-python3 -m pip})
limit=$((60 * 1024 * 1024))

mkdir -p "$dest"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Pinned versions for the target Python, from the lock (markers evaluated for PYVER, Linux).
(cd "$here" && uv export --frozen --no-hashes --no-dev --no-emit-project) >"$work/all.txt"
python3 - "$pyver" "$work/all.txt" "$work/wheels.txt" "$work/sdists.txt" <<'EOF'
import re
import sys

pyver, src, wheels_out, sdists_out = sys.argv[1:]
required = {"rasterio", "pyogrio", "pyproj", "shapely", "hydra-core", "omegaconf", "pyarrow"}
# small dependencies, where the lock has them for this Python (rasterio 1.5 drops cligj/click-plugins)
wanted = required | {"affine", "certifi", "cligj", "click-plugins", "pyyaml"}
sdist_only = {"antlr4-python3-runtime"}
env = {
    "python_version": pyver,
    "python_full_version": pyver + ".0",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}


def version_tuple(text):
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def marker_ok(marker):
    """Evaluate uv's simple markers: and-joined comparisons of the keys in env."""
    for clause in marker.split(" and "):
        m = re.match(r"\s*(\w+)\s*(==|!=|>=|<=|<|>)\s*'([^']*)'\s*$", clause)
        if m is None:
            raise SystemExit(f"unsupported marker clause: {clause!r}")
        key, op, value = m.groups()
        have = env[key]
        if key.startswith("python"):
            a, b = version_tuple(have), version_tuple(value)
            if value.endswith(".*"):
                a, b = a[: len(b)], b
        else:
            a, b = have, value
        ok = {"==": a == b, "!=": a != b, ">=": a >= b, "<=": a <= b, "<": a < b, ">": a > b}[op]
        if not ok:
            return False
    return True


found = {}
for line in open(src):
    line = line.strip()
    if not line or line.startswith("#") or "==" not in line:
        continue
    spec, _, marker = line.partition(";")
    name, version = (p.strip() for p in spec.split("=="))
    if name.lower() in wanted | sdist_only and (not marker.strip() or marker_ok(marker)):
        found[name.lower()] = f"{name}=={version}"
missing = (required | sdist_only) - found.keys()
if missing:
    raise SystemExit(f"not in uv.lock for Python {pyver}: {sorted(missing)}")
with open(wheels_out, "w") as fh:
    fh.write("\n".join(v for k, v in sorted(found.items()) if k not in sdist_only) + "\n")
with open(sdists_out, "w") as fh:
    fh.write("\n".join(v for k, v in sorted(found.items()) if k in sdist_only) + "\n")
EOF
echo "Python $pyver: $(tr '\n' ' ' <"$work/wheels.txt")$(tr '\n' ' ' <"$work/sdists.txt")"

"${pip[@]}" download --quiet --no-deps --only-binary=:all: --dest "$work/dl" \
    --python-version "$pyver" --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
    -r "$work/wheels.txt"
"${pip[@]}" wheel --quiet --no-deps --wheel-dir "$work/dl" -r "$work/sdists.txt"

# Split into parts under the limit, largest first (first fit).
rm -rf "$dest"/part-*
python3 - "$work/dl" "$dest" "$limit" <<'EOF'
import shutil
import sys
from pathlib import Path

src, dest, limit = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
wheels = sorted(src.glob("*.whl"), key=lambda p: p.stat().st_size, reverse=True)
parts: list[list[Path]] = []
sizes: list[int] = []
for wheel in wheels:
    size = wheel.stat().st_size
    if size >= limit:
        raise SystemExit(f"{wheel.name} alone is {size / 2**20:.1f} MiB >= the part limit")
    for i, used in enumerate(sizes):
        if used + size < limit:
            parts[i].append(wheel)
            sizes[i] += size
            break
    else:
        parts.append([wheel])
        sizes.append(size)
for i, (part, used) in enumerate(zip(parts, sizes, strict=True), start=1):
    folder = dest / f"part-{i}"
    folder.mkdir(parents=True, exist_ok=True)
    for wheel in part:
        shutil.copy2(wheel, folder / wheel.name)
    names = ", ".join(w.name.split("-")[0] for w in part)
    print(f"{folder}: {used / 2**20:.1f} MiB, {len(part)} wheels ({names})")
print(f"total {sum(sizes) / 2**20:.1f} MiB in {len(parts)} part(s)")
EOF
