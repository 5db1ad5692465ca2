"""Fine-tuning a model on the user's corrected nuclei, with no terminal.

The pieces the Fine-tune widget (and scripts) use, none of which imports napari or Qt:

* :func:`export_ground_truth` -- a corrected label image (optionally only the nuclei the
  user marked *verified*) appended to a training-set folder (:mod:`.export`);
* :func:`augmentation_preview` -- what copy-paste and stain/intensity augmentation do to
  an image, with the targets recomputed from the augmented labels;
* :func:`pseudo_labels` / :func:`export_pseudo_labels` -- self-training: the model's
  confident nuclei on an unlabelled image, minus the nuclei the user edited or rejected;
* :func:`finetune` (and :func:`iter_finetune`, its generator form for worker threads) --
  trains from a base model on the training sets, resumable, Cancel-safe;
* :func:`compare_models` -- every score of several models on one image with ground truth.

Fine-tuning run folder (``out``)::

    OUT/
      finetune.json       the request, the staged data, progress and history
      data/               a snapshot of the training sets (see below)
      checkpoint.pt       the last finished epoch (resume from here)
      train_config.json   the trainer's configuration
      model/              the best model so far (by validation AJI): a model folder

The training sets are copied into ``OUT/data`` when the run starts, so appending to a
set later never changes (or breaks the resumption of) a run. A set of fewer than
:data:`MIN_IMAGES` images is cut into tiles there, so that one tile can be held out for
validation: the trainer keeps the epoch with the best validation AJI and tunes the
post-processing on the held-out tiles, which needs at least two pieces per set.

With the bundled training data mixed in, the user's pieces would be a negligible share
of the pixels the trainer samples from (it samples in proportion to image area), so
their training tiles are also repeated in a mosaic (one image per tile, copies
separated by a background-coloured gutter, in a folder of its own so that no copy is
ever used for validation) until they make up ``bundled_share`` of the pixels of their
modality.
"""

from __future__ import annotations

import csv
import gc
import io
import json
import math
import os
import queue
import shutil
import tempfile
import threading
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy import ndimage as ndi

from ._io import InputError, check_labels, read_image, read_labels, write_bytes, write_tiff
from .export import ExportResult, export_sample
from .metrics import ImageScores, evaluate
from .model.augment import AugmentConfig, copy_paste, photometric
from .model.data import (
    DEFAULT_EXCLUDE_SPLITS,
    find_pairs,
    index_modality,
    index_pixel_size,
    median_diameter,
    parse_folder_spec,
    read_index,
)
from .model.folder import (
    LoadedModel,
    ModelError,
    load_model,
    resolve_model_dir,
    save_model_folder,
)
from .model.inference import CancelledError
from .model.network import NetConfig
from .model.train import TrainConfig, split_samples, train
from .postprocess import PostprocessParams
from .preprocess import (
    CANONICAL_DIAMETER,
    CANONICAL_PIXEL_SIZE,
    Modality,
    detect_modality,
    prepare_image,
    to_network_input,
)
from .segment import segment
from .targets import Targets, make_targets, relabel_sequential

__all__ = [
    "DATA_ENV_VAR",
    "MIN_IMAGES",
    "AugmentationPreview",
    "CancelledError",
    "InputError",
    "ModelError",
    "PseudoLabels",
    "augmentation_preview",
    "bundled_training_data",
    "compare_models",
    "export_ground_truth",
    "export_pseudo_labels",
    "finetune",
    "iter_finetune",
    "pseudo_labels",
    "read_run",
    "summarise_scores",
    "verified_ids",
]

#: Environment variable naming a folder that holds the bundled training data sets.
DATA_ENV_VAR = "NAPARI_MEDINST_DATA"
#: Training sets with fewer images than this are cut into tiles (see the module docstring).
MIN_IMAGES = 4
#: Tiles are at least this many pixels on a side at the network's pixel size.
MIN_TILE = 96
#: At most this many tiles per image axis.
MAX_TILES_PER_AXIS = 4
#: A repeat mosaic holds at most this many pixels.
MOSAIC_MAX_PIXELS = 16_000_000
#: Background gutter between the copies in a repeat mosaic (px).
MOSAIC_GUTTER = 8

RUN_FILE = "finetune.json"
_STAGED_FIELDS = [
    "id",
    "height",
    "width",
    "channels",
    "n_nuclei",
    "pixel_size",
    "modality",
    "split",
]
_PROVENANCE_SKIP = ("format", "version", "net", "weights_sha256")


# ------------------------------------------------------------------------ export


def verified_ids(status: Mapping[int, str] | None) -> list[int]:
    """Ids whose review status is ``verified`` (see :data:`napari_medinst.editing.STATUSES`)."""
    return sorted(int(i) for i, s in (status or {}).items() if s == "verified")


