"""The "Segment nuclei" dock widget: maps once, then live post-processing.

The widget is a thin front end: the maps come from
:func:`napari_medinst.segment.compute_maps` (model or classical), the instances from a
cached :class:`~napari_medinst.postprocess.Postprocessor`. User-facing documentation:
``docs/segment_widget.md``.

Flow
----
* **Run** computes the maps in a napari ``thread_worker`` (a generator that yields
  progress; Cancel sets a flag the tiled inference polls) and post-processes them with
  the current parameters. Maps and the Postprocessor are kept per (image data, plane,
  model, pixel size, modality, device), so pressing Run again, or tuning, never runs the
  network twice for the same input.
* **Tuning** any post-processing parameter, or editing the markers layer, re-runs only the
  post-processing on the cached maps (only its stages that depend on the change), in a
  worker thread. Changes are throttled rather than delayed: a slider change starts a run
  at once when none is in flight (a fixed debounce delay would add to the latency);
  changes made while one runs are merged into a single follow-up run (marker edits and
  camera moves after a 10 ms single-shot timer), so the layers always end on the latest
  parameters and never queue up stale runs.
* Errors are returned from the workers as values and reported with a one-line
  notification (napari would show a traceback for an exception raised in a worker).
* **Tune on visible region** post-processes only the part of the maps shown in the canvas
  (plus a margin) into a preview layer; **Apply to whole image** (or leaving the mode)
  post-processes the whole image.

Corrections are never overwritten: a re-run (Run, any model, or a parameter change) keeps
the corrected nuclei of the instances layer exactly (those whose pixels differ from what
the panel last wrote, by any means, and those the ground-truth editor marks edited or
verified; erased pixels stay background) as fixed instances and seeds of
:meth:`Postprocessor.run`, and writes the rest into the same layer as one undo step. A
re-run while a split or an outline is in progress in the editor is refused with a message.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import napari
import numpy as np
import pandas as pd
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSlider,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
    SpinBox,
)
from napari.layers import Image, Labels, Layer
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QObject, Qt, QTimer, Signal
from qtpy.QtGui import QKeySequence, QShortcut
from qtpy.QtWidgets import QSlider

from .._io import InputError, write_bytes
from ..channels import trailing_channels
from ..measure import as_features, measure_nuclei
from ..model import registry
from ..model.folder import ModelError, list_models, model_defaults
from ..model.inference import DEFAULT_TTA, CancelledError
from ..postprocess import Postprocessor, PostprocessParams, PostprocessResult, marker_points
from ..preprocess import prepare_image
from ..segment import CLASSICAL, MapResult, compute_maps
from ..stable_ids import carry_ids, relabel
from ..targets import hv_gradient_magnitude
from ._common import (
    ROLE,
    _camera,
    _canvas_size,
    clear_path,
    input_images,
    model_choices,
    on_undocked,
    pixel_size_box,
    qt_alive,
    show_pixel_size,
    unwrap,
)
from ._contract import POSTPROCESSOR_KEY, publish
from ._editing import existing_editor
from ._history import History, PanelState
from ._layout import scroll_panel
from ._review import ReviewPanel, session_source
from ._slide_job import SlideSection

__all__ = ["SegmentWidget"]

logger = logging.getLogger(__name__)

CHOOSE_FOLDER = "Choose folder…"
CURRENT_PLANE, ALL_PLANES = "current plane", "all planes"
#: Delay (ms) that merges bursts of changes (markers, camera moves, follow-up runs).
TUNE_DELAY_MS = 10
#: Extra pixels around the visible region, so its border matches the whole-image result.
CROP_MARGIN = 32
#: Cached maps: at most this many (image, settings) combinations and this many pixels.
MAX_SESSIONS = 3
CACHE_PIXELS = 60_000_000
_SOURCE = "napari_medinst_source"
#: Who this panel is when it publishes a prediction's parameters (see ._contract).
_ORIGIN = "segment"

# (field, label, widget class, options, tooltip); sizes are at the model's reference pixel size
_PARAMS: tuple[tuple[str, str, type, dict[str, Any], str], ...] = (
    (
        "fg_threshold",
        "nucleus probability ≥",
        FloatSlider,
        {"min": 0.0, "max": 1.0, "step": 0.01},
        "Pixels whose (smoothed) nuclear probability exceeds this are nucleus. "
        "Lower: larger nuclei, faint nuclei kept; higher: tighter, fewer nuclei.",
    ),
    (
        "marker_threshold",
        "marker threshold",
        FloatSlider,
        {"min": 0.0, "max": 1.0, "step": 0.01},
        "Boundary energy below which a nucleus pixel can seed a nucleus. "
        "Lower: fewer seeds, touching nuclei merge; higher: more seeds, more splits.",
    ),
    (
        "sobel_size",
        "edge kernel (odd, px)",
        SpinBox,
        {"min": 3, "max": 51, "step": 2},
        "Size of the derivative kernel applied to the HV maps; larger is smoother.",
    ),
    (
        "contour_weight",
        "contour weight",
        FloatSpinBox,
        {"min": 0.0, "max": 10.0, "step": 0.05},
        "How much the predicted contour adds to the boundary energy between nuclei.",
    ),
    (
        "smoothing",
        "smoothing σ (px)",
        FloatSpinBox,
        {"min": 0.0, "max": 20.0, "step": 0.25},
        "Gaussian smoothing of the probability before thresholding (0: none).",
    ),
    (
        "marker_opening",
        "marker opening (px)",
        SpinBox,
        {"min": 0, "max": 20},
        "Radius of the opening that removes thin bridges between seeds (0: none).",
    ),
    (
        "min_marker_size",
        "min seed area (px)",
        SpinBox,
        {"min": 0, "max": 10_000_000},
        "Seeds smaller than this are dropped.",
    ),
    (
        "min_nucleus_size",
        "min nucleus area (px)",
        SpinBox,
        {"min": 0, "max": 10_000_000},
        "Nuclei smaller than this are removed from the result.",
    ),
)
PARAM_NAMES = tuple(p[0] for p in _PARAMS)
#: The sliders shown unfolded; the others sit in the folded "More post-processing".
MAIN_PARAMS = ("fg_threshold", "marker_threshold")

# role -> (name suffix, layer kind, initially visible)
_OUTPUTS: dict[str, tuple[str, str, bool]] = {
    "instances": ("instances", "labels", True),
    "contours": ("contours", "labels", True),
    "probability": ("nuclear probability", "image", False),
    "hv_h": ("HV maps (horizontal)", "image", False),
    "hv_v": ("HV maps (vertical)", "image", False),
    "gradient": ("HV gradient", "image", False),
    "energy": ("HV energy", "image", False),
    "markers": ("markers", "points", True),
    "types": ("types", "labels", False),
    "preview": ("instances (preview)", "labels", True),
}
#: Layers for checking why a result looks as it does: only with "Show diagnostic maps".
DIAGNOSTIC = ("contours", "probability", "hv_h", "hv_v", "gradient", "energy")

Plane = tuple[int, ...]
#: Points data-event actions that end a user edit (napari's ActionType values).
_MARKER_EDITS = frozenset({"added", "removed", "changed"})
#: Marker diameter (µm): about a third of a small (5 µm) nucleus, whatever the pixel size.
MARKER_UM = 1.6
#: Marker diameter on screen (px), whatever the zoom: never lost, never hiding a nucleus.
MARKER_SCREEN_PX = (4, 14)


# --------------------------------------------------------------------------- helpers


def _marker_style(pixel_size: float) -> dict[str, Any]:
    """Points-layer style of the markers: small rings, the nucleus under them visible.

    Parameters
    ----------
    pixel_size : float
        µm per pixel of the image the markers are drawn on.
    """
    return {
        "size": max(3.0, MARKER_UM / pixel_size),
        "canvas_size_limits": MARKER_SCREEN_PX,
        "face_color": "transparent",
        "border_color": "yellow",
        "border_width": 0.3,
        "border_width_is_relative": True,
    }


def _digest(arr: np.ndarray) -> tuple:
    """Cheap fingerprint of an array's content (detects edits made behind our back)."""
    a = np.ascontiguousarray(arr)
    return a.shape, str(a.dtype), zlib.crc32(a.data)


def _boundaries(labels: np.ndarray) -> np.ndarray:
    """Inner boundary pixels of every instance, carrying the instance's id."""
    edge = np.zeros(labels.shape, bool)
    for axis in (-1, -2):
        n = labels.shape[axis]
        a = [slice(None)] * labels.ndim
        b = [slice(None)] * labels.ndim
        a[axis], b[axis] = slice(1, n), slice(0, n - 1)
        diff = labels[tuple(a)] != labels[tuple(b)]
        edge[tuple(a)] |= diff
        edge[tuple(b)] |= diff
    return np.where(edge, labels, 0).astype(labels.dtype, copy=False)


def _same(written: tuple | None, layer: Layer, sources: tuple) -> bool:
    """Whether ``layer`` was last written from exactly these source arrays."""
    if written is None or written[0] is not layer or len(written[1]) != len(sources):
        return False
    return all(a is b for a, b in zip(written[1], sources, strict=True))


def _type_colours(model: str) -> dict[str, Any]:
    """``colormap`` of the types layer: each class in its colour from the model's config
    (empty when the model names no classes, e.g. the classical fallback)."""
    from napari.utils.colormaps import DirectLabelColormap

    from ..model.folder import model_type_classes

    classes = model_type_classes(model)
    if not classes:
        return {}
    colours = {None: (0, 0, 0, 0), 0: (0, 0, 0, 0)}
    colours |= {i: (*(c / 255 for c in rgb), 1.0) for i, (_, rgb) in classes.items()}
    return {"colormap": DirectLabelColormap(color_dict=colours)}


