"""Whole-slide benchmark: block seams, memory and throughput of ``segment-slide``.

Part 1, ``--seams``: an H&E mosaic of MoNuSeg 2018 *training* tiles at 0.5 µm/px (tiles
area-averaged ×2 from 40x, laid out as ``scripts/make_test_slide.py`` does) is segmented
by the in-memory block path (``blockwise.segment_blockwise``, default model, pixel size
fixed at 0.5) at several block sizes and by the whole-image path (``segment.segment``,
which runs the network in 512 px tiles), and also by a one-piece prediction (the network
on the whole image at once), to tell block seams apart from the model's own tiling.
Printed per pair: % of the reference's nuclei with an identical pixel set in the other
result, AJI of the other result against the reference, ids split in several connected
parts, reference nuclei covered by more than one id, and where the differing nuclei lie
(on a block core's border or elsewhere). Targets: >= 99.5 % identical, AJI >= 0.995.

Part 2, ``--slide``: a pyramidal OME-TIFF (40x, ×2 levels) is written to a temporary
folder and ``napari-medinst segment-slide --no-tta`` runs in a subprocess with each
``--runs`` layout (workers x threads). Printed: wall time, Mpx of tissue per second
(cores of the blocks the store's plan did not mark as background), peak RSS of the
client and of every process under it (``/proc/<pid>/status`` VmHWM sampled every 0.2 s
over the process tree), and the single-image yardstick: ``napari-medinst segment
--no-tta`` on a central crop of the same working level, with the slide path's overhead
against it (target <= 15 %).

    .venv/bin/python benchmarks/bench_slide.py --seams [--seams-size 4000] [--tta]
    .venv/bin/python benchmarks/bench_slide.py --slide [--slide-size 10000]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import tifffile
from scipy import ndimage as ndi

from napari_medinst.blockwise import plan_blocks, segment_blockwise
from napari_medinst.metrics import aggregated_jaccard, overlap_table
from napari_medinst.model.inference import pick_device, predict_maps
from napari_medinst.postprocess import Postprocessor
from napari_medinst.preprocess import prepare_image, to_network_input
from napari_medinst.segment import get_model, segment

REPO = Path(__file__).resolve().parents[1]
PIXEL_SIZE = 0.5
TARGET_IDENTICAL = 99.5
TARGET_AJI = 0.995
TARGET_OVERHEAD = 0.15
SAMPLE_S = 0.2


def _make_test_slide():
    """The ``scripts/make_test_slide.py`` module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("make_test_slide", REPO / "scripts" /
                                                  "make_test_slide.py")  # fmt: skip
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- part 1


def he_mosaic(size: int, seed: int = 0) -> np.ndarray:
    """``size`` × ``size`` RGB mosaic of MoNuSeg training tiles at 0.5 µm/px."""
    mts = _make_test_slide()
    tiles = [mts.downsample(t, 2) for t in mts.training_tiles()]
    return mts.Mosaic(size, tiles, seed).region(0, size, 0, size)


def one_piece(image: np.ndarray, tta: bool, params) -> np.ndarray:
    """Labels of the network run on the whole image at once (no 512 px tiling)."""
    loaded = get_model("default")
    x = to_network_input(prepare_image(image), "he")
    side = max(x.shape[1:])
    maps = predict_maps(loaded.net, x, device=pick_device("auto"), tile=side, tta=tta)
    del x
    pp = Postprocessor(maps.prob, maps.hv, maps.contour, maps.type_prob, pixel_size=PIXEL_SIZE)
    return pp.run(params).labels


