"""Command line: ``napari-medinst segment | segment-slide | convert | evaluate | train | demo``.

Every subcommand answers bad input with one line on stderr naming the file and the
problem, exits with status 2, and leaves no partial output behind.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

__all__ = ["main"]


def number_arg(convert, accept, expected: str):
    """An argparse ``type``: ``convert(text)`` when ``accept`` says yes, else exit 2 with
    "expected <expected>, got '<text>'" (one line naming the option, by argparse)."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


#: ``--channel``: a channel number, 0 or more.
_channel_arg = number_arg(int, lambda v: v >= 0, "a channel number 0, 1, 2, ...")
#: ``--block-size``: 0 (never) or at least 16 px.
_block_size_arg = number_arg(int, lambda v: v == 0 or v >= 16, "0 (off) or a block size >= 16 px")


def _uses_blocks(shape, block_size: int | None) -> int:
    """Block size (px) for a plane of ``shape``, 0 for the whole-image path."""
    from .blockwise import AUTO_BLOCK_PIXELS, DEFAULT_BLOCK

    if block_size is not None:
        return block_size
    return DEFAULT_BLOCK if shape[0] * shape[1] > AUTO_BLOCK_PIXELS else 0


def _check_block_maps(path: Path, planes, args) -> None:
    """Refuse ``--save-maps`` for planes segmented in blocks, before any work."""
    from ._io import InputError

    if args.save_maps and any(_uses_blocks(p.shape, args.block_size) for _, p in planes):
        raise InputError(
            f"{path}: --save-maps is not available when segmenting in blocks (images above "
            "16 Mpx, or --block-size): the full-size maps need 16 bytes a pixel; add "
            "--block-size 0 to segment it whole, or crop a region"
        )


def _segment_plane(plane, model, *, block_size: int | None, **kwargs):
    """:func:`~.segment.segment`, or the block engine for big planes.

    The block path's result is given the attributes ``run_segment`` reads of a
    :class:`~.segment.Segmentation` (``labels``, ``scores``, ``result.n_instances``,
    ``maps.modality``, ``maps.pixel_size``, ``maps.pixel_size_estimated``).
    """
    from types import SimpleNamespace

    from .blockwise import segment_blockwise
    from .segment import segment

    block = _uses_blocks(plane.shape, block_size)
    if not block:
        return segment(plane, model, **kwargs)
    res = segment_blockwise(plane, model, block=block, **kwargs)
    return SimpleNamespace(labels=res.labels, scores=res.scores, result=res, maps=res)


_MODALITY_HELP = "he (H&E) or fluorescence (default: detected, colour images are H&E)"
_DEVICE_HELP = "auto, cpu, cuda or mps (default: auto, a GPU when there is one)"