def _type_image(r: PostprocessResult) -> np.ndarray:
    """Per-pixel class of each instance (0: background)."""
    types = r.types if r.types is not None else np.zeros(r.n_instances, np.int16)
    if r.ids is not None:  # kept nuclei: ids are not 1..n (they are increasing)
        out = np.zeros(r.labels.shape, np.uint32)
        at = r.labels > 0
        out[at] = types[np.searchsorted(r.ids, r.labels[at])]
        return out
    lut = np.concatenate([[0], types.astype(np.int64)]).astype(np.uint32)
    return lut[r.labels]


def _global_ids(
    s: _Session, planes: list[Plane], taken: np.ndarray | None = None
) -> dict[Plane, tuple[np.ndarray, ...]]:
    """Per plane: the layer id of each instance, its new instances' own ids and layer ids.

    Kept nuclei keep their ids; new ones take, plane after plane, the smallest ids
    above the previous plane's that no kept nucleus (and no id in ``taken``) uses; without
    either: the planes' ids 1..n shifted by the instances of the planes before.
    """
    results = [s.results[p] for p in planes]
    kept = [r.instance_ids[r.kept] for r in results if r.kept is not None]
    kept += [] if taken is None else [taken.astype(np.int64)]
    reserved = np.unique(np.concatenate(kept)) if kept else np.zeros(0, np.uint32)
    out, start = {}, 1
    for p in planes:
        r = s.results[p]
        ids = r.instance_ids.astype(np.int64)
        new = ids if r.kept is None else ids[~r.kept]
        pool = np.arange(start, start + new.size + reserved.size, dtype=np.int64)
        given = np.setdiff1d(pool, reserved)[: new.size]
        start = int(given[-1]) + 1 if given.size else start
        mapped = ids.copy()
        mapped[np.isin(ids, new)] = given
        out[p] = mapped, new, given
    return out