def _pairs(ref: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ref id, other id, shared pixels) of every overlap of a reference nucleus."""
    inside = ref > 0
    base = int(other.max()) + 1
    keys, counts = np.unique(ref[inside].astype(np.int64) * base + other[inside],
                             return_counts=True)  # fmt: skip
    return keys // base, keys % base, counts


def n_multipart(labels: np.ndarray) -> int:
    """Ids whose pixels form more than one 8-connected component."""
    count = 0
    for i, box in enumerate(ndi.find_objects(labels), start=1):
        if box is not None and ndi.label(labels[box] == i, np.ones((3, 3)))[1] > 1:
            count += 1
    return count


def _on_border(ref: np.ndarray, ids: np.ndarray, lines: list[int]) -> np.ndarray:
    """Whether each nucleus' bounding box straddles one of the core borders ``lines``."""
    boxes = ndi.find_objects(ref)
    out = np.zeros(ids.size, bool)
    for k, i in enumerate(ids):
        rs, cs = boxes[i - 1]
        out[k] = any(rs.start < x < rs.stop or cs.start < x < cs.stop for x in lines)
    return out


def compare(ref: np.ndarray, other: np.ndarray, lines: list[int] | None = None) -> dict:
    """Agreement of ``other`` with ``ref``; ``lines``: block core borders (square grid)."""
    area_r = np.bincount(ref.ravel())
    area_o = np.bincount(other.ravel())
    r, o, n = _pairs(ref, other)
    same = (o > 0) & (n == area_r[r]) & (n == area_o[o])
    ids = np.flatnonzero(area_r[1:]) + 1
    identical = np.isin(ids, r[same])
    covered = np.bincount(r[o > 0], minlength=area_r.size)
    iou = n / (area_r[r] + area_o[o] - n)
    close = np.isin(ids, r[(o > 0) & (iou >= 0.9)])
    aji, _ = aggregated_jaccard(overlap_table(ref, other))
    out = {"n_ref": int(ids.size), "n_other": int(np.count_nonzero(area_o[1:])),
           "identical_pct": 100.0 * identical.mean() if ids.size else 100.0, "aji": aji,
           "iou90_pct": 100.0 * close.mean() if ids.size else 100.0,
           "multipart": n_multipart(other), "multi_cover": int(np.count_nonzero(covered > 1))}  # fmt: skip
    if lines:
        differ = ids[~identical]
        on = _on_border(ref, differ, lines)
        out.update(differ_on_border=int(on.sum()), differ_elsewhere=int((~on).sum()),
                   ref_on_border=int(_on_border(ref, ids, lines).sum()))  # fmt: skip
    return out


@contextlib.contextmanager
def model_in_one_piece():
    """Within: every model call of the block path runs on its whole window at once.

    A diagnostic only (it rebinds ``segment.predict_maps``): with it, a block sees the
    network exactly as the one-piece prediction does except at the block's own edges,
    which isolates block seams from the model's 512 px tiling inside each block.
    """
    import napari_medinst.segment as seg

    original = seg.predict_maps
    seg.predict_maps = functools.partial(original, tile=1 << 20)
    try:
        yield
    finally:
        seg.predict_maps = original


def _print_row(name: str, c: dict) -> None:
    line = (f"  {name:<34} nuclei {c['n_ref']:6d} -> {c['n_other']:6d}  identical "
            f"{c['identical_pct']:7.3f} %  IoU>=0.9 {c['iou90_pct']:7.3f} %  AJI {c['aji']:.4f}  multipart ids {c['multipart']:4d}"
            f"  ref covered by >1 id {c['multi_cover']:4d}")  # fmt: skip
    print(line)
    if "differ_on_border" in c:
        print(f"  {'':<34} differing: {c['differ_on_border']} on a core border "
              f"(of {c['ref_on_border']} nuclei there), {c['differ_elsewhere']} elsewhere")  # fmt: skip


def _verdict(c: dict) -> str:
    ok = c["identical_pct"] >= TARGET_IDENTICAL and c["aji"] >= TARGET_AJI
    return "meets" if ok else "misses"


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def _one_piece_blocks(image, piece, blocks, tta, params) -> None:
    """Block path with the model in one piece per window, against the one-piece prediction."""
    size = image.shape[0]
    for block in blocks:
        with model_in_one_piece():
            res, t_block = _timed(segment_blockwise, image, "default", pixel_size=PIXEL_SIZE,
                                  tta=tta, block=block, params=params)  # fmt: skip
        n = math.ceil(size / block)
        c = compare(piece, res.labels, [round(i * size / n) for i in range(1, n)])
        print(f"  block {block}, model in one piece per window: {res.n_instances} nuclei, "
              f"{t_block:.1f} s")  # fmt: skip
        _print_row(f"block {block} (1-piece) vs one-piece", c)
        print(f"  {'':<34} verdict (block seams alone): {_verdict(c)}")