def _writable_folder(folder: str | os.PathLike, what: str) -> Path:
    """Create ``folder`` if needed and check that files can be written in it."""
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: is a file; choose a folder for the {what}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise InputError(f"{path}: cannot write the {what} there ({reason})") from exc
    return path


def export_ground_truth(
    folder: str | os.PathLike,
    image: np.ndarray,
    labels: np.ndarray,
    *,
    name: str,
    status: Mapping[int, str] | None = None,
    verified_only: bool = False,
    pixel_size: float | None = None,
    modality: str | None = None,
    source: str = "",
) -> ExportResult:
    """Append corrected ground truth to the training-set ``folder`` (never overwriting).

    With ``verified_only`` only the nuclei whose ``status`` is ``verified`` are exported
    (see :func:`napari_medinst.export.export_sample` for how the rest is masked).

    Raises
    ------
    InputError
        Empty ground truth, image and labels of different shapes, no review status or
        no verified nucleus with ``verified_only``, or a folder that cannot be written.
    """
    img, lab = _image_and_labels(image, labels, what="ground truth")
    if not lab.any():
        raise InputError("the ground truth is empty: there is no nucleus to export")
    ids = None
    if verified_only:
        if not status:
            raise InputError(
                "the ground truth has no review status: mark nuclei as verified first "
                "(key W on the ground-truth layer), or export all nuclei"
            )
        present = set(np.unique(lab).tolist())
        ids = [i for i in verified_ids(status) if i in present]
        if not ids:
            raise InputError(
                "no nucleus of the ground truth is verified yet: mark nuclei as verified "
                "(key W on the ground-truth layer), or export all nuclei"
            )
    if modality is not None and modality not in ("he", "fluorescence"):
        raise InputError(f"unknown modality {modality!r}; expected 'he' or 'fluorescence'")
    folder = _writable_folder(folder, "training set")
    try:
        return export_sample(
            folder,
            img,
            lab,
            name=name,
            pixel_size=pixel_size,
            modality=modality or detect_modality(img),
            verified_ids=ids,
            source=source,
        )
    except OSError as exc:
        raise InputError(
            f"{folder}: could not write the training set ({exc.strerror or exc})"
        ) from exc


# ------------------------------------------------------------------ augmentation


class AugmentationPreview(NamedTuple):
    """An augmented image for display, its labels and the targets made from them."""

    image: np.ndarray  # (H, W, 3) float32 in [0, 1] for H&E, (H, W) float32 otherwise
    labels: np.ndarray  # (H, W) int32, 1..N
    targets: Targets


def _image_and_labels(
    image: np.ndarray, labels: np.ndarray, what: str = "labels"
) -> tuple[np.ndarray, np.ndarray]:
    img = prepare_image(image, name="image")
    lab = check_labels(labels, name="ground truth")
    if img.shape[:2] != lab.shape:
        raise InputError(
            f"the image is {img.shape[0]}x{img.shape[1]} px, the {what} "
            f"{lab.shape[0]}x{lab.shape[1]} px: they must have the same size"
        )
    return img, lab


def augmentation_preview(
    image: np.ndarray,
    labels: np.ndarray,
    modality: Modality | None = None,
    cfg: AugmentConfig | None = None,
    seed: int = 0,
) -> AugmentationPreview:
    """Apply the training augmentation to a whole image, for inspection.

    Up to ``cfg.copy_paste_max`` nuclei of the image are copied into the image itself
    (each zoomed by a factor in ``cfg.copy_paste_scale``, rotated, and placed where at
    most ``cfg.copy_paste_max_overlap`` of it covers other nuclei), then the stain
    (H&E) or intensity (fluorescence) jitter, blur and noise are applied as in
    training. The foreground, HV and contour targets are computed from the augmented
    labels with :func:`~napari_medinst.targets.make_targets`, exactly as the trainer
    does. The image keeps its pixel size (no random crop or zoom), so the preview
    lies on top of the original.
    """
    cfg = cfg or AugmentConfig()
    img, lab = _image_and_labels(image, labels)
    if not lab.any():
        raise InputError("the ground truth is empty: there are no nuclei to copy and paste")
    if modality is None:
        modality = detect_modality(img)
    rng = np.random.default_rng(seed)
    x = to_network_input(img, modality)
    seq, _ = relabel_sequential(lab)
    if cfg.copy_paste_max > 0:
        x, seq, _ = copy_paste(
            x,
            seq,
            x,
            seq,
            rng,
            n_max=int(cfg.copy_paste_max),
            scale_range=tuple(cfg.copy_paste_scale),
            max_overlap=float(cfg.copy_paste_max_overlap),
        )
    x = photometric(x, modality, cfg, rng)
    shown = np.clip(x.transpose(1, 2, 0), 0.0, 1.0) if modality == "he" else x[0]
    seq = seq.astype(np.int32)
    return AugmentationPreview(np.ascontiguousarray(shown, np.float32), seq, make_targets(seq))


# -------------------------------------------------------------- self-training


