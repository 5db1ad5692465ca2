"""Tiles per second of the network path, one tile at a time against batched tiles with
their mirror passes in one batch, in float32 and in mixed precision; and the end-to-end
throughput of ``segment`` (model + post-processing) on a large image, in Mpx/s.

Target (issue #16): >= 30 tiles of 512 x 512 per second on one data-centre GPU (real-time
use on frozen sections). Runs on the CPU too (fewer tiles, a smaller image), so it can
be checked anywhere; on CUDA it uses the GPU.

    .venv/bin/python benchmarks/bench_gpu.py [--device auto] [--tiles 64] [--size 4096]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from napari_medinst.model.inference import pick_device, predict_maps
from napari_medinst.segment import get_model, segment


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def tiles_per_second(net, device, n_tiles: int, tta: int, batch: int, amp: str | None) -> float:
    """Tiles of 512 x 512 per second through predict_maps on a row of n_tiles tiles
    (no overlap: each tile is one network input)."""
    x = np.random.default_rng(0).random((3, 512, 512 * n_tiles)).astype(np.float32)
    run = lambda: predict_maps(  # noqa: E731
        net, x, device=device, tile=512, overlap=0, tta=tta, batch_size=batch, amp=amp
    )
    run()  # warm-up: cuDNN autotuning, allocations
    _sync(device)
    t0 = time.perf_counter()
    run()
    _sync(device)
    return n_tiles / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", default="default")
    ap.add_argument("--tiles", type=int, default=0, help="tiles per timing (default 64 GPU, 6 CPU)")
    ap.add_argument(
        "--size",
        type=int,
        default=0,
        help="side of the end-to-end image (default 8192 GPU, 2048 CPU)",
    )
    args = ap.parse_args()
    device = pick_device(args.device)
    gpu = device.type == "cuda"
    if gpu:
        torch.backends.cudnn.benchmark = True
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU, {torch.get_num_threads()} threads"
    n = args.tiles or (64 if gpu else 6)
    model = get_model(args.model, str(device))
    net = model.net
    print(f"device: {name}; model {model.name}; {n} tiles of 512x512 per timing")
    rows = [("one tile at a time, fp32", 1, None)]
    rows += [("batched 8 + passes in batch, fp32", 8, None)]
    if gpu:
        rows += [("batched 16, bf16", 16, "bf16"), ("batched 16, fp16", 16, "fp16")]
    base = {}
    for tta in (1, 2, 4):
        for label, batch, amp in rows:
            tps = tiles_per_second(net, device, n, tta, batch, amp)
            base.setdefault(tta, tps)
            print(
                f"  {tta} pass{'es' if tta > 1 else '  '} {label:<36} {tps:8.1f} tiles/s"
                f"  ({tps / base[tta]:.2f}x one at a time)"
            )
    size = args.size or (8192 if gpu else 2048)
    from napari_medinst.samples import load_sample

    img = np.tile(load_sample("he")[0], (size // 512 + 1, size // 512 + 1, 1))[:size, :size]
    for tta in (1, 4):
        segment(img[:1024, :1024], model, pixel_size=0.5, device=str(device), tta=tta)
        _sync(device)
        t0 = time.perf_counter()
        seg = segment(img, model, pixel_size=0.5, device=str(device), tta=tta)
        _sync(device)
        dt = time.perf_counter() - t0
        print(
            f"segment {size}x{size} at 0.5 um/px, {tta} pass(es): {dt:.1f} s, "
            f"{size * size / 1e6 / dt:.1f} Mpx/s end to end ({seg.result.n_instances} nuclei)"
        )


if __name__ == "__main__":
    main()