def _add_segment(sub) -> None:
    p = sub.add_parser("segment", help="segment nuclei in images, write <stem>_instances.tif")
    p.add_argument("images", nargs="+", help="TIFF, PNG or JPEG images")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--model", default="default", help="'default', 'classical' or a model folder")
    p.add_argument(
        "--format",
        type=_formats_arg,
        default=("tif", "csv"),
        metavar="LIST",
        help="outputs, comma-separated: tif (<stem>_instances.tif), csv (<stem>_instances.csv), "
        "geojson (<stem>.geojson, QuPath), ome-zarr (<stem>_instances.ome.zarr), "
        "measurements (<stem>_measurements.csv: area, shape, intensity, score per nucleus); "
        "default tif,csv",
    )
    p.add_argument(
        "--pixel-size",
        type=float,
        default=None,
        help="µm per pixel, 0.05-5 (default: estimate)",
    )
    p.add_argument("--modality", choices=["he", "fluorescence"], default=None, help=_MODALITY_HELP)
    p.add_argument(
        "--channel",
        type=_channel_arg,
        default=None,
        metavar="N",
        help="nuclear channel (0-based) of a multi-channel image (default: none; needed "
        "when a fluorescence image has several channels)",
    )
    p.add_argument(
        "--channel-axis",
        type=int,
        default=None,
        metavar="AXIS",
        help="axis holding the channels (default: from the file's metadata, else the last "
        "axis when it has at most 16 entries)",
    )
    p.add_argument("--device", default="auto", help=_DEVICE_HELP)
    p.add_argument(
        "--params",
        default=None,
        help="post-processing parameters JSON file (default: the model's own for the modality)",
    )
    add_tta_args(p)
    p.add_argument(
        "--save-maps", action="store_true", help="also write probability, HV and contour maps"
    )
    p.add_argument(
        "--block-size",
        type=_block_size_arg,
        default=None,
        metavar="PX",
        help="segment in blocks of PX px, memory bounded (default: blocks of 1024 px for "
        "images above 16 Mpx; 0: never)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train or fine-tune a model on image/label folders")
    p.add_argument(
        "data", nargs="+", help="data folders (images/ + labels/), optionally PATH@UM_PER_PX"
    )
    p.add_argument("--out", required=True, help="output folder (checkpoint + model/)")
    p.add_argument(
        "--init",
        default=None,
        help="start from this model, name or folder (default: random weights)",
    )
    p.add_argument("--epochs", type=int, default=40, help="training epochs (default: 40)")
    p.add_argument(
        "--steps-per-epoch", type=int, default=100, help="batches per epoch (default: 100)"
    )
    p.add_argument("--batch-size", type=int, default=8, help="crops per batch (default: 8)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default: 0.002)")
    p.add_argument(
        "--widths",
        type=int,
        nargs="+",
        default=None,
        help="network channels per level (default 16 32 64 96 128)",
    )
    p.add_argument(
        "--blocks",
        type=int,
        nargs="+",
        default=None,
        help="residual blocks per level below full resolution (default one each)",
    )
    p.add_argument(
        "--he-fraction",
        type=float,
        default=0.65,
        help="share of H&E crops per batch when both modalities are present (default 0.65)",
    )
    p.add_argument(
        "--type-names",
        nargs="+",
        default=None,
        metavar="NAME",
        help="names of nucleus classes 1, 2, ... in the data folders' types/ maps: adds a "
        "type head (default: none, or the --init model's kept)",
    )
    p.add_argument(
        "--type-head-only",
        action="store_true",
        help="train only the --init model's type head on the typed images; its segmentation "
        "stays exactly as it is and checkpoints are chosen by validation mPQ",
    )
    p.add_argument(
        "--type-context",
        type=int,
        default=None,
        metavar="C",
        help="give the type head a branch of C channels that reads the network at 1/4 "
        "resolution (0: none; default: the --init model's)",
    )
    p.add_argument(
        "--type-balance",
        type=float,
        default=0.0,
        metavar="B",
        help="weigh each nucleus class by its pixel share to the power -B in the type loss "
        "(0: alike, the default; 0.5: inverse square root; at most 1)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="random seed of crops and weights (default: 0)"
    )
    p.add_argument("--device", default="auto", help=_DEVICE_HELP)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    p.add_argument(
        "--name",
        default=None,
        help="model name stored in its config (default: the output folder's name)",
    )


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo", help="segment the bundled sample; open napari or render a screenshot"
    )
    p.add_argument("-o", "--out", default="out/demo", help="output folder (default: out/demo)")
    p.add_argument(
        "--model",
        default="default",
        help="'default', 'classical' or a model folder (default: default)",
    )
    p.add_argument(
        "--sample",
        choices=["he", "fluorescence"],
        default="he",
        help="bundled sample image to segment (default: he)",
    )
    p.add_argument(
        "--gui",
        choices=["auto", "open", "screenshot", "none"],
        default="auto",
        help="open napari (needs a display), render a screenshot, or neither (default: "
        "auto, napari when a display is available, else neither)",
    )


class _VersionAction(argparse.Action):
    """``--version``: print the release and the bundled model's name and hash, exit 0."""

    def __init__(
        self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None
    ):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from . import version_text

        print(version_text())
        parser.exit()