@dataclass(frozen=True, eq=False)
class PseudoLabels:
    """The model's confident nuclei on an unlabelled image, for self-training.

    ``labels`` holds the kept nuclei (1..N) and ``scores[i]`` the confidence of nucleus
    ``i + 1``; ``ignore`` marks the pixels of everything else the model or the user
    found there (low-confidence and excluded nuclei, and the exclusion mask): those are
    neither nucleus nor background, and :func:`export_pseudo_labels` paints them over.
    """

    labels: np.ndarray
    scores: np.ndarray
    ignore: np.ndarray
    n_predicted: int
    n_low_score: int
    n_excluded: int

    @property
    def n_kept(self) -> int:
        return int(self.scores.size)


def pseudo_labels(
    image: np.ndarray,
    model: str | os.PathLike | LoadedModel = "default",
    *,
    pixel_size: float | None = None,
    modality: Modality | None = None,
    min_score: float = 0.8,
    exclude_mask: np.ndarray | None = None,
    params: PostprocessParams | None = None,
    device: str = "auto",
    should_stop: Callable[[], bool] | None = None,
) -> PseudoLabels:
    """Segment ``image`` and keep the nuclei the model is sure of.

    A nucleus is kept when its confidence (mean nuclear probability) is at least
    ``min_score`` and none of its pixels lies in ``exclude_mask`` (the nuclei the user
    edited, verified or deleted: where the model is known to be wrong, or the user's
    own labels take over).
    """
    if not 0.0 <= min_score <= 1.0:
        raise InputError(f"minimum confidence must be between 0 and 1, got {min_score}")
    img = prepare_image(image, name="image")
    if exclude_mask is not None:
        exclude_mask = np.asarray(exclude_mask, bool)
        if exclude_mask.shape != img.shape[:2]:
            raise InputError(
                f"the exclusion mask is {exclude_mask.shape} but the image is {img.shape[:2]}"
            )
    model = _as_model(model, device)
    seg = segment(
        img,
        model,
        pixel_size=pixel_size,
        modality=modality,
        params=params,
        device=device,
        should_stop=should_stop,
    )
    labels = np.asarray(seg.labels).astype(np.int64)
    scores = np.asarray(seg.scores, np.float64)
    n = int(scores.size)
    confident = np.zeros(n + 1, bool)
    confident[1:] = scores >= min_score
    excluded = np.zeros(n + 1, bool)
    if exclude_mask is not None and exclude_mask.any():
        hit = np.unique(labels[exclude_mask])
        excluded[hit[hit > 0]] = True
    keep = confident & ~excluded
    keep[0] = False
    kept = np.where(keep[labels], labels, 0)
    kept, old = relabel_sequential(kept)
    ignore = (labels > 0) & ~keep[labels]
    if exclude_mask is not None:
        ignore |= exclude_mask & (kept == 0)
    return PseudoLabels(
        labels=kept.astype(np.int32),
        scores=scores[old.astype(np.int64) - 1].astype(np.float32)
        if old.size
        else np.zeros(0, np.float32),
        ignore=ignore,
        n_predicted=n,
        n_low_score=int((~confident[1:]).sum()),
        n_excluded=int((excluded[1:] & confident[1:]).sum()),
    )


def export_pseudo_labels(
    folder: str | os.PathLike,
    image: np.ndarray,
    pl: PseudoLabels,
    *,
    name: str,
    pixel_size: float | None = None,
    modality: str | None = None,
    source: str = "",
) -> ExportResult:
    """Append pseudo-labels to a training set: kept nuclei as labels, the rest painted over.

    Every ignored region (:attr:`PseudoLabels.ignore`) is exported like an unverified
    nucleus: set to the median background colour, so the model is not taught that a
    nucleus there is background.
    """
    img = prepare_image(image, name="image")
    if pl.labels.shape != img.shape[:2]:
        raise InputError(f"pseudo-labels {pl.labels.shape} do not match the image {img.shape[:2]}")
    if pl.n_kept == 0:
        raise InputError(
            "the model is not confident about any nucleus here (or all are excluded): "
            "lower the minimum confidence, or choose another image"
        )
    others, _ = ndi.label(pl.ignore & (pl.labels == 0))
    combined = np.where(others > 0, others.astype(np.int64) + pl.n_kept, pl.labels)
    folder = _writable_folder(folder, "training set")
    try:
        return export_sample(
            folder,
            img,
            combined,
            name=name,
            pixel_size=pixel_size,
            modality=modality or detect_modality(img),
            verified_ids=range(1, pl.n_kept + 1),
            source=source or f"pseudo-labels of {name}",
        )
    except OSError as exc:
        raise InputError(
            f"{folder}: could not write the training set ({exc.strerror or exc})"
        ) from exc


# --------------------------------------------------------------------- compare


def _as_model(model: Any, device: str = "cpu") -> LoadedModel:
    """A freshly loaded model (never a cached one: a run folder's model changes)."""
    if isinstance(model, LoadedModel):
        return model
    from .model.inference import pick_device

    return load_model(model, device=pick_device(device))


