"""Whole slides segmented block by block on ``dask.distributed``, straight into a zarr store.

Plan (:func:`plan_slide`, on the client, reading only the header, the coarsest level and
one central crop): the *working level* is the coarsest level whose pixel size is at most
the model's working size (0.5 µm/px, :data:`~.preprocess.CANONICAL_PIXEL_SIZE`). A slide
without a pixel size is estimated on a central crop of level 0 (and the plan says so).
Modality, post-processing parameters and normalisation are decided once
(:func:`~.blockwise.prepare_setup`); the blocks are those of
:func:`~.blockwise.plan_blocks` over the working level (the grid of the in-memory block
path, so both give the same nuclei). A tissue mask of the coarsest level (saturation for
H&E, intensity for fluorescence, Otsu) marks blocks with less than ``min_tissue`` of
tissue in their core as background: they are recorded as complete and empty, unread.

Run (:func:`run_slide`), two phases, both on the workers, which read the slide by its
*path* and write into the store themselves; only small summaries travel back:

1. *segment* a block: get the whole slide's model maps on its window, post-process them
   (:func:`~.blockwise.block_from_maps`) and save its owned nuclei (centroid in the core,
   whole outline) as ``records/<block>.npz``, then the marker ``records/<block>.json``.
   With a network model the maps come from *map regions* (:mod:`.tilemaps`): a region
   task reads the pixels of a group of the slide's 512 px model tiles, runs each tile
   once (model loaded once per worker process) and saves the maps as
   ``maps/<region>-<part>.npy``; a block task waits for the regions its window meets and
   reads just that part of their files. Tasks are prioritised in row order and a region's
   file is removed when every block reading it is done, so about two rows of tiles' maps
   across the slide and the regions of the blocks being segmented are on disk at a time
   (36 bytes a working px with a typed model). The classical
   fallback has no tiles: its blocks compute their maps from their own pixels.
2. *paint* a chunk of ``labels``: gather the owned nuclei of every block whose window
   reaches near the chunk and paint them in one fixed order (block, then local id). A
   nucleus more than half covered by earlier ones is the same nucleus claimed by two
   blocks and is dropped; otherwise it gives up the pixels of earlier kept ones and
   keeps its largest piece (the rules of :func:`~.blockwise.paste_block`). Each decision
   looks only at the nucleus and the ones overlapping it, so every chunk computes the
   same outline for a nucleus it shares with a neighbour: tasks write disjoint chunks
   and need no locks. The task also writes the chunk's part of every pyramid level
   (every ``2**i``-th pixel; level ``i``'s chunks are ``chunk / 2**i`` px, so each
   paint task owns exactly one chunk per level). The chunk's table rows (nuclei whose
   centroid lies in it) go into ``chunks/<chunk>.npy``, the chunk's completion marker,
   written last.

Every write is atomic (zarr's local store renames each chunk into place; records and
markers go through :func:`~._io._atomic_write`) and every task can run twice with the
same result, so a worker process that dies mid-task is harmless: ``distributed`` runs
its tasks again elsewhere. An interrupted client leaves the store ``incomplete``;
``--resume`` redoes what has no marker.

Labels are unique without coordination: block ``k``'s nucleus ``i`` gets the id
``k * stride + i``, ``stride`` the power of two above the largest window's pixel count (a
block cannot own more nuclei than it has pixels). ``uint32`` when every id fits, else
``uint64``, which cannot overflow (``2**64 / stride`` blocks of ``stride`` pixels would be
far beyond any slide). The table of nuclei gives each id its centroid and bounding box in
slide µm (level-0 origin), area in µm², score and type.

Store (zarr format 2, readable by zarr-python 2 and 3; the labels are an OME-NGFF 0.4
label image, written with :func:`~.omezarr.label_image_attrs`)::

    OUT.zarr/
      .zattrs          napari_medinst_slide: plan, settings, status running|incomplete|complete
      labels/          .zattrs {"labels": ["nuclei"]}
        nuclei/        .zattrs multiscales (y, x in micrometer, working level's µm/px) +
                       image-label; 0/ (H, W) uint32|uint64 at the working level, chunks of
                       ``block`` px; 1/, 2/, ...: every 2**i-th pixel, chunks ``block/2**i``
      maps/            while running: per map region, its model maps (removed when read)
      records/         per block: <k>.npz (owned nuclei), <k>.json (marker, written last)
      chunks/          per chunk: <k>.npy (table rows; marker, written last)
      nuclei.csv       written at the end, when every chunk is complete
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from ._io import InputError, _atomic_write, bytes_writer, check_free_space, remove_stale_parts
from .blockwise import (
    HALO_UM,
    BlockResult,
    BlockSetup,
    BlockSpec,
    _grid_step,
    _tile_grid,
    block_from_maps,
    core_edges,
    plan_blocks,
    prepare_setup,
    segment_block,
)
from .editing import largest_part
from .model.folder import LoadedModel
from .model.inference import CancelledError, Maps
from .omezarr import label_image_attrs, level_count, pyramid
from .preprocess import (
    CANONICAL_PIXEL_SIZE,
    Modality,
    check_pixel_size,
    detect_modality,
    network_scale,
    prepare_image,
)
from .segment import get_model
from .slide import _LEVEL_SLACK, _zarr, open_slide, read_region
from .tilemaps import MapRegion, assemble, plan_regions, region_maps

__all__ = ["LABELS", "MIN_TISSUE", "SlidePlan", "SlideRun", "connect", "label_levels",
           "plan_slide", "run_slide", "write_table"]  # fmt: skip

#: Block and zarr chunk side of a slide, px of the working level (larger than the
#: in-memory path's blocks: fewer, larger chunk files and tasks; a worker's peak stays
#: near 1 GB).
DEFAULT_BLOCK = 2048
#: A block whose core holds less tissue than this share is background (not segmented).
MIN_TISSUE = 0.01
#: Side of the central crop the pixel size is estimated on (px of level 0).
ESTIMATE_CROP = 2048
#: The coarsest level is read whole for the tissue mask only up to this many pixels.
MAX_MASK_PIXELS = 25_000_000
STORE_KEY = "napari_medinst_slide"
#: Layout of the store (1: labels as a plain array; 2: an OME-NGFF label image).
STORE_FORMAT = 2
#: The label image inside the store (its ``labels/`` group lists it).
LABEL_NAME = "nuclei"
LABELS = f"labels/{LABEL_NAME}"
#: Pyramid levels stop before their chunks would be smaller than this (px).
MIN_LEVEL_CHUNK = 64
#: Seconds a run waits for its tasks between two questions to ``should_stop``.
POLL_S = 0.5
#: Rows of nuclei.csv formatted at a time.
_CSV_BATCH = 16384
_TABLE = [("id", "u8"), ("centroid_y_um", "f8"), ("centroid_x_um", "f8"), ("bbox_y0_um", "f8"),
          ("bbox_x0_um", "f8"), ("bbox_y1_um", "f8"), ("bbox_x1_um", "f8"),
          ("area_um2", "f8"), ("score", "f4"), ("type", "i2")]  # fmt: skip


@dataclass(frozen=True)
class SlidePlan:
    """Everything the workers share for one slide: decided once, on the client."""

    path: str
    stamp: tuple[int, int]  # (mtime_ns, size) of the slide
    level: int
    downsample: float  # level-0 px per working-level px
    shape: tuple[int, int]  # working level (H, W)
    setup: BlockSetup  # pixel_size: µm/px of the working level
    model: str
    specs: tuple[BlockSpec, ...]
    background: frozenset[int]  # blocks with too little tissue: not segmented
    chunk: int
    stride: int
    dtype: str
    notes: tuple[str, ...] = ()
    #: Map regions the blocks share (:mod:`.tilemaps`; empty for the classical fallback)
    #: and, per block, the regions it reads.
    regions: tuple[MapRegion, ...] = ()
    uses: tuple[tuple[int, ...], ...] = ()
    map_channels: int = 0

    @functools.cached_property
    def _region_index(self) -> dict[int, MapRegion]:
        return {r.index: r for r in self.regions}

    def region(self, g: int) -> MapRegion:
        """Map region ``g`` (its :attr:`~.tilemaps.MapRegion.index`)."""
        try:
            return self._region_index[g]
        except KeyError:
            raise KeyError(f"region {g} is not in the plan") from None

    @property
    def n_chunks(self) -> tuple[int, int]:
        return (-(-self.shape[0] // self.chunk), -(-self.shape[1] // self.chunk))

    def fingerprint(self) -> dict:
        """The settings a resumed run must share with the store."""
        s = self.setup
        return {"slide": self.path, "stamp": list(self.stamp), "level": self.level,
                "shape": list(self.shape), "model": self.model, "modality": s.modality,
                "pixel_size_um": round(s.pixel_size, 9), "tta": s.tta,
                "blocks": [list(b.window) for b in self.specs],
                "reads": [list(b.read_box) for b in self.specs], "chunk": self.chunk,
                "background": sorted(self.background), "stride": self.stride,
                "dtype": self.dtype, "params": dataclasses.asdict(s.params)}  # fmt: skip


@dataclass
class SlideRun:
    """What a run did: counts, failures, and where the results are."""

    out: Path
    n_blocks: int
    n_background: int
    segmented: int
    painted: int
    n_nuclei: int
    failed: dict[int, str]  # block or chunk ("chunk k") -> one-line reason
    seconds: float
    complete: bool


# --------------------------------------------------------------------------- planning


def _read_level(path: str, level: int, shape: tuple[int, int]) -> np.ndarray:
    return read_region(path, level, 0, shape[0], 0, shape[1])


def _tissue(overview: np.ndarray, modality: Modality) -> np.ndarray:
    """Tissue (True) on a low-resolution RGB or grey overview, by Otsu, slightly dilated."""
    from skimage.filters import threshold_otsu

    arr = overview.astype(np.float32)
    if modality == "he" and arr.ndim == 3 and arr.shape[-1] == 3:
        top = arr.max(axis=-1)
        signal = (top - arr.min(axis=-1)) / np.maximum(top, 1.0)  # saturation
        lo, hi = 0.04, 0.15
    else:
        signal = arr.max(axis=-1) / 255.0 if arr.ndim == 3 else arr / 255.0
        lo, hi = 0.02, 0.5
    thr = float(np.clip(threshold_otsu(signal), lo, hi)) if np.ptp(signal) > 0 else hi
    return ndi.binary_dilation(signal > thr, iterations=2)


def _background_blocks(slide, level: int, specs, modality, min_tissue: float) -> frozenset:
    """Blocks whose core holds less than ``min_tissue`` of tissue on the coarsest level."""
    coarse = len(slide.levels) - 1
    shape = slide.levels[coarse].shape[:2]
    if min_tissue <= 0 or shape[0] * shape[1] > MAX_MASK_PIXELS:
        return frozenset()
    overview = _read_level(str(slide.path), coarse, shape)
    mask = _tissue(overview[..., 0] if overview.shape[-1] == 1 else overview, modality)
    scale = slide.downsamples[level] / slide.downsamples[coarse]
    empty = set()
    for spec in specs:
        r0, r1, c0, c1 = spec.core
        part = mask[int(r0 * scale) : max(int(r0 * scale) + 1, math.ceil(r1 * scale)),
                    int(c0 * scale) : max(int(c0 * scale) + 1, math.ceil(c1 * scale))]  # fmt: skip
        if part.size == 0 or part.mean() < min_tissue:
            empty.add(spec.index)
    return frozenset(empty)


def _central(path: str, level: int, shape: tuple[int, int], size: int) -> np.ndarray:
    r0, c0 = max(0, (shape[0] - size) // 2), max(0, (shape[1] - size) // 2)
    crop = read_region(path, level, r0, min(shape[0], r0 + size), c0, min(shape[1], c0 + size))
    return crop[..., 0] if crop.shape[-1] == 1 else crop


def _working_level(slide, px0: float, target: float) -> int:
    """Coarsest level whose pixel size (level 0: ``px0``) is at most ``target``."""
    best = 0
    for k, ds in enumerate(slide.downsamples):
        if px0 * ds <= target * (1 + _LEVEL_SLACK):
            best = k
    return best


def _level0_pixel_size(slide, loaded, pixel_size, modality, device) -> tuple[float, bool, str]:
    """(µm/px of level 0, estimated?, note) from the user, the file, or the image."""
    if pixel_size is not None:
        return check_pixel_size(pixel_size, "--pixel-size"), False, ""
    if slide.pixel_size_um is not None:
        return slide.pixel_size_um, False, ""
    shape = slide.levels[0].shape[:2]
    crop = _central(str(slide.path), 0, shape, ESTIMATE_CROP)
    est = prepare_setup(crop, loaded, modality=modality, device=device, tta=False).pixel_size
    note = (f"{slide.path}: the slide states no pixel size; estimated {est:.3f} µm/px from "
            "the image (give --pixel-size to set it)")  # fmt: skip
    return est, True, note


def _ids(specs) -> tuple[int, str]:
    """Ids per block (a power of two above the largest window) and the labels' dtype."""
    biggest = max((w[1] - w[0]) * (w[3] - w[2]) for w in (s.window for s in specs))
    stride = 1 << int(biggest).bit_length()
    fits = len(specs) * stride <= np.iinfo(np.uint32).max
    return stride, "uint32" if fits else "uint64"


