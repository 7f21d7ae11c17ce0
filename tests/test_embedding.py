"""Embeddings (``task = "embedding"``): one feature vector per tile, end to end and in parts.

The end-to-end checks compare what the run wrote with the network run by hand on the tile read
straight from the file, so a vector on the wrong tile, a lost digit or a wrong normalisation
fails them, whatever the code in between.
"""

from __future__ import annotations

import json
import sqlite3
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import rasterio
import shapely
import torch
from conftest import run_mgpr_inprocess, segmentation_args, write_utm_rgb

from mgpr.errors import ModelError
from mgpr.models.base import Embedding, embeddings_from_features, pooled_features
from mgpr.models.custom import ModuleAdapter
from mgpr.models.tta import VIEWS, augmented_forward
from mgpr.monitor.embedding_colours import principal_rgb
from mgpr.outputs.features import read_features, write_features
from mgpr.outputs.geoparquet import GeoParquetWriter
from mgpr.outputs.gpkg import GpkgWriter
from mgpr.outputs.vector import FeatureBatch

EMBEDDERS = """
import torch


class Skewed(torch.nn.Module):
    \"\"\"Seeded convolution, then pooling weighted by tile position: no symmetry at all.\"\"\"

    task = "embedding"

    def __init__(self, out="vector"):
        super().__init__()
        g = torch.Generator().manual_seed(11)
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g))
            self.conv.bias.copy_(torch.randn(6, generator=g) * 0.1)
        self.out = out
        self.calls = 0

    def forward(self, x):
        y = torch.relu(self.conv((x - 0.5) * 4))
        h, w = y.shape[-2:]
        if self.out == "map":
            return y  # (B, 6, H, W): mgpr averages the cells
        if self.out == "tokens":
            return y.flatten(2).transpose(1, 2)  # (B, H*W, 6)
        if self.out == "growing":
            self.calls += 1
            return y.mean(dim=(2, 3))[:, : 3 + self.calls]
        weights = torch.linspace(0, 1, h * w).view(1, 1, h, w)
        return (y * weights).mean(dim=(2, 3))  # (B, 6)


def vector(weights):
    return Skewed()


def feature_map(weights):
    return Skewed("map")


def tokens(weights):
    return Skewed("tokens")


def growing(weights):
    return Skewed("growing")
"""


@pytest.fixture
def embedders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "mgpr_embedders.py").write_text(textwrap.dedent(EMBEDDERS))
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import mgpr_embedders

    return importlib.reload(mgpr_embedders)


def _image(path: Path, data: np.ndarray) -> Path:
    return write_utm_rgb(path, data, 0.5)


def _parquet_vectors(run: Path) -> dict[str, np.ndarray]:
    table = pq.read_table(run / "embeddings.parquet")
    flat = table["embedding"].combine_chunks().flatten().to_numpy()
    vectors = flat.reshape(table.num_rows, -1)
    return dict(zip(table["tile_key"].to_pylist(), vectors, strict=True))


def _gpkg_vectors(run: Path) -> dict[str, np.ndarray]:
    with sqlite3.connect(run / "predictions.gpkg") as db:
        rows = db.execute("SELECT tile_key, embedding FROM embeddings").fetchall()
    return {key: np.frombuffer(blob, "<f4") for key, blob in rows}


def _tile(path: Path, row: int, col: int, size: int) -> torch.Tensor:
    """The tile at (row, col) read by hand, padded with 0 past the raster, as float in [0, 1]."""
    with rasterio.open(path) as src:
        window = rasterio.windows.Window(col * size, row * size, size, size)
        data = src.read(window=window, boundless=True, fill_value=0)
    return torch.from_numpy(data.astype(np.float32) / 255.0)[None]


# ---------------------------------------------------------------- the model's output