def _add_evaluate(sub) -> None:
    """The ``evaluate`` subcommand (defined here: importing the metrics is not free)."""
    p = sub.add_parser(
        "evaluate",
        help="score predicted label images against ground truth",
        description=(
            "Score predicted instance label images against ground truth: accuracy, "
            "precision, recall, F1 and AP at IoU 0.50-0.95, mAP, PQ, AJI, AJI+ and Dice. "
            "Files in folders are paired by name; a trailing '_instances' on a "
            "prediction name is ignored."
        ),
    )
    p.add_argument("--pred", required=True, type=Path, help="prediction label image or folder")
    p.add_argument("--gt", required=True, type=Path, help="ground-truth label image or folder")
    p.add_argument("--json", action="store_true", help="print all results as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="napari-medinst", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--version",
        action=_VersionAction,
        help="show the version, the bundled model's name and its weights' sha256, and exit",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_segment(sub)
    from .slide_cli import add_parser as add_segment_slide

    add_segment_slide(sub)
    _add_evaluate(sub)
    _add_train(sub)
    _add_demo(sub)
    from .convert import add_parser as add_convert

    add_convert(sub)
    _finish_help(parser, sub)
    return parser


class _PlainHelpFormatter(argparse.HelpFormatter):
    """Help as plain text: reStructuredText roles and backticks from docstrings removed."""

    @staticmethod
    def _plain(text: str) -> str:
        return re.sub(r":[\w:]+:`([^`]*)`", r"\1", text).replace("`", "")

    def _format_text(self, text: str) -> str:
        return super()._format_text(self._plain(text))

    def _expand_help(self, action) -> str:
        return self._plain(super()._expand_help(action))


def _finish_help(parser: argparse.ArgumentParser, sub) -> None:
    """Every subcommand gets a description and every option with a default says it.

    Subcommands added by other modules keep their own texts; a missing description is
    the one-line help of the subcommand list, and an option whose help does not mention
    its default gets ``(default: ...)`` appended.
    """
    parser.formatter_class = _PlainHelpFormatter
    helps = {a.dest: a.help for a in sub._choices_actions}
    for name, sp in sub.choices.items():
        sp.formatter_class = _PlainHelpFormatter
        if not sp.description and helps.get(name):
            text = helps[name]
            sp.description = text[0].upper() + text[1:] + ("" if text.endswith(".") else ".")
        for action in sp._actions:
            if action.help is None and action.dest == "modality":
                action.help = _MODALITY_HELP
            shown = action.default not in (None, False, argparse.SUPPRESS)
            says = re.search(r"\bdefault[:;\s)]", action.help or "")
            if action.option_strings and action.help and shown and not says:
                action.help += " (default: %(default)s)"


def _planes(
    arr,
    info=None,
    channel: int | None = None,
    channel_axis: int | None = None,
    notes: list[str] | None = None,
):
    """Yield (index, image) to segment: (H, W) or colour (H, W, 3/4) per plane.

    A note about how an ambiguous shape was read is appended to ``notes`` (printed by
    the caller once every input has passed its checks, so an error stays one line).

    Axes come from ``info`` (the file's metadata) or the shape rule of
    :mod:`napari_medinst.channels`; ``channel`` picks the nuclear channel and
    ``channel_axis`` overrides which axis holds the channels.
    """
    from ._io import guess_axes
    from .channels import iter_planes, plan_layout

    known = info is not None and info.axes_from_metadata and info.shape == arr.shape
    axes = info.axes if known else guess_axes(arr.shape)
    layout = plan_layout(
        arr.shape, arr.dtype, axes, from_metadata=known, channel=channel, channel_axis=channel_axis
    )
    if layout.axes == "ZYX" and not known and arr.shape[0] <= 16 and notes is not None:
        notes.append(
            f"note: shape {arr.shape} is segmented as {arr.shape[0]} grey planes; if its first "
            "axis holds channels, pick the nuclear one with --channel N (colour images: save "
            "them channel-last (H, W, 3), or pass --channel-axis 0)"
        )
    yield from iter_planes(arr, layout)


#: Output name of each ``segment --format`` word (``{stem}`` is the image's stem).
SEGMENT_FORMATS = {
    "tif": ("instances", "{stem}_instances.tif"),
    "csv": ("scores", "{stem}_instances.csv"),
    "geojson": ("geojson", "{stem}.geojson"),
    "ome-zarr": ("ome-zarr", "{stem}_instances.ome.zarr"),
    "measurements": ("measurements", "{stem}_measurements.csv"),
}


def add_tta_args(p) -> None:
    """``--tta [N]`` (mirror passes averaged: 1, 2 or 4) and ``--no-tta`` (= ``--tta 1``)."""
    from .model.tta import DEFAULT_TTA

    p.add_argument(
        "--tta",
        type=int,
        nargs="?",
        const=4,
        choices=(1, 2, 4),
        default=DEFAULT_TTA,
        metavar="N",
        help="average the model over N mirror images: 1 (none), 2 (the image and its half "
        f"turn) or 4 (all mirrors; --tta alone) (default: {DEFAULT_TTA}); the model's time "
        "grows with N",
    )
    p.add_argument(
        "--no-tta", dest="tta", action="store_const", const=1, help="the same as --tta 1"
    )


def _score_rows(seg, offset: int, rows: list[str]) -> list[str]:
    """``label,score`` rows of one plane (``,type`` too when the model gives types; the
    header in ``rows[0]`` is widened on the first typed plane)."""
    types = seg.result.types
    if types is None:
        return [f"{offset + i + 1},{s:.5f}" for i, s in enumerate(seg.scores)]
    rows[0] = "label,score,type"
    return [
        f"{offset + i + 1},{s:.5f},{int(t)}"
        for i, (s, t) in enumerate(zip(seg.scores, types, strict=True))
    ]


def _formats_arg(text: str) -> tuple[str, ...]:
    """argparse type of ``--format``: known words, comma-separated (else exit 2)."""
    words = tuple(dict.fromkeys(w.strip().lower() for w in text.split(",") if w.strip()))
    bad = [w for w in words if w not in SEGMENT_FORMATS]
    if bad or not words:
        raise argparse.ArgumentTypeError(
            f"expected some of {', '.join(SEGMENT_FORMATS)} (comma-separated), got {text!r}"
        )
    return words


def _outputs_for(out: Path, stem: str, save_maps: bool, formats=("tif", "csv")) -> dict[str, Path]:
    names = {SEGMENT_FORMATS[f][0]: SEGMENT_FORMATS[f][1].format(stem=stem) for f in formats}
    if save_maps:
        names |= {
            "prob": f"{stem}_prob.tif",
            "hv": f"{stem}_hv.tif",
            "contour": f"{stem}_contour.tif",
        }
    return {k: out / v for k, v in names.items()}


def _estimate_bytes(plane_pixels: int, save_maps: bool) -> int:
    """A low estimate of the outputs' size on disk (labels compress well, maps do not)."""
    return plane_pixels // 32 + (4 * plane_pixels if save_maps else 0)


def _write_outputs(
    targets: dict[str, Path], labels, rows: list[str], maps, overwrite: bool, extra=()
):
    """Write one image's outputs as one unit (all or nothing), the instances TIFF last.

    A complete ``_instances.tif`` therefore means that the CSV (and maps) beside it are
    from the same run.
    """
    import numpy as np

    from ._io import bytes_writer, tiff_writer, write_group

    items = list(extra)  # e.g. the GeoJSON (see _geojson_item)
    if "scores" in targets:
        items.insert(0, (targets["scores"], bytes_writer(("\n".join(rows) + "\n").encode())))
    for attr in ("prob", "hv", "contour"):
        if attr in targets:
            arrs = [getattr(m.maps, attr).astype(np.float32) for m in maps]
            items.append(
                (targets[attr], tiff_writer(arrs[0] if len(arrs) == 1 else np.stack(arrs)))
            )
    if "instances" in targets:
        items.append((targets["instances"], tiff_writer(labels)))
    write_group(items, overwrite=overwrite)


def _check_formats(path: Path, planes, formats) -> None:
    """Refuse, before any work, an output format that cannot hold this image's result."""
    from ._io import InputError

    for word in formats:
        key = SEGMENT_FORMATS[word][0]
        if key in ("instances", "scores"):
            continue
        if key not in SEGMENT_WRITERS and key != "ome-zarr":
            raise InputError(f"--format {word}: this output is not available in this version")
        if key in ("geojson", "ome-zarr", "measurements") and len(planes) > 1:
            raise InputError(
                f"{path}: --format {word} needs a 2-D image, this one has {len(planes)} "
                "planes; segment the planes as separate images"
            )
        if key == "ome-zarr":
            from .omezarr import _zarr

            _zarr()  # zarr missing: say so before any work


def _write_with_zarr(targets: dict[str, Path], stack, pixel_size, write_rest, overwrite) -> None:
    """Write the OME-Zarr labels, then the other outputs, all or nothing.

    The labels are written under a temporary name beside ``dest`` first (an existing
    ``dest`` must be a store this package may replace, and is kept), then the other
    outputs; only when those succeeded is the new store renamed into place. On failure
    the temporary store is removed and ``dest`` is as before. ``pixel_size`` is None
    when it was estimated (scales in pixels).
    """
    import shutil

    from .omezarr import _place_folder, _staging, _target, write_labels_zarr

    dest = targets.get("ome-zarr")
    if dest is None:
        write_rest()
        return
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest}: already exists (use --overwrite to replace)")
    final, inside = _target(dest)
    if inside:  # labels into an existing image: the label image itself is placed atomically
        write_labels_zarr(dest, stack, pixel_size=pixel_size, overwrite=overwrite)
        write_rest()
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    stage = _staging(dest)
    try:
        write_labels_zarr(stage / "store", stack, pixel_size=pixel_size)
        write_rest()
        _place_folder(stage / "store", final, overwrite)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _measure(labels, rows: list[str], seg, image, model=None) -> tuple[dict, dict]:
    """(scores by id, measurement columns) of one plane's nuclei; pixels when the pixel
    size was estimated, µm when it was given or read from the file."""
    import numpy as np

    from .measure import measure_nuclei

    scores = {int(r.split(",")[0]): float(r.split(",")[1]) for r in rows[1:]}
    img = image if image.ndim == 2 or image.shape[-1] <= 4 else None
    px = None if seg.maps.pixel_size_estimated else seg.maps.pixel_size  # estimated: pixels
    cols = measure_nuclei(labels, img, pixel_size=px, scores=scores)
    types = _types_by_id(rows)
    if types:
        names = getattr(model, "type_classes", None) or {}
        ids = np.asarray(cols["label"], np.int64)
        cols["type"] = np.array([types.get(int(i), 0) for i in ids], np.int64)
        cols["type_name"] = np.array([names.get(types.get(int(i), 0), ("",))[0] for i in ids])
    return scores, cols