def plan_slide(
    path: str | os.PathLike,
    model: str = "default",
    *,
    pixel_size: float | None = None,
    modality: Modality | None = None,
    block: int = DEFAULT_BLOCK,
    device: str = "auto",
    tta: bool | int = True,
    min_tissue: float = MIN_TISSUE,
) -> SlidePlan:
    """Choose the working level, decide the setup once, cut blocks and find background.

    Parameters
    ----------
    path : path-like
        The slide (any format :func:`~.slide.open_slide` reads).
    model : str
        ``'default'``, ``'classical'``, a bundled name or a model folder.
    pixel_size : float, optional
        µm/px of level 0; default: the file's, else estimated on a central crop.
    block : int
        Core size of a block and side of a zarr chunk, px of the working level.
    min_tissue : float
        Blocks with a smaller share of tissue in their core are skipped (0: none).
    """
    if isinstance(block, bool) or not isinstance(block, int) or block < 64:
        raise InputError(f"--block-size must be a whole number of at least 64 px, got {block!r}")
    if not 0 <= min_tissue < 1:
        raise InputError(f"--min-tissue must be a share from 0 to 1, got {min_tissue!r}")
    slide = open_slide(path)
    loaded = get_model(model, device)
    if modality is None:
        coarse = len(slide.levels) - 1
        cshape = slide.levels[coarse].shape[:2]
        modality = detect_modality(_central(str(slide.path), coarse, cshape, 2048))
    px0, estimated, note = _level0_pixel_size(slide, loaded, pixel_size, modality, device)
    level = _working_level(slide, px0, CANONICAL_PIXEL_SIZE)
    shape = tuple(int(n) for n in slide.levels[level].shape[:2])
    px = px0 * slide.downsamples[level]
    crop = _central(str(slide.path), level, shape, ESTIMATE_CROP)
    setup = prepare_setup(crop, loaded, pixel_size=px, modality=modality, device=device, tta=tta)
    setup = dataclasses.replace(setup, pixel_size_estimated=estimated)
    halo = max(16, math.ceil(HALO_UM / px))
    grid = _tile_grid(loaded, px)
    specs = tuple(plan_blocks(shape, block, halo, _grid_step(loaded, px), grid=grid))
    stride, dtype = _ids(specs)
    background = _background_blocks(slide, level, specs, modality, min_tissue)
    regions, uses, channels = (), (), 0
    if isinstance(loaded, LoadedModel):
        windows = {s.index: s.window for s in specs if s.index not in background}
        regions, used = plan_regions(shape, windows, pixel_size=px, stride=loaded.net.stride,
                                     align=_grid_step(loaded, px), edges=core_edges(specs))  # fmt: skip
        uses = tuple(used.get(s.index, ()) for s in specs)
        channels = 4 + (loaded.net.config.n_types or 0)
    return SlidePlan(
        path=str(Path(path).resolve()),
        stamp=(slide.path.stat().st_mtime_ns, slide.path.stat().st_size),
        level=level,
        downsample=float(slide.downsamples[level]),
        shape=shape,
        setup=setup,
        model=model if isinstance(model, str) else loaded.name,
        specs=specs,
        background=background,
        chunk=block,
        stride=stride,
        dtype=dtype,
        notes=(note,) if note else (),
        regions=regions,
        uses=uses,
        map_channels=channels,
    )


