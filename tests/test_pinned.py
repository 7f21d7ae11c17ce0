"""Pinned batch pool: which runs register the pool's buffers, and each mapping exactly once.

The registrar is injected (a recorder that checks every range is registered once and
unregistered before the end); the real ``cudaHostRegister`` is a ``gpu`` test in test_gpu.py.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from mgpr.data.dataset import TileDataset
from mgpr.data.pinned import HostMemoryPlan, PinnedSlots, host_memory_plan
from mgpr.geo.raster import TileReader, describe_raster
from mgpr.geo.tiling import plan_tiles
from mgpr.models import build_model
from mgpr.run.accel import InFlightCopies, configure_cuda, local_device_index
from mgpr.run.module import InferenceModule
from mgpr.run.trainer import make_dataloader


class Recorder:
    """A registrar that keeps the live ranges and refuses double registration."""

    def __init__(self, fail: bool = False) -> None:
        self.live: dict[int, int] = {}
        self.calls: list[tuple[str, int]] = []
        self.fail = fail

    def register(self, ptr: int, nbytes: int) -> None:
        if self.fail:
            raise RuntimeError("cudaErrorHostMemoryAlreadyRegistered")
        assert ptr not in self.live, "registered twice"
        self.live[ptr] = nbytes
        self.calls.append(("register", ptr))

    def unregister(self, ptr: int) -> None:
        assert ptr in self.live, "unregistered a range that was not registered"
        del self.live[ptr]
        self.calls.append(("unregister", ptr))


def test_host_memory_plan() -> None:
    assert host_memory_plan(False, 4, True) == HostMemoryPlan(False, False)  # CPU: unchanged
    assert host_memory_plan(True, 4, True) == HostMemoryPlan(False, True)  # pinned pool
    assert host_memory_plan(True, 0, True) == HostMemoryPlan(True, False)  # no pool: pin copy
    assert host_memory_plan(True, 4, False) == HostMemoryPlan(True, False)  # fake data


def test_pinned_slots_bookkeeping() -> None:
    rec = Recorder()
    slots = PinnedSlots(rec)
    assert slots.ensure(0, 1000, 64) and slots.ensure(0, 1000, 64)  # the same mapping: once
    assert slots.ensure(1, 2000, 64)
    assert slots.registrations == 2 and rec.live == {1000: 64, 2000: 64}
    assert slots.ensure(0, 3000, 128)  # the worker regrew slot 0: old range out, new one in
    assert rec.calls[-2:] == [("unregister", 1000), ("register", 3000)]
    slots.release_all()
    assert rec.live == {} and slots.ranges == {}


def test_pinned_slots_failure_turns_registration_off(caplog: pytest.LogCaptureFixture) -> None:
    slots = PinnedSlots(Recorder(fail=True))
    with caplog.at_level(logging.WARNING):
        assert not slots.ensure(0, 1000, 64)
        assert not slots.ensure(1, 2000, 64)
    (message,) = [r.getMessage() for r in caplog.records]
    assert "could not pin the batch buffers" in message and "pageable" in message
    assert slots.failed and "AlreadyRegistered" in slots.failed


def _dataset(make_image, tile: int = 64) -> TileDataset:
    img = make_image(width=640, height=384, objects=12)
    info = describe_raster(str(img.path))
    tiles = plan_tiles(info.path, info.height, info.width, tile, 0)
    return TileDataset(tiles, TileReader({info.path: [1, 2, 3]}, tile), set())


def test_pool_registers_each_slot_once_and_unregisters_at_the_end(make_image) -> None:
    ds = _dataset(make_image)
    expected = torch.stack([ds[i]["image"] for i in range(len(ds))])
    rec = Recorder()
    loader = make_dataloader(ds, 2, 2, pin_memory=False, host_registrar=rec)
    batches = 0
    for batch in loader:
        assert torch.equal(batch["image"], expected[batch["index"]])
        assert batch["image"].untyped_storage().data_ptr() in rec.live  # pinned on arrival
        batches += 1
        del batch
    pool = loader.batch_pool
    assert pool.pinned is not None
    assert 0 < pool.pinned.registrations <= 2 * pool.slots_per_worker < batches
    assert rec.live == {}  # every range unregistered after the last batch


class _Counting(InferenceModule):
    def __init__(self, registrar: Recorder) -> None:
        super().__init__(build_model("null", "none"), None, 64)
        self.registrar = registrar
        self.live_seen: list[int] = []

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> Any:
        self.live_seen.append(len(self.registrar.live))
        return super().predict_step(batch, batch_idx)


def test_registrar_survives_lightning_and_is_released_at_predict_end(make_image) -> None:
    """Lightning rebuilds a predict DataLoader from its constructor arguments, and stops after
    len(loader) batches without a StopIteration: the module releases the pool itself."""
    ds = _dataset(make_image)
    rec = Recorder()
    module = _Counting(rec)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,
    )
    loader = make_dataloader(ds, 4, 2, pin_memory=False, host_registrar=rec)
    trainer.predict(module, dataloaders=loader, return_predictions=False)
    assert module.live_seen and all(n >= 1 for n in module.live_seen)
    assert rec.live == {}


class FakeEvent:
    done: set[int] = set()
    made = 0

    def __init__(self) -> None:
        FakeEvent.made += 1
        self.id = FakeEvent.made

    def record(self) -> None:
        pass

    def query(self) -> bool:
        return self.id in FakeEvent.done


def test_in_flight_copies_hold_batches_until_their_copy_is_done() -> None:
    copies = InFlightCopies(FakeEvent)
    first, second = torch.zeros(4), torch.zeros(4)
    copies.hold(first)
    copies.hold(second)
    assert copies.prune() == 2
    FakeEvent.done.add(2)  # events of one stream finish in order: the older one is first
    assert copies.prune() == 2
    FakeEvent.done.add(1)
    assert copies.prune() == 0
    copies.hold(first)
    copies.clear()
    assert copies.prune() == 0


def test_local_device_index_is_the_ranks_own() -> None:
    assert local_device_index({}, 4) == 0
    assert local_device_index({"LOCAL_RANK": "3"}, 4) == 3
    assert local_device_index({"SLURM_LOCALID": "2", "SLURM_STEP_ID": "0"}, 4) == 2
    assert local_device_index({"SLURM_LOCALID": "2"}, 4) == 0  # sbatch shell, not a task
    assert local_device_index({"SLURM_LOCALID": "1", "SLURM_STEP_ID": "0"}, 1) == 0  # 1 per task


def test_cudnn_benchmark_only_on_cuda() -> None:
    before = torch.backends.cudnn.benchmark
    assert configure_cuda(torch.device("cpu")) is False
    assert torch.backends.cudnn.benchmark == before


def test_pool_repins_a_regrown_slot_before_dropping_the_old_mapping() -> None:
    from mgpr.data.batch_pool import SharedBatchPool, new_shared_bytes

    class Checking(Recorder):
        def unregister(self, ptr: int) -> None:
            assert pool._mapped[0].data_ptr() == ptr  # still mapped while it is unpinned
            super().unregister(ptr)

    rec = Checking()
    pool = SharedBatchPool(1, 2, registrar=rec)
    small = new_shared_bytes(3 * 8 * 8)
    pool.track({"pool_slot": 0, "image": small.view(1, 3, 8, 8)})
    pool.track({"pool_slot": 0, "image": small.view(1, 3, 8, 8)})  # the same mapping again
    big = new_shared_bytes(4 * 8 * 8)  # the worker regrew the slot (a 4-band batch)
    pool.track({"pool_slot": 0, "image": big.view(1, 4, 8, 8)})
    assert rec.calls == [
        ("register", small.untyped_storage().data_ptr()),
        ("unregister", small.untyped_storage().data_ptr()),
        ("register", big.untyped_storage().data_ptr()),
    ]
    pool.forget_mappings()
    assert rec.live == {}
