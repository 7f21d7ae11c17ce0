"""Tests of mgpr.models.checkpoint: checkpoint layouts, key prefixes, refusals (CPU, no network).

Every checkpoint is a real file written in ``tmp_path`` from a tiny network built here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from mgpr.errors import ModelError
from mgpr.models.checkpoint import _resnet_kind, align_keys, load_checkpoint


class Net(torch.nn.Module):
    """A tiny classifier: conv, batch norm, linear head (a ResNet's kinds of keys)."""

    def __init__(self, classes: int = 5, bands: int = 3) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(bands, 4, 3)
        self.bn1 = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, classes)."""
        return self.fc(self.bn1(self.conv1(x)).mean(dim=(2, 3)))


class Classifier(LightningModule):
    """A LightningModule as fine-tuning code writes it: the network and a weighted loss."""

    def __init__(self) -> None:
        super().__init__()
        self.model = Net()
        self.loss = torch.nn.CrossEntropyLoss(weight=torch.ones(5))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        """One loss value."""
        x, y = batch
        return self.loss(self.model(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Plain SGD."""
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _assert_same_weights(dst: torch.nn.Module, src: dict[str, torch.Tensor]) -> None:
    for key, value in dst.state_dict().items():
        torch.testing.assert_close(value, src[key])


def test_lightning_checkpoint_with_a_weighted_loss_loads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """ModelCheckpoint's file: the network under ``model.`` beside ``loss.weight``."""
    module = Classifier()
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[ModelCheckpoint(dirpath=tmp_path, filename="last")],
    )
    data = TensorDataset(torch.rand(2, 3, 8, 8), torch.tensor([0, 1]))
    trainer.fit(module, DataLoader(data, batch_size=2))
    ckpt = tmp_path / "last.ckpt"
    assert "loss.weight" in torch.load(ckpt, weights_only=True)["state_dict"]
    dst = Net()
    with caplog.at_level(logging.INFO, logger="mgpr.models.checkpoint"):
        load_checkpoint(ckpt, dst)
    _assert_same_weights(dst, module.model.state_dict())
    assert f"weights={ckpt}: loading the 9 keys under 'model.'" in caplog.text
    assert "dropped 1 key(s) outside 'model.' that are not network weights: loss.weight" in (
        caplog.text
    )


def test_the_prefix_is_the_one_the_model_keys_are_under() -> None:
    """Not the one every key shares: a few extras (metrics, loss) sit beside the network."""
    sd = Net().state_dict()
    state = {f"model.net.{k}": v for k, v in sd.items()}
    state |= {"loss.weight": torch.ones(5), "train_acc.total": torch.zeros(())}
    found = align_keys(state, set(sd))
    assert found.prefix == "model.net." and set(found.state) == set(sd)
    assert found.dropped == ("loss.weight", "train_acc.total") and found.others == ()
    plain = align_keys(dict(sd), set(sd))
    assert plain.prefix == "" and plain.dropped == ()


def test_missing_network_keys_are_refused_after_the_prefix(tmp_path: Path) -> None:
    """Dropping the extras never loads a partial network."""
    state = {f"model.{k}": v for k, v in Net().state_dict().items() if k != "fc.bias"}
    path = tmp_path / "partial.ckpt"
    torch.save({"state_dict": state | {"loss.weight": torch.ones(5)}, "epoch": 2}, path)
    with pytest.raises(ModelError, match=r"does not fit the model: 1 missing: fc\.bias"):
        load_checkpoint(path, Net())


def test_two_networks_in_one_file_are_refused(tmp_path: Path) -> None:
    """An EMA copy beside the model: which one to load is the user's choice."""
    sd = Net().state_dict()
    state = {f"model.{k}": v for k, v in sd.items()}
    state |= {f"ema.{k}": v.clone() for k, v in sd.items() if k != "fc.bias"}
    path = tmp_path / "ema.ckpt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(ModelError) as info:
        load_checkpoint(path, Net())
    msg = str(info.value)
    assert msg.startswith(f"weights={path} holds the model's weights under 'model.' and more ")
    assert "network weights under 'ema.' (8 keys: ema.conv1.weight," in msg
    assert "k.removeprefix('model.')" in msg and "\n" not in msg