def _types_by_id(rows: list[str]) -> dict[int, int]:
    """label -> class from ``label,score,type`` rows (empty without a type column)."""
    if not rows or rows[0] != "label,score,type":
        return {}
    return {int(r.split(",")[0]): int(r.split(",")[2]) for r in rows[1:]}


def _measurements_item(target: Path, labels, measured, model, seg):
    """(path, writer) of the per-nucleus measurements table (CSV)."""
    from .measure import table_writer

    return target, table_writer(target, measured()[1])


def _geojson_item(target: Path, labels, measured, model, seg):
    """(path, writer) of the QuPath GeoJSON of one plane's nuclei (status: predicted)."""
    from . import __version__
    from .geojson import geojson_writer, measurements_from_columns

    scores, cols = measured()
    config = getattr(model, "config", {}) or {}
    version = config.get("version") or f"napari-medinst {__version__}"
    writer = geojson_writer(
        labels,
        status=dict.fromkeys(scores, "predicted"),
        measurements=measurements_from_columns(
            {k: v for k, v in cols.items() if k not in ("type", "type_name")}
        ),
        model={"name": seg.maps.model_name, "version": str(version)},
        types={int(i): int(t) for i, t in zip(cols["label"], cols["type"], strict=True)}
        if "type" in cols
        else None,
        type_names=getattr(model, "type_classes", None),
    )
    return target, writer