def compare_models(
    models: Sequence[str | os.PathLike | LoadedModel] | Mapping[str, Any],
    image: np.ndarray,
    ground_truth: np.ndarray,
    pixel_size: float | None = None,
    modality: Modality | None = None,
    *,
    device: str = "auto",
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, ImageScores]:
    """Segment ``image`` with every model (its own post-processing defaults) and score it.

    ``models`` is a list of names / folders / loaded models, or a mapping from the name
    to show to such a model. Returns the scores by that name, in the given order.
    """
    img, gt = _image_and_labels(image, ground_truth)
    if not gt.any():
        raise InputError("the ground truth is empty: there is nothing to compare against")
    items = list(models.items()) if isinstance(models, Mapping) else [(None, m) for m in models]
    if not items:
        raise InputError("choose at least one model to compare")
    out: dict[str, ImageScores] = {}
    for key, m in items:
        loaded = _as_model(m, device)
        label = key or (loaded.name if isinstance(m, LoadedModel) else str(m))
        while label in out:
            label += "'"
        seg = segment(
            img,
            loaded,
            pixel_size=pixel_size,
            modality=modality,
            device=device,
            should_stop=should_stop,
        )
        out[label] = evaluate(gt, seg.labels, scores=seg.result.scores_by_id)
    return out


# -------------------------------------------------------------------- bundled data


def _data_roots() -> list[Path]:
    roots = []
    env = os.environ.get(DATA_ENV_VAR, "").strip()
    if env:
        roots.append(Path(env).expanduser())
    roots += [Path.cwd(), Path(__file__).resolve().parents[2]]
    return roots


def bundled_training_data(model: str | os.PathLike = "default") -> list[str]:
    """The data folders ``model`` was trained on that exist on this computer.

    Relative paths in the model's training record are looked up from the current
    folder and the source checkout; ``$NAPARI_MEDINST_DATA`` may name a folder that
    holds the data sets by their folder names. Returns specs (``PATH`` or
    ``PATH@PIXEL_SIZE``) ready for :func:`finetune`; empty when none is found.
    """
    try:
        path = resolve_model_dir(model)
        config = json.loads((path / "config.json").read_text())
        # a model whose type head was retrained alone segments with what its
        # parent learnt: that run's data first
        records = [config.get("segmentation_training"), config["training"]]
        specs = [spec for r in records if r for spec in r["config"]["data"]]
    except (ModelError, OSError, ValueError, KeyError, TypeError):
        return []
    found = []
    for spec in specs:
        folder, px = parse_folder_spec(str(spec))
        candidates = [folder] if folder.is_absolute() else []
        for root in _data_roots():
            if not folder.is_absolute():
                candidates.append(root / folder)
            candidates.append(root / folder.name)
        for c in candidates:
            if (c / "images").is_dir() and (c / "labels").is_dir():
                text = str(c.resolve()) + (f"@{px:g}" if px is not None else "")
                if text not in found:
                    found.append(text)
                break
    return found


# ---------------------------------------------------------------------- staging


@dataclass
class _Piece:
    """One staged training image (a whole image of a set, or a tile of one)."""

    folder: str  # staged folder name
    key: str
    image: np.ndarray
    labels: np.ndarray
    pixel_size: float  # µm/px (explicit, so that tiles share their image's scale)
    modality: str
    source: str

    @property
    def canonical_area(self) -> float:
        s = self.pixel_size / CANONICAL_PIXEL_SIZE
        return float(self.labels.size) * s * s


def _read_set(spec: str | os.PathLike) -> list[tuple[str, np.ndarray, np.ndarray, float, str]]:
    """(id, image, labels, pixel size, modality) of every usable pair of a training set."""
    folder, folder_px = parse_folder_spec(str(spec))
    if not folder.is_dir():
        raise InputError(f"{folder}: training-set folder not found")
    index = read_index(folder)
    out = []
    for key, img_path, lab_path in find_pairs(folder):
        row = index.get(key, {})
        if row.get("split", "") in DEFAULT_EXCLUDE_SPLITS:
            continue
        image = prepare_image(read_image(img_path), name=str(img_path))
        labels = read_labels(lab_path)
        if image.shape[:2] != labels.shape:
            raise InputError(
                f"{img_path}: the image is {image.shape[:2]} px but its labels are "
                f"{labels.shape} px"
            )
        modality = index_modality(row) or detect_modality(image)
        px = index_pixel_size(row, folder / "index.csv", key) or folder_px
        if px is None:  # as the trainer does: the median nucleus brought to the canonical size
            d = median_diameter(relabel_sequential(labels)[0])
            px = CANONICAL_PIXEL_SIZE * (CANONICAL_DIAMETER / d if d > 0 else 1.0)
        out.append((key, image, labels, float(px), modality))
    return out