def test_features_are_taken_as_vectors_or_averaged_maps() -> None:
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.bfloat16).view(2, 3, 2, 2)
    pooled = pooled_features(x, "m")
    assert pooled.dtype == torch.float32 and pooled.shape == (2, 3)
    torch.testing.assert_close(pooled, x.float().mean(dim=(2, 3)))
    torch.testing.assert_close(pooled_features(np.ones((2, 4), np.float64), "m"), torch.ones(2, 4))
    records = embeddings_from_features(torch.ones(4, 5, dtype=torch.float16), "m")
    assert len(records) == 4 and records[0].vector.dtype == np.float32
    with pytest.raises(ModelError, match=r"returns a \(2, 7, 3\).*x\[:, 0\]"):
        pooled_features(torch.zeros(2, 7, 3), "m")
    with pytest.raises(ModelError, match="return \\(B, D\\) float features"):
        pooled_features(torch.zeros(2, 3, dtype=torch.int64), "m")
    with pytest.raises(ValueError, match="float32 vector"):
        Embedding(np.zeros((2, 2), np.float32))


def test_a_user_embedder_declares_its_task_and_keeps_its_length(embedders) -> None:
    def adapter(module: torch.nn.Module) -> ModuleAdapter:
        return ModuleAdapter(
            module, name="u:e", weights="w", topk=5, score_threshold=0.05, tile_size=16
        )

    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    vec = adapter(embedders.vector("w"))
    assert vec.task == "embedding" and vec.categories is None
    out = vec.postprocess(vec.forward(x), 16)
    assert [r.vector.shape for r in out] == [(6,), (6,)]
    grid = adapter(embedders.feature_map("w"))
    got = grid.postprocess(grid.forward(x), 16)
    want = embedders.feature_map("w")(x).mean(dim=(2, 3)).detach()
    np.testing.assert_allclose(np.stack([r.vector for r in got]), want.numpy(), rtol=1e-6)
    with pytest.raises(ModelError, match="tokens: return x"):
        tok = adapter(embedders.tokens("w"))
        tok.postprocess(tok.forward(x), 16)
    grows = adapter(embedders.growing("w"))
    grows.postprocess(grows.forward(x), 16)
    with pytest.raises(ModelError, match="returned 5 features per tile after 4"):
        grows.postprocess(grows.forward(x), 16)


def test_averaged_views_give_a_vector_no_flip_or_turn_changes(embedders) -> None:
    adapter = ModuleAdapter(
        embedders.vector("w"), name="u:e", weights="w", topk=5, score_threshold=0.05, tile_size=12
    )
    x = torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(4))
    plain = adapter.forward(x)
    assert not torch.allclose(adapter.forward(torch.rot90(x, 1, (2, 3))), plain, atol=1e-3)
    for mode in ("flips", "d4"):
        mean = augmented_forward(adapter, x, VIEWS[mode])
        assert isinstance(mean, torch.Tensor) and mean.shape == (3, 6)
        for view in VIEWS[mode]:
            torch.testing.assert_close(augmented_forward(adapter, view.apply(x), VIEWS[mode]), mean)


# ---------------------------------------------------------------- vector columns in the outputs


def _batch(n: int, dim: int) -> FeatureBatch:
    rings = np.array(
        [[[i, 0], [i + 1, 0], [i + 1, 1], [i, 1], [i, 0]] for i in range(n)], np.float64
    ).reshape(-1, 5, 2)
    vectors = np.random.default_rng(n).standard_normal((n, dim)).astype(np.float32)
    keys = np.array([f"k{i}" for i in range(n)], dtype=object)
    return FeatureBatch(rings, {"tile_key": keys, "embedding": vectors})


