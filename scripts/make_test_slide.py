"""Build a realistic pyramidal whole-slide image for tests and benchmarks.

The slide is a mosaic of H&E tiles (MoNuSeg 2018 *training* images, else the bundled
sample tile) cut out by a few elliptical "tissue pieces" on a white background, written
with JPEG (or lossless) tiles and a pyramid of area-averaged levels:

* ``svs``: Aperio layout (level 0, a stripped thumbnail, then ×4 levels, one page each),
  ImageDescription ``Aperio Image Library ... |MPP = 0.2500``;
* ``ome-tiff``: OME-TIFF, ×2 levels in SubIFDs, ``PhysicalSizeX`` in µm;
* ``tiff``: generic pyramidal TIFF, ×2 levels in SubIFDs, resolution tags in cm;
* ``ome-zarr``: OME-NGFF 0.4 (zarr v2), axes y, x, c, ``scale`` in micrometer.

Level 0 is streamed tile row by tile row, so a 40,000 × 40,000 px slide needs only its
level 1 in memory. Files are written under a temporary name and renamed into place.

Usage::

    python scripts/make_test_slide.py --size 40000 --out slide.svs --format svs
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile

from napari_medinst._io import _atomic_write, read_image

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TILES = REPO.parent / "shared" / "data" / "monuseg"
BUNDLED_TILE = REPO / "src" / "napari_medinst" / "data" / "he_tile.tif"
BACKGROUND = (242, 242, 240)
FORMATS = ("svs", "ome-tiff", "tiff", "ome-zarr")
MIN_LEVEL_SIDE = 128


def training_tiles(folder: Path = DEFAULT_TILES, limit: int = 12) -> list[np.ndarray]:
    """RGB tiles of the MoNuSeg *training* split (never the test split), else the sample."""
    index = folder / "index.csv"
    if index.exists():
        with open(index, newline="") as fh:
            ids = [r["id"] for r in csv.DictReader(fh) if r["split"] == "MoNuSeg2018-train"]
        tiles = [read_image(folder / "images" / f"{i}.tif")[..., :3] for i in ids[:limit]]
        if tiles:
            return tiles
    return [read_image(BUNDLED_TILE)[..., :3]]


class Mosaic:
    """A ``size`` × ``size`` RGB mosaic of tiles inside elliptical tissue on white.

    Parameters
    ----------
    size : int
        Side of level 0 (px).
    tiles : list of ndarray
        (H, W, 3) uint8 tiles; cropped to their common square size.
    seed : int
        Chooses the tissue pieces and the tile order.
    tissue : float, optional
        Share of the slide the tissue pieces cover (their areas summed; overlaps make
        it a little less); default: as drawn (about 40 %).
    """

    def __init__(self, size: int, tiles: list[np.ndarray], seed: int = 0,
                 tissue: float | None = None) -> None:  # fmt: skip
        cell = min(min(t.shape[:2]) for t in tiles)
        self.size, self.cell = int(size), cell
        self.tiles = [np.ascontiguousarray(t[:cell, :cell, :3]) for t in tiles]
        rng = np.random.default_rng(seed)
        n = 3
        self.centres = rng.uniform(0.3, 0.7, (n, 2)) * size
        self.radii = rng.uniform(0.18, 0.3, (n, 2)) * size
        if tissue is not None:
            if not 0 < tissue <= 1:
                raise ValueError(f"--tissue must be a share above 0 and at most 1, got {tissue}")
            drawn = np.pi * np.prod(self.radii, axis=1).sum() / size**2
            self.radii *= np.sqrt(tissue / drawn)

    def _cell(self, i: int, j: int) -> np.ndarray:
        tile = self.tiles[(i * 7 + j * 3) % len(self.tiles)]
        flip = (i + 2 * j) % 4
        return tile[:: 1 - 2 * (flip & 1), :: 1 - 2 * (flip >> 1)]

    def _tissue(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        yy = np.arange(y0, y1, dtype=np.float64)[:, None] + 0.5
        xx = np.arange(x0, x1, dtype=np.float64)[None, :] + 0.5
        mask = np.zeros((y1 - y0, x1 - x0), bool)
        for (cy, cx), (ry, rx) in zip(self.centres, self.radii, strict=True):
            mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        return mask

    def region(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels [y0:y1, x0:x1] of level 0 (outside the slide: background)."""
        out = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
        out[:] = BACKGROUND
        c = self.cell
        for i in range(y0 // c, (min(y1, self.size) - 1) // c + 1):
            for j in range(x0 // c, (min(x1, self.size) - 1) // c + 1):
                ty0, tx0 = max(y0, i * c), max(x0, j * c)
                ty1, tx1 = min(y1, (i + 1) * c, self.size), min(x1, (j + 1) * c, self.size)
                if ty1 > ty0 and tx1 > tx0:
                    src = self._cell(i, j)[ty0 - i * c : ty1 - i * c, tx0 - j * c : tx1 - j * c]
                    out[ty0 - y0 : ty1 - y0, tx0 - x0 : tx1 - x0] = src
        keep = self._tissue(y0, y1, x0, x1)
        out[~keep] = BACKGROUND
        return out


def downsample(arr: np.ndarray, factor: int, rows: int = 256) -> np.ndarray:
    """Area average over ``factor`` × ``factor`` blocks (edges padded with background).

    Done ``rows`` output rows at a time, so that a large level needs little more memory
    than its result.
    """
    ny, nx = -(-arr.shape[0] // factor), -(-arr.shape[1] // factor)
    out = np.empty((ny, nx, 3), np.uint8)
    for y in range(0, ny, rows):
        n = min(rows, ny - y)
        part = arr[y * factor : (y + n) * factor]
        pad = np.empty((n * factor, nx * factor, 3), np.uint8)
        pad[:] = BACKGROUND
        pad[: part.shape[0], : part.shape[1]] = part
        blocks = pad.reshape(n, factor, nx, factor, 3).astype(np.uint32)
        out[y : y + n] = (blocks.sum(axis=(1, 3)) + factor * factor // 2) // (factor * factor)
    return out


def _level0_tiles(mosaic: Mosaic, tile: int, factor: int, level1: np.ndarray) -> Iterator:
    """Level-0 tiles row by row; fills ``level1`` (the ×``factor`` level) on the way."""
    n = mosaic.size
    rows = -(-n // tile)
    for r in range(rows):
        strip = mosaic.region(r * tile, (r + 1) * tile, 0, rows * tile)
        small = downsample(strip, factor)
        y = r * tile // factor
        level1[y : y + small.shape[0]] = small[: level1.shape[0] - y, : level1.shape[1]]
        for c in range(rows):
            yield strip[:, c * tile : (c + 1) * tile]


def level_shapes(size: int, factor: int) -> list[int]:
    """Sides of the pyramid levels: divide by ``factor`` while at least MIN_LEVEL_SIDE."""
    sides = [size]
    while -(-sides[-1] // factor) >= MIN_LEVEL_SIDE:
        sides.append(-(-sides[-1] // factor))
    return sides


def _pyramid(level1: np.ndarray, count: int, factor: int) -> list[np.ndarray]:
    levels = [level1]
    while len(levels) < count:
        levels.append(downsample(levels[-1], factor))
    return levels


def _aperio(size: int, tile: int, quality: int, mpp: float | None, shape=None) -> str:
    head = f"Aperio Image Library v12.0.15 \r\n{size}x{size} [0,0 {size}x{size}]"
    if shape is not None:
        head += f" -> {shape[1]}x{shape[0]}"
    fields = f"({tile}x{tile}) JPEG/RGB Q={quality}|AppMag = 40"
    return f"{head} {fields}" + ("" if mpp is None else f"|MPP = {mpp:.4f}")


def _write_svs(tmp: Path, mosaic: Mosaic, tile: int, codec: dict, mpp: float | None) -> None:
    size, sides = mosaic.size, level_shapes(mosaic.size, 4)
    level1 = _sink(size, 4)
    tiles = _level0_tiles(mosaic, tile, 4, level1)
    q = codec.get("compressionargs", {}).get("level", 0)
    with tifffile.TiffWriter(tmp, bigtiff=size * size * 3 > 2**31) as tw:
        tw.write(tiles, shape=(size, size, 3), dtype=np.uint8, tile=(tile, tile),
                 photometric="rgb", description=_aperio(size, tile, q, mpp), metadata=None,
                 **codec)  # fmt: skip
        thumb = downsample(level1, max(1, level1.shape[0] // 256))
        tw.write(thumb, photometric="rgb", description=_aperio(size, tile, q, mpp, thumb.shape),
                 metadata=None, **codec)  # fmt: skip
        for lv in _pyramid(level1, len(sides) - 1, 4)[: len(sides) - 1]:
            tw.write(lv, tile=(tile, tile), photometric="rgb", metadata=None,
                     description=_aperio(size, tile, q, mpp, lv.shape), **codec)  # fmt: skip


def _sink(size: int, factor: int) -> np.ndarray:
    side = -(-size // factor)
    return np.empty((side, side, 3), np.uint8)


def _write_subifd_tiff(tmp: Path, mosaic: Mosaic, tile: int, codec: dict, mpp: float | None,
                       ome: bool) -> None:  # fmt: skip
    size, sides = mosaic.size, level_shapes(mosaic.size, 2)
    level1 = _sink(size, 2)
    tiles = _level0_tiles(mosaic, tile, 2, level1)
    res = (
        {}
        if mpp is None
        else {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    )
    physical = (
        {}
        if mpp is None
        else {
            "PhysicalSizeX": mpp,
            "PhysicalSizeXUnit": "µm",
            "PhysicalSizeY": mpp,
            "PhysicalSizeYUnit": "µm",
        }
    )
    meta = {"axes": "YXS", **physical} if ome else None
    with tifffile.TiffWriter(tmp, bigtiff=size * size * 3 > 2**31, ome=ome) as tw:
        tw.write(tiles, shape=(size, size, 3), dtype=np.uint8, tile=(tile, tile),
                 photometric="rgb", subifds=len(sides) - 1, metadata=meta, **res, **codec)  # fmt: skip
        for lv in _pyramid(level1, len(sides) - 1, 2):
            tw.write(lv, tile=(tile, tile), photometric="rgb", subfiletype=1, metadata=None,
                     **res, **codec)  # fmt: skip


def _write_zarr(dest: Path, mosaic: Mosaic, tile: int, mpp: float, overwrite: bool) -> Path:
    import zarr

    size, sides = mosaic.size, level_shapes(mosaic.size, 2)
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest}: already exists (pass --overwrite to replace it)")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", suffix=".part", dir=dest.parent))
    try:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        level1 = _sink(size, 2)
        arr0 = group.create_array("0", shape=(size, size, 3), dtype=np.uint8,
                                  chunks=(tile, tile, 3))  # fmt: skip
        rows = -(-size // tile)
        for k, t in enumerate(_level0_tiles(mosaic, tile, 2, level1)):
            r, c = divmod(k, rows)
            part = t[: size - r * tile, : size - c * tile]
            arr0[r * tile : r * tile + part.shape[0], c * tile : c * tile + part.shape[1]] = part
        for k, lv in enumerate(_pyramid(level1, len(sides) - 1, 2), start=1):
            group.create_array(str(k), data=lv, chunks=(tile, tile, 3))
        axes = [{"name": "y", "type": "space", "unit": "micrometer"},
                {"name": "x", "type": "space", "unit": "micrometer"},
                {"name": "c", "type": "channel"}]  # fmt: skip
        datasets = [{"path": str(k), "coordinateTransformations": [
            {"type": "scale", "scale": [mpp * 2**k, mpp * 2**k, 1.0]}]}
            for k in range(len(sides))]  # fmt: skip
        group.attrs["multiscales"] = [{"version": "0.4", "name": dest.stem, "axes": axes,
                                       "datasets": datasets}]  # fmt: skip
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def make_slide(
    out: str | os.PathLike,
    size: int,
    fmt: str = "svs",
    *,
    tiles: list[np.ndarray] | None = None,
    tile: int = 256,
    compression: str = "jpeg",
    quality: int = 85,
    mpp: float | None = 0.25,
    seed: int = 0,
    overwrite: bool = False,
    tissue: float | None = None,
) -> tuple[Path, Mosaic]:
    """Write a ``size`` × ``size`` pyramidal slide to ``out``; return it and its mosaic.

    ``compression`` is ``"jpeg"`` (``quality``) or ``"zlib"`` (lossless: every level
    equals the mosaic and its area averages exactly). ``mpp=None`` writes no pixel size
    (``svs`` and ``tiff`` only). ``tissue``: share of the slide covered by tissue
    (see :class:`Mosaic`).
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if size < 64 or tile % 16 or tile < 16:
        raise ValueError(
            f"--size must be at least 64 and --tile a multiple of 16 (got {size}, {tile})"
        )
    mosaic = Mosaic(size, tiles or training_tiles(), seed, tissue)
    dest = Path(out)
    if fmt == "ome-zarr":
        return _write_zarr(dest, mosaic, tile, mpp or 1.0, overwrite), mosaic
    codec = {"compression": compression}
    if compression == "jpeg":
        codec["compressionargs"] = {"level": quality}
    if fmt == "svs":
        write = lambda tmp: _write_svs(tmp, mosaic, tile, codec, mpp)  # noqa: E731
    else:
        write = lambda tmp: _write_subifd_tiff(tmp, mosaic, tile, codec, mpp,  # noqa: E731
                                               ome=fmt == "ome-tiff")  # fmt: skip
    return _atomic_write(dest, write, overwrite), mosaic


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, required=True, help="side of level 0 (px)")
    parser.add_argument("--out", required=True, help="output file (.svs, .ome.tif, .tif, .zarr)")
    parser.add_argument("--format", choices=FORMATS, default="svs")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--compression", choices=("jpeg", "zlib"), default="jpeg")
    parser.add_argument("--quality", type=int, default=85)
    parser.add_argument("--mpp", type=float, default=0.25, help="µm/px of level 0")
    parser.add_argument("--tiles", type=Path, default=DEFAULT_TILES,
                        help="MoNuSeg folder (index.csv, images/); training split only")  # fmt: skip
    parser.add_argument("--tissue", type=float, default=None, metavar="SHARE",
                        help="share of the slide covered by tissue (default: about 0.4)")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        path, _ = make_slide(args.out, args.size, args.format, tiles=training_tiles(args.tiles),
                             tile=args.tile, compression=args.compression,
                             quality=args.quality, mpp=args.mpp, overwrite=args.overwrite,
                             tissue=args.tissue)  # fmt: skip
    except (ValueError, OSError) as exc:
        print(f"make_test_slide: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"path": str(path), "size": args.size, "format": args.format}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
