"""Score a model and the classical fallback on the MoNuSeg 2018 test split (the benchmark).

Runs ``napari-medinst segment`` and ``napari-medinst evaluate`` exactly as a user would,
on the 14 test images (40x, 0.25 µm/px), and also on the same images downscaled to 20x
(0.5 µm/px) with the pixel size given and with it estimated, a check that the model
generalises across magnifications. Nothing here tunes anything: the test split is only
ever scored.

    .venv/bin/python scripts/evaluate_monuseg_test.py [--model default] [--tta] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
from skimage.transform import rescale

KEYS = ("aji", "pq", "map", "dice")


def run(args: list[str]) -> str:
    cmd = [sys.executable, "-m", "napari_medinst.cli", *args]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def prepare(data: Path, work: Path) -> dict[str, tuple[Path, Path]]:
    with open(data / "monuseg" / "index.csv", newline="") as fh:
        ids = [r["id"] for r in csv.DictReader(fh) if r["split"] == "MoNuSeg2018-test"]
    sets = {"40x": (work / "img40", work / "gt40"), "20x": (work / "img20", work / "gt20")}
    for d in [p for pair in sets.values() for p in pair]:
        d.mkdir(parents=True, exist_ok=True)
    for i in ids:
        img = tifffile.imread(data / "monuseg" / "images" / f"{i}.tif")
        gt = tifffile.imread(data / "monuseg" / "labels" / f"{i}.tif")
        shutil.copy(data / "monuseg" / "images" / f"{i}.tif", sets["40x"][0] / f"{i}.tif")
        shutil.copy(data / "monuseg" / "labels" / f"{i}.tif", sets["40x"][1] / f"{i}.tif")
        img20 = rescale(img, 0.5, channel_axis=2, anti_aliasing=True, preserve_range=True)
        gt20 = rescale(gt, 0.5, order=0, anti_aliasing=False, preserve_range=True)
        tifffile.imwrite(sets["20x"][0] / f"{i}.tif", np.round(img20).astype(np.uint8))
        tifffile.imwrite(sets["20x"][1] / f"{i}.tif", gt20.astype(np.uint16))
    return sets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument(
        "--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data"
    )
    ap.add_argument("--work", type=Path, default=Path("out/monuseg_test"))
    ap.add_argument("--quick", action="store_true", help="40x with the given pixel size only")
    ap.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="model runs use the CLI's default mirror averaging (--no-tta: one pass)",
    )
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    sets = prepare(args.data, args.work)
    runs = [("40x", args.model, "0.25"), ("40x", "classical", "0.25")]
    if not args.quick:
        runs += [
            ("40x", args.model, None),
            ("20x", args.model, "0.5"),
            ("20x", args.model, None),
            ("20x", "classical", "0.5"),
        ]
    table = {}
    for mag, model, px in runs:
        img_dir, gt_dir = sets[mag]
        tta = args.tta and model != "classical"
        name = f"{mag} {Path(model).name}{'' if tta or model == 'classical' else ' no-tta'} pixel size {'given ' + px if px else 'estimated'}"
        out = args.work / name.replace(" ", "_")
        seg_args = [
            "segment",
            *sorted(str(p) for p in img_dir.glob("*.tif")),
            "-o",
            str(out),
            "--model",
            model,
        ]
        if px:
            seg_args += ["--pixel-size", px]
        if model != "classical" and not tta:
            seg_args.append("--no-tta")  # else the CLI's default, exactly as users run it
        t0 = time.perf_counter()
        run(seg_args)
        seconds = time.perf_counter() - t0  # one segment call, start-up included
        res = json.loads(run(["evaluate", "--pred", str(out), "--gt", str(gt_dir), "--json"]))
        mean = res["mean"]
        table[name] = {k: round(mean[k], 4) for k in KEYS} | {
            "acc@0.5": round(mean["accuracy"]["0.50"], 4),
            "segment_s_per_image": round(seconds / len(list(img_dir.glob("*.tif"))), 3),
        }
        print(name, table[name], flush=True)
    (args.work / "summary.json").write_text(json.dumps(table, indent=2))
    print(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
