"""Cost of test-time augmentation (``tta=flips|d4``): the model's compute alone, one run.

Times ``forward`` + ``postprocess`` of in-memory batches (no data path; a detector's views
fused by NMS, or with ``--fusion wbf`` by weighted box fusion, as a run does) for each ``tta`` mode
and prints each one's time over ``tta=none``'s, measured in one process so the ratios compare
(the ideal is 4x and 8x: one forward per view; the rest is the views' turning and averaging).
Whole runs add the data path once, so their ratio is a little lower.

    uv run python benchmarks/tta_cost.py --model lraspp --tile 256 --batch 4
"""

from __future__ import annotations

import argparse

import torch
from synthetic import best_of

from mgpr.models import build_model
from mgpr.models.tta import VIEWS, augmented_forward, fuse_detections, view_inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lraspp", help="a built-in model (any task)")
    parser.add_argument("--tile", type=int, default=256, help="tile edge, px")
    parser.add_argument("--batch", type=int, default=4, help="tiles per batch")
    parser.add_argument("--repeat", type=int, default=3, help="best of this many batches")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (the GPU default)")
    parser.add_argument("--fusion", default="nms", help="a detector's views: nms or wbf")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    adapter = build_model(args.model, "none", tile_size=args.tile)
    adapter.module.to(device)
    images = torch.rand(args.batch, 3, args.tile, args.tile, device=device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"{args.model} weights=none, {args.batch} x {args.tile}^2 px, "
        f"{'bf16 autocast' if args.bf16 else 'fp32'}, {where}, {torch.get_num_threads()} threads"
        + (f", views fused by {args.fusion}" if adapter.task == "detection" else "")
    )
    base = None
    for mode, views in VIEWS.items():

        def step(views=views) -> object:  # type: ignore[no-untyped-def]
            with (
                torch.inference_mode(),
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16),
            ):
                inputs = adapter.prepare(images.clone())
                if len(views) > 1 and adapter.task == "detection":
                    per_view = [
                        adapter.postprocess(adapter.forward(view_inputs(inputs, v)), args.tile)
                        for v in views
                    ]
                    return fuse_detections(per_view, views, args.tile, 0.5, 100, args.fusion)  # type: ignore[arg-type]
                if len(views) > 1:
                    raw = augmented_forward(adapter, inputs, views)
                else:
                    raw = adapter.forward(inputs)
                return adapter.postprocess(raw, args.tile)  # reads back to the host: synced

        step()  # warm-up
        seconds, _ = best_of(step, args.repeat)
        base = base or seconds
        print(
            f"  tta={mode:<6} {len(views)} view(s): {seconds * 1e3:8.1f} ms per batch, "
            f"{seconds / base:4.2f}x tta=none"
        )


if __name__ == "__main__":
    main()
