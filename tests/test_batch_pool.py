"""Shared-memory batch reuse: never overwrites a batch the main process still holds."""

from __future__ import annotations

import pickle
from multiprocessing.reduction import ForkingPickler

import pytest
import torch

from mgpr.data.batch_pool import EXTRA_SLOTS, NO_SLOT, SharedBatchPool, TileLoader
from mgpr.data.dataset import TileDataset
from mgpr.geo.raster import TileReader, describe_raster
from mgpr.geo.tiling import plan_tiles
from mgpr.run.trainer import make_dataloader


def _dataset(make_image, tile: int = 64) -> TileDataset:
    img = make_image(width=640, height=384, objects=12)
    info = describe_raster(str(img.path))
    tiles = plan_tiles(info.path, info.height, info.width, tile, 0)
    return TileDataset(tiles, TileReader({info.path: [1, 2, 3]}, tile), set())


def _reference(ds: TileDataset) -> torch.Tensor:
    return torch.stack([ds[i]["image"] for i in range(len(ds))])


def test_held_batches_are_never_overwritten(make_image) -> None:
    """Keeping every batch (and a slice of each) forces fresh segments once the pool is full;
    every held pixel must still equal a direct read at the end."""
    ds = _dataset(make_image)
    expected = _reference(ds)
    loader = make_dataloader(ds, 3, 2, pin_memory=False)
    held = []
    for batch in loader:
        held.append((batch["index"], batch["image"][:2]))  # a view keeps the storage alive
    for index, image in held:
        assert torch.equal(image, expected[index[:2]])
    pooled, fresh = loader.batch_pool.reuse_counts()
    assert pooled + fresh == len(held)
    assert pooled <= 2 * loader.batch_pool.slots_per_worker  # no slot handed out twice
    assert fresh > 0


def test_dropped_batches_are_reused(make_image) -> None:
    """A consumer that drops each batch gets (almost) every batch from a pooled slot."""
    ds = _dataset(make_image)
    expected = _reference(ds)
    loader = make_dataloader(ds, 2, 2, pin_memory=False)
    seen = 0
    mapped_at: dict[int, set[int]] = {}
    for batch in loader:
        assert torch.equal(batch["image"], expected[batch["index"]])
        seen += len(batch["index"])
        mapped_at.setdefault(batch["pool_slot"], set()).add(batch["image"].data_ptr())
        del batch
    assert seen == len(ds)
    pooled, fresh = loader.batch_pool.reuse_counts()
    assert fresh == 0 and pooled == -(-len(ds) // 2)
    # more batches than slots: buffers really were reused
    assert pooled > 2 * loader.batch_pool.slots_per_worker
    # and this process mapped each slot once: a reused slot arrives at the same address
    assert all(len(ptrs) == 1 for ptrs in mapped_at.values()), mapped_at
    assert loader.batch_pool._mapped == {}  # unmapped once the last batch was delivered


def test_slot_is_freed_only_when_no_tensor_refers_to_it() -> None:
    """Main-process bookkeeping: a tracked slot stays busy while any view of its storage lives."""
    pool = SharedBatchPool(workers=1, slots_per_worker=1)
    a, slot = pool.acquire(0, (2, 3, 4, 4))
    assert slot == 0 and a.is_shared() and int(pool.in_use[0]) == 1
    b, slot_b = pool.acquire(0, (2, 3, 4, 4))  # slot busy: a fresh segment
    assert slot_b == NO_SLOT and b.is_shared()
    # what the main process receives is its own mapping of the slot: stand in with a tensor
    received = torch.zeros((2, 3, 4, 4), dtype=torch.uint8)
    view = received[1:]
    pool.track({"image": received, "pool_slot": slot})
    del received
    pool.release_expired()
    assert int(pool.in_use[0]) == 1  # the view still refers to the storage
    del view
    pool.release_expired()
    assert int(pool.in_use[0]) == 0
    c, slot_c = pool.acquire(0, (1, 3, 4, 4))  # smaller batch: the same buffer, reused
    assert slot_c == 0 and c.shape == (1, 3, 4, 4)
    assert c.untyped_storage().data_ptr() == a.untyped_storage().data_ptr()
    assert pool.reuse_counts() == (2, 1)


def test_pool_pickles_without_buffers() -> None:
    pool = SharedBatchPool(workers=2, slots_per_worker=2)
    pool.acquire(1, (1, 1, 2, 2))
    clone = pickle.loads(ForkingPickler.dumps(pool))  # as a spawned worker receives it
    assert clone._buffers == {} and clone._pending == []
    clone.in_use[0] = 1
    assert int(pool.in_use[0]) == 1  # the flags are shared, not copied


def test_plain_dataset_and_no_workers_skip_the_pool(make_image) -> None:
    ds = _dataset(make_image)
    loader = make_dataloader(ds, 4, 0, pin_memory=False)
    assert isinstance(loader, TileLoader)
    assert all(b["pool_slot"] == NO_SLOT for b in loader)
    assert getattr(loader, "batch_pool", None) is None


def test_bad_pool_size() -> None:
    with pytest.raises(ValueError, match="workers >= 1"):
        SharedBatchPool(workers=0, slots_per_worker=2)


def test_lightning_run_reuses_slots_and_finds_every_object(tmp_path, monkeypatch, capsys) -> None:
    """The real CLI (Lightning re-creates the DataLoader with its own batch sampler): slots
    are reused across batches and the demo still finds each planted object exactly once."""
    from collections import Counter

    from conftest import run_mgpr_inprocess

    seen: Counter[int] = Counter()
    original = SharedBatchPool.track

    def counting_track(self: SharedBatchPool, batch: object) -> None:
        if isinstance(batch, dict):
            seen[batch["pool_slot"]] += 1
        original(self, batch)

    monkeypatch.setattr(SharedBatchPool, "track", counting_track)
    run = tmp_path / "run"
    rc = run_mgpr_inprocess(
        f"output_dir={run}",
        "image_size=1024",
        "objects=16",
        "tile_size=128",
        "overlap=32",
        "batch_size=2",
        "workers=2",
        "progress=false",
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "demo check   OK" in out
    pooled = {slot: n for slot, n in seen.items() if slot != NO_SLOT}
    assert sum(seen.values()) > 2 * (4 + EXTRA_SLOTS)  # more batches than slots
    assert max(pooled.values()) >= 2  # a buffer went round more than once


def test_shared_memory_shortfall_names_the_fix(make_image, monkeypatch, caplog) -> None:
    import logging
    import os

    from mgpr.data.batch_pool import shared_memory_shortfall

    assert shared_memory_shortfall(1) is None  # /dev/shm has a byte to spare
    ds = _dataset(make_image)
    assert ds.sample_bytes() == 3 * 64 * 64

    class Tiny:
        f_bavail, f_frsize = 16, 4096  # 64 KiB free, like a cramped container

    monkeypatch.setattr(os, "statvfs", lambda path: Tiny())
    loader = make_dataloader(ds, 4, 2, pin_memory=False)
    with caplog.at_level(logging.WARNING, logger="mgpr.data.batch_pool"):
        assert sum(len(b["index"]) for b in loader) == len(ds)  # still runs: a warning only
    (message,) = [r.getMessage() for r in caplog.records]
    need = 2 * (4 + EXTRA_SLOTS) * 4 * 3 * 64 * 64
    assert f"up to {need / 2**30:.2f} GiB" in message and "0.00 GiB free" in message
    assert "lower batch_size or workers" in message
