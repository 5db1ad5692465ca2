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
    offset : (int, int) or None
        (row, col) of the labels' top-left pixel in the slide's level-0 pixels; default:
        what the input says (GeoJSON: the features' corner, OME-Zarr: its translation,
        TIFF: 0, 0).
    object_type : str or None
        QuPath object type of every feature written to GeoJSON (``detection`` or
        ``annotation``); default: each nucleus keeps its own (new ones: detection).
    object_types : tuple of str or None
        Object types imported from GeoJSON (default: detections and cells when the
        file has any, else all).
    strict : bool
        Refuse a GeoJSON file with any bad feature (else skip those and report them).
    """

    shape: tuple[int, int] | None = None
    offset: tuple[int, int] | None = None
    object_type: str | None = None
    object_types: tuple[str, ...] | None = None
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
    offset : (int, int)
        (row, col) of ``labels[0, 0]`` in the slide's level-0 pixels.
    pixel_size : float or None
        µm per pixel when the input says.
    """

    labels: np.ndarray
    table: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    offset: tuple[int, int] = (0, 0)
    pixel_size: float | None = None


Reader = Callable[[Path, ConvertOptions], Labels]
Writer = Callable[[Path, Labels, ConvertOptions, bool], None]


def _read_tiff(path: Path, opts: ConvertOptions) -> Labels:
    from ._io import read_labels

    return Labels(read_labels(path), offset=tuple(opts.offset or (0, 0)))


def _write_tiff(path: Path, lab: Labels, opts: ConvertOptions, overwrite: bool) -> None:
    from ._io import write_tiff

    write_tiff(path, np.asarray(lab.labels), overwrite=overwrite)


def _read_geojson(path: Path, opts: ConvertOptions) -> Labels:
    from .geojson import read_geojson

    res = read_geojson(path, opts.shape, offset=opts.offset, strict=opts.strict,
                       object_types=opts.object_types)  # fmt: skip
    if res.labels.size == 0:
        raise InputError(f"{path}: no nucleus to rasterise (give --shape for an empty image)")
    return Labels(res.labels, res.table, res.problems, res.offset)


def _per_row_types(rows: dict, opts: ConvertOptions) -> dict | None:
    """Label -> object type: each row's own (cells and tiles as detections), unless forced."""
    if opts.object_type is not None:
        return None
    return {k: "annotation" if r.get("objectType") == "annotation" else "detection"
            for k, r in rows.items()}  # fmt: skip


def _per_row_models(rows: dict) -> dict:
    return {k: {"name": r["model"], "version": r.get("model_version")}
            for k, r in rows.items() if r.get("model")}  # fmt: skip


def _write_geojson(path: Path, lab: Labels, opts: ConvertOptions, overwrite: bool) -> None:
    from .geojson import write_geojson

    rows = {int(r["id"]): r for r in lab.table}
    names = {int(r["type"]): (r["name"], r.get("color")) for r in lab.table if r.get("type")}
    write_geojson(
        path,
        lab.labels,
        overwrite=overwrite,
        offset=lab.offset,
        object_type=opts.object_type or "detection",
        object_types=_per_row_types(rows, opts),
        models=_per_row_models(rows) or None,
        status={k: r["status"] for k, r in rows.items() if r.get("status")},
        types={k: r["type"] for k, r in rows.items() if r.get("type")},
        type_names=names or None,
        measurements={k: r["measurements"] for k, r in rows.items() if r.get("measurements")},
        ids={k: r["uuid"] for k, r in rows.items() if r.get("uuid")},
    )


def _read_zarr(path: Path, opts: ConvertOptions) -> Labels:
    from .omezarr import read_labels_zarr_table

    z = read_labels_zarr_table(path)
    offset = z.offset if opts.offset is None else tuple(opts.offset)
    return Labels(z.labels, z.table, offset=offset, pixel_size=z.pixel_size)


def _zarr_properties(table: list[dict]) -> dict:
    """Label -> flat properties: the row's known keys and its measurements."""
    keep = ("status", "uuid", "name", "type", "objectType", "model", "model_version")
    out = {}
    for r in table:
        props = {k: r[k] for k in keep if r.get(k) not in (None, "", 0)}
        props.update({k: v for k, v in (r.get("measurements") or {}).items() if k not in keep})
        out[int(r["id"])] = props
    return out


