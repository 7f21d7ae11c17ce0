"""Per-rank part files: atomic publication, what readers see, the background chunking."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from mgpr.errors import OutputError
from mgpr.geo.raster import describe_raster
from mgpr.geo.tiling import plan_tiles
from mgpr.models.base import Classification
from mgpr.outputs import parts_read
from mgpr.outputs.ledger import build_ledger
from mgpr.outputs.part_thread import BackgroundPartWriter
from mgpr.outputs.parts import MANIFEST_SUFFIX, RECORDS_SUFFIX, PartWriter, parts_dir
from mgpr.outputs.parts_read import (
    RecordsReader,
    count_written_tiles,
    finished_tile_keys,
    list_parts,
    read_manifests,
    tile_statuses,
)
from mgpr.tasks import get_task
from mgpr.tasks.base import TaskContext, TileOutcome


@pytest.fixture
def grid(make_image):
    info = describe_raster(str(make_image(width=512, height=512).path))
    tiles = plan_tiles(info.path, 512, 512, 64, 0)  # 64 tiles
    return info, tiles, TaskContext({info.path: info}, 64, 0, None, topk=1)


def _writer(run: Path, rank: int, ctx: TaskContext) -> PartWriter:
    task = get_task("classification")
    return PartWriter(run, rank, lambda outs, sink: task.write_payload(outs, ctx, sink))


def _done(tile) -> TileOutcome:
    rec = Classification(np.array([1], np.int64), np.array([0.5], np.float32))
    return TileOutcome(tile, 0, "", rec)


def test_manifest_marks_tiles_with_their_status_and_records(grid, tmp_path: Path) -> None:
    _, tiles, ctx = grid
    run = tmp_path / "run"
    _writer(run, 0, ctx).publish(
        [_done(tiles[0]), TileOutcome(tiles[1], 1), TileOutcome(tiles[2], 2, "IOError: bad block")]
    )
    (part,) = list_parts(run)
    assert part.files == (f"{part.name}.records.parquet",)
    table = read_manifests(run)
    assert table.column_names == [
        "tile_key",
        "path",
        "row",
        "col",
        "status",
        "reason",
        "n_records",
        "part",
    ]
    assert table["n_records"].to_pylist() == [1, 0, 0]
    statuses = tile_statuses(run)
    assert statuses[tiles[0].id.key()][0] == "done"
    assert statuses[tiles[2].id.key()] == ("failed", "IOError: bad block")
    assert finished_tile_keys(run) == {tiles[0].id.key(), tiles[1].id.key()}
    # A later success of the failed tile (another rank, a resume) wins.
    _writer(run, 1, ctx).publish([_done(tiles[2])])
    assert tile_statuses(run)[tiles[2].id.key()][0] == "done"
    assert count_written_tiles(run) == 4


def test_part_names_are_unique_across_writers_and_ranks(grid, tmp_path: Path) -> None:
    _, tiles, ctx = grid
    run = tmp_path / "run"
    names = []
    for rank in (0, 0, 1):  # a requeue of rank 0 in the same process, and another rank
        writer = _writer(run, rank, ctx)
        writer.publish([_done(tiles[0])])
        writer.publish([_done(tiles[1])])
    names = [p.name for p in list_parts(run)]
    assert len(names) == len(set(names)) == 6
    assert sorted(n.split("-")[0] for n in names) == ["r0"] * 4 + ["r1"] * 2


def test_unpublished_files_are_ignored(grid, tmp_path: Path) -> None:
    """A writer killed mid-write leaves a hidden temp file; one killed between payload and
    manifest leaves a payload no manifest names: readers see neither."""
    _, tiles, ctx = grid
    run = tmp_path / "run"
    _writer(run, 0, ctx).publish([_done(tiles[0])])
    folder = parts_dir(run)
    good = next(folder.glob(f"*{MANIFEST_SUFFIX}"))
    (folder / f".r0-x-1-ab-000001{MANIFEST_SUFFIX}.tmp").write_bytes(good.read_bytes()[:50])
    (folder / f".r0-y-1-ab-000001{MANIFEST_SUFFIX}.tmp").write_bytes(good.read_bytes())
    (folder / "r0-z-1-ab-000009.records.parquet").write_bytes(b"half a payload")
    assert [p.name for p in list_parts(run)] == [good.name[: -len(MANIFEST_SUFFIX)]]
    assert finished_tile_keys(run) == {tiles[0].id.key()}


def test_a_failing_payload_publishes_no_manifest(grid, tmp_path: Path) -> None:
    _, tiles, _ = grid
    run = tmp_path / "run"

    def broken(outs, sink):
        sink.publish(".records.parquet", lambda tmp: tmp.write_bytes(b"x"))
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        PartWriter(run, 0, broken).publish([_done(tiles[0])])
    assert list_parts(run) == [] and finished_tile_keys(run) == set()
    assert not [p for p in parts_dir(run).iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("n_tiles", [4, 64])
def test_background_writer_publishes_chunks_of_at_most_chunk_tiles(
    grid, tmp_path: Path, n_tiles: int
) -> None:
    """Batches of one tile are gathered into chunks; close publishes the rest."""
    _, tiles, ctx = grid
    run = tmp_path / "run"
    bg = BackgroundPartWriter(_writer(run, 0, ctx), chunk_tiles=16, chunk_seconds=3600)
    for t in tiles[:n_tiles]:
        bg.put([_done(t)])
    bg.close()
    sizes = [len(read_manifests(run, [p])) for p in list_parts(run)]
    assert sum(sizes) == n_tiles and max(sizes) <= 16
    assert len(sizes) == -(-n_tiles // 16)
    assert len(finished_tile_keys(run)) == n_tiles and bg.records == n_tiles


def test_background_writer_bounds_a_chunk_by_its_results_bytes(grid, tmp_path: Path) -> None:
    """Class maps with probabilities (12 KiB a 64 px tile): a 50,000-byte bound publishes
    chunks of 5 tiles (4 tiles hold 48 KiB), well before the 256-tile or time bound."""
    from mgpr.models.base import ClassMap
    from mgpr.outputs.part_thread import held_bytes

    info, tiles, _ = grid
    ctx = TaskContext({info.path: info}, 64, 0, ("a", "b"), probabilities=True)
    task = get_task("segmentation")
    writer = PartWriter(tmp_path, 0, lambda outs, sink: task.write_payload(outs, ctx, sink))
    bg = BackgroundPartWriter(writer, chunk_tiles=256, chunk_seconds=3600, chunk_bytes=50_000)
    ids = np.zeros((64, 64), np.uint8)
    outcomes = [
        TileOutcome(t, 0, "", ClassMap(ids, np.zeros((2, 64, 64), np.uint8))) for t in tiles[:20]
    ]
    assert held_bytes(outcomes[0]) == 3 * 64 * 64 and held_bytes(_done(tiles[0])) == 0
    for outcome in outcomes:
        bg.put([outcome])
    bg.close()
    sizes = [len(read_manifests(tmp_path, [p])) for p in list_parts(tmp_path)]
    assert sizes == [5, 5, 5, 5]


@pytest.mark.parametrize(
    ("error", "fix"),
    [
        (PermissionError(1, "Operation not permitted"), "writable for this user (ls -ld, lsattr)"),
        (OSError(28, "No space left on device"), "free disk space, then re-run the same command"),
    ],
    ids=["permission", "full"],
)
def test_a_failed_write_names_the_fix_for_its_cause(
    grid, tmp_path: Path, monkeypatch, error: OSError, fix: str
) -> None:
    """A parts folder made immutable (chattr +i) was told to free disk space."""
    _, tiles, ctx = grid
    writer = _writer(tmp_path / "run", 0, ctx)

    def refuse(outcomes):
        raise error

    monkeypatch.setattr(writer, "publish", refuse)
    bg = BackgroundPartWriter(writer, chunk_tiles=1, chunk_seconds=3600)
    bg.put([_done(tiles[0])])
    with pytest.raises(OutputError) as failed:
        bg.close()
    line = str(failed.value)
    assert f"writing results to {writer.folder} failed ({type(error).__name__}" in line
    assert fix in line and f"with output_dir={tmp_path / 'run'} to resume" in line


def test_background_writer_publishes_a_due_chunk_without_new_batches(grid, tmp_path: Path) -> None:
    _, tiles, ctx = grid
    run = tmp_path / "run"
    bg = BackgroundPartWriter(_writer(run, 0, ctx), chunk_tiles=256, chunk_seconds=0.05)
    bg.put([_done(tiles[0])])
    deadline = time.monotonic() + 60  # a guard against hanging, not a timing assertion
    while not list_parts(run) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert finished_tile_keys(run) == {tiles[0].id.key()}
    bg.close()
    assert len(list_parts(run)) == 1


def test_background_writer_error_reaches_the_predict_loop(grid, tmp_path: Path) -> None:
    _, tiles, _ = grid

    def disk_full(outs, sink):
        raise OSError(28, "No space left on device")

    bg = BackgroundPartWriter(PartWriter(tmp_path, 0, disk_full), chunk_tiles=1)
    bg.put([_done(tiles[0])])
    with pytest.raises(OutputError, match="No space left on device"):
        bg.close()


def test_manifest_reads_back_with_pyarrow_alone(grid, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    _, tiles, ctx = grid
    _writer(tmp_path, 3, ctx).publish([_done(tiles[5])])
    (part,) = list_parts(tmp_path)
    table = pq.read_table(part.manifest)
    assert table.schema.field("row").type == pa.int32()
    assert table.to_pylist()[0] == {
        "tile_key": tiles[5].id.key(),
        "path": tiles[5].id.path,
        "row": 0,
        "col": 5,
        "status": "done",
        "reason": "",
        "n_records": 1,
    }


def test_put_blocks_while_the_queued_results_exceed_their_byte_bound(grid, tmp_path: Path) -> None:
    """While a chunk is being published, batches wait in the queue: past max_pending_bytes a
    put blocks until the writer takes them (a batch alone above the bound still goes in)."""
    import threading

    from mgpr.models.base import ClassMap

    info, tiles, _ = grid
    ctx = TaskContext({info.path: info}, 64, 0, ("a", "b"))
    task = get_task("segmentation")
    release = threading.Event()

    def slow_payload(outs, sink):  # the first publish waits until the test releases it
        release.wait(timeout=60)
        return task.write_payload(outs, ctx, sink)

    writer = PartWriter(tmp_path, 0, slow_payload)
    bg = BackgroundPartWriter(
        writer, chunk_tiles=1, chunk_seconds=3600, max_pending=100, max_pending_bytes=10_000
    )
    ids = np.zeros((64, 64), np.uint8)  # 4096 bytes a tile
    outs = [TileOutcome(t, 0, "", ClassMap(ids)) for t in tiles[:5]]
    bg.put([outs[0]])  # taken by the thread, which blocks publishing it
    deadline = time.monotonic() + 60  # a guard against hanging, not a timing assertion
    while bg._queue.qsize() and time.monotonic() < deadline:
        time.sleep(0.01)
    bg.put([outs[1]])
    bg.put([outs[2]])  # 8192 bytes queued
    third = threading.Thread(target=bg.put, args=([outs[3]],))
    third.start()
    third.join(timeout=0.5)
    assert third.is_alive()  # 12288 > 10000 bytes: blocked
    release.set()
    third.join(timeout=60)
    assert not third.is_alive()
    bg.put([outs[4]])
    bg.close()
    assert len(finished_tile_keys(tmp_path)) == 5


def _key_k_class(table: pa.Table) -> list[tuple]:
    cols = [table[c].to_pylist() for c in ("tile_key", "k", "class_id")]
    return list(zip(*cols, strict=True))


def test_records_reader_returns_each_picked_tiles_rows_whatever_it_keeps(
    grid, tmp_path: Path
) -> None:
    """Picks across parts read back as a filter of the files would, the cache small or not."""
    _, tiles, ctx = grid
    run = tmp_path / "run"
    writer = _writer(run, 0, ctx)
    rng = np.random.default_rng(3)
    for chunk in range(4):  # 4 parts of 16 tiles, 1..4 rows a tile (class ids in a random order)
        outs = []
        for tile in tiles[chunk * 16 : (chunk + 1) * 16]:
            k = int(rng.integers(1, 5))
            ids = rng.permutation(10)[:k].astype(np.int64)
            outs.append(TileOutcome(tile, 0, "", Classification(ids, rng.random(k, np.float32))))
        writer.publish(outs[::-1])  # rows in the file not in key order
    task = get_task("classification")
    ledger = build_ledger(run, [t.id.key() for t in tiles])
    folder = parts_dir(run)
    files = {p.name: pq.read_table(folder / f"{p.name}{RECORDS_SUFFIX}") for p in list_parts(run)}

    def expected(picks: dict[str, list[str]]) -> list[tuple]:
        rows = []
        for name, keys in picks.items():
            table = files[name]
            table = table.filter(pc.is_in(table["tile_key"], pa.array(keys, pa.string())))
            rows += _key_k_class(table)
        return sorted(rows, key=lambda r: r[0])  # stable: a tile's rows in their file order

    part_bytes = max(t.nbytes for t in files.values())
    for max_bytes in (0, part_bytes, 10**9):  # 0: only the part in use is kept
        reader = RecordsReader(run, ledger.parts, RECORDS_SUFFIX, task.records_schema, max_bytes)
        for _ in range(12):
            keys = [t.id.key() for t in rng.choice(tiles, int(rng.integers(0, 20)), replace=False)]
            picks = ledger.picks(keys)
            table = reader.read(picks)
            assert sorted(_key_k_class(table), key=lambda r: r[0]) == expected(picks)
            assert table.schema == task.records_schema
        *kept, in_use = reader._cache.values()
        assert sum(r.table.nbytes for r in kept) <= max_bytes or not kept


def test_records_reader_reads_each_part_once_for_one_tile_picks(
    grid, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many small rasters: a tile at a time from the same parts reads each part file once."""
    _, tiles, ctx = grid
    run = tmp_path / "run"
    writer = _writer(run, 0, ctx)
    for chunk in range(4):
        writer.publish([_done(t) for t in tiles[chunk * 16 : (chunk + 1) * 16]])
    ledger = build_ledger(run, [t.id.key() for t in tiles])
    task = get_task("classification")
    reads: list[str] = []
    real = parts_read.pq.read_table
    monkeypatch.setattr(
        parts_read.pq, "read_table", lambda path, **kw: reads.append(path) or real(path, **kw)
    )
    reader = RecordsReader(run, ledger.parts, RECORDS_SUFFIX, task.records_schema)
    rows = sum(reader.read(ledger.picks([t.id.key()])).num_rows for t in tiles)
    assert rows == 64 and len(reads) == len(set(reads)) == 4