#: Writers of the ``segment --format`` outputs beyond the TIFF and CSV:
#: ``key -> f(target, labels, measured, model, seg) -> (path, writer)``, where
#: ``measured()`` gives :func:`_measure`'s (scores, columns), computed once per image.
SEGMENT_WRITERS = {"geojson": _geojson_item, "measurements": _measurements_item}


def _format_items(targets: dict[str, Path], labels, rows, model, seg, image) -> list:
    """(path, writer) of each extra output asked for, for :func:`_write_outputs`."""
    import functools

    measured = functools.cache(lambda: _measure(labels, rows, seg, image, model))
    return [
        SEGMENT_WRITERS[key](targets[key], labels, measured, model, seg)
        for key in SEGMENT_WRITERS
        if key in targets
    ]


def _checked_planes(path: Path, arr, info=None, args=None, notes=None) -> list:
    """The planes of an image read from ``path``, each checked as the model will see it
    (dtype, NaN/inf, size), so that a bad image is refused before any other image's
    outputs are written; an error names the file (and the plane)."""
    from ._io import InputError
    from .preprocess import prepare_image

    pick = {"channel": args.channel, "channel_axis": args.channel_axis} if args else {}
    try:
        planes = list(_planes(arr, info, notes=notes, **pick))
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None
    for z, plane in planes:
        where = f"{path}" + (f" (plane {z})" if z is not None else "")
        try:
            prepare_image(plane, name="image")
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from None
    return planes