def _write_zarr(path: Path, lab: Labels, opts: ConvertOptions, overwrite: bool) -> None:
    from .omezarr import write_labels_zarr

    props = _zarr_properties(lab.table)
    write_labels_zarr(path, np.asarray(lab.labels), properties=props or None,
                      overwrite=overwrite, offset=lab.offset,
                      pixel_size=lab.pixel_size)  # fmt: skip


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


def _types_arg(text: str) -> tuple[str, ...]:
    """argparse type of ``--object-types``: comma-separated QuPath object types."""
    from .geojson import OBJECT_TYPES

    kinds = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in kinds if t not in OBJECT_TYPES]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(
            f"--object-types: expected some of {','.join(OBJECT_TYPES)}, got {text!r}"
        )
    return kinds


def add_parser(sub) -> None:
    """Register the ``convert`` subcommand."""
    p = sub.add_parser(
        "convert", help="convert labels between TIFF and QuPath GeoJSON (by file suffix)"
    )
    p.add_argument("input", help="labels: .tif/.tiff, .geojson/.json or .zarr (OME-Zarr, or "
                   "a segment-slide result: to .geojson, chunk by chunk)")  # fmt: skip
    p.add_argument("output", help="labels to write: .tif/.tiff, .geojson/.json or .zarr")
    p.add_argument("--shape", type=_pair_arg("--shape", True), default=None, metavar="HxW",
                   help="size of the label image made from GeoJSON (default: the "
                   "features' extent)")  # fmt: skip
    p.add_argument("--like", default=None, metavar="IMAGE",
                   help="take the size of the label image from this image")  # fmt: skip
    p.add_argument("--offset", type=_pair_arg("--offset", False), default=None,
                   metavar="ROW,COL", help="slide position of the labels' top-left pixel "
                   "(level 0); default: the input's (GeoJSON: the features' corner, "
                   "OME-Zarr: its translation, TIFF: 0,0)")  # fmt: skip
    p.add_argument("--object-type", choices=["detection", "annotation"], default=None,
                   help="QuPath object type of every exported nucleus (default: each keeps "
                   "its own; new ones are detections)")  # fmt: skip
    p.add_argument("--object-types", type=_types_arg, default=None, metavar="TYPES",
                   help="GeoJSON object types to import, comma-separated, of "
                   "annotation,detection,cell,tile (default: detections and cells when the "
                   "file has any, else all)")  # fmt: skip
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


def _run_slide(args) -> int:
    """``convert STORE.zarr OUT.geojson`` for a ``segment-slide`` result: chunk by chunk."""
    from .slide_export import export_geojson

    if Path(args.output).suffix.lower() not in (".geojson", ".json"):
        raise InputError(f"{args.input}: a whole-slide result converts to GeoJSON only "
                         "(.geojson); it is too large for one TIFF or label image")  # fmt: skip
    for flag, value in (("--shape", args.shape), ("--like", args.like), ("--offset", args.offset),
                        ("--object-types", args.object_types)):  # fmt: skip
        if value is not None:
            raise InputError(f"{flag} does not apply to a whole-slide result")
    n = export_geojson(args.input, args.output, object_type=args.object_type or "detection",
                       overwrite=args.overwrite)  # fmt: skip
    print(f"{args.output}: {n} nuclei written (QuPath GeoJSON, slide level-0 pixels)")
    return 0


def run(args) -> int:
    """Run ``napari-medinst convert`` (errors are reported by ``cli.main``)."""
    from .slide_export import is_slide_store

    if is_slide_store(args.input):
        return _run_slide(args)
    opts = ConvertOptions(
        shape=_shape_from(args),
        offset=None if args.offset is None else tuple(args.offset),
        object_type=args.object_type,
        object_types=args.object_types,
        strict=not args.skip_bad,
    )
    lab = convert(args.input, args.output, opts, overwrite=args.overwrite)
    for line in lab.problems:
        print(f"warning: {line}", file=sys.stderr)
    n = int(np.count_nonzero(np.unique(lab.labels)))
    where = ""
    if any(lab.offset):
        row, col = lab.offset
        where = f", offset {row},{col}"
        if Path(args.output).suffix.lower() in (".tif", ".tiff"):
            where += f"; a TIFF has no offset: pass --offset {row},{col} when converting it back"
    print(f"{args.output}: {n} nuclei written ({lab.labels.shape[0]}x{lab.labels.shape[1]} px"
          f"{where})")  # fmt: skip
    return 0
