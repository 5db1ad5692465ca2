"""Evaluate predicted label images on disk against ground truth: pairing, report, CLI.

* :func:`pair_files` pairs prediction and ground-truth files (or folders of them) by
  file stem, ignoring a trailing ``_instances`` on prediction stems, and finds an
  optional confidence-score CSV beside each prediction.
* :func:`evaluate_paths` scores every pair with :func:`napari_medinst.metrics.evaluate`
  and returns a JSON-ready dict ``{"images": [...], "mean": {...}, "pooled": {...}}``.
* :func:`format_report` renders that dict as a plain-text table.
* :func:`run` runs the ``napari-medinst evaluate`` command (its parser is in :mod:`.cli`).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_medinst._io import InputError, read_labels
from napari_medinst.class_metrics import type_table
from napari_medinst.metrics import ImageScores, combine_scores, evaluate_table, overlap_table

__all__ = [
    "LABEL_SUFFIXES",
    "ImagePair",
    "evaluate_paths",
    "format_report",
    "pair_files",
    "read_scores",
    "run",
]

#: File types accepted as label images.
LABEL_SUFFIXES = (".tif", ".tiff", ".png")
#: Suffix of prediction stems that is ignored when pairing (``img_instances.tif`` ~ ``img.tif``).
PRED_STEM_SUFFIX = "_instances"


@dataclass(frozen=True)
class ImagePair:
    """A prediction file, its ground truth and (optionally) its confidence-score CSV
    and the ground truth's type map (the class of every nucleus pixel)."""

    name: str
    pred: Path
    gt: Path
    scores: Path | None = None
    gt_types: Path | None = None


# ---------------------------------------------------------------------------- pairing


def _base_stem(path: Path) -> str:
    stem = path.stem
    if stem.endswith(PRED_STEM_SUFFIX) and len(stem) > len(PRED_STEM_SUFFIX):
        return stem[: -len(PRED_STEM_SUFFIX)]
    return stem


def _check_exists(path: Path, what: str) -> None:
    if not path.exists():
        raise InputError(f"{path}: {what} not found (no such file or folder)")
    if path.is_file() and path.suffix.lower() not in LABEL_SUFFIXES:
        raise InputError(
            f"{path}: {what} must be a label image ({', '.join(LABEL_SUFFIXES)}) or a folder"
        )


def _index_folder(folder: Path, strip_suffix: bool) -> dict[str, Path]:
    """Label images in ``folder`` keyed by stem; an ambiguous stem is an error."""
    index: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        if path.suffix.lower() not in LABEL_SUFFIXES:
            continue
        key = _base_stem(path) if strip_suffix else path.stem
        if key in index:
            raise InputError(
                f"{folder}: two label images for {key!r}: {index[key].name} and {path.name}"
            )
        index[key] = path
    if not index:
        raise InputError(f"{folder}: no label images ({', '.join(LABEL_SUFFIXES)}) in folder")
    return index


def _pair_folders(pred: Path, gt: Path) -> list[tuple[str, Path, Path]]:
    preds = _index_folder(pred, strip_suffix=True)
    gts = _index_folder(gt, strip_suffix=False)
    no_gt = sorted(set(preds) - set(gts))
    no_pred = sorted(set(gts) - set(preds))
    if no_gt or no_pred:
        parts = []
        if no_gt:
            parts.append(f"predictions without ground truth in {gt}: {', '.join(no_gt)}")
        if no_pred:
            parts.append(f"ground truth without prediction in {pred}: {', '.join(no_pred)}")
        raise InputError("unpaired images: " + "; ".join(parts))
    return [(key, preds[key], gts[key]) for key in sorted(preds)]


def _find_in_folder(folder: Path, key: str, strip_suffix: bool, what: str) -> Path:
    index = _index_folder(folder, strip_suffix)
    if key not in index:
        raise InputError(f"{folder}: no {what} named {key!r} ({', '.join(LABEL_SUFFIXES)})")
    return index[key]


def _scores_file(pred: Path) -> Path | None:
    """The confidence CSV beside a prediction, if any (see :func:`pair_files`)."""
    base = _base_stem(pred)
    for name in dict.fromkeys((f"{pred.stem}_scores.csv", f"{base}_scores.csv")):
        if (pred.parent / name).is_file():
            return pred.parent / name
    table = pred.parent / f"{base}{PRED_STEM_SUFFIX}.csv"
    if table.is_file() and "score" in _csv_header(table):
        return table
    return None


