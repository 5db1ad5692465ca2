"""The Segment panel's "Whole slide" section, shown when the chosen image is multiscale.

A slide cannot be read whole (level 0 of a 40x slide holds billions of pixels), so the
panel never reads level 0 of a pyramid when a coarser level serves the model:

* **Segment visible region** reads the part of the slide shown in the canvas from the
  *working level* (the coarsest level at most the model's working pixel size, 0.5 µm/px,
  as :func:`~napari_medinst.slide_engine.plan_slide` chooses it), refuses above
  :data:`MAX_REGION_PIXELS`, and hands the region to the panel as its image: the same
  maps, live tuning, corrections and review queue as for any image. The output layers
  carry the region's scale and translate, so they lie on the slide (napari draws level
  ``k`` pixel ``i`` at level-0 pixel ``i * downsample``; the layers do the same).
* **Segment whole slide…** runs :func:`~napari_medinst.slide_engine.plan_slide` and
  :func:`~napari_medinst.slide_engine.run_slide` in a worker thread on a new
  ``LocalCluster`` (closed at the end, on Cancel, and when the panel or the viewer
  closes), into a zarr store. The store is shown as a lazily read multiscale labels
  layer from the first painted chunk on, refreshed as chunks finish, and opened again as
  the finished result at the end. An existing store: a complete one is refused unless
  "overwrite" is ticked; an unfinished one of the same plan is resumed.

User-facing documentation: ``docs/slides.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from magicgui.widgets import CheckBox, Container, FileEdit, Label, ProgressBar, PushButton, SpinBox
from napari.layers import Image, Labels
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QObject, QTimer, Signal

from .._io import InputError
from ..model.inference import CancelledError
from ..preprocess import CANONICAL_PIXEL_SIZE
from ..slide import _LEVEL_SLACK
from ._common import canvas_box

__all__ = ["MAX_REGION_PIXELS", "SlideSection", "region_of", "working_level"]

logger = logging.getLogger(__name__)

#: The largest visible region read at the working level (px); larger: "zoom in".
MAX_REGION_PIXELS = 16_000_000
#: Block (and zarr chunk) side of a whole-slide run, px of the working level.
DEFAULT_BLOCK = 2048
#: The live labels layer is refreshed at most this often while chunks finish (ms).
REFRESH_MS = 1000
#: How long closing the panel waits for a running job to stop and close its cluster (s).
CLOSE_WAIT_S = 30.0


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Region:
    """A rectangle of one pyramid level, and where it lies in the world."""

    level: int
    box: tuple[int, int, int, int]  # r0, r1, c0, c1 at ``level``
    downsample: float  # level-0 px per px of ``level``
    scale: tuple[float, float]
    translate: tuple[float, float]

    @property
    def pixels(self) -> int:
        r0, r1, c0, c1 = self.box
        return (r1 - r0) * (c1 - c0)

    def label(self, name: str) -> str:
        """A name for the region's layers: the slide, the level and the rectangle."""
        r0, r1, c0, c1 = self.box
        return f"{name} [level {self.level} y {r0}:{r1} x {c0}:{c1}]"


def _downsample(layer: Image, level: int) -> float:
    return float(layer.downsample_factors[level][-1])


def _level_shape(layer: Image, level: int) -> tuple[int, int]:
    shape = layer.data[level].shape
    shape = shape[:-1] if layer.rgb else shape
    return int(shape[-2]), int(shape[-1])


def working_level(layer: Image, pixel_size: float | None) -> int:
    """The coarsest level whose pixel size is at most the model's working size.

    ``pixel_size`` is level 0's (µm/px); when it is unknown, level 0 (the pixel size is
    then estimated on the region itself).
    """
    if not pixel_size:
        return 0
    best = 0
    for k in range(len(layer.data)):
        if pixel_size * _downsample(layer, k) <= CANONICAL_PIXEL_SIZE * (1 + _LEVEL_SLACK):
            best = k
    return best