def _report_warnings(caught, path: Path, said: set[str]) -> None:
    """Print pixel-size warnings as one line naming the file (each once); re-emit others."""
    import warnings

    from .preprocess import PixelSizeWarning

    for w in caught:
        if not issubclass(w.category, PixelSizeWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        elif str(w.message) not in said:
            said.add(str(w.message))
            print(f"{path}: warning: {w.message}", file=sys.stderr)


def _file_pixel_size(path: Path, info, args, notes: list[str]) -> float | None:
    """The pixel size the file's metadata states, when it is plausible.

    A file's resolution tags are not always about the specimen (a scanner's or an editor's
    dpi): a value outside the range the model accepts is not used; the size is estimated
    instead, and a note in ``notes`` tells the user (``--pixel-size`` overrides the file).
    """
    from .preprocess import PIXEL_SIZE_RANGE

    px = info.pixel_size
    if px is None or args.pixel_size is not None:
        return px
    lo, hi = PIXEL_SIZE_RANGE
    if lo <= px <= hi:
        return px
    notes.append(
        f"{path}: warning: its metadata says {px:.4g} µm/px, outside the plausible "
        f"{lo:g}-{hi:g}; the pixel size is estimated instead (or give --pixel-size)"
    )
    return None


def _pixel_size_for(args, from_file: float | None) -> float | None:
    """µm/px to segment with: ``--pixel-size``, else the file's, else None (estimate)."""
    return args.pixel_size if args.pixel_size is not None else from_file


def _px_note(args, seg, from_file: float | None) -> str:
    """How the pixel size was obtained, for the per-image line."""
    if seg.maps.pixel_size_estimated:
        return " estimated"
    return " from file metadata" if args.pixel_size is None and from_file else ""


def run_segment(args) -> int:
    import warnings

    from ._io import (
        InputError,
        check_free_space,
        check_output_dir,
        open_image,
        remove_stale_parts,
    )
    from .postprocess import PostprocessParams
    from .preprocess import PixelSizeWarning, check_pixel_size
    from .segment import get_model

    out = check_output_dir(args.out)  # before any work: a file, read-only, full disk
    remove_stale_parts(out)  # .part files a killed run left there
    if args.pixel_size is not None:  # before any work; unusual values warn per image
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PixelSizeWarning)
            check_pixel_size(args.pixel_size, "--pixel-size")
    params = None
    if args.params:
        try:
            params = PostprocessParams.from_file(args.params)
        except ValueError as exc:  # names the file: a folder, not UTF-8, bad JSON or values
            raise InputError(f"--params {exc}") from None
    jobs, stems, file_px, notes, pixels = [], {}, {}, {}, 0
    for name in args.images:
        path = Path(name)
        if path.stem in stems:
            raise InputError(
                f"{path}: same output name as {stems[path.stem]} ({path.stem}_instances.tif); "
                "segment them into different output folders"
            )
        stems[path.stem] = path
        targets = _outputs_for(out, path.stem, args.save_maps, args.format)
        clash = [str(p) for p in targets.values() if p.exists()]
        if clash and not args.overwrite:
            raise InputError(f"{clash[0]}: already exists (use --overwrite to replace)")
        arr, info = open_image(path)
        notes[path] = []  # printed once every input has passed its checks
        file_px[path] = _file_pixel_size(path, info, args, notes[path])
        planes = _checked_planes(path, arr, info, args, notes[path])
        _check_block_maps(path, planes, args)
        _check_formats(path, planes, args.format)
        pixels += sum(plane.shape[0] * plane.shape[1] for _, plane in planes)
        # every image is checked before any is written, but only the first one stays
        # decoded: the others are read again in turn, so memory holds at most two images
        jobs.append((path, planes if not jobs else None, targets))
        del arr, planes
    check_free_space(out, _estimate_bytes(pixels, args.save_maps))
    model = get_model(args.model, args.device)

    def read(path: Path):
        arr, info = open_image(path)
        return _checked_planes(path, arr, info, args, [])

    # The next image is decoded and the last one's outputs are written in two helper
    # threads while the network runs (file I/O and compression release the GIL). At
    # most one read and one write are pending; their errors surface at the next step.
    with ThreadPoolExecutor(1, "medinst-read") as reader, \
            ThreadPoolExecutor(1, "medinst-write") as writer:  # fmt: skip
        ahead = writing = None
        while jobs:
            path, planes, targets = jobs.pop(0)
            if planes is None:
                planes = ahead.result() if ahead is not None else read(path)
            ahead = reader.submit(read, jobs[0][0]) if jobs else None
            result = _segment_one(path, planes, args, notes, file_px, params, model)
            if writing is not None:
                writing.result()
            writing = writer.submit(_write_one, targets, result, model, args)
            del planes, result  # before the next image is decoded
        if writing is not None:
            writing.result()
    return 0