def test_vector_columns_round_trip_every_format(tmp_path: Path) -> None:
    batch = _batch(5, 7)
    with pytest.raises(ValueError, match="must be float32"):
        FeatureBatch(batch.rings, {"embedding": np.zeros((5, 7))})
    back, meta = read_features(write_features(tmp_path / "f.parquet", batch, {"path": "a"}))
    assert meta == {"path": "a"}
    np.testing.assert_array_equal(back.fields["embedding"], batch.fields["embedding"])
    empty, _ = read_features(write_features(tmp_path / "e.parquet", _batch(0, 0), {}))
    merged = FeatureBatch.concat([empty, batch, _batch(2, 7)])
    assert merged.fields["embedding"].shape == (7, 7)

    parquet = GeoParquetWriter(tmp_path, "predictions")
    gpkg = GpkgWriter(tmp_path, "predictions")
    for writer in (parquet, gpkg):
        writer.write("embeddings", "EPSG:32633", batch)
        writer.write("embeddings", "EPSG:32633", _batch(2, 7))
        writer.commit()
    table = pq.read_table(tmp_path / "embeddings.parquet")
    assert pa.types.is_list(table.schema.field("embedding").type)
    vectors = table["embedding"].combine_chunks().flatten().to_numpy().reshape(7, 7)
    np.testing.assert_array_equal(vectors, merged.fields["embedding"])
    with sqlite3.connect(tmp_path / "predictions.gpkg") as db:
        rows = db.execute("SELECT embedding, typeof(embedding) FROM embeddings ORDER BY fid")
        blobs = rows.fetchall()
    assert {kind for _, kind in blobs} == {"blob"}
    np.testing.assert_array_equal([np.frombuffer(b, "<f4") for b, _ in blobs], vectors)


def test_principal_colours_separate_what_differs_and_are_grey_without_spread() -> None:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((2, 64)) * 5
    vectors = np.concatenate([c + 0.1 * rng.standard_normal((50, 64)) for c in centres])
    rgb = principal_rgb(vectors)
    assert rgb.shape == (100, 3) and rgb.min() >= 0 and rgb.max() <= 1
    assert abs(rgb[:50, 0].mean() - rgb[50:, 0].mean()) > 0.8  # the first component splits them
    np.testing.assert_array_equal(principal_rgb(vectors), rgb)  # seeded: the same colours
    np.testing.assert_array_equal(principal_rgb(np.ones((4, 8))), np.full((4, 3), 0.5))
    assert principal_rgb(np.zeros((0, 8))).shape == (0, 3)


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_resnet50_embeddings_are_the_network_on_each_tile(tmp_path: Path, capsys) -> None:
    """The built-in embedder from a fine-tuned classifier's checkpoint (head of 10 classes, not
    loaded): each row is ResNet-50's pooled features of its tile as read by hand, in both
    formats; the summary, summary.json and the preview say what was written."""
    from torchvision.models import resnet50

    torch.manual_seed(0)
    net = resnet50(num_classes=10).eval()
    ckpt = tmp_path / "finetuned.pth"
    torch.save({"state_dict": net.state_dict()}, ckpt)
    data = np.random.default_rng(1).integers(0, 256, (3, 200, 160), dtype=np.uint8)
    image = _image(tmp_path / "ortho.tif", data)
    run = tmp_path / "run"
    args = segmentation_args(
        image, run, "output_format=both", model="resnet50-embed", tile_size=96, overlap=0
    )
    assert run_mgpr_inprocess(*args, f"weights={ckpt}", "precision=32") == 0
    out = capsys.readouterr().out
    assert "embeddings   2048 float32 features per tile (column embedding)" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == "embedding" and summary["records"] == 6  # 3 rows x 2 columns
    assert summary["embedding"] == {"dim": 2048, "dtype": "float32", "column": "embedding"}
    assert (run / "preview.png").stat().st_size > 0

    stored = _parquet_vectors(run)
    assert sorted(stored) == sorted(_gpkg_vectors(run))
    for key, blob in _gpkg_vectors(run).items():
        np.testing.assert_array_equal(blob, stored[key])
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    net.fc = torch.nn.Identity()
    for row in range(3):
        for col in range(2):
            with torch.inference_mode():
                want = net((_tile(image, row, col, 96) - mean) / std)[0].numpy()
            got = stored[f"{image}::r{row}c{col}"]
            # fp32 both, but channels_last vs contiguous convolutions: ~5e-5 on values to ~50
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-4)
    # footprints: each tile's window inside the raster, in the raster's CRS
    table = pq.read_table(run / "embeddings.parquet")
    geoms = shapely.from_wkb(table["geometry"].to_numpy(zero_copy_only=False))
    keys = table["tile_key"].to_pylist()
    corner = geoms[keys.index(f"{image}::r2c1")]
    np.testing.assert_allclose(
        corner.bounds, (500000 + 96 * 0.5, 5000000 - 200 * 0.5, 500000 + 80, 5000000 - 96)
    )