def pair_files(pred: str | os.PathLike, gt: str | os.PathLike) -> list[ImagePair]:
    """Pair prediction and ground-truth label images.

    Parameters
    ----------
    pred, gt : path
        Each a label image (.tif, .tiff, .png) or a folder of them.  Files are
        paired by stem; a trailing ``_instances`` on a prediction stem is ignored
        (``img_instances.tif`` pairs with ``img.tif``).  Two files given directly
        are paired whatever their names; a file and a folder: the folder must hold
        the counterpart of the file.

    Returns
    -------
    list of ImagePair
        Sorted by name.  ``scores`` is the CSV of per-nucleus confidence found beside
        the prediction: ``<pred stem>_scores.csv`` (or ``<stem>_scores.csv``) with
        columns ``label,score``, else ``<stem>_instances.csv`` if it has a
        ``score`` column; None when there is none.

    Raises
    ------
    napari_medinst._io.InputError
        A path is missing, a folder has no label image or two for one stem, or
        some images have no counterpart (all unpaired names are listed).
    """
    pred, gt = Path(pred), Path(gt)
    _check_exists(pred, "prediction")
    _check_exists(gt, "ground truth")
    if pred.is_dir() and gt.is_dir():
        triples = _pair_folders(pred, gt)
    elif pred.is_dir():
        triples = [(gt.stem, _find_in_folder(pred, gt.stem, True, "prediction"), gt)]
    elif gt.is_dir():
        key = _base_stem(pred)
        triples = [(key, pred, _find_in_folder(gt, key, False, "ground truth"))]
    else:
        triples = [(gt.stem, pred, gt)]
    return [ImagePair(name, p, g, _scores_file(p), _gt_types_file(g)) for name, p, g in triples]


def _gt_types_file(gt: Path) -> Path | None:
    """The ground truth's type map: ``<stem>_types.tif`` beside it, or, in a data folder
    (``labels/<stem>.tif``), ``types/<stem>.tif`` (CoNSeP's layout)."""
    for cand in (
        gt.with_name(f"{gt.stem}_types{gt.suffix}"),
        gt.parent.parent / "types" / gt.name if gt.parent.name == "labels" else None,
    ):
        if cand is not None and cand.is_file():
            return cand
    return None


def read_types(path: str | os.PathLike) -> dict[int, int] | None:
    """Per-nucleus classes from the ``type`` column of a CSV with a ``label`` column
    (``segment``'s ``<stem>_instances.csv``); None when the file has no such column."""
    path = Path(path)
    if "type" not in _csv_header(path):
        return None
    with path.open(newline="", encoding="utf-8-sig") as fh:
        rows = csv.reader(fh)
        header = [c.strip().lower() for c in next(rows)]
        i_label, i_type = header.index("label"), header.index("type")
        out: dict[int, int] = {}
        for line, row in enumerate(rows, start=2):
            if not any(cell.strip() for cell in row):
                continue
            try:
                out[int(row[i_label])] = int(row[i_type])
            except (IndexError, ValueError):
                raise InputError(f"{path}: line {line}: malformed label/type {row!r}") from None
    return out


def _gt_type_table(gt: np.ndarray, path: Path) -> np.ndarray:
    """Class of each gt nucleus (indexed by id) from its type map."""
    try:
        return type_table(gt, read_labels(path))
    except ValueError as exc:
        raise InputError(f"{path}: {exc}") from None


# ---------------------------------------------------------------------------- scores


def _csv_header(path: Path) -> list[str]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            row = next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: not a readable CSV ({exc})") from exc
    return [c.strip().lower() for c in row]


def read_scores(path: str | os.PathLike) -> dict[int, float]:
    """Read per-nucleus confidences from a CSV with columns ``label`` and ``score``.

    Other columns are ignored.  Labels must be distinct positive integers and scores
    finite numbers.

    Raises
    ------
    napari_medinst._io.InputError
        With the file name, and the line number for a bad row.
    """
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            return _parse_scores(path, csv.reader(fh))
    except OSError as exc:
        raise InputError(f"{path}: cannot read scores ({exc})") from exc
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: not a readable CSV ({exc})") from exc


def _parse_scores(path: Path, rows: Any) -> dict[int, float]:
    header = [c.strip().lower() for c in next(rows, [])]
    if "label" not in header or "score" not in header:
        raise InputError(f"{path}: scores CSV needs columns 'label' and 'score', got {header}")
    i_label, i_score = header.index("label"), header.index("score")
    out: dict[int, float] = {}
    for line, row in enumerate(rows, start=2):
        if not any(cell.strip() for cell in row):
            continue
        try:
            label_text, score_text = row[i_label].strip(), row[i_score].strip()
            label, score = int(float(label_text)), float(score_text)
        except (IndexError, ValueError) as exc:
            raise InputError(f"{path}: line {line}: malformed row {row!r}") from exc
        if label <= 0 or float(label_text) != label:
            raise InputError(
                f"{path}: line {line}: label must be a positive integer, got {label_text!r}"
            )
        if not math.isfinite(score):
            raise InputError(
                f"{path}: line {line}: score must be a finite number, got {score_text!r}"
            )
        if label in out:
            raise InputError(f"{path}: line {line}: label {label} listed twice")
        out[label] = score
    return out


# --------------------------------------------------------------------------- evaluate