def _tile_counts(shape: tuple[int, int], px: float) -> tuple[int, int]:
    s = px / CANONICAL_PIXEL_SIZE
    return tuple(  # type: ignore[return-value]
        int(np.clip(int(n * s // MIN_TILE), 1, MAX_TILES_PER_AXIS)) for n in shape
    )


def _cut(image: np.ndarray, labels: np.ndarray, grid: tuple[int, int]):
    rows = np.linspace(0, labels.shape[0], grid[0] + 1).round().astype(int)
    cols = np.linspace(0, labels.shape[1], grid[1] + 1).round().astype(int)
    for i in range(grid[0]):
        for j in range(grid[1]):
            sl = (slice(rows[i], rows[i + 1]), slice(cols[j], cols[j + 1]))
            yield f"r{i}c{j}", image[sl], labels[sl]


def _stage_pieces(sets: Sequence[str]) -> list[_Piece]:
    pieces: list[_Piece] = []
    used: set[str] = set()
    for k, spec in enumerate(sets):
        folder, _ = parse_folder_spec(spec)
        base = f"set{k + 1}-{folder.name}"[:60]
        name = base
        while name in used:
            name += "_"
        used.add(name)
        items = _read_set(spec)
        if not items:
            raise InputError(f"{folder}: no usable image/label pairs")
        if not any(lab.any() for _, _, lab, _, _ in items):
            raise InputError(f"{folder}: every label image is empty; export some nuclei first")
        if len(items) >= MIN_IMAGES:
            grids = [(1, 1)] * len(items)
        else:
            grids = [_tile_counts(lab.shape, px) for _, _, lab, px, _ in items]
            if sum(a * b for a, b in grids) < 2:  # split the largest image in two
                big = int(np.argmax([lab.size for _, _, lab, _, _ in items]))
                h, w = items[big][2].shape
                s = items[big][3] / CANONICAL_PIXEL_SIZE
                if max(h, w) * s >= 2 * 32:
                    grids[big] = (2, 1) if h >= w else (1, 2)
        for (key, img, lab, px, mod), grid in zip(items, grids, strict=True):
            for tile, t_img, t_lab in _cut(img, lab, grid):
                pkey = key if grid == (1, 1) else f"{key}_{tile}"
                pieces.append(_Piece(name, pkey, t_img, t_lab, px, mod, f"{spec}/{key}:{tile}"))
    return pieces


def _validation_keys(pieces: Sequence[_Piece], fraction: float) -> set[str]:
    """The staged pieces the trainer will hold out (its split is by name)."""

    class _Named:
        def __init__(self, name: str) -> None:
            self.name = name

    _, val = split_samples([_Named(f"{p.folder}/{p.key}") for p in pieces], fraction)
    return {v.name for v in val}


def _write_staged(root: Path, folder: str, pieces: Sequence[_Piece]) -> None:
    dest = root / folder
    rows = []
    for p in pieces:
        lab = relabel_sequential(p.labels)[0].astype(np.uint32)
        write_tiff(dest / "images" / f"{p.key}.tif", p.image)
        write_tiff(dest / "labels" / f"{p.key}.tif", lab)
        rows.append(
            {
                "id": p.key,
                "height": lab.shape[0],
                "width": lab.shape[1],
                "channels": 1 if p.image.ndim == 2 else p.image.shape[2],
                "n_nuclei": int(lab.max()),
                "pixel_size": f"{p.pixel_size:.6g}",
                "modality": p.modality,
                "split": "user",
            }
        )
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_STAGED_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    write_bytes(dest / "index.csv", buf.getvalue().encode(), overwrite=True)


def _mosaic(piece: _Piece, copies: int) -> _Piece:
    """``copies`` copies of a piece in a grid, separated by background gutters."""
    img, lab = piece.image, relabel_sequential(piece.labels)[0]
    h, w = lab.shape
    ncol = math.ceil(math.sqrt(copies * h / max(w, 1)))
    ncol = max(1, min(copies, ncol))
    nrow = math.ceil(copies / ncol)
    g = MOSAIC_GUTTER
    shape = (nrow * (h + g) - g, ncol * (w + g) - g)
    bg = (
        np.median(img[lab == 0], axis=0)
        if (lab == 0).any()
        else np.median(img.reshape(h * w, -1), 0)
    )
    out_img = np.empty((*shape, *img.shape[2:]), img.dtype)
    out_img[...] = np.asarray(bg).astype(img.dtype)
    out_lab = np.zeros(shape, np.int64)
    n = int(lab.max())
    for k in range(copies):
        r, c = divmod(k, ncol)
        sl = (slice(r * (h + g), r * (h + g) + h), slice(c * (w + g), c * (w + g) + w))
        out_img[sl] = img
        out_lab[sl] = np.where(lab > 0, lab + k * n, 0)
    return replace(piece, key=f"{piece.key}_x{copies}", image=out_img, labels=out_lab)


def _bundled_areas(specs: Sequence[str]) -> dict[str, float]:
    """Canonical-size pixel count of the bundled training data, per modality."""
    areas = {"he": 0.0, "fluorescence": 0.0}
    for spec in specs:
        folder, folder_px = parse_folder_spec(spec)
        index = read_index(folder)
        for key, img_path, _ in find_pairs(folder):
            row = index.get(key)
            if row is None or not row.get("height"):
                image = read_image(img_path)
                row = {
                    "height": image.shape[0],
                    "width": image.shape[1],
                    "channels": image.shape[2] if image.ndim == 3 else 1,
                }
            if row.get("split", "") in DEFAULT_EXCLUDE_SPLITS:
                continue
            # (the index's channel count stands in for reading every image)
            mod = index_modality(row) or (
                "he" if str(row.get("channels")) == "3" else "fluorescence"
            )
            px = index_pixel_size(row, folder / "index.csv", key) or folder_px
            px = px or CANONICAL_PIXEL_SIZE
            s = px / CANONICAL_PIXEL_SIZE
            areas[mod] += float(row["height"]) * float(row["width"]) * s * s
    return areas


def _stage(
    out: Path, sets: Sequence[str], bundled: Sequence[str], share: float, val_fraction: float
) -> tuple[list[str], dict[str, Any]]:
    """Write the staged training sets under ``out/data``; returns their specs and notes."""
    root = out / "data"
    pieces = _stage_pieces(sets)
    by_folder: dict[str, list[_Piece]] = {}
    for p in pieces:
        by_folder.setdefault(p.folder, []).append(p)
    for folder, members in by_folder.items():
        _write_staged(root, folder, members)
    specs = [str(root / f) for f in by_folder]
    val = _validation_keys(pieces, val_fraction)
    notes: dict[str, Any] = {
        "pieces": len(pieces),
        "validation": sorted(val),
        "sources": {f"{p.folder}/{p.key}": p.source for p in pieces},
    }
    if not val:
        notes["warning"] = (
            "the training set is too small to hold out a validation tile: the model of "
            "the first epoch is kept and the post-processing is not re-tuned"
        )
    if bundled:
        areas = _bundled_areas(bundled)
        train_pieces = [p for p in pieces if f"{p.folder}/{p.key}" not in val]
        repeats: dict[str, int] = {}
        for mod in ("he", "fluorescence"):
            mine = [p for p in train_pieces if p.modality == mod]
            user_area = sum(p.canonical_area for p in mine)
            if not mine or user_area <= 0 or areas[mod] <= 0:
                continue
            extra = share / (1.0 - share) * areas[mod] / user_area - 1.0
            total_px = sum(p.labels.size for p in mine)
            copies = int(min(round(extra), MOSAIC_MAX_PIXELS // max(total_px, 1)))
            if copies < 1:
                continue
            mosaics = [_mosaic(p, copies) for p in mine]
            name = f"repeat-{mod}"
            for m in mosaics:  # one image per folder: the trainer never validates on it
                folder = f"{name}-{m.key}"[:80]
                _write_staged(root, folder, [replace(m, folder=folder)])
                specs.append(str(root / folder))
            repeats[mod] = copies
            got = user_area * (1 + copies) / (user_area * (1 + copies) + areas[mod])
            notes.setdefault("share", {})[mod] = round(got, 3)
        notes["repeats"] = repeats
    return specs, notes


# ------------------------------------------------------------------ run folder


def read_run(out: str | os.PathLike) -> dict[str, Any] | None:
    """The record of the fine-tuning run in ``out`` (None when there is none)."""
    path = Path(out) / RUN_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_run(out: Path, run: dict[str, Any]) -> None:
    write_bytes(out / RUN_FILE, json.dumps(run, indent=2).encode(), overwrite=True)


def _identity(request: dict[str, Any]) -> dict[str, Any]:
    """What must match for a run folder to be resumed (epochs and names may change)."""
    return {
        k: v for k, v in request.items() if k not in ("epochs", "steps_per_epoch", "name", "device")
    }


def _complete_model(model_dir: Path, parent: LoadedModel, provenance: dict[str, Any]) -> None:
    """Give modalities the run could not tune the parent's post-processing; record provenance."""
    model = load_model(model_dir)
    post = dict(model.postprocess)
    for mod, params in parent.postprocess.items():
        post.setdefault(mod, params)
    extra = {k: v for k, v in model.config.items() if k not in _PROVENANCE_SKIP}
    extra["finetune"] = provenance
    save_model_folder(
        model_dir, model.net, extra_config=extra, postprocess=post, metrics=model.metrics
    )


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------- finetune


def finetune(
    sets: Sequence[str | os.PathLike],
    base_model: str | os.PathLike = "default",
    out: str | os.PathLike = "finetuned",
    *,
    epochs: int = 10,
    steps_per_epoch: int = 50,
    lr: float = 5e-4,
    batch_size: int = 8,
    crop: int = 256,
    augment: AugmentConfig | None = None,
    include_bundled_data: Sequence[str] | None = None,
    bundled_share: float = 0.5,
    name: str | None = None,
    seed: int = 0,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    device: str = "auto",
    verbose: bool = False,
) -> Path:
    """Fine-tune ``base_model`` on the training ``sets``; returns the model folder ``out/model``.

    Parameters
    ----------
    sets : folders (or ``PATH@PIXEL_SIZE``) written by :func:`export_ground_truth`
    base_model : a bundled model name or a model folder; the new model starts from its
        weights and keeps its network.
    out : the run folder (see the module docstring). A folder that holds a run with the
        same sets, base model and settings is resumed (``epochs`` may be raised); any
        other non-empty folder is refused.
    include_bundled_data : data folders to mix in (see :func:`bundled_training_data`);
        the user's tiles are repeated until they make up ``bundled_share`` of the pixels
        of their modality.
    on_epoch : called with ``{"epoch", "loss", "val_aji", "best_aji", "seconds"}``.
    on_progress : called with ``{"event": "step", "done", "total"}``,
        ``{"event": "phase", "text"}``, ``{"event": "warning", "text"}`` (e.g. a set too
        small to validate on) and, when resuming, once with ``{"event": "history",
        "records"}`` (the epochs of the earlier part of the run).
    should_stop : polled at every step; when it returns True, :class:`CancelledError` is
        raised after the last finished epoch's checkpoint and best model are kept.

    Raises
    ------
    InputError
        No sets, unreadable or empty sets, bad settings, an output folder that cannot
        be written or holds something else, or a write failure (disk full) while
        training (the last complete model, if any, stays in place).
    ModelError
        The base model folder is missing, incomplete or corrupt.
    CancelledError
        ``should_stop`` asked to stop.
    """
    sets = [str(s) for s in sets if str(s).strip() not in ("", ".")]
    if not sets:
        raise InputError("choose at least one training-set folder (export ground truth first)")
    for label, value, low in (
        ("epochs", epochs, 1),
        ("steps per epoch", steps_per_epoch, 1),
        ("batch size", batch_size, 1),
    ):
        if int(value) < low:
            raise InputError(f"{label} must be at least {low}, got {value}")
    if not (0 < lr <= 1):
        raise InputError(f"learning rate must be in (0, 1], got {lr}")
    if crop < 32 or crop % 16:
        raise InputError(f"crop size must be a multiple of 16 and at least 32, got {crop}")
    bundled = [str(s) for s in include_bundled_data or []]
    if bundled and not (0 < bundled_share < 1):
        raise InputError(f"the share of your data must be in (0, 1), got {bundled_share}")
    parent = load_model(base_model)  # ModelError on a missing / corrupt folder
    resolved_sets = []
    for s in sets:
        folder, px = parse_folder_spec(s)
        if not folder.is_dir():
            raise InputError(f"{folder}: training-set folder not found")
        resolved_sets.append(str(folder.resolve()) + (f"@{px:g}" if px is not None else ""))
    augment = augment or AugmentConfig()
    out = Path(out).expanduser()
    request = {
        "sets": resolved_sets,
        "base_model": str(parent.path.resolve()),
        "bundled": bundled,
        "bundled_share": bundled_share if bundled else None,
        "net": parent.config["net"],
        "epochs": int(epochs),
        "steps_per_epoch": int(steps_per_epoch),
        "lr": float(lr),
        "batch_size": int(batch_size),
        "crop": int(crop),
        "seed": int(seed),
        "augment": augment.to_dict(),
        "name": name or f"{parent.config.get('name') or parent.name} fine-tuned",
        "device": device,
    }
    request = json.loads(json.dumps(request))  # tuples as lists, as they are read back
    run = read_run(out) if out.is_dir() else None
    if run is not None:
        if _identity(run.get("request", {})) != _identity(request):
            raise InputError(
                f"{out} holds a fine-tuning run with other training sets, base model or "
                "settings; choose a new output folder (or the same settings to resume it)"
            )
    elif out.exists() and not out.is_dir():
        raise InputError(f"{out}: is a file; choose a folder for the fine-tuned model")
    elif out.exists() and any(out.iterdir()):
        raise InputError(
            f"{out} is not empty; choose an empty or new output folder "
            "(or the folder of an earlier fine-tuning run to resume it)"
        )
    out = _writable_folder(out, "fine-tuned model")

    def progress(event: dict[str, Any]) -> None:
        if on_progress is not None:
            on_progress(event)

    def stop_requested() -> bool:
        return bool(should_stop is not None and should_stop())

    val_fraction = 0.15
    try:
        if run is None or not run.get("staged"):
            progress({"event": "phase", "text": "Copying the training sets…"})
            run = {"request": request, "staged": [], "history": [], "status": "staging"}
            _write_run(out, run)
            shutil.rmtree(out / "data", ignore_errors=True)  # a staging that failed half-way
            run["staged"], run["notes"] = _stage(out, sets, bundled, bundled_share, val_fraction)
            if run["notes"].get("warning"):
                progress({"event": "warning", "text": run["notes"]["warning"]})
        else:
            run["request"] = request
            progress({"event": "phase", "text": "Resuming the earlier run…"})
            if run.get("history"):
                progress({"event": "history", "records": list(run["history"])})
        run["status"] = "running"
        _write_run(out, run)
        if stop_requested():
            raise CancelledError("fine-tuning cancelled before it started")
        total_steps = int(epochs) * int(steps_per_epoch)
        cfg = TrainConfig(
            data=[*run["staged"], *bundled],
            out=str(out),
            init=str(parent.path),
            epochs=int(epochs),
            steps_per_epoch=int(steps_per_epoch),
            batch_size=int(batch_size),
            crop=int(crop),
            lr=float(lr),
            warmup_steps=max(1, min(50, total_steps // 10)),
            seed=int(seed),
            device=device,
            val_fraction=val_fraction,
            net=NetConfig.from_dict(parent.config["net"]),
            augment=augment,
            name=request["name"],
        )
        done_epochs = len(run.get("history", []))
        calls = [0]

        def polled() -> bool:
            done = (done_epochs * int(steps_per_epoch)) + calls[0]
            calls[0] += 1
            progress({"event": "step", "done": min(done, total_steps), "total": total_steps})
            return stop_requested()

        def epoch_done(record: dict[str, Any]) -> None:
            nonlocal done_epochs
            done_epochs = int(record["epoch"])
            calls[0] = 0
            run.setdefault("history", []).append(dict(record))
            _write_run(out, run)
            if on_epoch is not None:
                on_epoch(dict(record))
            if done_epochs >= int(epochs):
                progress({"event": "phase", "text": "Tuning the post-processing…"})

        progress({"event": "phase", "text": "Loading the training images…"})
        try:
            model_dir = train(cfg, on_epoch=epoch_done, should_stop=polled, verbose=verbose)
        except CancelledError:
            run["status"] = "cancelled"
            if (out / "model" / "config.json").exists():
                _complete_model(out / "model", parent, {**request, "status": "cancelled"})
            _write_run(out, run)
            raise
        _complete_model(model_dir, parent, {**request, "status": "finished"})
        run["status"] = "finished"
        _write_run(out, run)
        return model_dir
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        if getattr(exc, "filename", None):
            reason += f": {exc.filename}"
        kept = (
            f"; the last complete model stays in {out / 'model'}"
            if (out / "model" / "config.json").exists()
            else ""
        )
        raise InputError(f"fine-tuning in {out} stopped: {reason}{kept}") from exc
    except ValueError as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(str(exc)) from exc
    finally:
        _release_memory()


_DONE = object()


def iter_finetune(*args: Any, **kwargs: Any) -> Generator[dict[str, Any], None, Path]:
    """:func:`finetune` as a generator of events, for a worker thread's progress.

    Yields ``{"event": "epoch", ...record}`` after each epoch and the ``on_progress``
    events (``"step"``, ``"phase"``, ``"history"``); returns the model folder. The
    training runs in a helper thread; its exceptions are raised here.
    """
    if "on_epoch" in kwargs or "on_progress" in kwargs:
        raise TypeError("iter_finetune yields the epochs and progress itself")
    events: queue.Queue = queue.Queue()
    result: dict[str, Any] = {}
    abandoned = threading.Event()  # the consumer closed the generator: stop training
    user_stop = kwargs.pop("should_stop", None)

    def stop() -> bool:
        return abandoned.is_set() or bool(user_stop is not None and user_stop())

    def target() -> None:
        try:
            result["path"] = finetune(
                *args,
                on_epoch=lambda r: events.put({"event": "epoch", **r}),
                on_progress=events.put,
                should_stop=stop,
                **kwargs,
            )
        except BaseException as exc:  # handed to the generator's caller
            result["error"] = exc
        finally:
            events.put(_DONE)

    thread = threading.Thread(target=target, name="napari-medinst-finetune", daemon=True)
    thread.start()
    try:
        while True:
            item = events.get()
            if item is _DONE:
                break
            yield item
    finally:
        if thread.is_alive():
            abandoned.set()
        thread.join()
    if "error" in result:
        raise result["error"]
    return result["path"]


def summarise_scores(scores: Mapping[str, ImageScores]) -> dict[str, dict[str, float]]:
    """The scores a side-by-side table shows, per model name."""
    out = {}
    for label, s in scores.items():
        out[label] = {
            "AJI": s.aji,
            "PQ": s.pq,
            "F1 @ IoU 0.5": s.f1.get(0.5, float("nan")),
            "mAP 0.5-0.95": s.map,
            "Dice": s.dice,
            "nuclei found": float(s.n_pred),
            "nuclei in ground truth": float(s.n_gt),
        }
    return out