def region_of(layer: Image, level: int, box: tuple[int, int, int, int]) -> Region:
    """The :class:`Region` ``box`` of ``level``, placed like napari draws that level."""
    ds = _downsample(layer, level)
    scale = np.asarray(layer.scale[-2:], float)
    origin = np.asarray(layer.translate[-2:], float) + np.array([box[0], box[2]]) * ds * scale
    return Region(level, box, ds, tuple((scale * ds).tolist()), tuple(origin.tolist()))


def visible_box(viewer, layer: Image, level: int) -> tuple[int, int, int, int]:
    """Rows and columns of ``level`` shown in the canvas (clipped to the level)."""
    return canvas_box(viewer, layer, _level_shape(layer, level), _downsample(layer, level))


def _read(layer: Image, region: Region) -> np.ndarray:
    """The region's pixels (worker thread): only the chunks of its level that it covers."""
    r0, r1, c0, c1 = region.box
    return np.asarray(layer.data[region.level][r0:r1, c0:c1])


# --------------------------------------------------------------------------- the store


def slide_path(layer: Image) -> Path | None:
    """The file the layer was opened from (the slide reader's metadata, else its source)."""
    path = layer.metadata.get("slide_path") if isinstance(layer.metadata, dict) else None
    path = path or getattr(layer.source, "path", None)
    return Path(path) if path else None


def default_store(path: Path) -> Path:
    """``<slide stem>_nuclei.zarr`` beside the slide (``.ome`` dropped from the stem)."""
    stem = path.name.split(".")[0] if path.name.lower().endswith((".ome.tif", ".ome.tiff")) \
        else path.stem  # fmt: skip
    return path.with_name(f"{stem}_nuclei.zarr")