def _segment_one(path: Path, planes, args, notes, file_px, params, model) -> tuple:
    """Segment an image's planes; (labels stack, score rows, maps, last result, plane 0)."""
    import warnings

    import numpy as np

    from ._io import InputError
    from .preprocess import PixelSizeWarning

    for note in notes[path]:
        print(note, file=sys.stderr)
    labels, maps, rows, said = [], [], ["label,score"], set()
    for z, plane in planes:
        where = f"{path}" + (f" (plane {z})" if z is not None else "")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PixelSizeWarning)
            try:
                seg = _segment_plane(
                    plane,
                    model,
                    pixel_size=_pixel_size_for(args, file_px[path]),
                    modality=args.modality,
                    params=params,
                    device=args.device,
                    tta=args.tta,
                    block_size=args.block_size,
                )
            except InputError as exc:
                raise InputError(f"{where}: {exc}") from exc
        _report_warnings(caught, path, said)
        offset = int(sum(int(lab.max()) for lab in labels))
        labels.append(seg.labels)
        rows += _score_rows(seg, offset, rows)
        maps.append(seg.maps)
        print(
            f"{where}: {seg.result.n_instances} nuclei (modality {seg.maps.modality}, "
            f"{seg.maps.pixel_size:.3f} µm/px{_px_note(args, seg, file_px[path])})"
        )
    stack = labels[0] if len(labels) == 1 else np.stack(labels)
    if len(labels) > 1:  # ids unique across planes
        offs = np.cumsum([0] + [int(lab.max()) for lab in labels[:-1]]).astype(np.uint32)
        stack = np.where(stack > 0, stack + offs[:, None, None], 0).astype(np.uint32)
    stack = stack.astype(np.uint32, copy=False)
    return stack, rows, maps, seg, planes[0][1]