def test_the_pytorch_tutorial_layout_loads(tmp_path: Path) -> None:
    """{'epoch', 'model_state_dict', 'optimizer_state_dict', 'loss'}, as the tutorial saves it."""
    net = Net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.rand(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    path = tmp_path / "tutorial.pth"
    torch.save(
        {
            "epoch": 4,
            "model_state_dict": net.state_dict(),
            "optimizer_state_dict": optimizer.state_dict(),
            "loss": 0.25,
        },
        path,
    )
    dst = Net()
    load_checkpoint(path, dst)
    _assert_same_weights(dst, net.state_dict())


# ------------------------------------------------------------------ files torch.load refuses


def _refusal(path: Path) -> str:
    """The one-line message load_checkpoint refuses ``path`` with."""
    with pytest.raises(ModelError) as info:
        load_checkpoint(path, Net())
    msg = str(info.value)
    assert msg.startswith(f"weights={path} ") and "\n" not in msg
    return msg


def test_a_whole_pickled_module_is_named_with_its_re_save(tmp_path: Path) -> None:
    """torch.save(model): the class is read from the pickle's opcodes, nothing is run."""
    path = tmp_path / "whole.pth"
    torch.save(Net(), path)
    msg = _refusal(path)
    assert "holds a whole pickled " in msg and "Net (torch.save(model))" in msg
    assert f"torch.save(torch.load('{path}', weights_only=False).state_dict(), 'sd.pth')" in msg
    assert "if you trust the file" in msg


def test_a_foreign_object_beside_the_tensors_is_named(tmp_path: Path) -> None:
    import argparse

    path = tmp_path / "args.ckpt"
    torch.save({"state_dict": Net().state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    msg = _refusal(path)
    assert "holds an object of class argparse.Namespace beside its tensors" in msg
    assert "weights_only=False)['state_dict'], 'sd.pth')" in msg


def test_a_torchscript_archive_is_named_without_torchs_warning(
    tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    path = tmp_path / "scripted.pth"
    with pytest.warns(FutureWarning):  # torch.jit is deprecated, still what many export
        torch.jit.save(torch.jit.trace(Net().eval(), torch.rand(1, 3, 8, 8)), path)
    recwarn.clear()
    msg = _refusal(path)
    assert "is a TorchScript archive (torch.jit.save), not a state_dict" in msg
    assert f"torch.save(torch.jit.load('{path}').state_dict(), 'sd.pth')" in msg
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_a_safetensors_file_named_pth_is_read_as_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    sd = Net().state_dict()
    path = tmp_path / "model.pth"
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    dst = Net()
    load_checkpoint(path, dst)
    _assert_same_weights(dst, sd)


def test_a_truncated_and_an_empty_file_say_so(tmp_path: Path) -> None:
    whole = tmp_path / "whole.pth"
    torch.save(Net().state_dict(), whole)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    msg = _refusal(cut)
    assert "is a truncated or corrupt torch.save archive" in msg and msg.endswith("copy it again.")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    assert "is an empty file (0 bytes)" in _refusal(empty)


def test_one_line_cuts_at_a_word() -> None:
    from mgpr.models.checkpoint import one_line

    text = "Weights only load failed. This file can still be loaded, to do so you have two"
    assert one_line(text, 40) == "Weights only load failed. This file..."
    assert one_line("short", 40) == "short"


# ------------------------------------------------------------------ checkpoints that do not fit


def _misfit(state: dict[str, torch.Tensor], tmp_path: Path, dst: torch.nn.Module) -> str:
    """The message ``state``, saved to a file, is refused with by ``dst`` (model=net)."""
    path = tmp_path / "misfit.pth"
    torch.save(state, path)
    with pytest.raises(ModelError) as info:
        load_checkpoint(path, dst, model_name="net")
    msg = str(info.value)
    assert msg.startswith(f"weights={path} does not fit model=net: ") and "\n" not in msg
    assert "weights=DEFAULT" not in msg  # that advice would throw the fine-tune away
    return msg


def test_another_band_count_names_the_bands_and_the_own_builder(tmp_path: Path) -> None:
    """An RGB+NIR fine-tune: only the first convolution's input width differs."""
    msg = _misfit(Net(bands=4).state_dict(), tmp_path, Net())
    assert "conv1.weight (4, 4, 3, 3) vs (4, 3, 3, 3)" in msg
    assert "the checkpoint was trained on 4 input bands and model=net takes 3" in msg
    assert "a 4-band model needs your own builder" in msg
    assert msg.endswith('run as model=pkg.module:build (README, "Models").')


def test_a_partial_checkpoint_and_another_network_say_which(tmp_path: Path) -> None:
    partial = {k: v for k, v in Net().state_dict().items() if not k.startswith("fc.")}
    msg = _misfit(partial, tmp_path, Net())
    assert "2 missing: fc.weight, fc.bias" in msg and "holds only part of the network" in msg
    other = {"features.0.weight": torch.zeros(4, 3, 3, 3), "classifier.weight": torch.zeros(5, 4)}
    msg = _misfit(other, tmp_path, Net())
    assert "it was saved from another network than model=net" in msg


def test_resnet_kinds_are_told_apart_by_their_keys() -> None:
    from torchvision import models

    kinds = {}
    with torch.device("meta"):  # shapes only: no memory, no time
        for name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnext50_32x4d"):
            kinds[name] = _resnet_kind(getattr(models, name)().state_dict())
        kinds["wide_resnet50_2"] = _resnet_kind(models.wide_resnet50_2().state_dict())
        kinds["mobilenet_v3_small"] = _resnet_kind(models.mobilenet_v3_small().state_dict())
    assert kinds == {
        "resnet18": "ResNet-18 (2-2-2-2 basic blocks)",
        "resnet34": "ResNet-34 (3-4-6-3 basic blocks)",
        "resnet50": "ResNet-50 (3-4-6-3 bottleneck blocks)",
        "resnet101": "ResNet-101 (3-4-23-3 bottleneck blocks)",
        "resnext50_32x4d": "ResNeXt-50 (3-4-6-3 bottleneck blocks)",
        "wide_resnet50_2": "wide ResNet-50 (3-4-6-3 bottleneck blocks)",
        "mobilenet_v3_small": None,
    }