def store_status(out: Path) -> str | None:
    """``running`` / ``incomplete`` / ``complete`` of a segment-slide store, else None."""
    from ..slide_engine import STORE_KEY

    try:
        attrs = json.loads((out / ".zattrs").read_text(encoding="utf-8"))
        return str(attrs[STORE_KEY].get("status", "incomplete"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def store_mode(out: Path, overwrite: bool) -> tuple[bool, bool]:
    """(resume, overwrite) for ``out``: new, replaced (ticked), or an unfinished one resumed.

    Raises
    ------
    InputError
        ``out`` holds a complete result and ``overwrite`` is not ticked.
    """
    if not os.path.lexists(out):
        return False, False
    status = store_status(out)
    if overwrite:
        return False, True
    if status == "complete":
        raise InputError(f"{out}: already holds a complete result; tick 'overwrite' to "
                         "replace it, or choose another output store")  # fmt: skip
    return status is not None, False  # not ours: check_store says so


def _gui_text(exc: BaseException) -> str:
    """One line for the panel: the engine's command-line option names as the panel's."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text.replace("--overwrite", "'overwrite'").replace("--resume", "resume")


@dataclass(frozen=True)
class _Request:
    path: str
    out: str
    model: str
    pixel_size: float | None
    modality: str | None
    device: str
    tta: bool | int
    workers: int
    block: int
    resume: bool
    overwrite: bool


@dataclass
class _Failed:
    """An exception handed to the GUI thread as a value (no traceback dialog)."""

    error: BaseException


class _Relay(QObject):
    """Carries ``run_slide``'s progress from the worker thread to the GUI thread."""

    progress = Signal(str, int, int, float)


def _close(client) -> None:
    """Close the client and the local cluster it started."""
    if client is None:
        return
    cluster = getattr(client, "cluster", None)
    with contextlib.suppress(Exception):
        client.close()
    if cluster is not None:
        with contextlib.suppress(Exception):
            cluster.close()


def _local_client(workers: int):
    """A client of a new ``LocalCluster`` of one-thread worker processes that is not
    napari's default dask scheduler: the viewer's own lazy layers must never be computed
    on the cluster (and fail once it is closed)."""
    from ..slide_engine import connect

    return connect(None, workers, 1, set_as_default=False)


def _slide_job(req: _Request, relay: _Relay, cancel: threading.Event, done: threading.Event):
    """Worker function: plan, start a local cluster, run; always closes the cluster."""
    from .. import slide_engine as se

    client = None
    try:
        plan = se.plan_slide(req.path, req.model, pixel_size=req.pixel_size,
                             modality=req.modality, block=req.block, device=req.device,
                             tta=req.tta)  # fmt: skip
        if cancel.is_set():
            raise CancelledError("cancelled")
        client = _local_client(req.workers)
        threads = max(1, (os.cpu_count() or 1) // req.workers)
        return se.run_slide(plan, req.out, client, device=req.device, resume=req.resume,
                            overwrite=req.overwrite, threads=threads,
                            progress=relay.progress.emit, should_stop=cancel.is_set)  # fmt: skip
    except Exception as exc:
        return _Failed(exc)
    finally:
        _close(client)
        done.set()


# --------------------------------------------------------------------------- sessions


def _find_session(panel, layer: Image, region: Region, settings):
    """The panel's session of this region of ``layer`` with these settings, if any."""
    for s in panel._sessions:
        if s.image is layer and s.place == region and s.settings == settings:
            return s
    return None


def _new_session(panel, layer: Image, region: Region, settings, data: np.ndarray):
    """A panel session whose image is the region read from the slide."""
    from ._segment_widget import _Session

    session = _Session(image=layer, data=data, settings=settings, lead=(), place=region)
    panel._sessions.append(session)
    return session


# --------------------------------------------------------------------------- the section


class SlideSection(Container):
    """Controls of the Segment panel for a multiscale layer (a whole slide).

    Parameters
    ----------
    panel : SegmentWidget
        The Segment panel: its chosen layer, model settings, and the run of a region.
    """

    def __init__(self, panel) -> None:
        super().__init__(labels=True)
        self._panel = panel
        self._viewer = panel._viewer
        self._layer: Image | None = None
        self._reading = False
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._done.set()
        self._worker = None
        self._live: Labels | None = None
        self._out: Path | None = None
        self._phase = ""
        self.block = DEFAULT_BLOCK
        self._relay = _Relay()
        self._relay.progress.connect(self._on_progress)
        self._refresh_timer = QTimer()
        self._refresh_timer.setSingleShot(True)
        self._refresh_timer.setInterval(REFRESH_MS)
        self._refresh_timer.timeout.connect(self._refresh_live)
        self._build()
        panel._pixel_size.changed.connect(lambda *_: self.set_layer(panel._image_layer.value))

    def _build(self) -> None:
        self._info = Label(label="", value="")
        self._region = PushButton(text="Segment visible region")
        self._region.tooltip = (
            "Read the part of the slide shown in the canvas at the model's working pixel "
            f"size (at most {MAX_REGION_PIXELS / 1e6:g} Mpx: zoom in on larger views) and "
            "segment it like an image: the post-processing sliders update it live."
        )
        self._region.changed.connect(self.segment_visible)
        self._store = FileEdit(label="output store", mode="w", filter="*.zarr")
        self._store.tooltip = "A .zarr folder: labels pyramid + nuclei.csv (as segment-slide)."
        self._overwrite = CheckBox(text="overwrite a finished store", value=False)
        cores = os.cpu_count() or 2
        self._workers = SpinBox(label="workers", min=1, max=max(1, min(4, cores)), value=1)
        self._workers.tooltip = "Local worker processes (each loads the model once)."
        self._start = PushButton(text="Segment whole slide…")
        self._start.changed.connect(self.start)
        self._stop = PushButton(text="Cancel", enabled=False)
        self._stop.changed.connect(self.cancel)
        self._buttons = Container(widgets=[self._start, self._stop], layout="horizontal",
                                  labels=False, label="")  # fmt: skip
        self._bar = ProgressBar(label="progress", min=0, max=1, value=0)
        self._status = Label(label="", value="")
        for w in (self._info, self._status):
            w.native.setWordWrap(True)
        # room for two lines: a longer message set later is not clipped by the section
        self._status.native.setMinimumHeight(2 * self._status.native.fontMetrics().lineSpacing())
        self.extend([self._info, self._region, self._store, self._overwrite, self._workers,
                     self._buttons, self._bar, self._status])  # fmt: skip

    # ------------------------------------------------------------------ state

    @property
    def running(self) -> bool:
        """True while a whole-slide job runs (until its cluster is closed)."""
        return not self._done.is_set()

    @property
    def reading(self) -> bool:
        """True while a visible region is read (its segmentation starts next)."""
        return self._reading

    @property
    def idle(self) -> bool:
        """True when no region is being read and no whole-slide job runs."""
        return not self._reading and not self.running

    def _px(self) -> float | None:
        """Level 0's µm/px as the panel's field holds it (None: unknown)."""
        px = float(self._panel._pixel_size.value or 0.0)
        return px if px > 0 else None

    def _alive(self) -> bool:
        return self._panel._alive()

    def set_layer(self, layer: Image | None) -> None:
        """The panel's chosen layer changed: describe the slide, default the store."""
        self._layer = layer if isinstance(layer, Image) and layer.multiscale else None
        if self._layer is None:
            return
        ok = self._layer.ndim == 2
        path = slide_path(self._layer)
        self._region.enabled = ok
        self._start.enabled = ok and path is not None and not self.running
        px = self._px()
        k = working_level(self._layer, px)
        h, w = _level_shape(self._layer, k)
        where = f"level {k} of {len(self._layer.data)}, {h}×{w} px"
        where += f" at {px * _downsample(self._layer, k):.3g} µm/px" if px else \
            " (no pixel size: level 0; set the pixel size above)"  # fmt: skip
        notes = [f"Working level: {where}."]
        if not ok:
            notes.append("Only 2-D slides are supported.")
        elif path is None:
            notes.append("Whole-slide runs need a slide opened from a file.")
        elif not self.running:
            with self._store.changed.blocked():
                self._store.value = default_store(path)
        self._info.value = " ".join(notes)

    # ------------------------------------------------------------------ visible region

    def segment_visible(self, *_: Any) -> None:
        """Segment the visible part of the slide at the working level."""
        layer = self._usable()
        if layer is None:
            return
        k = working_level(layer, self._px())
        self._segment_region(layer, region_of(layer, k, visible_box(self._viewer, layer, k)))

    def segment_level(self) -> None:
        """Segment the whole working level when it is small enough (the panel's Run)."""
        layer = self._usable()
        if layer is None:
            return
        k = working_level(layer, self._px())
        h, w = _level_shape(layer, k)
        if h * w > MAX_REGION_PIXELS:
            show_error(
                f"'{layer.name}' is a whole slide ({w}×{h} px at its working level {k}): too "
                f"large to segment at once (limit {MAX_REGION_PIXELS / 1e6:g} Mpx). Use "
                "'Segment visible region' (zoom in) or 'Segment whole slide…' (Whole slide)."
            )
            return
        self._segment_region(layer, region_of(layer, k, (0, h, 0, w)))

    def _usable(self) -> Image | None:
        layer = self._panel._image_layer.value
        if not isinstance(layer, Image) or not layer.multiscale:
            show_error("Choose a multiscale image (a slide) first.")
            return None
        if layer.ndim != 2:
            show_error(f"'{layer.name}': only 2-D slides can be segmented.")
            return None
        if self._reading or self._panel._job == "run":
            show_info("A segmentation is already running; wait or press Cancel.")
            return None
        return layer

    def _segment_region(self, layer: Image, region: Region) -> None:
        if min(region.box[1] - region.box[0], region.box[3] - region.box[2]) < 16:
            show_error(f"'{layer.name}': the visible part of the slide is too small to "
                       "segment; zoom out or pan onto the slide.")  # fmt: skip
            return
        if region.pixels > MAX_REGION_PIXELS:
            show_error(
                f"'{layer.name}': the visible region is {region.pixels / 1e6:.1f} Mpx at level "
                f"{region.level} (limit {MAX_REGION_PIXELS / 1e6:g} Mpx); zoom in, or use "
                "'Segment whole slide…'."
            )
            return
        settings = self._panel._settings()
        if settings is None:
            return
        if settings.pixel_size:  # the field holds level 0's µm/px
            px = round(settings.pixel_size * region.downsample, 6)
            settings = dataclasses.replace(settings, pixel_size=px)
        cached = _find_session(self._panel, layer, region, settings)
        if cached is not None:  # the same region and settings: its maps are reused
            self._run_when_free(cached)
            return
        self._reading = True
        self._panel._status.value = f"Reading {region.label(layer.name)}…"
        worker = create_worker(self._read_job, layer, region, _start_thread=False,
                               _ignore_errors=True)  # fmt: skip
        worker.returned.connect(lambda out: self._on_read(layer, region, settings, out))
        worker.start()

    @staticmethod
    def _read_job(layer: Image, region: Region):
        try:
            return _read(layer, region)
        except Exception as exc:
            return _Failed(exc)

    def _on_read(self, layer: Image, region: Region, settings, out) -> None:
        if not self._alive() or layer not in self._viewer.layers or isinstance(out, _Failed):
            self._reading = False
            if self._alive() and isinstance(out, _Failed):
                show_error(f"Cannot read '{layer.name}' at level {region.level}: "
                           f"{_gui_text(out.error)}")  # fmt: skip
                self._panel._status.value = "Failed."
            return
        self._run_when_free(_new_session(self._panel, layer, region, settings, out))

    def _run_when_free(self, session) -> None:
        """Start the panel's run of ``session`` once no tuning job runs (one at a time)."""
        if not self._alive() or session.image not in self._viewer.layers:
            self._reading = False
            return
        if self._panel._job is not None:
            QTimer.singleShot(20, lambda: self._run_when_free(session))
            return
        self._reading = False
        self._panel._start_run(session, ((),))

    # ------------------------------------------------------------------ whole slide

    def start(self, *_: Any) -> None:
        """Check the output store, then run the whole slide in the background."""
        if self.running:
            show_info("A whole-slide run is in progress; wait or press Cancel.")
            return
        req = self._request()
        if req is None:
            return
        self._cancel.clear()
        self._done.clear()
        self._out, self._phase = Path(req.out), ""
        self._remove_live()
        self._start.enabled = False
        self._stop.enabled = True
        self._bar.value = 0
        self._bar.native.setFormat("planning…")
        verb = "Resuming" if req.resume else "Starting"
        self._status.value = f"{verb}: planning the slide, then starting {req.workers} worker(s)…"
        worker = create_worker(_slide_job, req, self._relay, self._cancel, self._done,
                               _start_thread=False, _ignore_errors=True)  # fmt: skip
        worker.returned.connect(self._on_done)
        self._worker = worker
        worker.start()

    def _request(self) -> _Request | None:
        """The run's settings, the store checked; None with one message when refused."""
        from .._io import check_output_dir
        from ..slide_engine import check_store

        layer = self._layer
        path = slide_path(layer) if layer is not None else None
        if layer is None or path is None:
            show_error("Whole slide: choose a slide opened from a file first.")
            return None
        settings = self._panel._settings()
        if settings is None:
            return None
        raw = str(self._store.line_edit.value or "").strip()
        if raw in ("", "."):
            show_error("Whole slide: choose an output store (a .zarr folder) first.")
            return None
        out = Path(raw).expanduser()
        try:
            resume, overwrite = store_mode(out, bool(self._overwrite.value))
            out = check_store(out, resume=resume, overwrite=overwrite)
            check_output_dir(out.parent)
        except (InputError, ValueError, OSError) as exc:
            show_error(f"Whole slide: {_gui_text(exc)}")
            return None
        return _Request(path=str(path), out=str(out), model=settings.model,
                        pixel_size=settings.pixel_size, modality=settings.modality,
                        device=settings.device, tta=settings.tta,
                        workers=int(self._workers.value), block=int(self.block), resume=resume,
                        overwrite=overwrite)  # fmt: skip

    def cancel(self, *_: Any) -> None:
        """Stop the run: outstanding blocks are cancelled, the store stays incomplete."""
        if self.running:
            self._cancel.set()
            self._stop.enabled = False
            self._status.value = "Cancelling…"

    def _on_progress(self, what: str, done: int, total: int, elapsed: float) -> None:
        from ..slide_engine import _eta

        if not self._alive():
            return
        if what != self._phase:
            self._phase = what
            self._bar.max = max(total, 1)
            if what == "chunks":
                self._show_live()
        self._bar.value = min(done, self._bar.max)
        eta = _eta(elapsed / done * (total - done)) if done else "?"
        text = f"{what} {done} / {total}" + (f", ETA {eta}" if what == "blocks" else "")
        self._bar.native.setFormat(text)
        self._status.value = text
        if what == "chunks" and not self._refresh_timer.isActive():
            self._refresh_timer.start()

    def _on_done(self, out) -> None:
        self._refresh_timer.stop()
        if not self._alive():
            return
        self._start.enabled = self._layer is not None and slide_path(self._layer) is not None
        self._stop.enabled = False
        store = self._out
        if isinstance(out, _Failed):
            self._show_failure(out.error)
        elif out.complete:
            self._bar.value = self._bar.max
            self._status.value = (f"{out.n_nuclei} nuclei in {out.n_blocks} blocks "
                                  f"({out.n_background} background), {out.seconds:.0f} s "
                                  f"-> {store.name}")  # fmt: skip
            show_info(f"Whole slide: {out.n_nuclei} nuclei -> {store}")
        else:
            items = "; ".join(f"{k}: {v}" for k, v in sorted(out.failed.items(), key=str))
            self._status.value = "Incomplete: press 'Segment whole slide…' again to resume."
            show_error(f"Whole slide: {len(out.failed)} block(s) failed ({items}); {store} is "
                       "incomplete: fix the cause and run again to resume")  # fmt: skip
        if store is not None and store_status(store) is not None:
            self._reopen(store)

    def _show_failure(self, exc: BaseException) -> None:
        if isinstance(exc, CancelledError):
            self._status.value = "Cancelled: the store is incomplete; run again to resume."
            show_info("Whole slide: cancelled; run again to resume.")
            return
        self._status.value = "Failed: the store is incomplete; run again to resume."
        if isinstance(exc, InputError | ValueError | OSError | MemoryError):
            show_error(f"Whole slide: {_gui_text(exc)}")
        else:
            logger.warning("whole-slide run failed: %s: %s", type(exc).__name__, exc)
            show_error(f"Whole slide failed: {type(exc).__name__}: {_gui_text(exc)}")

    # ------------------------------------------------------------------ the labels layer

    def _open_store(self, store: Path, live: bool) -> Labels | None:
        from ._slide_reader import read_slide_result

        try:
            [(data, kwargs, _)] = read_slide_result(store)
        except InputError as exc:
            show_error(f"Whole slide: {_gui_text(exc)}")
            return None
        if live:  # napari's dask cache would show chunks as they were when first read
            kwargs["cache"] = False
        try:
            return self._viewer.add_labels(data, **kwargs)
        except Exception as exc:  # an unreadable chunk: say so, the run goes on
            show_error(f"Whole slide: cannot show {store.name}: {_gui_text(exc)}")
            return None

    def _show_live(self) -> None:
        if self._out is not None and self._live is None:
            self._live = self._open_store(self._out, live=True)

    def _refresh_live(self) -> None:
        if self._alive() and self._live is not None and self._live in self._viewer.layers:
            self._live.refresh()

    def _remove_live(self) -> None:
        live, self._live = self._live, None
        if live is not None and live in self._viewer.layers:
            self._viewer.layers.remove(live)

    def _reopen(self, store: Path) -> None:
        """The store's labels as they are now (its name says whether it is complete)."""
        self._remove_live()
        layer = self._open_store(store, live=False)
        if layer is not None:
            self._viewer.layers.selection.active = layer

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """The panel is closing: stop a run and wait (bounded) until its cluster is closed."""
        with contextlib.suppress(RuntimeError):
            self._refresh_timer.stop()
        if self.running:
            self._cancel.set()
            t0 = time.monotonic()
            if not self._done.wait(CLOSE_WAIT_S):
                logger.warning("the whole-slide run did not stop within %.0f s",
                               time.monotonic() - t0)  # fmt: skip