def _write_one(targets: dict[str, Path], result: tuple, model, args) -> None:
    """Write one image's outputs (see :func:`_segment_one`)."""
    stack, rows, maps, seg, plane = result
    extra = _format_items(targets, stack, rows, model, seg, plane)
    _write_with_zarr(
        targets,
        stack,
        None if seg.maps.pixel_size_estimated else seg.maps.pixel_size,
        lambda: _write_outputs(targets, stack, rows, maps, args.overwrite, extra),
        args.overwrite,
    )


def _net_config(args):
    from .model.network import NetConfig

    d = NetConfig().to_dict()
    if args.widths:
        d["widths"] = args.widths
    if args.blocks:
        d["blocks"] = args.blocks
    return NetConfig.from_dict(d)  # checked: a clear error for impossible shapes


def run_train(args) -> int:
    from .model.train import TrainConfig, train

    cfg = TrainConfig(
        data=list(args.data),
        out=args.out,
        init=args.init,
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        batch_size=args.batch_size,
        lr=args.lr,
        he_fraction=args.he_fraction,
        net=_net_config(args),
        seed=args.seed,
        device=args.device,
        threads=args.threads,
        type_names=list(args.type_names or []),
        type_head_only=args.type_head_only,
        type_balance=args.type_balance,
        type_context=args.type_context,
        name=args.name or Path(args.out).name,
    )
    model_dir = train(cfg)
    print(f"model written to {model_dir}")
    metrics = json.loads((model_dir / "metrics.json").read_text())
    print(json.dumps({k: v for k, v in metrics.items() if k != "history"}, indent=2))
    return 0


def run_demo(args) -> int:
    from .demo import run_demo as demo

    return demo(out=Path(args.out), model=args.model, sample=args.sample, gui=args.gui)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``napari-medinst`` command."""
    from ._io import InputError, describe_os_error

    args = build_parser().parse_args(argv)
    previous = _ignore_sigxfsz()
    try:
        if args.command == "segment":
            return run_segment(args)
        if args.command == "segment-slide":
            from .slide_cli import run as run_segment_slide

            return run_segment_slide(args)
        if args.command == "evaluate":
            from .evaluation import run

            return run(args)
        if args.command == "train":
            return run_train(args)
        if args.command == "convert":
            from .convert import run as run_convert

            return run_convert(args)
        return run_demo(args)
    except (InputError, FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"napari-medinst {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, file size limit, read-only, permission, ...
        print(f"napari-medinst {args.command}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"napari-medinst {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        _restore_sigxfsz(previous)


def _ignore_sigxfsz():
    """Ignore SIGXFSZ, so that a write beyond ``ulimit -f`` fails with EFBIG.

    By default the kernel's SIGXFSZ ends the process without a word; ignored, the write
    raises OSError, which ends in one line and exit status 2. The ``python`` program
    already ignores it at start-up; this makes sure when Python is embedded without its
    signal handlers. Returns the previous handler (None where there is nothing to restore).
    """
    import signal

    if not hasattr(signal, "SIGXFSZ"):
        return None
    try:
        return signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    except ValueError:  # not the main thread
        return None


def _restore_sigxfsz(previous) -> None:
    import contextlib
    import signal

    if previous is not None:
        with contextlib.suppress(ValueError):  # not the main thread
            signal.signal(signal.SIGXFSZ, previous)


if __name__ == "__main__":
    sys.exit(main())