def _relabel(labels: np.ndarray, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """``labels`` with the ids ``src`` (small, increasing) replaced by ``dst``."""
    if np.array_equal(src, dst):
        return labels.copy()
    lut = np.zeros(int(src.max()) + 1, np.uint32)
    lut[src] = dst
    out = labels.astype(np.uint32, copy=True)
    at = np.isin(labels, src)
    out[at] = lut[labels[at]]
    return out


def _keep_colours(
    layer: Labels, labels: np.ndarray, features: pd.DataFrame, results: list[PostprocessResult]
) -> tuple[np.ndarray, pd.DataFrame]:
    """``labels`` and ``features`` renumbered so that surviving nuclei keep their id.

    A nucleus matching one the layer holds (IoU above 0.5) takes that nucleus' id, and so
    its colour; kept (corrected) nuclei keep theirs; new nuclei take ids no nucleus of the
    layer has (:func:`~napari_medinst.stable_ids.carry_ids`).
    """
    old = np.asarray(layer.data)
    if old.shape != labels.shape or old.dtype.kind not in "ui" or not old.any():
        return labels, features
    kept = [r.ids[r.kept] for r in results if r.kept is not None]
    src, dst = carry_ids(old, labels, np.concatenate(kept).tolist() if kept else ())
    if np.array_equal(src, dst):
        return labels, features
    ids = dst[np.searchsorted(src, features["label"].to_numpy())]
    return relabel(labels, src, dst), features.assign(index=ids, label=ids)


def _pixel_size_from_layer(layer: Layer) -> float | None:
    """µm/px from the layer's metadata, else from a non-unit scale (in µm unless units say)."""
    value = layer.metadata.get("pixel_size_um") if isinstance(layer.metadata, dict) else None
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    scale = float(layer.scale[-1])
    if math.isclose(scale, 1.0) or scale <= 0:
        return None
    try:
        unit = layer.units[-1]
        if unit.dimensionality == {"[length]": 1}:
            return float((scale * unit).to("micrometer").magnitude)
    except (AttributeError, IndexError, TypeError, ValueError):
        pass
    return scale


class _Relay(QObject):
    """Carries tile progress from the worker thread to the GUI thread."""

    progress = Signal(float)


@dataclass(frozen=True)
class _Settings:
    model: str
    pixel_size: float | None
    modality: str | None
    device: str
    tta: bool = DEFAULT_TTA
    channel: int | None = None  # the nuclear channel of a channels-last layer


@dataclass
class _Session:
    """Maps, Postprocessors and results of one image + settings; layers it wrote."""

    image: Image
    data: Any
    settings: _Settings
    lead: tuple[int, ...]
    maps: dict[Plane, MapResult] = field(default_factory=dict)
    post: dict[Plane, Postprocessor] = field(default_factory=dict)
    results: dict[Plane, PostprocessResult] = field(default_factory=dict)
    seeds: dict[Plane, np.ndarray] = field(default_factory=dict)  # user-edited markers
    active: tuple[Plane, ...] = ()
    crop: tuple | None = None  # (plane, (r0, r1, c0, c1), Postprocessor)
    layers: dict[str, Layer] = field(default_factory=dict)
    written: dict[str, tuple] = field(default_factory=dict)  # role -> (layer, sources)
    gradients: dict[Plane, tuple[int, np.ndarray]] = field(default_factory=dict)  # Sobel size
    held: _Held | None = None  # corrected nuclei the last job kept
    place: Any = None  # a slide region (_slide_job.Region): data is that region

    @property
    def name(self) -> str:
        """What the output layers are named after: the image, or the slide region."""
        return self.place.label(self.image.name) if self.place is not None else self.image.name

    def plane_array(self, plane: Plane) -> np.ndarray:
        return _plane(self.data, plane, self.settings.channel)


@dataclass
class _RunJob:
    session: _Session
    planes: tuple[Plane, ...]
    missing: tuple[Plane, ...]
    params: PostprocessParams | None  # None: use the model's defaults
    seeds: dict[Plane, np.ndarray]
    held: dict[Plane, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    extra: tuple[Plane, ...] = ()  # other planes with a result, redone to keep corrections


@dataclass(frozen=True)
class _Held:
    """Corrected nuclei of an instances layer that a re-run keeps exactly.

    ``planes`` maps a plane to ``(fixed labels, cleared mask)`` for
    :meth:`Postprocessor.run`; ``token`` fingerprints the layer (data and statuses)
    when they were read, so a result is never written over edits made meanwhile.
    """

    layer: Labels
    token: tuple
    planes: dict[Plane, tuple[np.ndarray, np.ndarray]]
    cleared: np.ndarray  # the layer's shape: pixels the user cleared
    kept: frozenset[int]
    corrected: bool = False  # anything kept or cleared, in any plane


@dataclass(frozen=True)
class _Baseline:
    """What the panel last wrote into an instances layer, and the corrections it kept."""

    labels: np.ndarray
    kept: frozenset[int] = frozenset()
    cleared: np.ndarray | None = None


def _plane(data, plane: Plane, channel: int | None) -> np.ndarray:
    """One plane of a layer's data, and of it the nuclear channel when one is chosen."""
    arr = data[plane] if plane else data
    return np.asarray(arr[..., channel] if channel is not None else arr)


def _post_kwargs(seeds: np.ndarray | None, shape: tuple[int, int], held=None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if held is not None:  # corrected nuclei, kept exactly
        out["fixed"], out["cleared"] = held
    if seeds is None:
        return out
    if len(seeds) == 0:  # every marker deleted: only unseeded components seed themselves
        return {**out, "seed_labels": np.zeros(shape, np.int32), "seed_mode": "replace"}
    return {**out, "seed_points": seeds, "seed_mode": "replace"}


@dataclass
class _Failed:
    """An exception handed to the GUI thread as a value.

    napari relays exceptions raised in a worker to its notification manager, which shows
    a traceback; the widget reports errors itself, with a plain message.
    """

    error: Exception


def _run_job(job: _RunJob, relay: _Relay, cancel: threading.Event):
    """Worker generator: maps for the planes that lack them, then post-processing."""
    try:
        return (yield from _run_steps(job, relay, cancel))
    except Exception as exc:
        return _Failed(exc)


def _run_steps(job: _RunJob, relay: _Relay, cancel: threading.Event) -> Iterator[float]:
    s = job.session
    maps: dict[Plane, MapResult] = {}
    n = len(job.missing)
    for i, plane in enumerate(job.missing):

        def progress(done: int, total: int, i: int = i) -> None:
            relay.progress.emit((i + done / max(total, 1)) / (n + 0.25))

        maps[plane] = compute_maps(
            s.plane_array(plane),
            s.settings.model,
            pixel_size=s.settings.pixel_size,
            modality=s.settings.modality,  # type: ignore[arg-type]
            device=s.settings.device,
            progress=progress,
            should_stop=cancel.is_set,
            tta=s.settings.tta,
            tta_std=True,  # for the review queue: the mirror passes' disagreement
        )
        if cancel.is_set():
            raise CancelledError("segmentation cancelled")
        yield (i + 1) / (n + 0.25)
    all_maps = {**s.maps, **maps}
    posts = {}
    for p in job.planes + job.extra:
        m = all_maps[p]
        posts[p] = s.post.get(p) or Postprocessor(
            m.maps.prob, m.maps.hv, m.maps.contour, m.maps.type_prob, pixel_size=m.pixel_size
        )
    params = job.params or all_maps[job.planes[0]].default_params
    results = {}
    for p in job.planes + job.extra:
        if cancel.is_set():
            raise CancelledError("segmentation cancelled")
        shape = all_maps[p].maps.shape
        results[p] = posts[p].run(params, **_post_kwargs(job.seeds.get(p), shape, job.held.get(p)))
    yield 1.0
    return maps, posts, results, params


def _tune_job(items: list[tuple[Plane, Postprocessor, np.ndarray | None, Any]], params):
    """Worker function: post-processing only, on cached maps."""
    try:
        return {
            plane: pp.run(params, **_post_kwargs(seeds, pp.prob.shape, held))
            for plane, pp, seeds, held in items
        }
    except Exception as exc:
        return _Failed(exc)


# --------------------------------------------------------------------------- widget


class SegmentWidget(Container):
    """Segment nuclei in an image layer and tune the result live.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
        The viewer whose image layers are offered and where result layers are written.
    """

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=False)  # the sections label their controls
        # napari hands plugins a PublicOnlyProxy; the widget compares layers by identity
        # across events, which needs the real objects (it uses no private viewer API).
        self._viewer = unwrap(viewer)
        self._closed = False
        self._sessions: list[_Session] = []
        self._session: _Session | None = None
        self._worker = None
        self._job: str | None = None  # "run" or "tune" while a worker runs
        self._running_image: Image | None = None
        self._pending = False
        self._writing = False
        self._updating_params = False
        self._params_touched = False  # user set params since the model last changed
        self._params_model: str | None = None  # model whose defaults fill the widgets
        self._defaults = PostprocessParams()
        self._ref_pixel_size = self._defaults.pixel_size
        self._estimate: tuple[Image, float] | None = None  # (layer, µm/px) shown in the field
        self._seed_check: tuple | None = None  # (session, state before a marker edit)
        #: undo / redo of parameters and markers; the state the labels were last asked for
        self._history: History[PanelState] = History(on_change=self._update_undo_buttons)
        self._applied: PanelState | None = None
        self._dragging = False  # a slider is held: its step is recorded on release
        self._cancel = threading.Event()
        self._relay = _Relay()
        self._relay.progress.connect(self._on_progress)
        #: per instances layer: what the panel wrote last, and before (one undo back)
        self._baselines: dict[int, list[_Baseline]] = {}
        self._tune_timer = QTimer()
        self._tune_timer.setSingleShot(True)
        self._tune_timer.setInterval(TUNE_DELAY_MS)
        self._tune_timer.timeout.connect(self._start_tuning)
        self._build_input_widgets()
        self._build_run_widgets()
        self._build_param_widgets()
        self._build_undo_widgets()
        self._build_file_widgets()
        self._review = ReviewPanel(self._viewer, lambda: session_source(self._session))
        self._slide = SlideSection(self)
        self._build_layout()
        self._connect_viewer()
        registry.add_listener(self._on_models_changed)
        self.native.destroyed.connect(self._on_destroyed)
        self._undocked = on_undocked(self, self._slide.cancel)  # a run must not go on unseen
        # the chosen model's defaults, not generic ones, from the start (issue 17, bug 3)
        self._image_layer.changed.connect(self._show_model_defaults)
        self._modality.changed.connect(self._show_model_defaults)
        self._show_model_defaults()
        self._applied = self._panel_state()
        self._on_image_changed(self._image_layer.value)

    # ------------------------------------------------------------------ building

    def _build_input_widgets(self) -> None:
        self._image_layer = ComboBox(label="image", choices=self._image_choices)
        self._image_layer.changed.connect(self._on_image_changed)
        self._no_image = Label(value="Open an image (File ▸ Open, or a sample) to segment it.")
        models = self._model_choices()
        self._model = ComboBox(label="model", choices=self._model_choices, value=models[0][1])
        self._model.changed.connect(self._on_model_changed)
        self._model_folder = FileEdit(label="model folder", mode="d", visible=False)
        self._model_note = Label(
            value="" if list_models() else "No trained model installed: using 'classical'."
        )
        self._pixel_size = pixel_size_box(
            "Microns per pixel of the image. 0 = estimate from the image."
        )
        self._modality = ComboBox(label="modality", choices=["auto", "he", "fluorescence"])
        self._device = ComboBox(label="device", choices=["auto", "cpu", "cuda"])
        self._tta = CheckBox(text="Average mirror images (TTA)", value=DEFAULT_TTA)
        self._tta.tooltip = (
            "Run the model on the image and its three mirror images and average the maps: "
            "about 4x the model time, slightly more accurate outlines. Tuning stays as fast. "
            "Turn it off for a quicker first look at a large image."
        )
        self._show_maps = CheckBox(text="Show diagnostic maps", value=False)
        self._show_maps.tooltip = (
            "Also add the contours, the nuclear probability, the HV maps, their gradient and "
            "the HV energy as layers (hidden but the contours), to see why a result looks as "
            "it does. Untick to remove them."
        )
        self._show_maps.changed.connect(self._on_show_maps_changed)
        self._planes = ComboBox(label="planes", choices=[CURRENT_PLANE, ALL_PLANES], visible=False)
        self._channel = ComboBox(label="nuclear channel", choices=[0], visible=False)
        self._channel.tooltip = (
            "The image's last axis holds channels (not a row of pixels): segment this one."
        )

    def _build_run_widgets(self) -> None:
        self._run = PushButton(text="Run")
        self._run.changed.connect(self._on_run_clicked)
        self._cancel_button = PushButton(text="Cancel", enabled=False)
        self._cancel_button.changed.connect(self._on_cancel_clicked)
        self._run_buttons = Container(
            widgets=[self._run, self._cancel_button], layout="horizontal", labels=False, label=""
        )
        self._progress = ProgressBar(label="progress", min=0, max=1000, value=0)
        self._status = Label(label="", value="")

    def _build_param_widgets(self) -> None:
        for name, label, cls, opts, tip in _PARAMS:
            w = cls(label=label, value=getattr(self._defaults, name), tooltip=tip, **opts)
            if cls is FloatSpinBox:
                w.native.setDecimals(4)  # keep loaded values exactly
            w.changed.connect(self._on_param_changed)
            setattr(self, f"_{name}", w)
        self._size_note = Label(label="", value="")
        self._tune_visible = CheckBox(text="Tune on visible region", value=False)
        self._tune_visible.changed.connect(self._on_tune_visible_changed)
        self._apply_whole = PushButton(text="Apply to whole image", enabled=False)
        self._apply_whole.changed.connect(self._on_apply_whole)
        self._reset_markers = PushButton(text="Reset markers to automatic")
        self._reset_markers.changed.connect(self._on_reset_markers)
        self._reset_params = PushButton(text="Reset to model defaults")
        self._reset_params.changed.connect(self._on_reset_params)
        self._update_size_note()
        for w in (self._no_image, self._model_note, self._size_note, self._status):
            w.native.setWordWrap(True)  # long notes must not widen the dock (and shrink the canvas)

    def _build_undo_widgets(self) -> None:
        """Undo / Redo buttons and keys (Ctrl+Z, Ctrl+Shift+Z while the panel has the focus);
        a slider drag is one step, recorded when the slider is released."""
        tip = "a post-processing setting or marker change"
        self._undo = PushButton(text="Undo", enabled=False, tooltip=f"Undo {tip} (Ctrl+Z)")
        self._redo = PushButton(text="Redo", enabled=False, tooltip=f"Redo {tip} (Ctrl+Shift+Z)")
        self._undo.changed.connect(self._on_undo)
        self._redo.changed.connect(self._on_redo)
        self._undo_buttons = Container(
            widgets=[self._undo, self._redo], layout="horizontal", labels=False, label=""
        )
        for key, slot in (("Ctrl+Z", self._on_undo), ("Ctrl+Shift+Z", self._on_redo)):
            shortcut = QShortcut(QKeySequence(key), self.native)
            shortcut.setContext(Qt.ShortcutContext.WidgetWithChildrenShortcut)
            shortcut.activated.connect(slot)
        for name in PARAM_NAMES:
            for slider in getattr(self, f"_{name}").native.findChildren(QSlider):
                slider.sliderPressed.connect(self._on_slider_pressed)
                slider.sliderReleased.connect(self._on_slider_released)

    def _build_file_widgets(self) -> None:
        self._save_params = FileEdit(label="save parameters", mode="w", filter="*.json")
        self._load_params = FileEdit(label="load parameters", mode="r", filter="*.json")
        for w, slot in (
            (self._save_params, self._on_save_params),
            (self._load_params, self._on_load_params),
        ):
            w.line_edit.native.setReadOnly(True)  # the dialog sets the path; no per-key saves
            w.changed.connect(slot)

    def _build_layout(self) -> None:
        """Fold the controls into sections in a scroll area (fits 1366×768, issue 17)."""

        def form(*names: str) -> Container:
            return Container(widgets=[getattr(self, n) for n in names], labels=True, label="")

        run = ("_image_layer", "_no_image", "_model", "_model_folder", "_model_note")
        run += ("_pixel_size", "_planes", "_channel", "_run_buttons", "_progress", "_status")
        main = [f"_{n}" for n in MAIN_PARAMS] + ["_size_note", "_tune_visible", "_apply_whole"]
        main.append("_undo_buttons")
        more = [f"_{n}" for n in PARAM_NAMES if n not in MAIN_PARAMS]
        more += ["_reset_markers", "_reset_params", "_save_params", "_load_params"]
        sections = [
            ("Image and model", form(*run), True),
            ("Run options", form("_modality", "_device", "_tta", "_show_maps"), False),
            ("Post-processing (updates live)", form(*main), True),
            ("More post-processing", form(*more), False),
            ("Whole slide", self._slide, True),
            ("Review queue", self._review, False),
        ]
        self.extend([body for _, body, _ in sections])  # magicgui children (reset_choices)
        self._sections = scroll_panel(self, sections)
        self._sections["Whole slide"].setVisible(False)  # only for a multiscale layer

    def _connect_viewer(self) -> None:
        ev = self._viewer.layers.events
        ev.inserted.connect(self._on_layers_changed)
        ev.removed.connect(self._on_layer_removed)
        ev.reordered.connect(self._on_layers_changed)
        for layer in self._viewer.layers:
            layer.events.name.connect(self._on_layers_changed)

    # ------------------------------------------------------------------ lifecycle

    def _on_destroyed(self, *_: Any) -> None:
        """The dock widget (or the whole viewer) went away: stop and never touch layers."""
        self._closed = True
        self._cancel.set()
        self._slide.close()  # stops a whole-slide run and closes its cluster
        # At viewer shutdown Qt may have deleted the timer already; an exception here (a
        # slot of `destroyed`) would make PyQt abort the whole process, losing unsaved work.
        with contextlib.suppress(RuntimeError):
            self._tune_timer.stop()
        registry.remove_listener(self._on_models_changed)
        ev = self._viewer.layers.events
        for emitter, slot in (
            (ev.inserted, self._on_layers_changed),
            (ev.removed, self._on_layer_removed),
            (ev.reordered, self._on_layers_changed),
        ):
            emitter.disconnect(slot)

    def _alive(self) -> bool:
        if not self._closed and not qt_alive(self):
            self._closed = True
        return not self._closed

    # ------------------------------------------------------------------ inputs

    def _image_choices(self, _widget=None) -> list[tuple[str, Image]]:
        return input_images(self._viewer)

    def _on_layers_changed(self, event=None) -> None:
        if not self._alive():
            return
        if event is not None and getattr(event, "type", None) == "inserted":
            event.value.events.name.connect(self._on_layers_changed)
        self._image_layer.reset_choices()
        self._no_image.visible = not self._image_layer.choices

    def _on_layer_removed(self, event) -> None:
        layer = event.value
        self._baselines.pop(id(layer), None)  # ids may be reused
        if self._job == "run" and self._running_image is layer:
            self._cancel.set()  # its result could not be shown: stop computing it
        self._sessions = [s for s in self._sessions if s.image is not layer]
        if self._session is not None and self._session.image is layer:
            self._session = None
        self._on_layers_changed()

    def _on_image_changed(self, layer: Image | None) -> None:
        self._no_image.visible = layer is None
        sections = getattr(self, "_sections", None)  # None while the panel is being built
        if sections is not None:
            sections["Whole slide"].setVisible(isinstance(layer, Image) and layer.multiscale)
            self._slide.set_layer(layer)
        if layer is None:
            return
        show_pixel_size(self._pixel_size, _pixel_size_from_layer(layer))
        modality = layer.metadata.get("modality")
        self._modality.value = modality if modality in ("he", "fluorescence") else "auto"
        self._planes.visible = bool(self._lead_shape(layer))
        n = trailing_channels(self._image_data(layer).shape, layer.rgb)
        self._channel.choices = list(range(max(n, 1)))
        self._channel.visible = n > 1

    @staticmethod
    def _model_choices(_widget=None) -> list[tuple[str, str]]:
        return model_choices([*list_models(), CLASSICAL, CHOOSE_FOLDER])

    def _on_models_changed(self) -> None:
        """A model was registered or unregistered (e.g. by the Fine-tune widget)."""
        if not self._alive():
            return
        keep = self._model.value
        self._model.reset_choices()
        if keep in self._model.choices:
            self._model.value = keep

    def _on_model_changed(self, value: str) -> None:
        self._model_folder.visible = value == CHOOSE_FOLDER
        self._params_touched = False
        self._show_model_defaults()

    def _show_model_defaults(self, *_: Any) -> None:
        """Show the chosen model's post-processing defaults at once (before any run).

        Only while the user has not tuned the sliders and no run has set them for this
        model; the modality is the chosen one, else guessed from the image (colour: H&E).
        """
        model = self._model.value
        if self._params_touched or model == CHOOSE_FOLDER or model == self._params_model:
            return
        modality = self._modality.value
        if modality not in ("he", "fluorescence"):
            layer = self._image_layer.value
            modality = "fluorescence" if layer is not None and not layer.rgb else "he"
        try:
            params = PostprocessParams() if model == CLASSICAL else model_defaults(model, modality)
        except InputError:  # a broken model folder says so when it is run
            return
        self._defaults = params
        self._set_params(params)
        self._applied = self._panel_state()  # not an undo step: no labels follow it

    @staticmethod
    def _image_data(layer: Image):
        """The layer's array; of a multiscale layer (a slide) the coarsest level, for its
        shape only: a slide is read region by region at its working level (._slide_job)."""
        return layer.data[-1] if layer.multiscale else layer.data

    @classmethod
    def _lead_shape(cls, layer: Image) -> tuple[int, ...]:
        shape = cls._image_data(layer).shape
        channels_last = layer.rgb or trailing_channels(shape, layer.rgb) > 0
        return tuple(shape[:-3] if channels_last else shape[:-2])

    def _layer_channel(self, layer: Image | None) -> int | None:
        """The chosen nuclear channel when ``layer`` holds channels last, else None."""
        if layer is None or not trailing_channels(self._image_data(layer).shape, layer.rgb):
            return None
        return int(self._channel.value or 0)

    def _settings(self) -> _Settings | None:
        model = self._model.value
        if model == CHOOSE_FOLDER:
            folder = str(self._model_folder.value or "")
            if folder in ("", "."):
                show_warning("Choose a model folder first (model ▸ Choose folder…).")
                return None
            model = folder
        px = float(self._pixel_size.value or 0.0)
        layer = self._image_layer.value
        if self._estimate is not None and self._estimate == (layer, round(px, 4)):
            px = 0.0  # the field shows the last run's estimate: still "estimate"
        modality = self._modality.value
        return _Settings(
            model=model,
            pixel_size=px if px > 0 else None,
            modality=None if modality == "auto" else modality,
            device=self._device.value,
            tta=DEFAULT_TTA if self._tta.value else 1,
            channel=self._layer_channel(layer),
        )

    def _current_plane(self, layer: Image, lead: tuple[int, ...]) -> Plane:
        pos = layer.world_to_data(self._viewer.dims.point)
        return tuple(int(np.clip(round(float(pos[i])), 0, n - 1)) for i, n in enumerate(lead))

    def _check_input(self, layer: Image) -> tuple[int, ...] | None:
        """Validate the layer before starting; returns the stack shape or None (notified)."""
        data = self._image_data(layer)
        if layer.rgb and data.shape[-1] not in (3, 4):
            show_error(
                f"'{layer.name}': {data.shape[-1]}-channel colour images are not "
                "supported; use RGB or grayscale."
            )
            return None
        lead = self._lead_shape(layer)
        plane = self._current_plane(layer, lead) if lead else ()
        try:
            image = _plane(data, plane, self._layer_channel(layer))
            prepare_image(image, name=f"'{layer.name}'")
        except InputError as exc:
            show_error(f"Cannot segment {exc}")
            return None
        notes = []
        if layer.rgb and data.shape[-1] == 4:
            notes.append("alpha channel ignored")
        if np.issubdtype(data.dtype, np.floating) or data.dtype.itemsize > 1:
            notes.append(f"{data.dtype} intensities normalised")
        if notes:
            show_info(f"'{layer.name}': " + "; ".join(notes) + ".")
        return lead

    # ------------------------------------------------------------------ run

    def _get_session(self, layer: Image, settings: _Settings, lead) -> _Session:
        data = self._image_data(layer)
        for s in self._sessions:
            if s.image is layer and s.data is data and s.settings == settings:
                self._sessions.remove(s)
                self._sessions.append(s)
                return s
        s = _Session(image=layer, data=data, settings=settings, lead=lead)
        old = self._session
        if old is not None and old.image is layer:  # keep writing into the same layers
            s.layers = dict(old.layers)
        self._sessions.append(s)
        return s

    def _trim_sessions(self) -> None:
        """Keep the maps of a few recent runs (switching back is free), within a budget."""
        kept, pixels = [], 0
        for s in reversed(self._sessions):
            if not s.maps:  # a cancelled or failed run
                continue
            pixels += sum(m.maps.prob.size for m in s.maps.values())
            if kept and (len(kept) >= MAX_SESSIONS or pixels > CACHE_PIXELS):
                break
            kept.append(s)
        self._sessions = kept[::-1]

    def _on_run_clicked(self, *_: Any) -> None:
        if not self._alive():
            return
        if self._job == "run":
            show_info("A segmentation is already running; wait or press Cancel.")
            return
        if self._job is not None:  # a tuning run: start when it ends
            QTimer.singleShot(20, self._on_run_clicked)
            return
        layer = self._image_layer.value
        if layer is None or layer not in self._viewer.layers:
            show_warning("No image layer to segment: open an image or a sample first.")
            return
        if layer.multiscale:  # a slide: its working level when small enough, never level 0
            self._slide.segment_level()
            return
        lead = self._check_input(layer)
        settings = self._settings()
        if lead is None or settings is None:
            return
        session = self._get_session(layer, settings, lead)
        if not lead:
            planes: tuple[Plane, ...] = ((),)
        elif self._planes.value == ALL_PLANES:
            planes = tuple(np.ndindex(*lead))
        else:
            planes = (self._current_plane(layer, lead),)
        self._start_run(session, planes)

    def _start_run(self, session: _Session, planes: tuple[Plane, ...]) -> None:
        """Compute the maps of ``planes`` that lack them, then post-process, in a worker."""
        layer, settings = session.image, session.settings
        model_key = settings.model
        use_defaults = model_key != self._params_model and not self._params_touched
        if self._refuse_busy(session):
            return
        extra = self._hold_planes(session, planes)
        job = _RunJob(
            session=session,
            planes=planes,
            missing=tuple(p for p in planes if p not in session.maps),
            params=None if use_defaults else self._read_params(),
            seeds=dict(session.seeds),
            held=session.held.planes if session.held is not None else {},
            extra=extra,
        )
        self._cancel.clear()
        self._running_image = layer
        self._status.value = "Computing maps…" if job.missing else "Post-processing…"
        worker = create_worker(
            _run_job, job, self._relay, self._cancel, _start_thread=False, _ignore_errors=True
        )
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(lambda out: self._on_run_done(job, out))
        # napari's activity dock may quit the worker: report it like Cancel
        worker.aborted.connect(lambda: self._on_run_error(job, CancelledError("cancelled")))
        self._start_worker(worker, "run")

    def run(self, model: str | None = None) -> None:
        """Segment the chosen image, as pressing Run does (the work runs in the background).

        Parameters
        ----------
        model : str, optional
            A model the list offers (a name, or a registered model folder), or another
            model folder; the chosen one when omitted.
        """
        if model is not None and model in self._model.choices:
            self._model.value = model
        elif model is not None:
            self._model.value = CHOOSE_FOLDER
            self._model_folder.value = model
        self._on_run_clicked()

    @property
    def idle(self) -> bool:
        """True when no segmentation or tuning runs or waits to run."""
        busy = self._job is not None or self._tune_timer.isActive() or self._pending
        return not busy and not self._slide.reading

    def _on_cancel_clicked(self, *_: Any) -> None:
        if self._job == "run":
            self._cancel.set()
            self._status.value = "Cancelling…"

    def _start_worker(self, worker, kind: str) -> None:
        """Start ``worker``; one at a time (a Postprocessor is not thread-safe)."""
        self._job = kind
        self._worker = worker
        if kind == "run":
            self._run.enabled = False
            self._cancel_button.enabled = True
            self._progress.value = 0
        worker.finished.connect(self._on_worker_finished)
        worker.start()

    def _on_progress(self, fraction: float) -> None:
        """Move the bar forward only (a pixel-size search runs the model again)."""
        if self._alive():
            value = int(1000 * min(max(fraction, 0.0), 1.0))
            self._progress.value = max(value, self._progress.value)

    def _on_worker_finished(self) -> None:
        kind, self._job, self._worker = self._job, None, None
        if not self._alive():
            return
        if kind == "run":
            self._run.enabled = True
            self._cancel_button.enabled = False
        if self._pending:
            self._pending = False
            self._schedule_tuning()

    def _on_run_done(self, job: _RunJob, out) -> None:
        if not self._alive():
            return
        if isinstance(out, _Failed):
            self._on_run_error(job, out.error)
            return
        s = job.session
        if s.image not in self._viewer.layers:
            show_warning(
                f"'{s.image.name}' was removed while it was segmented; the result was discarded."
            )
            return
        maps, posts, results, params = out
        s.maps.update(maps)
        for plane in maps:  # new maps: their gradient is not the cached one
            s.gradients.pop(plane, None)
        s.post.update(posts)
        s.results.update(results)
        s.active = job.planes
        self._session = s
        if s not in self._sessions:
            self._sessions.append(s)
        self._trim_sessions()
        first = s.maps[job.planes[0]]
        self._defaults = first.default_params
        if job.params is None:
            self._params_model = s.settings.model
            if not self._params_touched:  # unless the user tuned meanwhile (re-run pending)
                self._set_params(params)
        self._history.clear()  # a run starts a new undo history
        self._applied = self._panel_state()
        self._write_outputs(s)
        self._measure_instances(s)
        self._viewer.layers.selection.active = s.layers["instances"]
        if self._tune_visible.value:  # refresh the preview from the new maps
            s.crop = None
            self._schedule_tuning()
        if first.pixel_size_estimated:  # show the estimate, not 0 (issue 17, bug 10)
            self._estimate = (s.image, round(first.pixel_size, 4))
            with self._pixel_size.changed.blocked():
                show_pixel_size(self._pixel_size, first.pixel_size)
        self._show_count(s)
        self._progress.value = 1000

    def _on_run_error(self, job: _RunJob, exc: BaseException) -> None:
        if not self._alive():
            return
        name = job.session.image.name
        if isinstance(exc, CancelledError) and job.session.image not in self._viewer.layers:
            show_warning(f"'{name}' was removed while it was segmented; the run was stopped.")
            self._status.value = "Stopped: image removed."
        elif isinstance(exc, CancelledError):
            show_info(f"Segmentation of '{name}' cancelled; no layer was changed.")
            self._status.value = "Cancelled."
        elif isinstance(exc, ModelError):
            show_error(
                f"Could not load the model '{job.session.settings.model}': {exc}. "
                "Choose 'classical' or another model folder."
            )
            self._status.value = "Model failed to load."
        elif isinstance(exc, InputError | ValueError):
            show_error(f"Cannot segment '{name}': {exc}")
            self._status.value = "Failed."
        elif isinstance(exc, MemoryError):
            show_error(f"Out of memory while segmenting '{name}'; crop a smaller region.")
            self._status.value = "Failed."
        else:
            logger.error("segmentation failed", exc_info=exc)
            show_error(f"Segmentation of '{name}' failed: {type(exc).__name__}: {exc}")
            self._status.value = "Failed."

    # ------------------------------------------------------------------ parameters

    def _read_params(self) -> PostprocessParams:
        values: dict[str, Any] = {}
        for name in PARAM_NAMES:
            w = getattr(self, f"_{name}")
            v = w.value
            values[name] = int(v) if isinstance(w, SpinBox) else round(float(v), 4)
        if values["sobel_size"] % 2 == 0:  # typed an even size: use the next odd one
            values["sobel_size"] += 1
            with self._sobel_size.changed.blocked():
                self._sobel_size.value = values["sobel_size"]
        return PostprocessParams(**values, pixel_size=self._ref_pixel_size)

    def _set_params(self, params: PostprocessParams) -> None:
        """Show ``params`` in the widgets without triggering one run per widget."""
        self._updating_params = True
        try:
            for name in PARAM_NAMES:
                getattr(self, f"_{name}").value = getattr(params, name)
        finally:
            self._updating_params = False
        self._ref_pixel_size = params.pixel_size
        self._update_size_note()

    def _update_size_note(self) -> None:
        self._size_note.value = (
            f"<small>Sizes in px at {self._ref_pixel_size:g} µm/px (model reference), "
            "scaled to the image.</small>"
        )

    def _on_param_changed(self, *_: Any) -> None:
        if self._updating_params:
            return
        self._params_touched = True
        self._schedule_tuning(now=True)
        if not self._dragging:  # a slider drag is one step, recorded on release
            self._remember()

    def _on_params_published(self, layer: Layer, params: PostprocessParams, origin: str) -> None:
        """Another panel (auto-tune's Apply) rewrote one of our predictions: follow it.

        The layer now holds the labels of ``params``, so it is not a hand edit; when it is
        the prediction on show, the sliders take ``params`` and the other output layers
        are brought up to date, so the next slider move starts from the applied values.
        """
        if origin == _ORIGIN or not self._alive():
            return
        self._baselines[id(layer)] = [_Baseline(np.array(layer.data, copy=True))]
        s = self._session
        if s is None or s.layers.get("instances") is not layer:
            return
        self._set_params(params)
        self._params_touched = True
        self._remember()
        self._schedule_tuning()

    def _on_reset_params(self, *_: Any) -> None:
        self._set_params(self._defaults)
        self._params_touched = False
        self._remember()
        show_info("Post-processing parameters reset to the model's defaults.")
        self._schedule_tuning()

    def _on_save_params(self, path) -> None:
        if not path or str(path) in ("", "."):
            return
        path = Path(path)
        if path.suffix.lower() != ".json":
            path = path.with_suffix(".json")
        try:
            write_bytes(path, self._read_params().to_json().encode(), overwrite=True)
        except (OSError, ValueError) as exc:
            show_error(f"Could not save the parameters to {path}: {exc}")
        else:
            show_info(f"Parameters saved to {path}")
        finally:
            clear_path(self._save_params)

    def _on_load_params(self, path) -> None:
        if not path or str(path) in ("", "."):
            return
        path = Path(path)
        try:
            params = PostprocessParams.from_json(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            show_error(f"Could not read {path}: {exc}")
        except ValueError as exc:
            show_error(f"{path.name}: invalid parameters, nothing changed ({exc})")
        else:
            self._set_params(params)
            self._params_touched = True
            self._remember()
            show_info(f"Parameters loaded from {path.name}")
            self._schedule_tuning()
        finally:
            clear_path(self._load_params)

    # ------------------------------------------------------------------ tuning

    def _schedule_tuning(self, *_: Any, now: bool = False) -> None:
        """Re-run the post-processing soon (``now``: at once when no worker runs).

        Starting at once, rather than after the pending repaint, saves a frame of latency;
        changes made while a run is in flight are merged into one follow-up run.
        """
        if self._session is None or not self._session.results or not self._alive():
            return
        if now and self._job is None:
            self._tune_timer.stop()
            self._start_tuning()
        else:
            self._tune_timer.start()

    def _start_tuning(self) -> None:
        """Post-process the cached maps with the current parameters, off the GUI thread."""
        s = self._session
        if not self._alive() or s is None or not s.results:
            return
        if self._job is not None:
            self._pending = True
            return
        try:
            params = self._read_params()
        except ValueError as exc:
            show_error(f"Invalid post-processing parameters: {exc}")
            return
        if self._refuse_busy(s):
            return
        extra = self._hold_planes(s, s.active)
        held = s.held.planes if s.held is not None else {}
        if self._tune_visible.value:
            items, preview = self._crop_items(s, held), True
        else:
            planes = s.active + extra
            items = [(p, s.post[p], s.seeds.get(p), held.get(p)) for p in planes]
            preview = False
        if not items:
            return
        worker = create_worker(_tune_job, items, params, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(lambda res: self._on_tuned(s, res, preview))
        self._start_worker(worker, "tune")

    def _on_tuned(self, s: _Session, results, preview: bool) -> None:
        if not self._alive() or s is not self._session or s.image not in self._viewer.layers:
            return
        if isinstance(results, _Failed) or preview:
            self._seed_check = None  # only a whole-image result is compared
        if isinstance(results, _Failed):
            self._on_tune_error(results.error)
            return
        if preview:
            if self._tune_visible.value:  # else the user left the mode meanwhile
                self._write_preview(s, next(iter(results.values())))
            return
        s.results.update(results)
        self._write_outputs(s)
        self._show_count(s)
        check, self._seed_check = self._seed_check, None
        if check is not None and check[0] is s:
            self._explain_marker_edit(s, check[1])

    def _show_count(self, s: _Session) -> None:
        """The status line: the count and what made it (model, modality, pixel size)."""
        first = s.maps[s.active[0]]
        est = " (estimated)" if first.pixel_size_estimated else ""
        n = sum(s.results[p].n_instances for p in s.active if p in s.results)
        kept = sum(s.results[p].n_kept for p in s.active if p in s.results)
        self._status.value = (
            f"{n} nuclei in '{s.name}' · model {first.model_name} · "
            f"{first.modality} · {first.pixel_size:.3g} µm/px{est}"
        ) + (f" · kept {kept} corrected nuclei" if kept else "")

    def _on_tune_error(self, exc: BaseException) -> None:
        if not self._alive():
            return
        logger.error("post-processing failed", exc_info=exc)
        show_error(f"Post-processing failed: {type(exc).__name__}: {exc}")

    # visible region -----------------------------------------------------------------

    def _visible_rect(self, s: _Session) -> tuple[int, int, int, int]:
        """Rows/cols of the image shown in the canvas, plus a margin, clipped."""
        h, w = s.maps[s.active[0]].maps.shape
        cam, dims = _camera(self._viewer), self._viewer.dims
        if tuple(dims.displayed)[-2:] != (dims.ndim - 2, dims.ndim - 1) or dims.ndisplay != 2:
            return 0, h, 0, w
        centre = np.asarray(cam.center[-2:], float)
        half = np.asarray(_canvas_size(self._viewer), float) / 2.0 / max(cam.zoom, 1e-9)
        point = np.asarray(dims.point, float)
        corners = []
        for corner in (centre - half, centre + half):
            point[-2:] = corner
            if s.place is not None:  # the region's pixels, not the slide's level 0
                scale, translate = self._placement(s)
                corners.append((corner - translate) / scale)
            else:
                corners.append(s.image.world_to_data(point)[-2:])
        lo, hi = np.minimum(*corners), np.maximum(*corners)
        r0 = int(np.clip(math.floor(lo[0]) - CROP_MARGIN, 0, h))
        r1 = int(np.clip(math.ceil(hi[0]) + CROP_MARGIN, 0, h))
        c0 = int(np.clip(math.floor(lo[1]) - CROP_MARGIN, 0, w))
        c1 = int(np.clip(math.ceil(hi[1]) + CROP_MARGIN, 0, w))
        if r1 - r0 < 8 or c1 - c0 < 8:
            return 0, h, 0, w
        return r0, r1, c0, c1

    def _crop_items(self, s: _Session, held: dict[Plane, tuple]):
        plane = self._current_plane(s.image, s.lead) if s.lead else ()
        if plane not in s.maps:
            plane = s.active[0]
        rect = self._visible_rect(s)
        if s.crop is None or s.crop[:2] != (plane, rect):
            r0, r1, c0, c1 = rect
            m, mr = s.maps[plane].maps, s.maps[plane]
            win = (slice(r0, r1), slice(c0, c1))
            pp = Postprocessor(
                m.prob[win],
                m.hv[(slice(None), *win)],
                m.contour[win],
                None if m.type_prob is None else m.type_prob[(slice(None), *win)],
                pixel_size=mr.pixel_size,
            )
            s.crop = (plane, rect, pp)
        seeds = s.seeds.get(plane)
        if seeds is not None:
            r0, _, c0, _ = rect
            seeds = seeds - np.array([r0, c0], float)
        r0, r1, c0, c1 = rect
        crop = held.get(plane)
        if crop is not None:  # the corrected nuclei in the region are kept in the preview too
            crop = tuple(np.ascontiguousarray(a[r0:r1, c0:c1]) for a in crop)
        return [(plane, s.crop[2], seeds, crop)]

    def _on_tune_visible_changed(self, on: bool) -> None:
        self._apply_whole.enabled = on
        if on:
            _camera(self._viewer).events.center.connect(self._schedule_tuning)
            _camera(self._viewer).events.zoom.connect(self._schedule_tuning)
            self._schedule_tuning()
        else:
            _camera(self._viewer).events.center.disconnect(self._schedule_tuning)
            _camera(self._viewer).events.zoom.disconnect(self._schedule_tuning)
            self._on_apply_whole()

    def _on_apply_whole(self, *_: Any) -> None:
        s = self._session
        if s is None:
            return
        s.crop = None
        self._remove_output(s, "preview")
        if self._tune_visible.value:
            with self._tune_visible.changed.blocked():
                self._tune_visible.value = False
            self._apply_whole.enabled = False
            _camera(self._viewer).events.center.disconnect(self._schedule_tuning)
            _camera(self._viewer).events.zoom.disconnect(self._schedule_tuning)
        self._schedule_tuning()

    # markers ------------------------------------------------------------------------

    def _on_markers_edited(self, event) -> None:
        if self._writing or not self._alive():
            return
        if str(getattr(event, "action", "")) not in _MARKER_EDITS:  # not the "-ing" events
            return
        s = self._session
        layer = event.source
        if s is None or s.layers.get("markers") is not layer:
            return
        pts = np.asarray(layer.data, float).reshape(-1, layer.ndim)
        nl = len(s.lead)
        if self._seed_check is None:  # the state before this edit (merged edits: the first)
            self._seed_check = (s, self._marker_baseline(s))
        for plane in s.active:
            if nl:
                sel = np.all(np.round(pts[:, :nl]).astype(int) == np.array(plane), axis=1)
                s.seeds[plane] = pts[sel][:, nl:]
            else:
                s.seeds[plane] = pts
        self._status.value = "Markers edited: the watershed uses your markers."
        self._remember()
        self._schedule_tuning()

    def _marker_baseline(self, s: _Session) -> dict[Plane, np.ndarray]:
        """Per active plane, the markers (points) in use before an edit."""
        out = {}
        for p in s.active:
            r = s.results.get(p)
            if r is not None:
                seeds = s.seeds.get(p)
                out[p] = marker_points(r.markers, r.labels) if seeds is None else seeds
        return out

    def _explain_marker_edit(self, s: _Session, before: dict[Plane, np.ndarray]) -> None:
        """Tell the user about every added marker that made no nucleus of its own, and why."""
        notes = []
        for p, old in before.items():
            r, seeds = s.results.get(p), s.seeds.get(p)
            if r is None or seeds is None or not len(seeds):
                continue
            px = np.round(seeds).astype(int)
            h, w = r.labels.shape
            inside = (px[:, 0] >= 0) & (px[:, 0] < h) & (px[:, 1] >= 0) & (px[:, 1] < w)
            hit = np.zeros(len(px), np.int64)
            hit[inside] = r.labels[px[inside, 0], px[inside, 1]]
            per_nucleus = np.bincount(hit, minlength=int(r.labels.max()) + 1)
            old_px = {tuple(x) for x in np.round(old).astype(int)}
            for (row, col), ok, lab in zip(px, inside, hit, strict=True):
                if (row, col) in old_px or (lab and per_nucleus[lab] == 1):
                    continue  # not new, or it seeds a nucleus of its own
                where = f"the marker at ({row}, {col})"
                if not ok or not r.foreground[row, col]:
                    notes.append(f"{where} is on background, where no nucleus can grow")
                else:
                    notes.append(
                        f"{where} would make a piece smaller than 'min nucleus area', so it "
                        "changes nothing (move it further in, or lower the area)"
                    )
        if notes:
            text = "Marker edit: " + "; ".join(notes) + "."
            self._status.value = text
            show_info(text)

    def _on_reset_markers(self, *_: Any) -> None:
        s = self._session
        if s is None or not s.seeds:
            return
        s.seeds.clear()
        s.written.pop("markers", None)
        self._remember()
        show_info("Markers reset to the automatic ones.")
        self._schedule_tuning()

    # undo / redo (parameters and markers; see ._history) -----------------------------

    def _panel_state(self) -> PanelState:
        """The parameters and user markers on show, copied."""
        s = self._session
        seeds = {} if s is None else {p: np.array(a, float) for p, a in s.seeds.items()}
        layer = None if s is None or not seeds else self._find_output(s, "markers")
        points = None if layer is None else np.array(layer.data, float)
        return PanelState(self._read_params(), seeds, points)

    def _remember(self) -> None:
        """Record one undo step when the parameters or markers differ from the last state."""
        now = self._panel_state()
        if self._applied is not None and not now.same(self._applied):
            self._history.record(self._applied)
        self._applied = now

    def _on_slider_pressed(self) -> None:
        self._dragging = True

    def _on_slider_released(self) -> None:
        self._dragging = False
        self._remember()

    def _on_undo(self, *_: Any) -> None:
        self._step(self._history.undo)

    def _on_redo(self, *_: Any) -> None:
        self._step(self._history.redo)

    def _step(self, move: Callable[[PanelState], PanelState | None]) -> None:
        """Show the state ``move`` hands back (sliders, markers) and post-process with it."""
        if not self._alive():
            return
        self._remember()  # a change not recorded yet (e.g. a slider still held) comes first
        state = move(self._applied or self._panel_state())
        if state is None:
            return
        self._set_params(state.params)
        self._params_touched = True
        s = self._session
        if s is not None:
            self._restore_markers(s, state)
        self._applied = state
        self._seed_check = None
        self._schedule_tuning(now=True)

    def _restore_markers(self, s: _Session, state: PanelState) -> None:
        """The user's markers of ``state``, or the automatic ones when it has none."""
        s.seeds.clear()
        s.seeds.update({p: a.copy() for p, a in state.seeds.items()})
        layer = self._find_output(s, "markers")
        if not state.seeds or state.points is None or layer is None:
            s.written.pop("markers", None)  # rewritten from the result's markers
            return
        self._writing = True
        try:
            layer.data = state.points.copy()
        finally:
            self._writing = False

    def _update_undo_buttons(self) -> None:
        if hasattr(self, "_undo_buttons") and self._alive():
            self._undo.enabled = self._history.can_undo
            self._redo.enabled = self._history.can_redo

    def _on_layer_key(self, layer: Layer, redo: bool = False) -> None:
        """Ctrl+Z / Ctrl+Shift+Z on the instances or markers layer.

        On the instances layer the layer's own history (brush edits) goes first: the
        panel steps only while the layer holds what the panel last wrote.
        """
        can = self._history.can_redo if redo else self._history.can_undo
        own = isinstance(layer, Labels)
        if self._alive() and can and (not own or self._holds_last_write(layer)):
            self._step(self._history.redo if redo else self._history.undo)
        elif own and redo:
            layer.redo()
        elif own:
            layer.undo()

    def _holds_last_write(self, layer: Labels) -> bool:
        written = self._baselines.get(id(layer))
        return bool(written) and np.array_equal(written[-1].labels, np.asarray(layer.data))

    def _bind_undo_keys(self, layer: Layer) -> None:
        layer.bind_key("Control-z", self._on_layer_key, overwrite=True)
        layer.bind_key(
            "Control-Shift-z", lambda lay: self._on_layer_key(lay, redo=True), overwrite=True
        )

    # ------------------------------------------------------------------ writing layers

    def _find_output(self, s: _Session, role: str) -> Layer | None:
        layer = s.layers.get(role)
        if layer is not None and layer in self._viewer.layers:
            return layer
        for layer in reversed(list(self._viewer.layers)):
            md = layer.metadata
            if md.get(ROLE) == role and md.get(_SOURCE) == s.name:
                s.layers[role] = layer
                return layer
        return None

    # corrected nuclei ---------------------------------------------------------------

    def _refuse_busy(self, s: _Session) -> bool:
        """True, with a message, while a ground-truth edit of the instances is in progress.

        Looks at the editor of the instances layer and of ground truths copied from it
        (a split uses the prediction's maps).
        """
        layer = self._find_output(s, "instances")
        if layer is None:
            return False
        copy = f"copy of {layer.name}"
        for other in self._viewer.layers:
            if other is not layer and other.metadata.get("source") != copy:
                continue
            editor = existing_editor(other)
            busy = editor.busy if editor is not None else None
            if busy:
                text = f"Not re-run: in '{other.name}' {busy}. '{layer.name}' is unchanged."
                self._status.value = text
                show_warning(text)
                return True
        return False

    @staticmethod
    def _status_kept(layer: Layer) -> frozenset[int]:
        """Ids the ground-truth editor (or the ``status`` feature) marks edited or verified."""
        editor = existing_editor(layer)
        if editor is not None:
            status = editor.status
        else:
            f = layer.features
            ok = isinstance(f, pd.DataFrame) and {"label", "status"} <= set(f.columns)
            status = dict(zip(f["label"], f["status"], strict=True)) if ok else {}
        return frozenset(int(i) for i, v in status.items() if v in ("edited", "verified"))

    def _token(self, layer: Layer) -> tuple:
        """Fingerprint of the layer's labels and statuses (edits change it)."""
        return _digest(np.asarray(layer.data)), self._status_kept(layer)

    def _baseline(self, layer: Layer, current: np.ndarray) -> _Baseline | None:
        """What the panel wrote that ``current`` derives from: the closest of the last two
        writes (after Ctrl+Z of a re-run, the write before it)."""
        best, fewest = None, None
        for base in reversed(self._baselines.get(id(layer), [])):
            if base.labels.shape != current.shape:
                continue
            n = int(np.count_nonzero(base.labels != current))
            if fewest is None or n < fewest:
                best, fewest = base, n
        return best

    def _hold(self, s: _Session, planes: tuple[Plane, ...]) -> _Held | None:
        """The corrected nuclei of the instances layer, to keep through a re-run.

        Kept: nuclei marked edited or verified, nuclei whose pixels differ from what the
        panel wrote (painted, erased, filled; by any means), and nuclei kept before.
        Pixels erased by the user stay background. None when there is no layer.
        """
        layer = self._find_output(s, "instances")
        if not isinstance(layer, Labels) or layer.ndim != len(s.lead) + 2:
            return None
        current = np.asarray(layer.data)
        token = (_digest(current), self._status_kept(layer))
        kept, cleared = set(token[1]), np.zeros(current.shape, bool)
        base = self._baseline(layer, current)
        if base is not None:
            changed = current != base.labels
            kept |= set(np.unique(current[changed]).tolist()) | base.kept
            kept |= set(np.unique(base.labels[changed]).tolist())
            cleared = changed & (current == 0)
            if base.cleared is not None:
                cleared |= base.cleared & (current == 0)
        kept.discard(0)
        ids = np.array(sorted(kept), np.int64)
        fixed = np.where(np.isin(current, ids), current, 0) if ids.size else None
        held = {}
        for p in planes:
            f = np.zeros(current.shape[-2:], current.dtype) if fixed is None else fixed[p]
            if f.any() or cleared[p].any():
                held[p] = (f, cleared[p])
        present = frozenset() if fixed is None else frozenset(np.unique(fixed).tolist()) - {0}
        return _Held(layer, token, held, cleared, present, bool(present) or bool(cleared.any()))

    def _hold_planes(self, s: _Session, planes: tuple[Plane, ...]) -> tuple[Plane, ...]:
        """Hold the corrections for ``planes``; returns the other planes to redo with them.

        In a stack with corrections every plane that has a result is post-processed
        again, so that the layer never gets an older result over a plane's corrections.
        """
        s.held = self._hold(s, planes)
        if s.held is None or not s.held.corrected or not s.lead:
            return ()
        extra = tuple(p for p in sorted(s.results) if p not in planes)
        if extra:
            s.held = self._hold(s, planes + extra)
        return extra

    def _put(
        self, s: _Session, role: str, make: Callable[[], Any], sources: tuple, **kwargs: Any
    ) -> Layer:
        """Create or update the output layer ``role``; skipped when its sources are unchanged.

        ``make`` builds the data only when the layer has to be written.
        """
        layer = self._find_output(s, role)
        if layer is not None and _same(s.written.get(role), layer, sources):
            return layer
        suffix, kind, visible = _OUTPUTS[role]
        self._writing = True
        try:
            if layer is None:
                layer = self._add_layer(
                    s, role, f"{s.name} {suffix}", kind, make(), visible, kwargs
                )
            else:
                layer.data = make()
                for key, value in kwargs.items():
                    setattr(layer, key, value)
        finally:
            self._writing = False
        s.layers[role] = layer
        s.written[role] = (layer, sources)
        return layer

    def _add_layer(self, s, role, name, kind, data, visible, kwargs) -> Layer:
        cut = -1 if s.settings.channel is not None else None  # outputs have no channel axis
        scale, translate = self._placement(s)
        common = {
            "name": name,
            "scale": scale[:cut],
            "translate": translate[:cut],
            "visible": visible,
            "metadata": {ROLE: role, _SOURCE: s.name},
        }
        if s.place is not None:  # on the slide, in its units (µm)
            common["units"] = tuple(s.image.units)[-2:]
        common.update(kwargs)
        kwargs = {}
        if kind == "labels":
            layer = self._viewer.add_labels(data, **common, **kwargs)
            if role == "instances":
                self._bind_undo_keys(layer)
        elif kind == "points":
            layer = self._viewer.add_points(data, **common, **_marker_style(self._plane_px(s)))
            layer.events.data.connect(self._on_markers_edited)
            self._bind_undo_keys(layer)
        else:
            layer = self._viewer.add_image(data, **common, **kwargs)
        return layer

    @staticmethod
    def _placement(s: _Session) -> tuple[np.ndarray, np.ndarray]:
        """Scale and translate of the outputs: the image's, or those of its slide region."""
        if s.place is not None:
            return np.asarray(s.place.scale, float), np.asarray(s.place.translate, float)
        return np.asarray(s.image.scale, float), np.asarray(s.image.translate, float)

    @staticmethod
    def _plane_px(s: _Session) -> float:
        return next(iter(s.maps.values())).pixel_size if s.maps else 0.5

    def _remove_output(self, s: _Session, role: str) -> None:
        layer = self._find_output(s, role)
        if layer is not None:
            self._viewer.layers.remove(layer)
        s.layers.pop(role, None)
        s.written.pop(role, None)

    def _stack(self, s: _Session, get: Callable[[Plane], np.ndarray], dtype) -> np.ndarray:
        """One 2-D image, or the stack of every plane that has a result (others zero)."""
        if not s.lead:
            return get(())
        planes = sorted(s.results)
        first = get(planes[0])
        out = np.zeros((*s.lead, *first.shape), dtype)
        for p in planes:
            out[p] = get(p)
        return out

    def _instance_stack(
        self, s: _Session, taken: np.ndarray | None = None
    ) -> tuple[np.ndarray, pd.DataFrame]:
        """Instances with ids unique across planes (and not in ``taken``), and features."""
        planes = sorted(s.results) if s.lead else [()]
        ids_of = _global_ids(s, planes, taken)

        def shifted(p: Plane) -> np.ndarray:
            _, new, given = ids_of[p]
            return _relabel(s.results[p].labels, new, given)

        labels = self._stack(s, shifted, np.uint32)
        rows = []
        for p in planes:
            r = s.results[p]
            ids = ids_of[p][0]
            cols: dict[str, Any] = {"index": ids, "label": ids, "score": r.scores}
            if r.types is not None:
                cols["type"] = r.types.astype(int)
            if s.lead:
                cols["plane"] = [str(p)] * len(ids)
            rows.append(pd.DataFrame(cols))
        return labels, pd.concat(rows, ignore_index=True)

    def _write_outputs(self, s: _Session) -> None:
        """(Re)write the output layers whose sources changed since the last write.

        The diagnostic maps (:data:`DIAGNOSTIC`) only while "Show diagnostic maps" is on.
        """
        res = [s.results[p] for p in (sorted(s.results) if s.lead else [()])]
        label_src = tuple(r.labels for r in res)
        self._write_instances(s, label_src)
        if self._show_maps.value:
            self._write_diagnostics(s)
        if not s.seeds:  # user-edited markers are the user's: never rewritten
            self._put(s, "markers", lambda: self._marker_points(s), tuple(r.markers for r in res))
        if any(r.types is not None for r in res):
            self._put(
                s,
                "types",
                lambda: self._stack(s, lambda p: _type_image(s.results[p]), np.uint32),
                label_src,
                **_type_colours(s.settings.model),
            )

    def _write_diagnostics(self, s: _Session) -> None:
        """Contours (in the ids of the instances layer) and the maps behind the result."""
        res = [s.results[p] for p in (sorted(s.results) if s.lead else [()])]
        label_src = tuple(r.labels for r in res)
        maps_src = tuple(s.maps[p].maps for p in (sorted(s.results) if s.lead else [()]))
        stack = self._stack
        shown = self._find_output(s, "instances")
        if shown is not None:  # the ids on screen: a contour has its nucleus' colour
            self._put(s, "contours", lambda: _boundaries(np.asarray(shown.data)), label_src)
        self._put(
            s,
            "probability",
            lambda: stack(s, lambda p: s.maps[p].maps.prob, np.float32),
            maps_src,
            colormap="magma",
            contrast_limits=(0.0, 1.0),
        )
        for role, ch in (("hv_h", 0), ("hv_v", 1)):
            self._put(
                s,
                role,
                lambda ch=ch: stack(s, lambda p: s.maps[p].maps.hv[ch], np.float32),
                maps_src,
                colormap="PiYG",
                contrast_limits=(-1.0, 1.0),
            )
        planes = sorted(s.results) if s.lead else [()]
        grads = {p: self._gradient(s, p) for p in planes}  # cached: only a new Sobel size
        self._put(
            s,
            "gradient",
            lambda: stack(s, grads.__getitem__, np.float32),
            tuple(grads[p] for p in planes),
            colormap="inferno",
            contrast_limits=(0.0, 1.0),
        )
        self._put(
            s,
            "energy",
            lambda: stack(s, lambda p: s.results[p].energy, np.float32),
            tuple(r.energy for r in res),
            colormap="viridis",
            contrast_limits=(0.0, 1.0),
        )

    def _on_show_maps_changed(self, on: bool) -> None:
        """Add the diagnostic maps of the result on show, or remove them."""
        s = self._session
        if s is None or not s.results or not self._alive():
            return
        if on:
            self._write_diagnostics(s)
        else:
            for role in DIAGNOSTIC:
                self._remove_output(s, role)

    @staticmethod
    def _gradient(s: _Session, p: Plane) -> np.ndarray:
        """HV gradient magnitude of a plane, recomputed only when the Sobel size changes."""
        mr = s.maps[p]
        size = s.results[p].params.scaled_to(mr.pixel_size).sobel_size
        hit = s.gradients.get(p)
        if hit is None or hit[0] != size:
            hit = s.gradients[p] = (size, hv_gradient_magnitude(mr.maps.hv, size))
        return hit[1]

    def _marker_points(self, s: _Session) -> np.ndarray:
        pts = []
        for p, r in sorted(s.results.items()) if s.lead else [((), s.results[()])]:
            c = marker_points(r.markers, r.labels)  # on their nucleus, never background
            if s.lead:
                c = np.concatenate([np.tile(np.array(p, float), (len(c), 1)), c], axis=1)
            pts.append(c)
        return np.concatenate(pts) if pts else np.zeros((0, 2 + len(s.lead)))

    def _write_instances(self, s: _Session, sources: tuple) -> Labels:
        """Write the instances into their layer, as one undo step when nuclei were kept.

        The result was computed with the layer's corrected nuclei held fixed
        (:meth:`_hold`); when the layer changed while it was computed, nothing is written
        and the post-processing runs again with the new corrections.
        """
        layer = self._find_output(s, "instances")
        if layer is not None and _same(s.written.get("instances"), layer, sources):
            return layer
        held = s.held if s.held is not None and s.held.layer is layer else None
        if held is not None and self._token(layer) != held.token:
            self._status.value = "The instances changed meanwhile: re-running with them kept…"
            self._schedule_tuning()
            return layer
        name = f"{s.name} {_OUTPUTS['instances'][0]}"
        taken = None
        if held is not None and held.corrected and s.lead:  # planes without a result stay
            data = np.asarray(layer.data)
            rest = [data[p] for p in np.ndindex(*s.lead) if p not in s.results]
            taken = np.unique(np.concatenate([r.ravel() for r in rest])) if rest else None
        labels, features = self._instance_stack(s, taken)
        results = [s.results[p] for p in sorted(s.results)]
        if layer is not None:
            labels, features = _keep_colours(layer, labels, features, results)
        first = next(iter(s.maps.values()))
        scores: Any = np.concatenate([r.scores for r in results])
        if not np.array_equal(features["label"], np.arange(1, len(features) + 1)):
            scores = dict(zip(features["label"].tolist(), scores.tolist(), strict=True))
        meta = {
            "scores": scores,
            "model": first.model_name,
            "modality": first.modality,
            "pixel_size_um": first.pixel_size,
            "pixel_size_estimated": first.pixel_size_estimated,
        }
        if len(s.post) == 1:  # 2-D: the Evaluate widget's auto-tune reuses the cached maps
            meta[POSTPROCESSOR_KEY] = next(iter(s.post.values()))
        self._writing = True
        try:
            if layer is None:
                layer = self._add_layer(
                    s, "instances", name, "labels", labels, True, {"opacity": 0.5}
                )
            elif held is not None and held.corrected:
                self._write_held(s, layer, labels, features)
            else:
                layer.data = labels
            layer.metadata.update(meta)
            layer.features = features
            publish(layer, results[0].params, _ORIGIN).connect(self._on_params_published)
        finally:
            self._writing = False
        s.layers["instances"] = layer
        s.written["instances"] = (layer, sources)
        kept = frozenset(int(i) for r in results if r.kept is not None for i in r.ids[r.kept])
        cleared = None
        if held is not None and held.corrected:  # also those of planes without a result
            kept, cleared = kept | held.kept, held.cleared
        history = self._baselines.setdefault(id(layer), [])
        history[:] = [*history[-1:], _Baseline(np.array(layer.data, copy=True), kept, cleared)]
        return layer

    def _write_held(self, s: _Session, layer: Labels, labels: np.ndarray, features) -> None:
        """Write only the pixels that change, as one undo step (Ctrl+Z restores them all).

        Planes of a stack without a result keep what the layer holds; an attached
        ground-truth editor keeps the status of the kept nuclei.
        """
        current = np.asarray(layer.data)
        for p in np.ndindex(*s.lead) if s.lead else ():
            if p not in s.results:
                labels[p] = current[p]
        kept = [int(i) for r in s.results.values() if r.kept is not None for i in r.ids[r.kept]]
        where = np.nonzero(current != labels)
        editor = existing_editor(layer)
        if editor is not None:
            if where[0].size:
                editor.write_rerun(where, labels[where], kept)
            status = editor.status
            features["status"] = [status.get(int(i), "predicted") for i in features["label"]]
        elif where[0].size:
            if not layer.visible:
                layer.visible = True  # napari paints into the displayed slice too
            with layer.block_history():
                layer.data_setitem(where, labels[where])

    def _measure_instances(self, s: _Session) -> None:
        """Per-nucleus measurements into the instances' ``features`` (status bar, tables).

        Only after a Run (about 0.1 s per 1000² tile); tuning rewrites the features with
        the cheap columns only, so measurements are never stale.
        """
        layer = s.layers.get("instances")
        if layer is None:
            return
        first = next(iter(s.maps.values()))
        px = None if first.pixel_size_estimated else first.pixel_size
        planes = sorted(s.results) if s.lead else [()]
        try:
            tables = [
                pd.DataFrame(
                    measure_nuclei(np.asarray(layer.data[p] if p else layer.data),
                                   s.plane_array(p), pixel_size=px)
                )
                for p in planes
            ]  # fmt: skip
        except InputError as exc:  # an image the measurements cannot use: keep the scores
            logger.warning("measurements skipped: %s", exc)
            return
        layer.features = as_features(pd.concat(tables, ignore_index=True), layer.features)

    def _write_preview(self, s: _Session, result: PostprocessResult) -> None:
        plane, (r0, _, c0, _), _ = s.crop
        data = result.labels.copy()
        lead = len(s.lead)
        if lead:
            data = data.reshape((1,) * lead + data.shape)
        offset = np.array([*plane, r0, c0], float)
        scale, translate = self._placement(s)
        translate = translate[: offset.size] + offset * scale[: offset.size]
        self._put(s, "preview", lambda: data, (result.labels,), translate=translate, opacity=0.6)
        self._status.value = (
            f"Preview: {result.n_instances} nuclei in the visible region. "
            "Press 'Apply to whole image' when done."
        )
