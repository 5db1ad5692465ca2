"""``napari-medinst convert IN OUT``: label images between TIFF and QuPath GeoJSON.

The formats are chosen by the files' suffixes through two tables, :data:`READERS` and
:data:`WRITERS`, so that another format (e.g. OME-Zarr, ``.zarr``) is added by
registering one reader and one writer, without touching the command.

A reader is ``read(path, opts) -> Labels``; a writer is
``write(path, labels: Labels, opts, overwrite: bool) -> None`` and must write atomically
(never a half-written file, never an existing file unless ``overwrite``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._io import InputError

__all__ = ["READERS", "WRITERS", "ConvertOptions", "Labels", "add_parser", "convert", "run"]


@dataclass
class ConvertOptions:
    """What the command line says about the conversion.

    Attributes
    ----------
    shape : (int, int) or None
        Size of the label image made from GeoJSON (default: the features' extent).
    offset : (int, int)
        (row, col) of the labels' top-left pixel in the slide's level-0 pixels.
    object_type : str
        QuPath object type written to GeoJSON: ``detection`` or ``annotation``.
    strict : bool
        Refuse a GeoJSON file with any bad feature (else skip those and report them).
    """

    shape: tuple[int, int] | None = None
    offset: tuple[int, int] = (0, 0)
    object_type: str = "detection"
    strict: bool = True


@dataclass
class Labels:
    """A label image and what is known about its nuclei.

    Attributes
    ----------
    labels : ndarray
        2-D instance labels.
    table : list of dict
        One row per nucleus (``id``, ``uuid``, ``status``, ``type``, ``name``, ...), as
        :class:`napari_medinst.geojson.ImportResult` gives; may be empty.
    problems : list of str
        Features skipped or changed while reading.
    """

    labels: np.ndarray
    table: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


Reader = Callable[[Path, ConvertOptions], Labels]
Writer = Callable[[Path, Labels, ConvertOptions, bool], None]


def _read_tiff(path: Path, opts: ConvertOptions) -> Labels:
    from ._io import read_labels

    return Labels(read_labels(path))


def _write_tiff(path: Path, lab: Labels, opts: ConvertOptions, overwrite: bool) -> None:
    from ._io import write_tiff

    write_tiff(path, np.asarray(lab.labels), overwrite=overwrite)


def _read_geojson(path: Path, opts: ConvertOptions) -> Labels:
    from .geojson import read_geojson

    res = read_geojson(path, opts.shape, offset=opts.offset, strict=opts.strict)
    if res.labels.size == 0:
        raise InputError(f"{path}: no nucleus to rasterise (give --shape for an empty image)")
    return Labels(res.labels, res.table, res.problems)


def _write_geojson(path: Path, lab: Labels, opts: ConvertOptions, overwrite: bool) -> None:
    from .geojson import write_geojson

    rows = {int(r["id"]): r for r in lab.table}
    names = {int(r["type"]): (r["name"], r.get("color")) for r in lab.table if r.get("type")}
    write_geojson(
        path,
        lab.labels,
        overwrite=overwrite,
        offset=opts.offset,
        object_type=opts.object_type,
        status={k: r["status"] for k, r in rows.items() if r.get("status")},
        types={k: r["type"] for k, r in rows.items() if r.get("type")},
        type_names=names or None,
        measurements={k: r["measurements"] for k, r in rows.items() if r.get("measurements")},
        ids={k: r["uuid"] for k, r in rows.items() if r.get("uuid")},
    )


def _read_zarr(path: Path, opts: ConvertOptions) -> Labels:
    from .omezarr import read_labels_zarr

    return Labels(read_labels_zarr(path))


def _write_zarr(path: Path, lab: Labels, opts: ConvertOptions, overwrite: bool) -> None:
    from .omezarr import write_labels_zarr

    keep = ("status", "uuid", "name")
    props = {int(r["id"]): {k: r[k] for k in keep if r.get(k)} for r in lab.table}
    write_labels_zarr(path, np.asarray(lab.labels), properties=props or None, overwrite=overwrite)


#: Label readers by lower-case file suffix.
READERS: dict[str, Reader] = {
    ".tif": _read_tiff,
    ".tiff": _read_tiff,
    ".geojson": _read_geojson,
    ".json": _read_geojson,
    ".zarr": _read_zarr,
}
#: Label writers by lower-case file suffix.
WRITERS: dict[str, Writer] = {
    ".tif": _write_tiff,
    ".tiff": _write_tiff,
    ".geojson": _write_geojson,
    ".json": _write_geojson,
    ".zarr": _write_zarr,
}


def _pick(path: Path, table: dict, what: str):
    suffix = path.suffix.lower()
    if suffix not in table:
        raise InputError(
            f"{path}: cannot {what} {suffix or '(no suffix)'!r} files; "
            f"expected one of {', '.join(sorted(table))}"
        )
    return table[suffix]


def convert(src: str | Path, dst: str | Path, opts: ConvertOptions | None = None, *,
            overwrite: bool = False) -> Labels:  # fmt: skip
    """Convert the label image ``src`` into ``dst`` (formats by suffix).

    Returns
    -------
    Labels
        What was read (its ``problems`` list what was skipped or clipped).

    Raises
    ------
    InputError
        Unknown suffix, unreadable input, or a bad feature (with ``opts.strict``).
    FileExistsError
        ``dst`` exists and ``overwrite`` is False (checked before reading).
    """
    src, dst, opts = Path(src), Path(dst), opts or ConvertOptions()
    read, write = _pick(src, READERS, "read"), _pick(dst, WRITERS, "write")
    if src.resolve() == dst.resolve():
        raise InputError(f"{dst}: is the input file; choose another output")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst}: already exists (use --overwrite to replace)")
    lab = read(src, opts)
    write(dst, lab, opts, overwrite)
    return lab


def _pair_arg(name: str, positive: bool):
    """argparse type of a ``A,B`` (or ``AxB``) pair of integers."""

    def parse(text: str) -> tuple[int, int]:
        parts = text.lower().replace("x", ",").split(",")
        try:
            a, b = (int(p) for p in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{name}: expected two integers, got {text!r}"
            ) from None
        if (a < 1 or b < 1) if positive else (a < 0 or b < 0):
            raise argparse.ArgumentTypeError(f"{name}: values out of range in {text!r}")
        return a, b

    return parse


def add_parser(sub) -> None:
    """Register the ``convert`` subcommand."""
    p = sub.add_parser(
        "convert", help="convert labels between TIFF and QuPath GeoJSON (by file suffix)"
    )
    p.add_argument("input", help="labels: .tif/.tiff, .geojson/.json or .zarr (OME-Zarr)")
    p.add_argument("output", help="labels to write: .tif/.tiff, .geojson/.json or .zarr")
    p.add_argument("--shape", type=_pair_arg("--shape", True), default=None, metavar="HxW",
                   help="size of the label image made from GeoJSON (default: the "
                   "features' extent)")  # fmt: skip
    p.add_argument("--like", default=None, metavar="IMAGE",
                   help="take the size of the label image from this image")  # fmt: skip
    p.add_argument("--offset", type=_pair_arg("--offset", False), default=(0, 0),
                   metavar="ROW,COL", help="slide position of the labels' top-left pixel "
                   "(level 0); default 0,0")  # fmt: skip
    p.add_argument("--object-type", choices=["detection", "annotation"], default="detection",
                   help="QuPath object type of the exported nuclei (default detection)")  # fmt: skip
    p.add_argument("--skip-bad", action="store_true",
                   help="import the valid features of a GeoJSON file and list the bad ones "
                   "(default: refuse the file)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")


def _shape_from(args) -> tuple[int, int] | None:
    if args.like is None:
        return args.shape
    from ._io import read_image_info

    info = read_image_info(args.like)
    shape = tuple(info.shape[info.axes.index(a)] for a in "YX")
    if args.shape is not None and tuple(args.shape) != shape:
        raise InputError(f"--like {args.like}: size {shape} differs from --shape {args.shape}")
    return shape


def run(args) -> int:
    """Run ``napari-medinst convert`` (errors are reported by ``cli.main``)."""
    opts = ConvertOptions(
        shape=_shape_from(args),
        offset=tuple(args.offset),
        object_type=args.object_type,
        strict=not args.skip_bad,
    )
    lab = convert(args.input, args.output, opts, overwrite=args.overwrite)
    for line in lab.problems:
        print(f"warning: {line}", file=sys.stderr)
    n = int(np.count_nonzero(np.unique(lab.labels)))
    print(f"{args.output}: {n} nuclei written ({lab.labels.shape[0]}x{lab.labels.shape[1]} px)")
    return 0