def bench_seams(size: int, blocks: list[int], tta: bool, with_one_piece: bool,
                one_piece_blocks: list[int]) -> None:  # fmt: skip
    """Part 1 at one TTA setting: block path vs whole-image path vs one-piece prediction."""
    image = he_mosaic(size)
    print(
        f"\n== seams: {size}x{size} H&E mosaic at {PIXEL_SIZE} µm/px, tta={'on' if tta else 'off'}"
    )
    whole, t_whole = _timed(segment, image, "default", pixel_size=PIXEL_SIZE, tta=tta)
    params = whole.maps.default_params
    ref = whole.labels
    print(f"  whole-image path (512 px model tiles): {whole.result.n_instances} nuclei, "
          f"{t_whole:.1f} s, multipart ids {n_multipart(ref)}")  # fmt: skip
    del whole
    piece = None
    if with_one_piece:
        piece, t_piece = _timed(one_piece, image, tta, params)
        print(f"  one-piece prediction: {int(np.count_nonzero(np.bincount(piece.ravel())[1:]))} "
              f"nuclei, {t_piece:.1f} s")  # fmt: skip
        _print_row("whole path vs one-piece", compare(piece, ref))
    for block in blocks:
        res, t_block = _timed(segment_blockwise, image, "default", pixel_size=PIXEL_SIZE,
                              tta=tta, block=block, params=params)  # fmt: skip
        lines = [e for e in (round(i * size / math.ceil(size / block))
                             for i in range(1, math.ceil(size / block)))]  # fmt: skip
        print(f"  block {block}: {res.n_blocks} blocks, {res.n_instances} nuclei, {t_block:.1f} s, "
              f"{res.n_truncated} truncated")  # fmt: skip
        c = compare(ref, res.labels, lines)
        _print_row(f"block {block} vs whole path", c)
        print(f"  {'':<34} verdict vs whole path: {_verdict(c)} (>= {TARGET_IDENTICAL} %, "
              f"AJI >= {TARGET_AJI})")  # fmt: skip
        if piece is not None:
            c1 = compare(piece, res.labels, lines)
            _print_row(f"block {block} vs one-piece", c1)
            print(f"  {'':<34} verdict vs one-piece: {_verdict(c1)}")
    if piece is not None and one_piece_blocks:
        _one_piece_blocks(image, piece, one_piece_blocks, tta, params)


# --------------------------------------------------------------------------- part 2