def _evaluate_pair(pair: ImagePair, typed: bool = False) -> ImageScores:
    gt = read_labels(pair.gt)
    pred = read_labels(pair.pred)
    if gt.shape != pred.shape:
        raise InputError(
            f"{pair.name}: shapes differ: prediction {pair.pred} {pred.shape}, "
            f"ground truth {pair.gt} {gt.shape}"
        )
    scores = read_scores(pair.scores) if pair.scores is not None else None
    table = overlap_table(gt, pred)
    kinds = {}
    if typed:
        kinds["gt_types"] = _gt_type_table(gt, pair.gt_types)
        kinds["pred_types"] = read_types(pair.scores)
    try:
        return evaluate_table(table, scores=scores, **kinds)
    except ValueError as exc:
        if pair.scores is None:
            raise
        raise InputError(f"{pair.scores}: {exc}") from exc


def evaluate_paths(pred: str | os.PathLike, gt: str | os.PathLike) -> dict[str, Any]:
    """Evaluate prediction label images against ground truth (files or folders).

    Parameters
    ----------
    pred, gt : path
        See :func:`pair_files`.

    Returns
    -------
    dict
        ``{"images": [{"name", "n_gt", "n_pred", "accuracy", "ap", "precision",
        "recall", "f1", "map", "pq", "dq", "sq", "aji", "aji_plus", "dice"}, ...],
        "mean": {same keys but name, averaged over images}, "pooled": {scores of
        the counts summed over images, plus the summed tp/fp/fn}}``; when every image
        has a gt type map and predicted types, mAP is over classes and the pooled dict
        has ``types`` (see :mod:`napari_medinst.class_metrics`).  Per-threshold
        values are dicts keyed "0.50" ... "0.95".  Only plain Python numbers, so
        ``json.dumps`` works.

    Raises
    ------
    napari_medinst._io.InputError
        For missing, unpaired or unreadable files, mismatched shapes and malformed
        score files (the message names the file).
    """
    pairs = pair_files(pred, gt)
    # types are scored when every image has both a gt type map and predicted types
    typed = all(
        p.gt_types is not None and p.scores is not None and read_types(p.scores) is not None
        for p in pairs
    )
    scores = [_evaluate_pair(pair, typed) for pair in pairs]
    summary = combine_scores(scores)
    images = [{"name": p.name, **s.to_dict()} for p, s in zip(pairs, scores, strict=True)]
    return {"images": images, "mean": summary.mean, "pooled": summary.pooled}


# ----------------------------------------------------------------------------- report


_COLUMNS = ("n_gt", "n_pred", "acc@0.5", "mAP", "PQ", "AJI", "Dice")


def _row_values(d: dict[str, Any]) -> list[str]:
    acc = d["accuracy"].get("0.50", next(iter(d["accuracy"].values())))
    counts = [d["n_gt"], d["n_pred"]]
    count_text = [f"{c:.1f}" if isinstance(c, float) else str(c) for c in counts]
    return [*count_text, *(f"{v:.3f}" for v in (acc, d["map"], d["pq"], d["aji"], d["dice"]))]


def format_report(result: dict[str, Any]) -> str:
    """Render an :func:`evaluate_paths` result as a plain-text table.

    One row per image (n_gt, n_pred, accuracy at IoU 0.5, mAP, PQ, AJI, Dice), then
    the mean and pooled rows, then the mean accuracy at every IoU threshold.
    """
    rows = [(img["name"], _row_values(img)) for img in result["images"]]
    rows += [("mean", _row_values(result["mean"])), ("pooled", _row_values(result["pooled"]))]
    width = max(len("image"), *(len(name) for name, _ in rows))
    widths = [max(len(c), 7) for c in _COLUMNS]
    lines = [
        f"{'image':<{width}}  "
        + "  ".join(f"{c:>{w}}" for c, w in zip(_COLUMNS, widths, strict=True))
    ]
    for i, (name, values) in enumerate(rows):
        if i == len(rows) - 2:
            lines.append("-" * len(lines[0]))
        lines.append(
            f"{name:<{width}}  "
            + "  ".join(f"{v:>{w}}" for v, w in zip(values, widths, strict=True))
        )
    acc = result["mean"]["accuracy"]
    if "types" in result["pooled"]:
        t = result["pooled"]["types"]
        lines += ["", f"nucleus types (pooled): detection F1 {t['f1_d']:.3f}, mPQ {t['mpq']:.3f}"]
        lines += [
            f"  class {name:<16} F1 {v['f1']:.3f}  PQ {v['pq']:.3f}  gt {v['n_gt']}  pred {v['n_pred']}"
            for name, v in t["classes"].items()
        ]
    lines += [
        "",
        "accuracy TP/(TP+FP+FN) by IoU threshold (mean over images)",
        "  ".join(f"{k:>5}" for k in acc),
        "  ".join(f"{v:5.3f}" for v in acc.values()),
        "",
        "mAP: COCO 101-point AP over the confidence when a scores CSV lies beside the",
        "prediction; otherwise precision x recall at each threshold.",
    ]
    return "\n".join(lines)


# -------------------------------------------------------------------------------- CLI


def run(args: argparse.Namespace) -> int:
    """Run the ``evaluate`` subcommand; returns the exit code (0, or 2 on bad input)."""
    try:
        result = evaluate_paths(args.pred, args.gt)
    except (InputError, OSError, ValueError) as exc:
        print(f"napari-medinst evaluate: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0