# ------------------------------------------------------------------------ the store


def _is_ours(out: Path) -> bool:
    try:
        attrs = json.loads((out / ".zattrs").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(attrs, dict) and STORE_KEY in attrs


def check_store(out: str | os.PathLike, *, resume: bool, overwrite: bool) -> Path:
    """Refuse an existing output unless ``resume`` or ``overwrite`` (ours only), before work."""
    out = Path(out).expanduser()
    if resume and overwrite:
        raise InputError("--resume and --overwrite exclude each other")
    if out.suffix.lower() != ".zarr":
        raise InputError(f"{out}: the output must be a .zarr folder")
    if not os.path.lexists(out):
        if resume:
            raise InputError(f"{out}: nothing to resume (no such store)")
        return out
    if not out.is_dir() or not _is_ours(out):
        raise InputError(f"{out}: exists and is not a store napari-medinst segment-slide wrote; "
                         "not touched (choose another output)")  # fmt: skip
    if not (resume or overwrite):
        raise InputError(f"{out}: already exists (use --resume to finish it or --overwrite "
                         "to replace it)")  # fmt: skip
    return out


def _set_status(out: Path, meta: dict, status: str) -> None:
    zarr = _zarr()
    group = zarr.open_group(str(out), mode="r+", zarr_format=2)
    group.attrs[STORE_KEY] = {**meta, "status": status}


def _store_meta(plan: SlidePlan) -> dict:
    s = plan.setup
    return {"format": STORE_FORMAT, "plan": plan.fingerprint(),
            "scale_um": [s.pixel_size, s.pixel_size], "level": plan.level,
            "downsample": plan.downsample, "pixel_size_estimated": s.pixel_size_estimated,
            "labels": LABELS, "label_levels": label_levels(plan.shape, plan.chunk),
            "ids": f"block * {plan.stride} + local id"}  # fmt: skip


def label_levels(shape: tuple[int, int], chunk: int) -> int:
    """Levels of the labels' pyramid: halving while the larger side is at least 256 px
    (:func:`~.omezarr.level_count`) and ``chunk`` splits into whole chunks of at least
    :data:`MIN_LEVEL_CHUNK` px (so that a paint task owns one chunk of every level)."""
    n, most = 1, level_count(shape)
    while n < most and chunk % 2**n == 0 and chunk >> n >= MIN_LEVEL_CHUNK:
        n += 1
    return n


def labels_path(out: str | os.PathLike) -> Path:
    """The OME-NGFF label image (``multiscales`` levels ``0``, ``1``, ...) of a store."""
    return Path(out) / LABELS


def _create_labels(group, plan: SlidePlan) -> None:
    """The ``labels/`` group and its label image: empty pyramid levels and metadata."""
    labels = group.create_group("labels")
    image = labels.create_group(LABEL_NAME)
    n = label_levels(plan.shape, plan.chunk)
    for i in range(n):
        f = 2**i
        image.create_array(str(i), shape=(-(-plan.shape[0] // f), -(-plan.shape[1] // f)),
                           chunks=(plan.chunk // f, plan.chunk // f), dtype=plan.dtype,
                           fill_value=0, chunk_key_encoding={"name": "v2", "separator": "/"})  # fmt: skip
    image.attrs.update(label_image_attrs(LABEL_NAME, n, plan.setup.pixel_size))
    labels.attrs["labels"] = [LABEL_NAME]


def _has_edits(out: Path) -> bool:
    """Whether regions of the store were corrected by hand (``slide_edit``)."""
    try:
        return "napari_medinst_edits" in json.loads((out / ".zattrs").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def _create_store(out: Path, plan: SlidePlan, overwrite: bool) -> None:
    zarr = _zarr()
    if overwrite and out.exists():
        if _has_edits(out):  # hand corrections are never deleted: the old store is kept
            kept = out.with_name(f"{out.stem}.edited-{time.strftime('%Y%m%d-%H%M%S')}.zarr")
            out.rename(kept)
            print(f"{out}: holds hand corrections; kept as {kept}", file=sys.stderr)
        else:
            shutil.rmtree(out)  # check_store made sure it is a store of ours
    group = zarr.open_group(str(out), mode="w-", zarr_format=2)
    _create_labels(group, plan)
    (out / "records").mkdir()
    (out / "chunks").mkdir()
    (out / "maps").mkdir()
    _set_status(out, _store_meta(plan), "running")


def _open_for_resume(out: Path, plan: SlidePlan) -> None:
    attrs = json.loads((out / ".zattrs").read_text())[STORE_KEY]
    if attrs.get("format") != STORE_FORMAT:
        raise InputError(f"{out}: written by another version of segment-slide (store format "
                         f"{attrs.get('format')}, this one writes {STORE_FORMAT}); use "
                         "--overwrite")  # fmt: skip
    if attrs.get("plan") != json.loads(json.dumps(plan.fingerprint())):
        raise InputError(f"{out}: was made from another slide, with other settings "
                         "(model, pixel size, block size, ...) or by an earlier version that "
                         "cut the blocks differently; use --overwrite")  # fmt: skip
    for sub in ("records", "chunks", "maps"):
        (out / sub).mkdir(exist_ok=True)
    _set_status(out, _store_meta(plan), "running")


def _need_bytes(plan: SlidePlan) -> int:
    """Labels plus records, compressed (about 2 bytes a pixel of the tissue blocks), and
    the map regions on disk at once (uncompressed): three rows of tiles' maps across the
    slide and the regions of four blocks."""
    tissue = sum((s.core[1] - s.core[0]) * (s.core[3] - s.core[2])
                 for s in plan.specs if s.index not in plan.background)  # fmt: skip
    if not plan.regions:
        return 2 * tissue
    width = max(r.box[3] for r in plan.regions)  # the working level's, at the working scale
    side = max(r.box[1] - r.box[0] for r in plan.regions)  # one row of tiles
    block = max(s.core[1] - s.core[0] for s in plan.specs) * network_scale(plan.setup.pixel_size)
    return 2 * tissue + int((3 * side * width + 4 * block * block) * 4 * plan.map_channels)


# ------------------------------------------------------------------ worker: phase 1


def _save(path: Path, write: Callable) -> None:
    """Atomically write ``path`` with ``write(file object)``."""

    def writer(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            write(fh)

    _atomic_write(path, writer, True)


def _marker(out: Path, index: int, meta: dict) -> None:
    _atomic_write(out / "records" / f"{index:06d}.json", bytes_writer(json.dumps(meta).encode()),
                  True)  # fmt: skip


_THREADS: list[int] = []
_MALLOC: list[bool] = []
#: glibc's mallopt parameters, and the values a worker process gets (see _tune_malloc).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 32 * 2**20


def _tune_malloc() -> None:
    """Once per worker process: undo the cost of dask's ``MALLOC_TRIM_THRESHOLD_``.

    ``distributed`` starts its workers with ``MALLOC_TRIM_THRESHOLD_=65536`` (to give
    freed memory back to the system). Setting it switches off glibc's adaptive mmap
    threshold, so every buffer above 128 KiB the network allocates is mapped and zeroed
    anew: a tile took 1.6 times as long on this project's 2-core benchmark machine. The
    usual ceilings of that adaptive threshold (32 MiB, and twice that for trimming) are
    set instead, which still gives large blocks of freed memory back.
    """
    if _MALLOC or not sys.platform.startswith("linux") or \
            "MALLOC_TRIM_THRESHOLD_" not in os.environ:  # fmt: skip
        return
    _MALLOC.append(True)
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * _MMAP_THRESHOLD)
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): leave it
        pass


def _limit_threads(threads: int | None) -> None:
    """Once per worker process: torch's threads, so that workers do not oversubscribe,
    and the allocator's settings (:func:`_tune_malloc`)."""
    _tune_malloc()
    if threads and not _THREADS:
        import torch

        torch.set_num_threads(threads)
        _THREADS.append(threads)


def _map_path(out: Path, region: MapRegion) -> Path:
    """A region's maps; the name holds what was computed, so a file never answers for
    another part."""
    return out / "maps" / (f"{region.index:06d}-" + "-".join(map(str, region.part)) + ".npy")


def _read_box(plan: SlidePlan, box: tuple[int, int, int, int]) -> np.ndarray:
    """The working level's pixels in ``box`` (a one-channel image keeps its channel axis:
    prepare_image drops it)."""
    r0, r1, c0, c1 = box
    return read_region(plan.path, plan.level, r0, r1, c0, c1)


def _compute_region(plan: SlidePlan, region: MapRegion, out: Path, device: str) -> None:
    model = get_model(plan.model, device)
    s = plan.setup
    x = s.norm.apply(prepare_image(_read_box(plan, region.read), name=f"region {region.index}"))
    r0, r1, c0, c1 = region.part
    shape = (plan.map_channels, r1 - r0, c1 - c0)

    def write(tmp: Path) -> None:  # straight into the file: no copy of the maps in memory
        dest = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
        region_maps(x, region, model, image_shape=plan.shape, modality=s.modality,
                    pixel_size=s.pixel_size, device=device, tta=s.tta, out=dest)  # fmt: skip
        dest.flush()
        del dest

    _atomic_write(_map_path(out, region), write, True)


def maps_task(plan: SlidePlan, g: int, out: str, device: str, threads: int | None) -> dict:
    """Phase 1a on a worker: the model's maps of region ``g`` into ``maps/`` (once)."""
    t0 = time.perf_counter()
    region = plan.region(g)
    path = _map_path(Path(out), region)
    if not path.exists():  # a resumed run, or a task run again after a worker died
        _limit_threads(threads)
        _compute_region(plan, region, Path(out), device)
    return {"region": g, "seconds": round(time.perf_counter() - t0, 3)}


def _shared_maps(plan: SlidePlan, index: int, out: Path, device: str) -> Maps:
    """Block ``index``'s window maps from its regions' files (read only where needed)."""
    regions, parts = {}, {}
    for g in plan.uses[index]:
        region = plan.region(g)
        path = _map_path(out, region)
        if not path.exists():  # removed by hand, or by a run that finished meanwhile
            _compute_region(plan, region, out, device)
        regions[g], parts[g] = region, np.load(path, mmap_mode="r")
    return assemble(plan.specs[index].window, parts, regions, image_shape=plan.shape,
                    pixel_size=plan.setup.pixel_size)  # fmt: skip


def segment_task(plan: SlidePlan, index: int, out: str, device: str, threads: int | None,
                 *regions_done: dict) -> dict:  # fmt: skip
    """Phase 1 on a worker: segment block ``index`` and save its owned nuclei.

    With map regions (a network model) the block reads its maps from the regions'
    files (``regions_done``: their tasks' results, which make it wait for them);
    otherwise it computes them from its pixels."""
    t0 = time.perf_counter()
    spec = plan.specs[index]
    out_p = Path(out)
    if index in plan.background:
        meta = {"n": 0, "max_side": 0, "background": True, "seconds": 0.0}
        _marker(out_p, index, meta)
        return meta
    _limit_threads(threads)
    if plan.regions:
        maps = _shared_maps(plan, index, out_p, device)
        res = block_from_maps(maps, spec, plan.setup, plan.shape)
    else:
        model = get_model(plan.model, device)
        res = segment_block(_read_box(plan, spec.read_box), spec, plan.setup, model,
                            image_shape=plan.shape, device=device)  # fmt: skip
    meta = save_record(out_p, res)
    meta["seconds"] = round(time.perf_counter() - t0, 3)
    _marker(out_p, index, meta)
    return meta


def save_record(out: Path, res: BlockResult) -> dict:
    """Save a block's owned nuclei as ``records/<block>.npz``; returns its marker's content.

    The marker (:func:`_marker`) is written by the caller, after this.
    """
    boxes = [b for b in ndi.find_objects(res.labels) if b is not None]
    side = max((max(b[0].stop - b[0].start, b[1].stop - b[1].start) for b in boxes), default=0)
    n = int(res.scores.shape[0])
    small = res.labels.astype(np.uint16) if n < 2**16 else res.labels
    types = res.types if res.types is not None else np.zeros(0, np.int16)
    _save(out / "records" / f"{res.spec.index:06d}.npz",
          lambda fh: np.savez_compressed(fh, labels=small, scores=res.scores, types=types,
                                         has_types=res.types is not None))  # fmt: skip
    return {"n": n, "max_side": int(side), "background": False,
            "truncated": int(res.n_truncated)}  # fmt: skip


# ------------------------------------------------------------------ worker: phase 2


@dataclass
class _Nucleus:
    key: tuple[int, int]  # (block, local id): the painting order
    gid: int
    box: tuple[int, int, int, int]  # slide (working level) coords, half-open
    mask: np.ndarray
    centroid: tuple[float, float]  # pixel-centre convention, as blockwise._owned
    score: float
    type: int


def _nuclei_of(out: Path, plan: SlidePlan, index: int, region) -> list[_Nucleus]:
    """Owned nuclei of block ``index`` whose box meets ``region`` (r0, r1, c0, c1)."""
    with np.load(out / "records" / f"{index:06d}.npz") as rec:
        labels, scores, types = rec["labels"], rec["scores"], rec["types"]
        has_types = bool(rec["has_types"])
    wr, wc = plan.specs[index].window[0], plan.specs[index].window[2]
    found = []
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        box = (sl[0].start + wr, sl[0].stop + wr, sl[1].start + wc, sl[1].stop + wc)
        if box[0] >= region[1] or box[1] <= region[0] or box[2] >= region[3] or box[3] <= region[2]:
            continue
        mask = labels[sl] == i
        rr, cc = np.nonzero(mask)
        found.append(_Nucleus(
            key=(index, i), gid=index * plan.stride + i, box=box, mask=mask,
            centroid=(rr.mean() + box[0] + 0.5, cc.mean() + box[2] + 0.5),
            score=float(scores[i - 1]), type=int(types[i - 1]) if has_types else -1))  # fmt: skip
    return found


class _Painter:
    """Paints nuclei in order on a region; decides each one as described in the module."""

    def __init__(self, region: tuple[int, int, int, int]) -> None:
        self.region = region
        shape = (region[1] - region[0], region[3] - region[2])
        self.any = np.zeros(shape, bool)
        self.kept = np.zeros(shape, bool)

    def local(self, nuc: _Nucleus):
        """The nucleus' mask clipped to the region, and its slices there."""
        r0, r1, c0, c1 = self.region
        b = nuc.box
        y0, y1, x0, x1 = max(b[0], r0), min(b[1], r1), max(b[2], c0), min(b[3], c1)
        mask = nuc.mask[y0 - b[0] : y1 - b[0], x0 - b[2] : x1 - b[2]]
        return mask, (slice(y0 - r0, y1 - r0), slice(x0 - c0, x1 - c0))

    def final(self, nuc: _Nucleus) -> np.ndarray | None:
        """The nucleus' painted pixels (clipped to the region), None when dropped."""
        mask, where = self.local(nuc)
        lost = int(np.count_nonzero(self.any[where] & mask))
        self.any[where] |= mask
        if 2 * lost > int(np.count_nonzero(nuc.mask)):
            return None
        free = mask & ~self.kept[where]
        self.kept[where] |= mask
        if lost and free.any():
            free = largest_part(free)
        return free


def _row(nuc: _Nucleus, final: np.ndarray, origin: tuple[int, int], px: float):
    rr, cc = np.nonzero(final)
    rr, cc = rr + origin[0], cc + origin[1]
    return (
        nuc.gid,
        (rr.mean() + 0.5) * px,
        (cc.mean() + 0.5) * px,
        rr.min() * px,
        cc.min() * px,
        (rr.max() + 1) * px,
        (cc.max() + 1) * px,
        rr.size * px * px,
        nuc.score,
        nuc.type,
    )


def chunk_box(plan: SlidePlan, k: int) -> tuple[int, int, int, int]:
    """Rows and columns of chunk ``k`` (row-major) at the working level."""
    i, j = divmod(k, plan.n_chunks[1])
    c = plan.chunk
    return i * c, min((i + 1) * c, plan.shape[0]), j * c, min((j + 1) * c, plan.shape[1])


def _grow(box, by: int, shape) -> tuple[int, int, int, int]:
    return (max(0, box[0] - by), min(shape[0], box[1] + by), max(0, box[2] - by),
            min(shape[1], box[3] + by))  # fmt: skip


def _meets(a, b) -> bool:
    return a[0] < b[1] and b[0] < a[1] and a[2] < b[3] and b[2] < a[3]


def feeders(plan: SlidePlan, k: int, reach: int) -> list[int]:
    """Blocks whose window meets chunk ``k`` grown by ``reach`` px."""
    region = _grow(chunk_box(plan, k), reach, plan.shape)
    return [s.index for s in plan.specs if _meets(s.window, region)]


def paint_task(plan: SlidePlan, k: int, out: str, blocks: list[int], reach: int) -> int:
    """Phase 2 on a worker: paint chunk ``k`` from the records of ``blocks``; table rows."""
    _tune_malloc()
    out_p = Path(out)
    box = chunk_box(plan, k)
    region = _grow(box, reach, plan.shape)
    nuclei = [n for b in blocks for n in _nuclei_of(out_p, plan, b, region)]
    nuclei.sort(key=lambda n: n.key)
    painter = _Painter(region)
    canvas = np.zeros((region[1] - region[0], region[3] - region[2]), plan.dtype)
    rows, px = [], plan.setup.pixel_size
    for nuc in nuclei:
        final = painter.final(nuc)
        if final is None or not final.any():
            continue
        _, where = painter.local(nuc)
        canvas[where][final] = nuc.gid
        cy, cx = nuc.centroid
        if box[0] <= cy < box[1] and box[2] <= cx < box[3]:
            rows.append(_row(nuc, final, (where[0].start + region[0], where[1].start + region[2]),
                             px))  # fmt: skip
    inner = canvas[box[0] - region[0] : box[1] - region[0], box[2] - region[2] : box[3] - region[2]]
    _write_levels(out_p, plan, box, inner)
    table = np.array(rows, dtype=_TABLE)
    _save(out_p / "chunks" / f"{k:06d}.npy", lambda fh: np.save(fh, table))
    return len(rows)


def _write_levels(out: Path, plan: SlidePlan, box, inner: np.ndarray) -> None:
    """Chunk ``box``'s labels into every pyramid level (one whole chunk of each)."""
    zarr = _zarr()
    image = labels_path(out)
    for i, level in enumerate(pyramid(inner, label_levels(plan.shape, plan.chunk))):
        r0, c0 = box[0] >> i, box[2] >> i  # chunk corners are multiples of 2**i
        arr = zarr.open_array(str(image / str(i)), mode="r+")
        arr[r0 : r0 + level.shape[0], c0 : c0 + level.shape[1]] = level


# --------------------------------------------------------------------- the client


def _distributed():
    """The ``distributed`` module, or a clear message when it is not installed."""
    try:
        import distributed
    except ImportError as exc:
        raise InputError("segment-slide needs dask.distributed, which is not installed: "
                         "pip install 'napari-medinst[slides]'") from exc  # fmt: skip
    return distributed


def connect(scheduler: str | None, workers: int, threads_per_worker: int, *,
            set_as_default: bool = True):  # fmt: skip
    """A ``distributed.Client``: on ``scheduler``, else on a new ``LocalCluster``.

    ``set_as_default=False`` keeps dask's default scheduler as it is (napari computes its
    own lazy layers with it; they must not go to a cluster that is closed after the run).
    """
    dist = _distributed()
    Client, LocalCluster = dist.Client, dist.LocalCluster
    if scheduler:
        try:
            return Client(scheduler, timeout="5s", set_as_default=set_as_default)
        except (OSError, TimeoutError, ValueError) as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InputError(f"--scheduler {scheduler}: cannot reach the scheduler ({msg})") \
                from None  # fmt: skip
    if workers < 1 or threads_per_worker < 1:
        raise InputError(f"--workers and --threads-per-worker must be at least 1, got "
                         f"{workers} and {threads_per_worker}")  # fmt: skip
    cluster = LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker,
                           processes=True, dashboard_address=None,
                           silence_logs=logging.ERROR)  # fmt: skip
    try:
        return Client(cluster, set_as_default=set_as_default)
    except BaseException:
        cluster.close()
        raise


def _eta(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def text_progress(stream=None) -> Callable[[str, int, int, float], None]:
    """A progress callback printing ``blocks 12/40, ETA 1m20s`` (throttled) on stderr."""
    stream = stream or sys.stderr
    last = [0.0]

    def show(what: str, done: int, total: int, elapsed: float) -> None:
        now = time.monotonic()
        if done < total and now - last[0] < 2.0 and done > 1:
            return
        last[0] = now
        eta = _eta(elapsed / done * (total - done)) if done else "?"
        end = "\r" if stream.isatty() and done < total else "\n"
        print(f"{what} {done}/{total}, ETA {eta}", end=end, file=stream, flush=True)

    return show


def _collect(fut, key, results: dict, failed: dict) -> None:
    """A finished future's result into ``results``, or its one-line failure into ``failed``."""
    if fut.status == "error":
        exc = fut.exception()
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        failed[key] = f"{type(exc).__name__}: {text}"[:300]
    else:
        results[key] = fut.result()
    fut.release()


def _gather(client, futures: dict, what: str, progress, should_stop=None, *, on_result=None,
            others=()) -> tuple[dict, dict]:  # fmt: skip
    """Results and one-line failures of ``futures`` ({future: key}), with progress.

    ``on_result(key)`` is called for each success. ``others`` are futures the
    gathered ones depend on, cancelled with them.

    Asks ``should_stop`` (a callable returning True to stop) at least every
    :data:`POLL_S` s: on True the outstanding tasks are cancelled and
    :class:`~.model.inference.CancelledError` is raised. Works on ``client``'s own event
    loop, so the client need not be the process' default one (the napari panel's is not).
    """
    ready = _distributed().as_completed(list(futures), loop=client.loop)
    results, failed, t0 = {}, {}, time.perf_counter()
    total, done = len(futures), 0
    try:
        while not ready.is_empty():
            if should_stop is not None and should_stop():
                raise CancelledError(f"cancelled after {what} {done}/{total}")
            batch = ready.next_batch(block=False)
            if not batch:
                time.sleep(min(POLL_S, 0.05))
            for fut in batch:
                done += 1
                _collect(fut, futures[fut], results, failed)
                if on_result is not None and futures[fut] in results:
                    on_result(futures[fut])
                if progress is not None:
                    progress(what, done, total, time.perf_counter() - t0)
    except BaseException:  # interrupted (Ctrl-C, Cancel): start no further task
        client.cancel([*futures, *others])
        raise
    return results, failed


def _done_blocks(out: Path) -> dict[int, dict]:
    found = {}
    for path in (out / "records").glob("*.json"):
        try:
            found[int(path.stem)] = json.loads(path.read_text())
        except ValueError:
            continue  # a damaged marker: the block is done again
    return found


def _done_chunks(out: Path) -> set[int]:
    return {int(p.stem) for p in (out / "chunks").glob("*.npy") if p.stem.isdigit()}


def _plan_task(plan: SlidePlan) -> SlidePlan:
    """The plan as a task's result: every task takes it as a dependency, so it is sent once
    to each worker instead of once with each of the run's (up to tens of thousands of)
    tasks, and a worker that dies with it is no loss (the task runs again)."""
    return plan


def _segment_phase(client, plan, ref, out, device, threads, progress, should_stop=None):
    """Phase 1: blocks without a record; returns (metas of all blocks, redone, failures).

    ``ref`` is the plan as a future (:func:`_plan_task`), which the tasks receive.
    With map regions each block waits for the tasks of the regions it reads. Tasks are
    prioritised in row order (a region just before the first block that needs it), so
    the workers go through the slide row by row and a region's file, removed once every
    block reading it is done, lives while the blocks around it are segmented.
    """
    metas = _done_blocks(out)
    todo = [s.index for s in plan.specs if s.index not in metas]
    stamp, rank = time.time_ns(), [0]

    def submit(fn, *args, key):
        rank[0] += 1
        return client.submit(fn, *args, retries=2, pure=False, priority=-rank[0],
                             key=f"{key}-{stamp}")  # fmt: skip

    map_futures: dict[int, object] = {}
    left: dict[int, int] = {}
    futures = {}
    for i in todo:
        deps = []
        if plan.regions and i not in plan.background:
            for g in plan.uses[i]:
                if g not in map_futures:
                    map_futures[g] = submit(maps_task, ref, g, str(out), device, threads,
                                            key=f"maps-region-{g}")  # fmt: skip
                left[g] = left.get(g, 0) + 1
                deps.append(map_futures[g])
        futures[submit(segment_task, ref, i, str(out), device, threads, *deps,
                       key=f"segment-block-{i}")] = i  # fmt: skip

    def done(i: int) -> None:  # a region no block still needs is removed
        for g in plan.uses[i] if plan.regions else ():
            left[g] -= 1
            if not left[g]:
                map_futures.pop(g).release()
                # (a file still open elsewhere is removed with the folder at the end)
                with contextlib.suppress(OSError):
                    _map_path(out, plan.region(g)).unlink(missing_ok=True)

    results, failed = _gather(client, futures, "blocks", progress, should_stop, on_result=done,
                              others=list(map_futures.values()))  # fmt: skip
    metas.update(results)
    return metas, set(results), failed


def _paint_phase(client, plan, ref, out, metas, redone, failed_blocks, progress,
                 should_stop=None):  # fmt: skip
    """Phase 2: chunks not complete, or fed by a block segmented again in this run."""
    reach = 2 * max((m.get("max_side", 0) for m in metas.values()), default=0) + 2
    done = _done_chunks(out)
    n = plan.n_chunks[0] * plan.n_chunks[1]
    futures, blocked = {}, {}
    for k in range(n):
        feed = feeders(plan, k, reach)
        if k in done and not redone.intersection(feed):
            continue
        missing = [b for b in feed if b in failed_blocks or b not in metas]
        if missing:
            blocked[k] = f"needs failed block(s) {', '.join(map(str, missing))}"
            continue
        feed = [b for b in feed if metas[b].get("n", 0) > 0]
        futures[client.submit(paint_task, ref, k, str(out), feed, reach, retries=2, pure=False,
                              key=f"paint-chunk-{k}-{time.time_ns()}")] = k  # fmt: skip
    results, failed = _gather(client, futures, "chunks", progress, should_stop)
    failed.update(blocked)
    return results, failed


def write_table(out: Path, plan: SlidePlan) -> int:
    """Write ``nuclei.csv`` (atomically) from every chunk's rows; returns the row count.

    ``plan`` is the run's plan or anything with its ``n_chunks`` (rows, columns).

    Used when a run completes and by :mod:`.slide_edit` after a region is written back.
    """
    n = plan.n_chunks[0] * plan.n_chunks[1]
    table = np.concatenate([np.load(out / "chunks" / f"{k:06d}.npy") for k in range(n)])
    table = table[np.argsort(table["id"], kind="stable")]
    has_types = bool(table.size) and bool((table["type"] >= 0).any())
    names = [name for name, _ in _TABLE if name != "type" or has_types]

    def write(tmp: Path) -> None:  # in batches: the text of every row is never held at once
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(",".join(names) + "\n")
            for start in range(0, table.size, _CSV_BATCH):
                fh.write("".join(",".join(_fmt(row[name]) for name in names) + "\n"
                                 for row in table[start : start + _CSV_BATCH]))  # fmt: skip

    _atomic_write(out / "nuclei.csv", write, True)
    return int(table.size)


def _fmt(value) -> str:
    if isinstance(value, np.floating):
        return f"{float(value):.4f}"
    return str(int(value))


def run_slide(
    plan: SlidePlan,
    out: str | os.PathLike,
    client,
    *,
    device: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    threads: int | None = None,
    progress: Callable[[str, int, int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> SlideRun:
    """Segment the planned slide on ``client``'s workers into the store ``out``.

    Returns a :class:`SlideRun`; ``complete`` is False (and the store's status
    ``incomplete``) when a block or chunk still failed after two retries: those have no
    completion marker and ``--resume`` does them again.

    ``should_stop`` (called every :data:`POLL_S` s while tasks run) stops the run when it
    returns True: the outstanding tasks are cancelled, the store is left ``incomplete``
    (a later ``resume=True`` run finishes it) and
    :class:`~.model.inference.CancelledError` is raised.
    """
    t0 = time.perf_counter()
    out = check_store(out, resume=resume, overwrite=overwrite)
    check_free_space(out.parent, _need_bytes(plan))
    if resume:
        _open_for_resume(out, plan)
    else:
        _create_store(out, plan, overwrite)
    ref = client.submit(_plan_task, plan, pure=False, key=f"slide-plan-{time.time_ns()}")
    try:
        metas, redone, failed_blocks = _segment_phase(client, plan, ref, out, device, threads,
                                                      progress, should_stop)  # fmt: skip
        painted, failed_chunks = _paint_phase(client, plan, ref, out, metas, redone,
                                              failed_blocks, progress, should_stop)  # fmt: skip
    except BaseException:  # interrupted: what has no marker is done again by --resume
        client.cancel([ref])
        _set_status(out, _store_meta(plan), "incomplete")
        raise
    ref.release()
    for sub in ("records", "chunks", "maps"):  # temporary files of a worker that died mid-write
        remove_stale_parts(out / sub)
    failed = {**failed_blocks, **{f"chunk {k}": v for k, v in failed_chunks.items()}}
    complete = not failed
    if complete:  # maps of regions whose blocks failed are kept for --resume until then
        shutil.rmtree(out / "maps", ignore_errors=True)
    n_nuclei = write_table(out, plan) if complete else 0
    _set_status(out, _store_meta(plan), "complete" if complete else "incomplete")
    return SlideRun(out=out, n_blocks=len(plan.specs), n_background=len(plan.background),
                    segmented=len(redone - plan.background), painted=len(painted),
                    n_nuclei=n_nuclei, failed=failed, seconds=time.perf_counter() - t0,
                    complete=complete)  # fmt: skip