def _hwm_kib(pid: int) -> int:
    """Peak resident set (VmHWM) of a live process, KiB; 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _role(proc: psutil.Process) -> str:
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return "?"
    if "resource_tracker" in cmd:
        return "resource tracker"
    if "spawn_main" in cmd or "forkserver" in cmd:
        return "worker"
    return "other"


def run_monitored(cmd: list[str], log: Path) -> dict:
    """Run ``cmd``; wall time, exit status, wait4 max RSS and per-pid peak RSS of its tree."""
    peaks: dict[int, tuple[str, int]] = {}
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        root = psutil.Process(proc.pid)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            try:
                tree = [(root, "client")] + [(p, _role(p)) for p in root.children(recursive=True)]
            except psutil.Error:
                tree = []
            for p, role in tree:
                hwm = _hwm_kib(p.pid)
                old = peaks.get(p.pid, (role, 0))
                peaks[p.pid] = (old[0] if old[0] != "?" else role, max(old[1], hwm))
            time.sleep(SAMPLE_S)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall": wall, "rc": proc.returncode, "wait4_maxrss_mib": usage.ru_maxrss / 1024,
            "peaks": {pid: (role, kib / 1024) for pid, (role, kib) in peaks.items() if kib}}  # fmt: skip


def _cli() -> list[str]:
    exe = Path(sys.executable).with_name("napari-medinst")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "napari_medinst.cli"]


def store_tissue(store: Path, block: int) -> dict:
    """Working level, pixel size and tissue (non-background block cores) from the store."""
    from napari_medinst.slide_engine import STORE_KEY

    attrs = json.loads((store / ".zattrs").read_text())[STORE_KEY]
    plan = attrs["plan"]
    shape = tuple(plan["shape"])
    cores = [s.core for s in plan_blocks(shape, block, 0)]
    if len(cores) != len(plan["blocks"]):
        raise RuntimeError(f"{store}: {len(plan['blocks'])} blocks, expected {len(cores)}")
    background = set(plan["background"])
    tissue = sum((r1 - r0) * (c1 - c0) for k, (r0, r1, c0, c1) in enumerate(cores)
                 if k not in background)  # fmt: skip
    return {"status": attrs["status"], "level": attrs["level"], "shape": shape,
            "scale_um": attrs["scale_um"][0], "tissue_px": tissue, "n_blocks": len(cores),
            "n_background": len(background)}  # fmt: skip


def _print_memory(res: dict) -> None:
    # Linux: wait4's ru_maxrss is the largest of the process and its reaped children,
    # and a forked child starts from its parent's high-water mark (kept across exec),
    # so it includes this benchmark's own peak; VmHWM below is per process after exec.
    print(f"    wait4 max RSS (incl. the parent's peak inherited at fork, see code): "
          f"{res['wait4_maxrss_mib']:.0f} MiB")  # fmt: skip
    for pid, (role, mib) in sorted(res["peaks"].items(), key=lambda kv: -kv[1][1]):
        print(f"    peak RSS {role:<16} pid {pid:<8} {mib:7.0f} MiB")


def _slide_run(slide: Path, tmp: Path, layout: str, block: int) -> dict | None:
    workers, threads = (int(v) for v in layout.split("x"))
    store = tmp / f"out_{layout}.zarr"
    cmd = [*_cli(), "segment-slide", str(slide), "-o", str(store), "--no-tta",
           "--workers", str(workers), "--threads-per-worker", str(threads),
           "--block-size", str(block)]  # fmt: skip
    res = run_monitored(cmd, tmp / f"log_{layout}.txt")
    log = (tmp / f"log_{layout}.txt").read_text()
    print(f"\n  segment-slide --workers {workers} --threads-per-worker {threads} --no-tta: "
          f"exit {res['rc']}, wall {res['wall']:.1f} s")  # fmt: skip
    if res["rc"] != 0:
        print("    FAILED; log tail:\n" + log[-2000:])
        return None
    info = store_tissue(store, block)
    with open(store / "nuclei.csv") as fh:
        n_nuclei = sum(1 for _ in fh) - 1
    mpx = info["tissue_px"] / 1e6
    print(f"    level {info['level']} {info['shape'][0]}x{info['shape'][1]} px at "
          f"{info['scale_um']:.3f} µm/px, {info['n_blocks']} blocks ({info['n_background']} "
          f"background), tissue {mpx:.1f} Mpx, {n_nuclei} nuclei, status {info['status']}")  # fmt: skip
    print(f"    throughput {mpx / res['wall']:.3f} Mpx tissue/s ({res['wall'] / mpx:.2f} s/Mpx)")
    _print_memory(res)
    return {**res, **info, "mpx": mpx, "store": store}


def _yardstick(slide: Path, tmp: Path, info: dict, crop: int) -> dict | None:
    from napari_medinst.slide import read_region

    h, w = info["shape"]
    crop = min(crop, h, w)
    y0, x0 = (h - crop) // 2, (w - crop) // 2
    pixels = read_region(str(slide), info["level"], y0, y0 + crop, x0, x0 + crop)
    path = tmp / "crop.tif"
    tifffile.imwrite(path, np.asarray(pixels))
    cmd = [*_cli(), "segment", str(path), "-o", str(tmp / "crop_out"), "--no-tta",
           "--pixel-size", f"{info['scale_um']:.6g}"]  # fmt: skip
    res = run_monitored(cmd, tmp / "log_crop.txt")
    print(f"\n  yardstick: segment --no-tta on a central {crop}x{crop} crop of level "
          f"{info['level']}: exit {res['rc']}, wall {res['wall']:.1f} s")  # fmt: skip
    if res["rc"] != 0:
        print("    FAILED; log tail:\n" + (tmp / "log_crop.txt").read_text()[-2000:])
        return None
    mpx = crop * crop / 1e6
    print(f"    throughput {mpx / res['wall']:.3f} Mpx/s ({res['wall'] / mpx:.2f} s/Mpx)")
    _print_memory(res)
    return {**res, "mpx": mpx}


def bench_slide(size: int, layouts: list[str], block: int, crop: int, tmp_root: str | None) -> None:
    """Part 2: make a slide, run segment-slide per layout, then the single-image yardstick."""
    mts = _make_test_slide()
    with tempfile.TemporaryDirectory(prefix="bench_slide_", dir=tmp_root) as tmp_name:
        tmp = Path(tmp_name)
        (slide, _), t_make = _timed(mts.make_slide, tmp / "bench.ome.tif", size, "ome-tiff")
        print(f"\n== slide: {size}x{size} OME-TIFF at 0.25 µm/px (JPEG, ×2 levels), "
              f"{slide.stat().st_size / 2**20:.0f} MiB, written in {t_make:.1f} s; "
              f"blocks {block} px")  # fmt: skip
        runs = {layout: _slide_run(slide, tmp, layout, block) for layout in layouts}
        done = [r for r in runs.values() if r is not None]
        if not done:
            return
        single = _yardstick(slide, tmp, done[0], crop)
        if single is None:
            return
        base = single["wall"] / single["mpx"]
        print(f"\n  overhead of the slide path against the yardstick ({base:.2f} s/Mpx), "
              f"target <= {TARGET_OVERHEAD:.0%}:")  # fmt: skip
        for layout, r in runs.items():
            if r is not None:
                over = r["wall"] / r["mpx"] / base - 1
                verdict = "meets" if over <= TARGET_OVERHEAD else "misses"
                print(
                    f"    {layout:<5} {r['wall'] / r['mpx']:.2f} s/Mpx -> {over:+.1%} ({verdict})"
                )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seams", action="store_true", help="part 1: block seams")
    p.add_argument("--slide", action="store_true", help="part 2: memory and throughput")
    p.add_argument("--seams-size", type=int, default=4000, help="mosaic side, px (default 4000)")
    p.add_argument("--blocks", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--tta", choices=("off", "on", "both"), default="off",
                   help="model mirror averaging in part 1 (default off; on is ~4x slower)")  # fmt: skip
    p.add_argument("--no-one-piece", action="store_true",
                   help="skip the one-piece prediction (it holds the whole image's "
                   "activations at once)")  # fmt: skip
    p.add_argument("--one-piece-blocks", type=int, nargs="*", default=[1024], metavar="PX",
                   help="block sizes also run with the model in one piece per block window, "
                   "to isolate block seams from model tiling (default 1024)")  # fmt: skip
    p.add_argument("--slide-size", type=int, default=10000,
                   help="level-0 side of the slide, px (default 10000; 40000 is the issue's size)")  # fmt: skip
    p.add_argument("--runs", nargs="+", default=["1x2", "2x1"], metavar="WxT",
                   help="workers x threads per worker (default 1x2 2x1)")  # fmt: skip
    p.add_argument("--slide-block", type=int, default=2048, help="segment-slide --block-size")
    p.add_argument("--crop", type=int, default=2000, help="yardstick crop side, px")
    p.add_argument("--tmp", default=None, help="folder for the temporary slide and outputs")
    args = p.parse_args(argv)
    if not (args.seams or args.slide):
        p.error("choose --seams and/or --slide")
    print(f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.2f} at start")
    if args.seams:
        for tta in {"off": [False], "on": [True], "both": [False, True]}[args.tta]:
            bench_seams(
                args.seams_size, args.blocks, tta, not args.no_one_piece, args.one_piece_blocks
            )
    if args.slide:
        bench_slide(args.slide_size, args.runs, args.slide_block, args.crop, args.tmp)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