@pytest.mark.slow
def test_a_turned_raster_gives_the_same_vectors_with_d4(embedders, tmp_path: Path) -> None:
    """A raster turned a quarter gives each tile's vector again at its turned place with
    tta=d4, and not without (the model has no symmetry); a backbone checkpoint loads too."""
    data = np.random.default_rng(2).integers(0, 256, (3, 64, 96), dtype=np.uint8)
    plain = _image(tmp_path / "a.tif", data)
    turned = _image(tmp_path / "b.tif", np.ascontiguousarray(np.rot90(data, 1, (1, 2))))

    def vectors(image: Path, run: Path, *more: str) -> dict[str, np.ndarray]:
        args = segmentation_args(
            image, run, *more, model="mgpr_embedders:vector", tile_size=32, overlap=0
        )
        assert run_mgpr_inprocess(*args, "output_format=parquet", "precision=32") == 0
        return _parquet_vectors(run)

    def same_after_turn(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
        # rot90 (counter-clockwise): tile (r, c) of a 2 x 3 grid is tile (2 - c, r) of b's 3 x 2
        return all(
            np.allclose(a[f"{plain}::r{r}c{c}"], b[f"{turned}::r{2 - c}c{r}"], rtol=1e-4, atol=1e-5)
            for r in range(2)
            for c in range(3)
        )

    assert len(vectors(plain, tmp_path / "a0")) == 6
    assert not same_after_turn(vectors(plain, tmp_path / "a0"), vectors(turned, tmp_path / "b0"))
    a8, b8 = vectors(plain, tmp_path / "a8", "tta=d4"), vectors(turned, tmp_path / "b8", "tta=d4")
    assert same_after_turn(a8, b8)


def test_a_backbone_checkpoint_loads_and_another_network_is_refused(tmp_path: Path) -> None:
    from torchvision.models import resnet18, resnet50

    from mgpr.models.embedding import build_resnet50_embed

    torch.manual_seed(0)
    backbone = {k: v for k, v in resnet50().state_dict().items() if not k.startswith("fc.")}
    torch.save({f"encoder.{k}": v for k, v in backbone.items()}, tmp_path / "ssl.pth")
    adapter = build_resnet50_embed(str(tmp_path / "ssl.pth"))
    assert adapter.task == "embedding" and not adapter.random_weights
    torch.testing.assert_close(adapter.module.conv1.weight, backbone["conv1.weight"])
    torch.save(resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ModelError, match="layer1.0.conv3.weight"):
        build_resnet50_embed(str(tmp_path / "r18.pth"))


def test_bf16_features_are_averaged_in_float32() -> None:
    """Under bf16 autocast the built-in embedder's vectors are float32 means, not bf16 values
    (torchvision's pooling averaged in bf16: every feature on bf16's 8-bit grid)."""
    from mgpr.models.embedding import ImageNetEmbeddingAdapter, build_resnet50_embed

    def share_on_bf16_grid(adapter: ImageNetEmbeddingAdapter) -> float:
        x = adapter.prepare(torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1)))
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            raw = adapter.forward(x)
        vectors = np.stack([r.vector for r in adapter.postprocess(raw, 128)])
        bits = vectors.view(np.uint32)
        return float(((bits & 0xFFFF) == 0)[vectors != 0].mean())

    torch.manual_seed(0)
    adapter = build_resnet50_embed("none")
    assert share_on_bf16_grid(adapter) < 0.2
    adapter.module.avgpool = torch.nn.AdaptiveAvgPool2d(1)  # torchvision's own pooling
    assert share_on_bf16_grid(adapter) > 0.99
