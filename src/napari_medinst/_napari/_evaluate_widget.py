"""The "Evaluate" dock widget: live scores of a prediction against an editable ground truth.

A thin front end: every number comes from :mod:`napari_medinst.metrics`, every edit
from :mod:`napari_medinst.editing` (through :mod:`._editing`).

* **Metrics**: accuracy, AP, precision, recall, F1 and TP/FP/FN at IoU 0.50-0.95, mAP,
  PQ/DQ/SQ, AJI, AJI+, Dice, split and merge counts; the precision-recall curve with
  the operating point; CSV / JSON / PNG export.
* **Errors**: a Labels overlay ``"<gt> errors"`` colouring every nucleus by outcome and
  a review list of the errors, best estimated gain first; clicking one centres the view
  on it.
* **Live**: edits of the ground truth, the prediction or the mask re-evaluate at once
  when idle; bursts are merged so that at most one evaluation runs per
  :data:`DEBOUNCE_MS`.
* **Ground truth**: start from a prediction (a copy) or a file, edit with the keys of
  :mod:`._editing`, save (TIFF + status CSV; never overwriting without confirmation),
  autosave to a recovery folder and restore after a crash, only onto the layer the
  edits belong to (see :mod:`napari_medinst.recovery` and :meth:`EvaluateWidget.autosave_now`).
* **Auto-tune**: coordinate search over the post-processing parameters of a prediction
  made by the Segment widget (metadata ``napari_medinst_postprocessor`` and
  ``postprocess_params``), in a worker thread.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import secrets
import time
import weakref
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from magicgui.widgets import CheckBox, ComboBox, Container, FloatSpinBox, Label, PushButton
from napari.layers import Image, Labels, Shapes
from napari.qt.threading import create_worker
from napari.utils.colormaps import DirectLabelColormap
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QEvent, QObject, Qt, QTimer
from qtpy.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFileDialog,
    QFrame,
    QGridLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QMainWindow,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from .. import editing, metrics, recovery
from .._io import InputError, check_labels, write_bytes
from ..postprocess import Postprocessor, PostprocessParams
from ._common import ROLE, _camera, qt_alive, unwrap
from ._contract import PARAMS_KEY, POSTPROCESSOR_KEY, param_state, publish
from ._editing import (
    GT_KEY,
    KEY_BINDINGS,
    GroundTruthEditor,
    editor_for,
    existing_editor,
    layer_origin,
    load_ground_truth,
    start_from_prediction,
    status_path,
)
from ._layout import cap_height, scroll_panel
from ._slide_region import SlideRegionActions

if TYPE_CHECKING:
    import napari.viewer

__all__ = ["EvaluateWidget", "recovery_dir"]

logger = logging.getLogger(__name__)

#: Minimum time (ms) between two live evaluations; an edit after a quiet spell is
#: evaluated at once, edits arriving faster are merged into one evaluation.
DEBOUNCE_MS = 150
#: Delay (ms) after the last ground-truth edit before it is autosaved for recovery.
AUTOSAVE_MS = 3000
#: Above this many pixels the evaluation is not live (press Evaluate).
LIVE_MAX_PIXELS = 16_000_000
#: Above this many pixels the widget refuses to evaluate.
MAX_PIXELS = 150_000_000

SOURCE = "napari_medinst_source"
RECOVERY_ENV = "NAPARI_MEDINST_RECOVERY_DIR"

#: Contour width (pixels) of the prediction while the error overlay is shown, so that
#: its instance colours never fill the nuclei the overlay colours by outcome.
PREDICTION_OUTLINE = 2

#: Colour (RGBA) of each outcome in the error overlay and its legend.
OUTCOME_COLOURS: dict[str, tuple[float, float, float, float]] = {
    "tp": (0.18, 0.80, 0.44, 0.35),
    "fp": (0.95, 0.15, 0.15, 1.0),
    "fn": (1.00, 0.85, 0.00, 1.0),
    "split": (1.00, 0.50, 0.00, 1.0),
    "merge": (0.75, 0.25, 0.95, 1.0),
}
OUTCOME_NAMES = {
    "tp": "true positive",
    "fp": "false positive (prediction without gt)",
    "fn": "false negative (gt without prediction)",
    "split": "split (gt cut into pieces)",
    "merge": "merge (one prediction over several gt)",
}

#: Rows of the per-threshold table: (header, ImageScores attribute, is a count).
PER_THRESHOLD = (
    ("accuracy", "accuracy", False),
    ("AP", "ap", False),
    ("precision", "precision", False),
    ("recall", "recall", False),
    ("F1", "f1", False),
    ("TP", "tp", True),
    ("FP", "fp", True),
    ("FN", "fn", True),
)
#: Rows of the summary table: (name, ImageScores attribute).
SUMMARY = (
    ("mAP (AP averaged over IoU 0.50-0.95)", "map"),
    ("PQ", "pq"),
    ("DQ", "dq"),
    ("SQ", "sq"),
    ("AJI", "aji"),
    ("AJI+", "aji_plus"),
    ("Dice (foreground)", "dice"),
    ("gt nuclei", "n_gt"),
    ("predicted nuclei", "n_pred"),
)
#: Count rows of the summary, from the outcomes at the chosen IoU: (name, counts key).
OUTCOME_COUNTS = (
    ("TP", "tp"),
    ("FP", "fp"),
    ("FN", "fn"),
    ("split gt nuclei", "split_gt"),
    ("split pieces", "split_pred"),
    ("merging predictions", "merge_pred"),
    ("merged gt nuclei", "merge_gt"),
)

#: Search grid of the auto-tune, per parameter (in the parameters' own pixel size).
TUNE_GRID: dict[str, tuple[float, ...]] = {
    "fg_threshold": (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7),
    "marker_threshold": (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6),
    "contour_weight": (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0),
    "min_nucleus_size": (0, 5, 10, 15, 20, 30, 45, 60),
}
TUNE_OBJECTIVES = {"AJI": "aji", "PQ": "pq", "mAP": "map"}
TUNE_ROUNDS = 2


# ------------------------------------------------------------------------ helpers


class _Problem(Exception):
    """Bad input for the evaluation; ``level`` picks the notification."""

    def __init__(self, message: str, level: str = "error") -> None:
        super().__init__(message)
        self.level = level


def recovery_dir() -> Path:
    """Folder of the autosaved ground truths (``$NAPARI_MEDINST_RECOVERY_DIR`` overrides)."""
    env = os.environ.get(RECOVERY_ENV)
    if env:
        return Path(env)
    return Path.home() / ".cache" / "napari-medinst" / "recovery"


def _fingerprint(arr: np.ndarray | None) -> Any:
    if arr is None:
        return None
    a = np.ascontiguousarray(arr)
    return (a.shape, a.dtype.str, zlib.crc32(memoryview(a).cast("B")))


def _spatial_shape(image: Image) -> tuple[int, ...]:
    """The 2-D (rows, columns) shape of an image layer (colour axis left out)."""
    shape = tuple(int(s) for s in np.shape(image.data[0] if image.multiscale else image.data))
    return shape[-3:-1] if image.rgb else shape[-2:]


def _may_receive(layer: Labels, record: recovery.Record) -> bool:
    """Whether ``layer`` may be considered for ``record`` at all (before the source check).

    Same shape; and the edits of a ground truth never saved go only to a ground-truth
    layer, never to e.g. the prediction it was copied from (same labels, same image).
    """
    if tuple(layer.data.shape) != tuple(record.source.shape):
        return False
    return bool(record.source.path) or bool(layer.metadata.get(GT_KEY))


#: A token per editor for its autosave file name (:func:`recovery.record_path`), so two
#: layers of one source (the same file opened twice, two copies of one prediction over
#: one image) never overwrite or delete each other's autosave.
_AUTOSAVE_TOKENS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _autosave_token(editor: GroundTruthEditor) -> str:
    """This session's token of ``editor`` (made on first use, random)."""
    token = _AUTOSAVE_TOKENS.get(editor)
    if token is None:
        token = _AUTOSAVE_TOKENS[editor] = secrets.token_hex(4)
    return token


def _unlink(path: Path) -> None:
    try:
        Path(path).unlink(missing_ok=True)
    except OSError:
        logger.debug("could not remove %s", path, exc_info=True)


def _hex(rgba: tuple[float, ...]) -> str:
    return "#" + "".join(f"{round(255 * c):02x}" for c in rgba[:3])


def layer_types(layer: Labels, ids: np.ndarray) -> dict[int, int] | None:
    """Nucleus class of every id in ``ids`` from ``features["type"]`` (rows named by the
    ``label`` or ``index`` column), or None when the layer has no class for one of them
    (an edited nucleus, a layer without types)."""
    feats = layer.features
    if not isinstance(feats, pd.DataFrame) or "type" not in feats or not len(feats):
        return None
    ids_col = next((c for c in ("label", "index") if c in feats), None)
    keys = feats[ids_col] if ids_col else np.arange(1, len(feats) + 1)
    try:
        table = {int(i): int(t) for i, t in zip(keys, feats["type"], strict=True)}
    except (TypeError, ValueError):
        return None
    return table if all(int(i) in table for i in ids) else None


def prediction_scores(layer: Labels, pred_ids: np.ndarray) -> tuple[dict[int, float] | None, str]:
    """Confidence of every predicted nucleus, from the layer, or None and the reason.

    Looks at ``metadata["scores"]`` (a mapping id -> score, or an array whose entry
    ``k`` is the score of id ``k + 1``) and then at ``features["score"]`` (rows named
    by the ``label`` or ``index`` column, else row ``k`` is id ``k + 1``).
    """
    table: dict[int, float] | None = None
    md = layer.metadata if isinstance(layer.metadata, dict) else {}
    source = md.get("scores")
    try:
        if isinstance(source, dict):
            table = {int(k): float(v) for k, v in source.items()}
        elif source is not None:
            arr = np.asarray(source, np.float64).ravel()
            table = {k + 1: float(v) for k, v in enumerate(arr)}
        else:
            feats = layer.features
            if isinstance(feats, pd.DataFrame) and "score" in feats and len(feats):
                ids_col = next((c for c in ("label", "index") if c in feats), None)
                ids = feats[ids_col] if ids_col else np.arange(1, len(feats) + 1)
                table = {int(i): float(s) for i, s in zip(ids, feats["score"], strict=True)}
    except (TypeError, ValueError) as exc:
        return None, f"the prediction's scores cannot be read ({exc})"
    if table is None:
        return None, "the prediction has no confidence scores"
    missing = [int(i) for i in pred_ids if int(i) not in table]
    if missing:
        few = ", ".join(map(str, missing[:5])) + (" ..." if len(missing) > 5 else "")
        return None, f"no score for {len(missing)} predicted nuclei (ids {few}; edited?)"
    if not all(np.isfinite(table[int(i)]) for i in pred_ids):
        return None, "some scores are not finite"
    return {int(i): table[int(i)] for i in pred_ids}, ""


@dataclass(frozen=True, eq=False)
class EvaluationResult:
    """Everything one evaluation computed (all numbers from :mod:`metrics`)."""

    gt_name: str
    pred_name: str
    mask_name: str | None
    threshold: float
    table: metrics.OverlapTable
    scores: metrics.ImageScores
    outcomes: metrics.InstanceOutcomes
    errors: list[editing.ErrorItem]
    rank_metric: str
    pr: tuple[np.ndarray, np.ndarray, np.ndarray]
    scores_note: str
    seconds: float


class _CloseGuard(QObject):
    """Asks before the napari window is closed with unsaved ground-truth edits.

    It watches the widget itself until the widget is docked, then the main window the
    dock belongs to (found with Qt's public ``QWidget.window()``, no napari internals).
    Only *spontaneous* closes (the window's close button) are checked, as napari does:
    a programmatic ``viewer.close()`` is never held up.  "Close anyway" discards the
    edits, autosave included (:meth:`EvaluateWidget.discard_unsaved_autosaves`).
    Owned by the widget, so Qt removes it together with the widget.
    """

    def __init__(self, widget: EvaluateWidget) -> None:
        super().__init__(widget.native)
        self._widget = weakref.ref(widget)
        self._window: weakref.ReferenceType | None = None
        self._watched: set[int] = set()
        self._watch_chain(widget.native)

    def attached_window(self) -> QMainWindow | None:
        return None if self._window is None else self._window()

    def _watch_chain(self, native: QWidget) -> None:
        """Watch the widget and its ancestors (docking re-parents them one by one)."""
        w = native
        while w is not None:
            if id(w) not in self._watched:
                w.installEventFilter(self)
                self._watched.add(id(w))
            w = w.parentWidget()
        win = native.window()
        if isinstance(win, QMainWindow):
            self._window = weakref.ref(win)

    def eventFilter(self, obj, event) -> bool:
        try:
            kind = event.type()
            ref = getattr(self, "_widget", None)  # absent while Python tears the object down
            widget = ref() if ref is not None else None
            if widget is None:
                return False
            if kind in (QEvent.Type.ParentChange, QEvent.Type.Show):
                self._watch_chain(widget.native)
            elif (
                kind == QEvent.Type.Close and event.spontaneous() and obj is self.attached_window()
            ):
                names = widget.unsaved_ground_truths()
                if names:
                    if not widget._confirm_discard(names):
                        event.ignore()
                        return True
                    widget.discard_unsaved_autosaves()
        except Exception:  # never block closing because of a bug here
            logger.exception("unsaved-edits check failed")
        return False


def _untint_verified(image: np.ndarray, gt: np.ndarray, status: dict[int, str]) -> None:
    """Clear (to 0) the true-positive pixels of verified gt nuclei in ``image``, in place.

    Parameters
    ----------
    image : np.ndarray
        Outcome codes, as made by :func:`editing.outcome_image`.
    gt : np.ndarray
        The ground-truth labels ``image`` was made from.
    status : dict of int to str
        Review status of each ground-truth nucleus.

    Notes
    -----
    The faint green true-positive tint would hide the green "verified" review colour;
    errors on verified nuclei keep their colour.
    """
    ids = [i for i, s in status.items() if s == "verified"]
    if ids:
        tp = image == editing.OUTCOME_CODES["tp"]
        tp &= np.isin(gt, ids)
        image[tp] = 0


# ------------------------------------------------------------------------- widget


class EvaluateWidget(Container):
    """Dock widget: evaluate a prediction against a ground truth, live, and edit the latter."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=False)
        self._closed = False
        self._tune_fingerprint: tuple | None = None
        # napari hands plugin widgets a PublicOnlyProxy; layers are compared by identity
        # across events and combo boxes, which needs the real objects (no private
        # napari API is used through it)
        self._viewer = unwrap(viewer)
        self.result: EvaluationResult | None = None
        self._tuned: tuple[PostprocessParams, Any, float, float] | None = None
        self._tune_worker = None
        self._connected: list[tuple[Any, Callable]] = []
        self._fingerprint: Any = None
        self._settings: Any = None
        self._data_changed = True
        self._last_problem: str | None = None
        self._last_run_end = 0.0
        self._recovery_offers: list[tuple[Labels, Path, recovery.Record]] = []
        self._offered: set[tuple[int, Path]] = set()
        self._waiting = False  # autosaves wait for an offer to be resolved
        self._image_hashes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._warned_outputs: set[int] = set()
        self._outlined: tuple[Labels, int] | None = None  # prediction drawn as outlines
        self.evaluations = 0

        self._timer = QTimer(self.native)
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self._run_live)
        self._autosave_timer = QTimer(self.native)
        self._autosave_timer.setSingleShot(True)
        self._autosave_timer.timeout.connect(self.autosave_now)

        self._build_inputs()
        self._tabs = QTabWidget()
        self._tabs.addTab(self._build_metrics_tab(), "Metrics")
        self._tabs.addTab(self._build_errors_tab(), "Errors")
        self._tabs.addTab(self._build_edit_tab(), "Ground truth")
        self._tabs.addTab(self._build_tune_tab(), "Auto-tune")
        # one scroll area for the whole panel: it fits a 1366×768 screen (issue 17)
        self._sections = scroll_panel(
            self,
            [
                ("Layers", self._inputs_box, True),
                (None, self._recovery_banner(), True),
                (None, self._tabs, True),
            ],
        )
        self._pr_stale = False
        self._tabs.currentChanged.connect(self._redraw_pr)

        viewer.layers.events.inserted.connect(self._on_layers_changed)
        viewer.layers.events.removed.connect(self._on_layers_changed)
        self.native.destroyed.connect(self._on_destroyed)
        self._pick_defaults()
        self._attach_ground_truths()
        self._connect_live()
        self._install_close_guard()
        self._check_recovery()
        self._schedule()

    # ================================================================== UI building

    def _build_inputs(self) -> None:
        self._pred = ComboBox(label="prediction", choices=self._label_choices, nullable=True)
        self._gt = ComboBox(label="ground truth", choices=self._label_choices, nullable=True)
        self._mask = ComboBox(label="mask", choices=self._mask_choices, nullable=True)
        self._mask_mode = ComboBox(
            label="mask means", choices=["ignore inside", "evaluate inside only"]
        )
        self._tau = FloatSpinBox(label="IoU for outcomes", value=0.5, min=0.5, max=0.95, step=0.05)
        self._tau.tooltip = (
            "IoU threshold of the TP/FP/FN/split/merge outcomes, overlay and PR curve"
        )
        self._live = CheckBox(text="live (re-evaluate on every edit)", value=True)
        self._eval_btn = PushButton(text="Evaluate")
        self._status = Label(value="")
        self._status.native.setWordWrap(True)  # a long message must not widen the panel
        box = Container(
            widgets=[
                self._pred,
                self._gt,
                self._mask,
                self._mask_mode,
                self._tau,
                self._live,
                self._eval_btn,
                self._status,
            ],
            labels=True,
        )
        self.append(box)
        self._inputs_box = box
        for w in (self._pred, self._gt, self._mask, self._mask_mode, self._tau):
            w.changed.connect(self._on_inputs_changed)
        self._live.changed.connect(self._on_live_toggled)
        self._eval_btn.changed.connect(self._on_evaluate_clicked)

    def _build_metrics_tab(self) -> QWidget:
        page = QWidget()
        lay = QVBoxLayout(page)
        self.per_threshold_table = QTableWidget(len(metrics.THRESHOLDS), len(PER_THRESHOLD))
        self.per_threshold_table.setHorizontalHeaderLabels([h for h, _, _ in PER_THRESHOLD])
        self.per_threshold_table.setVerticalHeaderLabels(
            [f"IoU {metrics.threshold_key(t)}" for t in metrics.THRESHOLDS]
        )
        self.summary_table = QTableWidget(len(SUMMARY) + len(OUTCOME_COUNTS), 1)
        self.summary_table.setHorizontalHeaderLabels(["value"])
        self.summary_table.setVerticalHeaderLabels(
            [n for n, _ in SUMMARY] + [f"{n} @ IoU" for n, _ in OUTCOME_COUNTS]
        )
        for table in (self.per_threshold_table, self.summary_table):
            table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
            table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
            cap_height(table, 140, 260)
        # nine columns: as wide as their headers (scrolling sideways) rather than cut; set
        # once here (ResizeToContents would re-measure the cells at every live update)
        header = self.per_threshold_table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        number = self.per_threshold_table.fontMetrics().horizontalAdvance("0.0000")
        header.setMinimumSectionSize(number + 12)  # a score is never cut to "0.5…"
        self.per_threshold_table.resizeColumnsToContents()
        header.setStretchLastSection(True)
        self.ap_note = QLabel("")
        self.ap_note.setWordWrap(True)
        lay.addWidget(QLabel("Per IoU threshold (see docs/metrics.md):"))
        lay.addWidget(self.per_threshold_table)
        lay.addWidget(self.summary_table)
        lay.addWidget(self.ap_note)
        lay.addWidget(self._build_pr_canvas())
        row = QHBoxLayout()
        b1 = QPushButton("Export metrics (CSV + JSON)…")
        b1.clicked.connect(lambda: self._guard(self.export_metrics))
        b2 = QPushButton("Save PR curve (PNG)…")
        b2.clicked.connect(lambda: self._guard(self.export_pr_curve))
        row.addWidget(b1)
        row.addWidget(b2)
        lay.addLayout(row)
        return page

    def _build_pr_canvas(self) -> QWidget:
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(4, 3))
        self.figure.subplots_adjust(left=0.16, right=0.97, bottom=0.16, top=0.9)
        self._ax = self.figure.add_subplot(111)
        self.canvas = FigureCanvasQTAgg(self.figure)
        cap_height(self.canvas, 200, 320)
        self._ax.set_xlabel("recall")
        self._ax.set_ylabel("precision")
        self._ax.set_xlim(0, 1.02)
        self._ax.set_ylim(0, 1.02)
        (self._pr_line,) = self._ax.plot([], [], drawstyle="steps-post", color="tab:blue")
        (self._op_point,) = self._ax.plot([], [], "o", color="tab:red", label="operating point")
        self._ax.legend(loc="lower left", fontsize="small")
        self._ax.grid(alpha=0.3)
        return self.canvas

    def _build_errors_tab(self) -> QWidget:
        page = QWidget()
        lay = QVBoxLayout(page)
        self._show_overlay = QPushButton("Error overlay: on")
        self._show_overlay.setCheckable(True)
        self._show_overlay.setChecked(True)
        self._show_overlay.toggled.connect(self._on_overlay_toggled)
        lay.addWidget(self._show_overlay)
        legend = "".join(
            f'<span style="color:{_hex(OUTCOME_COLOURS[k])}">■</span> {k}: {OUTCOME_NAMES[k]}<br>'
            for k in metrics.CATEGORIES
        )
        self.legend = QLabel(legend)
        self.legend.setTextFormat(Qt.TextFormat.RichText)
        lay.addWidget(self.legend)
        row = QHBoxLayout()
        row.addWidget(QLabel("rank errors by gain in"))
        self.rank_metric = QComboBox()
        self.rank_metric.addItems(list(editing.RANK_METRICS))
        self.rank_metric.currentTextChanged.connect(lambda _: self._on_inputs_changed())
        row.addWidget(self.rank_metric)
        lay.addLayout(row)
        self.review_list = QListWidget()
        self.review_list.itemClicked.connect(self._on_review_clicked)
        self.review_list.itemActivated.connect(self._on_review_clicked)
        cap_height(self.review_list, 120, 300)
        lay.addWidget(self.review_list)
        hint = QLabel(
            "Click an error to centre the view on it. The gain is an estimate of how much "
            "fixing that error alone would raise the chosen score."
        )
        hint.setWordWrap(True)
        lay.addWidget(hint)
        return page

    def _build_edit_tab(self) -> QWidget:
        page = QWidget()
        lay = QVBoxLayout(page)
        grid = QGridLayout()
        buttons = [
            ("Start ground truth from prediction", self.start_from_prediction),
            ("Load ground truth from labels file…", self.load_ground_truth),
            ("Save ground truth (TIFF + status CSV)…", self.save_ground_truth),
            ("Save status table (CSV)…", self.export_status),
            ("Merge selected nuclei (G)", lambda: self._edit("merge_at_cursor")),
            ("Split mode (K)", lambda: self._edit("toggle_split_mode")),
            ("Join mode (J)", lambda: self._edit("toggle_join_mode")),
            ("Outline mode (Q)", lambda: self._edit("toggle_polygon_mode")),
            ("Fill holes (H)", lambda: self._edit("fill_holes")),
            ("Remove small fragments (R)", lambda: self._edit("remove_small")),
            ("Relabel sequentially (Shift-R)", lambda: self._edit("relabel")),
            ("Show/hide status colours (C)", lambda: self._edit("toggle_status_colours")),
        ]
        for k, (text, action) in enumerate(buttons):
            b = QPushButton(text)
            b.clicked.connect(lambda _=False, action=action: self._guard(action))
            # the long file buttons one per row, the short edit buttons two: a narrow panel
            if k < 4:
                grid.addWidget(b, k, 0, 1, 2)
            else:
                grid.addWidget(b, 4 + (k - 4) // 2, k % 2)
        lay.addLayout(grid)
        self.slide_region = SlideRegionActions(self._viewer, lambda: self._gt.value,
                                               self._adopt_ground_truth, self._remove_recovery,
                                               parent=page)  # fmt: skip
        lay.addWidget(self.slide_region)
        row = QHBoxLayout()
        row.addWidget(QLabel("minimum nucleus size (px)"))
        self.min_size = QSpinBox()
        self.min_size.setRange(0, 100_000)
        self.min_size.setValue(30)
        self.min_size.valueChanged.connect(self._on_min_size)
        row.addWidget(self.min_size)
        lay.addLayout(row)
        keys = "".join(f"<b>{k}</b>: {d}<br>" for k, _, d in KEY_BINDINGS)
        help_text = QLabel(
            "Keys on the ground-truth layer (cursor = the nucleus under the mouse):<br>"
            f"{keys}Ctrl+Z / Ctrl+Shift+Z: undo / redo (each action is one step)."
        )
        help_text.setTextFormat(Qt.TextFormat.RichText)
        help_text.setWordWrap(True)
        lay.addWidget(help_text)
        lay.addStretch(1)
        return page

    def _build_tune_tab(self) -> QWidget:
        page = QWidget()
        lay = QVBoxLayout(page)
        intro = QLabel(
            "Search the post-processing parameters (foreground threshold, marker threshold, "
            "contour weight, minimum size) of a Segment-widget prediction that maximise a "
            "score against the ground truth."
        )
        intro.setWordWrap(True)
        lay.addWidget(intro)
        row = QHBoxLayout()
        row.addWidget(QLabel("maximise"))
        self.tune_objective = QComboBox()
        self.tune_objective.addItems(list(TUNE_OBJECTIVES))
        row.addWidget(self.tune_objective)
        lay.addLayout(row)
        row = QHBoxLayout()
        self.tune_button = QPushButton("Auto-tune")
        self.tune_button.clicked.connect(lambda: self._guard(self.start_autotune))
        self.tune_cancel = QPushButton("Cancel")
        self.tune_cancel.setEnabled(False)
        self.tune_cancel.clicked.connect(self.cancel_autotune)
        row.addWidget(self.tune_button)
        row.addWidget(self.tune_cancel)
        lay.addLayout(row)
        self.tune_progress = QProgressBar()
        self.tune_progress.setRange(0, 1)
        self.tune_progress.setValue(0)
        lay.addWidget(self.tune_progress)
        self.tune_result = QLabel("")
        self.tune_result.setWordWrap(True)
        lay.addWidget(self.tune_result)
        self.tune_apply = QPushButton("Apply to the prediction layer")
        self.tune_apply.setEnabled(False)
        self.tune_apply.clicked.connect(lambda: self._guard(self.apply_tuned))
        lay.addWidget(self.tune_apply)
        lay.addStretch(1)
        return page

    def _recovery_banner(self) -> QWidget:
        self.recovery_frame = QFrame()
        self.recovery_frame.setFrameShape(QFrame.Shape.StyledPanel)
        lay = QHBoxLayout(self.recovery_frame)
        self.recovery_label = QLabel("")
        self.recovery_label.setWordWrap(True)
        self.recovery_restore = QPushButton("Restore")
        self.recovery_restore.clicked.connect(lambda: self._guard(self.restore_recovery))
        self.recovery_discard = QPushButton("Discard")
        self.recovery_discard.clicked.connect(lambda: self._guard(self.discard_recovery))
        hide = QPushButton("Hide")
        hide.setToolTip("Hide this note; the autosaves are kept")
        hide.clicked.connect(lambda: self.recovery_frame.setVisible(False))
        lay.addWidget(self.recovery_label, 1)
        lay.addWidget(self.recovery_restore)
        lay.addWidget(self.recovery_discard)
        lay.addWidget(hide)
        self.recovery_frame.setVisible(False)
        return self.recovery_frame

    # ================================================================== layer choice

    def _is_overlay(self, layer) -> bool:
        return isinstance(layer.metadata, dict) and layer.metadata.get(ROLE) == "errors"

    def _label_choices(self, *_: Any) -> list[tuple[str, Labels]]:
        return [
            (layer.name, layer)
            for layer in self._viewer.layers
            if isinstance(layer, Labels) and not self._is_overlay(layer)
        ]

    def _mask_choices(self, *_: Any) -> list[tuple[str, Any]]:
        return [
            (layer.name, layer)
            for layer in self._viewer.layers
            if isinstance(layer, Labels | Shapes) and not self._is_overlay(layer)
        ]

    def _pick_defaults(self) -> None:
        labels = [layer for _, layer in self._label_choices()]
        if self._gt.value is None:
            gts = [x for x in labels if x.metadata.get(GT_KEY)]
            if gts:
                self._gt.value = gts[-1]
        if self._pred.value is None:
            preds = [x for x in labels if not x.metadata.get(GT_KEY) and x is not self._gt.value]
            made = [x for x in preds if x.metadata.get(ROLE) == "instances"]
            if made or preds:
                self._pred.value = (made or preds)[-1]

    def _on_destroyed(self, *_: object) -> None:
        """The dock was closed: stop auto-tune and stop listening to the viewer."""
        self._closed = True
        self._restore_prediction()
        if self._tune_worker is not None:
            self._tune_worker.quit()
        for emitter in (self._viewer.layers.events.inserted, self._viewer.layers.events.removed):
            emitter.disconnect(self._on_layers_changed)

    def _on_layers_changed(self, event=None) -> None:
        if self._closed or not qt_alive(self):
            return
        self.reset_choices()
        self._pick_defaults()
        self._attach_ground_truths()
        self._connect_live()
        self._check_recovery()
        self._sync_outlines()
        self._schedule()

    def _attach_ground_truths(self) -> None:
        """Give every ground-truth layer (and the chosen one) an editor; follow its edits."""
        layers = [x for _, x in self._label_choices() if x.metadata.get(GT_KEY)]
        chosen = self._gt.value
        if chosen is not None and chosen not in layers:
            layers.append(chosen)
        for layer in layers:
            try:
                editor = editor_for(self._viewer, layer)
            except InputError:  # not editable labels: the evaluation explains why
                continue
            editor.min_size = self.min_size.value()
            callback = weakref.WeakMethod(self._on_gt_edited)
            if not any(getattr(c, "__self__", None) is self for c in editor.on_change):
                editor.on_change.append(_WeakCall(callback))
            if not any(getattr(c, "__self__", None) is self for c in editor.on_message):
                editor.on_message.append(_WeakCall(weakref.WeakMethod(self._on_editor_message)))

    def _on_editor_message(self, text: str) -> None:
        """Show why a ground-truth tool refused in the panel's status line."""
        if not self._closed and qt_alive(self):
            self._status.value = text

    def _on_min_size(self, value: int) -> None:
        for _, layer in self._label_choices():
            editor = existing_editor(layer)
            if editor is not None:
                editor.min_size = int(value)

    def _on_inputs_changed(self, *_: Any) -> None:
        self._last_problem = None
        self._drop_stale_overlays()
        self._sync_outlines()
        gt = self._gt.value
        if gt is not None and gt.metadata.get(ROLE) and id(gt) not in self._warned_outputs:
            self._warned_outputs.add(id(gt))
            show_warning(
                f"'{gt.name}' is an output of the Segment panel: running it again keeps the "
                "nuclei you edit or verify and re-segments the others. Use 'Start ground "
                "truth from prediction' to edit a separate copy."
            )
        self._attach_ground_truths()
        self._connect_live()
        self._schedule()

    def _on_live_toggled(self, value: bool) -> None:
        if value:
            self._last_problem = None
            self._schedule()

    def _connect_live(self) -> None:
        """Listen to the data / paint / set_data events of the chosen layers."""
        for emitter, callback in self._connected:
            try:
                emitter.disconnect(callback)
            except Exception:  # the layer may be gone
                logger.debug("disconnect failed", exc_info=True)
        self._connected = []
        for layer in {
            id(x): x for x in (self._pred.value, self._gt.value, self._mask.value) if x
        }.values():
            for name in ("data", "paint", "set_data"):
                emitter = getattr(layer.events, name, None)
                if emitter is not None:
                    emitter.connect(self._schedule)
                    self._connected.append((emitter, self._schedule))

    # ================================================================== evaluation

    def _schedule(self, event: Any = None) -> None:
        """Re-evaluate soon: at once after a quiet spell, else when DEBOUNCE_MS has passed."""
        if getattr(event, "type", "set_data") != "set_data":
            self._data_changed = True  # a real edit: no need to compare the pixels
        if not self._live.value or self._timer.isActive():
            return
        since = (time.perf_counter() - self._last_run_end) * 1000.0
        self._timer.start(0 if since >= DEBOUNCE_MS else int(DEBOUNCE_MS - since) + 1)

    def _run_live(self) -> None:
        self._evaluate(live=True)

    def _on_evaluate_clicked(self, *_: Any) -> None:
        self._last_problem = None
        self._evaluate(live=False)

    def evaluate_now(self) -> EvaluationResult | None:
        """Evaluate at once (as the Evaluate button does); None when the input is bad."""
        self._last_problem = None
        return self._evaluate(live=False)

    def _notify_problem(self, problem: _Problem, live: bool) -> None:
        text = str(problem)
        self._status.value = text
        if live and text == self._last_problem:
            return  # do not repeat the same message on every edit
        self._last_problem = text
        {"error": show_error, "warning": show_warning}.get(problem.level, show_info)(text)

    def _inputs(self, live: bool):
        gt_layer, pred_layer, mask_layer = self._gt.value, self._pred.value, self._mask.value
        if gt_layer is None or pred_layer is None:
            raise _Problem("Choose a prediction and a ground-truth layer.", "silent")
        if gt_layer is pred_layer:
            raise _Problem(
                f"'{gt_layer.name}' is chosen as both the prediction and the ground truth; "
                "choose two different layers."
            )
        for role, layer in (("prediction", pred_layer), ("ground truth", gt_layer)):
            if layer.ndim != 2:
                raise _Problem(
                    f"The {role} '{layer.name}' has {layer.ndim} dimensions; "
                    "the evaluation works on 2-D label images."
                )
        gshape, pshape = tuple(gt_layer.data.shape), tuple(pred_layer.data.shape)
        if gshape != pshape:
            raise _Problem(
                f"The prediction '{pred_layer.name}' is {pshape[0]}×{pshape[1]} but the ground "
                f"truth '{gt_layer.name}' is {gshape[0]}×{gshape[1]}: they must have the same shape."
            )
        n = int(np.prod(gshape))
        if n > MAX_PIXELS:
            raise _Problem(
                f"The image has {n / 1e6:.0f} million pixels, more than the "
                f"{MAX_PIXELS / 1e6:.0f} million the Evaluate widget handles; crop it first."
            )
        if live and n > LIVE_MAX_PIXELS:
            raise _Problem(
                f"The image has {n / 1e6:.0f} million pixels: live evaluation is off above "
                f"{LIVE_MAX_PIXELS / 1e6:.0f} million. Press Evaluate to score it.",
                "warning",
            )
        try:
            gt = check_labels(np.asarray(gt_layer.data), f"ground truth '{gt_layer.name}'")
            pred = check_labels(np.asarray(pred_layer.data), f"prediction '{pred_layer.name}'")
        except InputError as exc:
            raise _Problem(str(exc)) from None
        mask = self._mask_array(mask_layer, gshape)
        return gt_layer, pred_layer, gt, pred, mask

    def _mask_array(self, layer, shape: tuple[int, ...]) -> np.ndarray | None:
        """The ignore mask (True = ignored) from the mask layer, or None."""
        if layer is None:
            return None
        if isinstance(layer, Shapes):
            if len(layer.data) == 0:
                return None
            region = np.asarray(layer.to_masks(mask_shape=shape)).any(axis=0)
        else:
            if tuple(layer.data.shape) != shape:
                raise _Problem(
                    f"The mask '{layer.name}' is {tuple(layer.data.shape)} but the images are "
                    f"{shape}: they must have the same shape."
                )
            region = np.asarray(layer.data) != 0
        if self._mask_mode.value == "evaluate inside only":
            return ~region
        return region

    def _evaluate(self, live: bool) -> EvaluationResult | None:
        t0 = time.perf_counter()
        try:
            try:
                gt_layer, pred_layer, gt, pred, mask = self._inputs(live)
            except _Problem as problem:
                self._clear_display()
                if problem.level != "silent":
                    self._notify_problem(problem, live)
                else:
                    self._status.value = str(problem)
                return None
            rank = self.rank_metric.currentText()
            settings = (
                id(gt_layer),
                id(pred_layer),
                id(self._mask.value),
                self._mask_mode.value,
                float(self._tau.value),
                rank,
                id(pred_layer.metadata.get("scores")),
            )
            # a refresh (set_data) without an edit changes nothing: compare the pixels
            # then; after a paint / data event they changed, so skip the comparison
            changed = self._data_changed or not live
            self._data_changed = False
            data_key = None if changed else [_fingerprint(a) for a in (gt, pred, mask)]
            if (
                live
                and not changed
                and self.result is not None
                and settings == self._settings
                and data_key == self._fingerprint
            ):
                return self.result
            result = self._compute(gt_layer, pred_layer, gt, pred, mask, rank, t0)
            self._settings = settings
            self._fingerprint = data_key
            self.result = result
            self._show(result, gt_layer, gt, pred, mask)
            if result.scores.n_gt == 0:
                self._notify_problem(
                    _Problem(
                        f"The ground truth '{gt_layer.name}' has no nuclei: every score is "
                        "0 (or 1 if the prediction is empty too).",
                        "warning",
                    ),
                    live,
                )
            else:
                self._last_problem = None
            return result
        except Exception as exc:  # never a traceback dialog from a live update
            logger.exception("evaluation failed")
            self._notify_problem(_Problem(f"Evaluation failed: {exc}"), live)
            return None
        finally:
            self._last_run_end = time.perf_counter()

    def _compute(self, gt_layer, pred_layer, gt, pred, mask, rank, t0) -> EvaluationResult:
        table = metrics.overlap_table(gt, pred, ignore_mask=mask)
        scores, note = prediction_scores(pred_layer, table.pred_ids)
        gt_types = layer_types(gt_layer, table.gt_ids)
        pred_types = layer_types(pred_layer, table.pred_ids)
        typed = gt_types is not None and pred_types is not None
        image_scores = metrics.evaluate_table(
            table,
            scores=scores,
            gt_types=gt_types if typed else None,
            pred_types=pred_types if typed else None,
        )
        tau = round(float(self._tau.value), 2)
        outcomes = metrics.instance_outcomes(table, tau)
        errors = editing.rank_errors(table, outcomes, metric=rank)
        pr = metrics.pr_curve(table, scores, tau)
        return EvaluationResult(
            gt_name=gt_layer.name,
            pred_name=pred_layer.name,
            mask_name=None if self._mask.value is None else self._mask.value.name,
            threshold=tau,
            table=table,
            scores=image_scores,
            outcomes=outcomes,
            errors=errors,
            rank_metric=rank,
            pr=pr,
            scores_note=note,
            seconds=time.perf_counter() - t0,
        )

    # ================================================================== display

    def _show(self, result: EvaluationResult, gt_layer, gt, pred, mask) -> None:
        self._fill_tables(result)
        self.evaluations += 1
        s = result.scores
        types = ""
        if s.types is not None:  # both layers carry nucleus types: mAP is over classes
            t = s.types.to_dict()
            per = ", ".join(f"{name} {v['f1']:.2f}" for name, v in t["classes"].items())
            types = f"; types: detection F1 {t['f1_d']:.3f}, mPQ {t['mpq']:.3f}, F1 by class {per}"
        self._status.value = (
            f"{s.n_gt} gt, {s.n_pred} predicted nuclei - AJI {s.aji:.3f}, PQ {s.pq:.3f}, "
            f"mAP {s.map:.3f}{types} ({1000 * result.seconds:.0f} ms)"
        )
        self._fill_review(result)
        if self._show_overlay.isChecked():
            if mask is not None:
                gt = np.where(mask, 0, gt)
                pred = np.where(mask, 0, pred)
            image = editing.outcome_image(gt, pred, result.outcomes)
            editor = existing_editor(gt_layer)
            if editor is not None:
                _untint_verified(image, gt, editor.status)
            self._write_overlay(gt_layer, image)
            self._sync_outlines()
        self._draw_pr(result)

    def _fill_tables(self, result: EvaluationResult) -> None:
        s = result.scores
        t = self.per_threshold_table
        t.setUpdatesEnabled(False)
        for r, tau in enumerate(s.thresholds):
            for c, (_, attr, is_count) in enumerate(PER_THRESHOLD):
                v = getattr(s, attr)[tau]
                self._set_cell(t, r, c, str(int(v)) if is_count else f"{v:.4f}")
        t.setUpdatesEnabled(True)
        u = self.summary_table
        u.setUpdatesEnabled(False)
        for r, (_, attr) in enumerate(SUMMARY):
            v = getattr(s, attr)
            self._set_cell(u, r, 0, str(int(v)) if attr.startswith("n_") else f"{v:.4f}")
        counts = result.outcomes.counts
        for k, (_, key) in enumerate(OUTCOME_COUNTS):
            self._set_cell(u, len(SUMMARY) + k, 0, str(counts[key]))
        u.setUpdatesEnabled(True)
        note = s.ap_note
        if result.scores_note:
            note = f"{note} ({result.scores_note})."
        self.ap_note.setText(f"AP: {note}")

    def _clear_display(self) -> None:
        """Blank the numbers, list and curve (nothing valid to show)."""
        if self.result is None:
            return
        self.result = None
        self._settings = None
        for table in (self.per_threshold_table, self.summary_table):
            table.clearContents()
        self.review_list.clear()
        self.ap_note.setText("")
        self._pr_line.set_data([], [])
        self._op_point.set_data([], [])
        self._ax.set_title("")
        self._pr_stale = True
        self._redraw_pr()

    @staticmethod
    def _set_cell(table: QTableWidget, r: int, c: int, text: str) -> None:
        item = table.item(r, c)
        if item is None:
            item = QTableWidgetItem(text)
            item.setTextAlignment(int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter))
            table.setItem(r, c, item)
        elif item.text() != text:
            item.setText(text)

    def displayed_metrics(self) -> dict[str, Any]:
        """The numbers as shown in the tables: ``{(header, threshold): text}`` for the
        per-threshold table and ``{attribute: text}`` / ``{counts key: text}`` for the summary."""
        out: dict[Any, str] = {}
        for r, tau in enumerate(metrics.THRESHOLDS):
            for c, (_, attr, _) in enumerate(PER_THRESHOLD):
                item = self.per_threshold_table.item(r, c)
                out[(attr, tau)] = item.text() if item else ""
        for r, (_, attr) in enumerate(SUMMARY):
            item = self.summary_table.item(r, 0)
            out[attr] = item.text() if item else ""
        for k, (_, key) in enumerate(OUTCOME_COUNTS):
            item = self.summary_table.item(len(SUMMARY) + k, 0)
            out[key] = item.text() if item else ""
        return out

    def _fill_review(self, result: EvaluationResult) -> None:
        lst = self.review_list
        lst.setUpdatesEnabled(False)
        lst.clear()
        metric = (
            result.rank_metric.upper()
            if result.rank_metric in ("aji", "pq")
            else result.rank_metric
        )
        for k, item in enumerate(result.errors):
            entry = QListWidgetItem(f"{item.label}    {100 * item.gain:+.2f} {metric} pts")
            entry.setData(Qt.ItemDataRole.UserRole, k)
            lst.addItem(entry)
        lst.setUpdatesEnabled(True)

    def _overlay_layer(self, gt_layer) -> Labels | None:
        for layer in self._viewer.layers:
            md = layer.metadata
            if (
                isinstance(layer, Labels)
                and md.get(ROLE) == "errors"
                and md.get(SOURCE) == gt_layer.name
            ):
                return layer
        return None

    def _drop_stale_overlays(self) -> None:
        """Remove the error overlays of ground truths other than the chosen one.

        An overlay shows one ground truth's outcomes; once another is chosen, the old
        one would be drawn over (and mistaken for) the new one's.
        """
        gt = self._gt.value
        name = None if gt is None else gt.name
        for layer in [x for x in self._viewer.layers if self._is_overlay(x)]:
            if layer.metadata.get(SOURCE) != name:
                self._viewer.layers.remove(layer)

    def _write_overlay(self, gt_layer, image: np.ndarray) -> None:
        layer = self._overlay_layer(gt_layer)
        if (
            layer is not None
            and layer.data.shape == image.shape
            and layer.data.dtype == image.dtype
        ):
            # in place, so that napari only re-uploads the texture (no new-data bookkeeping)
            changed = layer.data != image
            if changed.any():
                rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
                box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
                layer.data[box] = image[box]
                layer.refresh()
            return
        if layer is not None:
            self._viewer.layers.remove(layer)
        colours = {None: "transparent", 0: "transparent"}
        colours.update({editing.OUTCOME_CODES[k]: v for k, v in OUTCOME_COLOURS.items()})
        active = self._viewer.layers.selection.active
        self._viewer.add_labels(
            image,
            name=f"{gt_layer.name} errors",
            colormap=DirectLabelColormap(color_dict=colours),
            opacity=0.7,
            scale=gt_layer.scale,
            translate=gt_layer.translate,
            metadata={ROLE: "errors", SOURCE: gt_layer.name},
        )
        if active is not None and active in self._viewer.layers:
            self._viewer.layers.selection.active = active  # keep the editing keys on the gt

    def _on_overlay_toggled(self, on: bool) -> None:
        self._show_overlay.setText(f"Error overlay: {'on' if on else 'off'}")
        gt = self._gt.value
        layer = self._overlay_layer(gt) if gt is not None else None
        if layer is not None:
            layer.visible = on
        self._sync_outlines()
        if on:
            self._settings = None
            self._schedule()

    def _sync_outlines(self) -> None:
        """Draw the chosen prediction as outlines exactly while the error overlay is shown.

        The overlay's fixed outcome colours would otherwise mix with the prediction's
        instance colours; the prediction's own contour setting comes back when the
        overlay is turned off or removed, or another prediction is chosen.
        """
        gt, pred = self._gt.value, self._pred.value
        shown = (
            self._show_overlay.isChecked()
            and gt is not None
            and pred is not None
            and pred is not gt
            and pred in self._viewer.layers
            and self._overlay_layer(gt) is not None
        )
        held = None if self._outlined is None else self._outlined[0]
        if shown and held is pred:
            return
        self._restore_prediction()
        if shown:
            self._outlined = (pred, int(pred.contour))
            pred.contour = PREDICTION_OUTLINE

    def _restore_prediction(self) -> None:
        """Give the outlined prediction back its own contour setting."""
        held, self._outlined = self._outlined, None
        if held is not None:
            layer, contour = held
            layer.contour = contour

    def _draw_pr(self, result: EvaluationResult) -> None:
        recall, precision, _ = result.pr
        if recall.size:
            # the curve starts at recall 0 with the first precision, as plotted by COCO
            x = np.concatenate(([0.0], recall))
            y = np.concatenate(([precision[0]], precision))
            self._pr_line.set_data(x, y)
            self._op_point.set_data([recall[-1]], [precision[-1]])
        else:
            self._pr_line.set_data([], [])
            self._op_point.set_data([], [])
        ap = result.scores.ap.get(result.threshold)
        kind = "AP" if result.scores.has_scores else "P×R (no scores)"
        title = f"IoU {metrics.threshold_key(result.threshold)}"
        if ap is not None:
            title += f": {kind} {ap:.3f}"
        self._ax.set_title(title, fontsize="small")
        self._pr_stale = True
        self._redraw_pr()

    def _redraw_pr(self, *_: Any) -> None:
        """Redraw the PR plot if it changed and can be seen (drawing costs ~tens of ms)."""
        if self._pr_stale and self.canvas.isVisible():
            self._pr_stale = False
            self.canvas.draw_idle()

    def _on_review_clicked(self, entry: QListWidgetItem) -> None:
        k = entry.data(Qt.ItemDataRole.UserRole)
        if k is not None:
            self._guard(lambda: self.focus_error(int(k)))

    def focus_error(self, index: int) -> bool:
        """Centre and zoom the view on the ``index``-th error of the review list."""
        if self.result is None or not 0 <= index < len(self.result.errors):
            return False
        gt_layer, pred_layer = self._gt.value, self._pred.value
        if gt_layer is None or pred_layer is None:
            return False
        item = self.result.errors[index]
        where = editing.error_bbox(np.asarray(gt_layer.data), np.asarray(pred_layer.data), item)
        if where is None:
            show_info(f"{item.label} is no longer in the images; re-evaluate.")
            return False
        centre, box = where
        world = np.asarray(gt_layer.data_to_world(centre), float)
        extent = max(box[0].stop - box[0].start, box[1].stop - box[1].start, 8)
        scale = float(np.max(np.abs(gt_layer.scale[-2:])))
        canvas = getattr(getattr(self._viewer, "canvas", None), "size", None) or (600, 800)
        view_px = max(min(canvas), 100)
        camera = _camera(self._viewer)
        camera.center = tuple(world[-2:])
        camera.zoom = float(view_px / (4.0 * extent * scale))
        self._viewer.status = f"{item.label}: gain {100 * item.gain:+.2f} points"
        return True

    # ================================================================== ground truth

    def _guard(self, action: Callable[[], Any]) -> Any:
        """Run a button action; expected problems become notifications."""
        try:
            return action()
        except (InputError, ValueError, OSError, _Problem) as exc:
            show_error(str(exc))
        return None

    def _editor(self) -> GroundTruthEditor:
        gt = self._gt.value
        if gt is None:
            raise _Problem("Choose a ground-truth layer first.")
        if gt is self._pred.value:
            raise _Problem("The prediction and the ground truth are the same layer.")
        return editor_for(self._viewer, gt)

    def _edit(self, method: str) -> Any:
        return getattr(self._editor(), method)()

    def start_from_prediction(self) -> Labels | None:
        """New ground-truth layer copied from the chosen prediction, and select it."""
        pred = self._pred.value
        if pred is None:
            show_error("Choose a prediction layer to start the ground truth from.")
            return None
        if pred.ndim != 2:
            show_error(f"'{pred.name}' is not 2-D; the ground truth must be a 2-D label image.")
            return None
        layer = start_from_prediction(self._viewer, pred)
        self.reset_choices()
        self._gt.value = layer
        self._viewer.layers.selection.active = layer
        show_info(f"Ground truth '{layer.name}' started as a copy of '{pred.name}'.")
        return layer

    def load_ground_truth(self, path: str | Path | None = None) -> Labels | None:
        """Add a ground-truth layer from a labels file (its status CSV too, if present)."""
        if path is None:
            path = self._ask_open_path("Open ground-truth labels", "Labels (*.tif *.tiff *.png)")
            if path is None:
                return None
        like = self._pred.value
        try:
            layer = load_ground_truth(self._viewer, path, like=like)
        except InputError as exc:
            show_error(str(exc))
            return None
        self.reset_choices()
        self._gt.value = layer
        self._viewer.layers.selection.active = layer
        return layer

    def unsaved_ground_truths(self) -> list[str]:
        """Names of ground-truth layers with edits not saved to a file."""
        out = []
        for _, layer in self._label_choices():
            editor = existing_editor(layer)
            if editor is not None and editor.dirty:
                out.append(layer.name)
        return out

    def save_ground_truth(self, path: str | Path | None = None) -> bool:
        """Save the ground truth as TIFF and its status as ``<stem>_status.csv``.

        An existing file is replaced only after :meth:`_confirm_overwrite` says yes.
        The TIFF embeds the status table and the CSV records the labels' hash
        (:func:`napari_medinst.recovery.write_ground_truth`), so a crash between the
        two writes never pairs the new labels with old statuses; a CSV there that did
        not belong to the labels replaced is kept as ``<stem>_status.stale-<time>.csv``
        (a warning names it).  Once both are written this layer's own autosave is
        deleted (an earlier session's autosave still offered is not) and editing
        starts afresh from the file.
        """
        editor = self._editor()
        layer = editor.layer
        if path is None:
            suggested = layer.metadata.get("path") or f"{layer.name}.tif"
            path = self._ask_save_path("Save ground truth", "TIFF (*.tif *.tiff)", suggested)
            if path is None:
                return False
        path = Path(path)
        if path.suffix.lower() not in (".tif", ".tiff"):
            path = path.with_name(path.name + ".tif")
        data = check_labels(np.asarray(layer.data), f"ground truth '{layer.name}'")
        targets = [path, status_path(path)]
        if not self._may_write(targets):
            return False
        saved = recovery.write_ground_truth(path, data, editor.status, targets[1])
        editor.dirty = False
        self._remove_recovery(layer)
        layer.metadata["path"] = str(path)
        editor.rebase()
        show_info(f"Saved '{layer.name}' to {path} (status: {targets[1].name}).")
        if saved.kept_csv is not None:
            show_warning(
                f"The replaced {targets[1].name} did not belong to the labels replaced; "
                f"its statuses were kept as {saved.kept_csv.name}."
            )
        return True

    def _adopt_ground_truth(self, layer: Labels) -> None:
        """Make ``layer`` (just added) the chosen ground truth, and select it.

        A multiscale prediction (a whole-slide result) cannot be scored against a region:
        it is unchosen.
        """
        self.reset_choices()
        self._gt.value = layer
        if getattr(self._pred.value, "multiscale", False):
            self._pred.value = None
        self._viewer.layers.selection.active = layer

    def _may_write(self, paths: list[Path]) -> bool:
        existing = [p for p in paths if p.exists()]
        if existing and not self._confirm_overwrite(existing):
            show_info("Not saved: the existing file was kept.")
            return False
        return True

    def export_status(self, path: str | Path | None = None) -> bool:
        """Write the ground truth's per-nucleus status table to CSV."""
        editor = self._editor()
        if path is None:
            path = self._ask_save_path(
                "Save status table", "CSV (*.csv)", status_path(f"{editor.layer.name}.tif")
            )
            if path is None:
                return False
        path = Path(path)
        if not self._may_write([path]):
            return False
        write_bytes(path, editor.status_csv().encode("utf-8"), overwrite=True)
        show_info(f"Saved the status table to {path}.")
        return True

    def metrics_dict(self) -> dict[str, Any]:
        """JSON-ready description of the last evaluation."""
        r = self._require_result()
        s = r.scores
        per = {
            key: {metrics.threshold_key(t): int(v) for t, v in getattr(s, key).items()}
            for key in ("tp", "fp", "fn")
        }
        return {
            "prediction": r.pred_name,
            "ground_truth": r.gt_name,
            "mask": r.mask_name,
            "mask_mode": self._mask_mode.value if r.mask_name else None,
            "outcome_iou": r.threshold,
            "has_scores": bool(s.has_scores),
            "ap_note": s.ap_note + (f" ({r.scores_note})" if r.scores_note else ""),
            "metrics": s.to_dict(),
            "counts_per_threshold": per,
            "outcome_counts": r.outcomes.counts,
        }

    def _require_result(self) -> EvaluationResult:
        if self.result is None:
            raise _Problem("Nothing evaluated yet: choose a prediction and a ground truth.")
        return self.result

    def export_metrics(self, path: str | Path | None = None) -> bool:
        """Write the last evaluation to ``<stem>.csv`` and ``<stem>.json``."""
        data = self.metrics_dict()
        if path is None:
            path = self._ask_save_path(
                "Export metrics",
                "CSV (*.csv);;JSON (*.json)",
                f"{data['ground_truth']} metrics.csv",
            )
            if path is None:
                return False
        path = Path(path)
        csv_path, json_path = path.with_suffix(".csv"), path.with_suffix(".json")
        if not self._may_write([csv_path, json_path]):
            return False
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["metric", "iou_threshold", "value"])
        m = data["metrics"]
        for key in ("accuracy", "ap", "precision", "recall", "f1"):
            for t, v in m[key].items():
                w.writerow([key, t, repr(float(v))])
        for key, values in data["counts_per_threshold"].items():
            for t, v in values.items():
                w.writerow([key, t, v])
        for key in ("map", "pq", "dq", "sq", "aji", "aji_plus", "dice"):
            w.writerow([key, "", repr(float(m[key]))])
        w.writerow(["n_gt", "", m["n_gt"]])
        w.writerow(["n_pred", "", m["n_pred"]])
        for key, v in data["outcome_counts"].items():
            w.writerow([key, metrics.threshold_key(data["outcome_iou"]), v])
        write_bytes(csv_path, buf.getvalue().encode("utf-8"), overwrite=True)
        write_bytes(json_path, json.dumps(data, indent=2).encode("utf-8"), overwrite=True)
        show_info(f"Saved the metrics to {csv_path.name} and {json_path.name}.")
        return True

    def export_pr_curve(self, path: str | Path | None = None) -> bool:
        """Save the precision-recall plot as PNG."""
        r = self._require_result()
        if path is None:
            path = self._ask_save_path("Save PR curve", "PNG (*.png)", f"{r.gt_name} pr curve.png")
            if path is None:
                return False
        path = Path(path)
        if path.suffix.lower() != ".png":
            path = path.with_name(path.name + ".png")
        if not self._may_write([path]):
            return False
        buf = io.BytesIO()
        self.figure.savefig(buf, format="png", dpi=150)
        write_bytes(path, buf.getvalue(), overwrite=True)
        show_info(f"Saved the precision-recall curve to {path}.")
        return True

    # dialogs (methods so tests can replace them)

    def _confirm_overwrite(self, paths: list[Path]) -> bool:
        names = "\n".join(str(p) for p in paths)
        answer = QMessageBox.question(
            self.native,
            "Replace file?",
            f"These files exist already:\n{names}\n\nReplace them?",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
            QMessageBox.StandardButton.No,
        )
        return answer == QMessageBox.StandardButton.Yes

    def _confirm_discard(self, names: list[str]) -> bool:
        answer = QMessageBox.question(
            self.native,
            "Unsaved ground truth",
            "The ground truth "
            + ", ".join(f"'{n}'" for n in names)
            + " has unsaved edits. Closing discards them, and their autosaved copy is "
            "deleted.\n\nClose anyway?",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
            QMessageBox.StandardButton.No,
        )
        return answer == QMessageBox.StandardButton.Yes

    def _ask_save_path(self, title: str, filters: str, suggested: Any) -> Path | None:
        name, _ = QFileDialog.getSaveFileName(
            self.native,
            title,
            str(suggested),
            filters,
            options=QFileDialog.Option.DontConfirmOverwrite,
        )
        return Path(name) if name else None

    def _ask_open_path(self, title: str, filters: str) -> Path | None:
        name, _ = QFileDialog.getOpenFileName(self.native, title, "", filters)
        return Path(name) if name else None

    # ================================================================== unsaved edits

    def _install_close_guard(self) -> None:
        self._close_guard = _CloseGuard(self)

    def _on_gt_edited(self) -> None:
        self._autosave_timer.start(AUTOSAVE_MS)

    def _paired_image(self, layer: Labels) -> Image | None:
        """The image ``layer`` is drawn over (rule: :func:`recovery.paired_image_index`)."""
        layers = list(self._viewer.layers)
        if layer not in layers:
            return None
        shape = tuple(layer.data.shape)
        flags = [isinstance(x, Image) and _spatial_shape(x) == shape for x in layers]
        k = recovery.paired_image_index(layers.index(layer), flags)
        return None if k is None else layers[k]

    def _image_hash(self, image: Image) -> str | None:
        """:func:`recovery.image_sha256` of an image layer (level 0), cached per data array.

        None if the data cannot be hashed: the image then counts as absent.
        """
        data = image.data[0] if image.multiscale else image.data
        cached = self._image_hashes.get(image)
        if cached is None or cached[0] != id(data):
            try:
                digest = recovery.image_sha256(data)
            except (TypeError, ValueError, MemoryError) as exc:
                logger.warning("cannot fingerprint image %s: %s", image.name, exc)
                digest = None
            cached = (id(data), digest)
            self._image_hashes[image] = cached
        return cached[1]

    def _source(self, layer: Labels) -> recovery.Source:
        """What edits of ``layer`` belong to: where its editor began, else the layer now."""
        editor = existing_editor(layer)
        if editor is not None:
            path, origin, base = editor.source_path, editor.origin, editor.base_sha256
        else:
            path, origin = layer_origin(layer)
            base = recovery.labels_sha256(np.asarray(layer.data))
        image = self._paired_image(layer)
        return recovery.Source(
            path=path,
            origin=origin,
            base_sha256=base,
            image_sha256=None if image is None else self._image_hash(image),
            shape=tuple(int(s) for s in layer.data.shape),
        )

    def autosave_now(self) -> list[Path]:
        """Write every ground truth with unsaved edits to the recovery folder.

        One file per editor, named by its source (:meth:`recovery.Source.key`: the
        ground-truth file, or the original labels and the image) and the editor's token
        (:func:`_autosave_token`), replaced at each autosave; its record says what the
        edits belong to.  Skipped: layers whose unsaved edits the user discarded
        ("Close anyway") and has not edited since, and layers with a recovery offer
        still pending (until Restore or Discard).
        """
        pending = {id(x) for x, _, _ in self._recovery_offers}
        written = []
        for _, layer in self._label_choices():
            editor = existing_editor(layer)
            if editor is None or not editor.dirty or id(layer) in pending:
                continue
            if editor.discarded_revision == editor.revision:
                continue
            try:
                written.append(self._autosave(layer, editor))
            except (OSError, InputError) as exc:
                logger.warning("autosave of %s failed: %s", layer.name, exc)
        return written

    def _autosave(self, layer: Labels, editor: GroundTruthEditor) -> Path:
        source = self._source(layer)
        status = editor.status
        data = np.asarray(layer.data)
        changed = recovery.changed_nuclei(editor.base_status, status)
        record = recovery.new_record(source, layer.name, data, status, changed)
        path = recovery.write_record(recovery_dir(), record, data, _autosave_token(editor))
        old, editor.recovery_file = editor.recovery_file, path
        if old is not None and old != path:  # the source changed (e.g. another image)
            self._delete_autosave(old)
        editor.discarded_revision = None
        return path

    def _delete_autosave(self, path: Path) -> None:
        """Delete an autosave of this session; never one still offered.

        An offered autosave holds an earlier session's edits that the user has not
        yet restored or discarded (even with the banner hidden): only
        :meth:`restore_recovery` (which adopts it) or :meth:`discard_recovery` may
        remove it.
        """
        if any(Path(p) == Path(path) for _, p, _ in self._recovery_offers):
            return
        _unlink(path)

    def _remove_recovery(self, layer: Labels) -> None:
        """After a save, delete the autosave of ``layer``'s editor (its own, or restored).

        Nothing else: not another layer's autosave of the same source, and not an
        earlier session's autosave still offered for this layer (it stays offered).
        """
        editor = existing_editor(layer)
        if editor is not None and editor.recovery_file is not None:
            self._delete_autosave(editor.recovery_file)
            editor.recovery_file = None

    def discard_unsaved_autosaves(self) -> list[str]:
        """The user closes with unsaved edits ("Close anyway"): delete their autosaves.

        Deleting (rather than keeping a copy) is deliberate: the user was just told
        the edits are unsaved and chose to discard them, so a copy that came back as a
        recovery offer would be a decision they already made, and one they might
        accept by mistake.  Autosaves of an earlier session still waiting for Restore
        or Discard are not this session's edits and are left alone.  Until a layer is
        edited again it is not autosaved (should the close not happen after all, the
        next edit autosaves again).  Returns the names of the layers concerned.
        """
        self._autosave_timer.stop()
        names = []
        for _, layer in self._label_choices():
            editor = existing_editor(layer)
            if editor is None or not editor.dirty:
                continue
            if editor.recovery_file is not None:
                self._delete_autosave(editor.recovery_file)
                editor.recovery_file = None
            editor.discarded_revision = editor.revision
            names.append(layer.name)
        return names

    def _check_recovery(self) -> None:
        """Offer the autosaves that belong to a layer of the viewer; mention unrelated ones.

        An autosave is offered for a 2-D labels layer only if its source matches the
        layer's (:meth:`recovery.Source.matches`: same file, or same original labels
        and same image).  One with the layer's name and shape but another source is
        never offered; the banner only says it exists.  This session's own autosaves
        are never offered.  A layer gets one offer at a time: several autosaves of one
        source (two layers of it were edited) are offered to as many layers of that
        source, and the rest are listed as waiting (offered once the first is
        restored or discarded, or to another layer of the source).
        """
        records = recovery.list_records(recovery_dir())
        layers = [x for _, x in self._label_choices() if x.ndim == 2]
        offers = [o for o in self._recovery_offers if o[0] in self._viewer.layers and o[1].exists()]
        own = {e.recovery_file for e in map(existing_editor, layers) if e is not None}
        sources: dict[int, recovery.Source] = {}
        others, waiting = [], []
        for path, record in records:
            if path in own or any(p == path for _, p, _ in offers):
                continue
            layer, busy = self._layer_for(path, record, layers, offers, sources)
            if layer is not None:
                self._offered.add((id(layer), path))
                offers.append((layer, path, record))
            elif busy:
                waiting.append(record)
            elif any(
                x.name == record.layer and tuple(x.data.shape) == record.source.shape
                for x in layers
            ):
                others.append(record)
        self._recovery_offers = offers
        self._waiting = bool(waiting)
        self._show_recovery(offers, others, waiting)

    def _layer_for(self, path, record, layers, offers, sources) -> tuple[Labels | None, bool]:
        """The first layer without an offer yet whose source matches ``record``'s.

        Also whether a layer that already has an offer matches it (the record then
        waits for that layer's offer to be resolved).
        """
        busy = {id(x) for x, _, _ in offers}
        waiting = False
        for layer in layers:
            key = id(layer)
            if (key, path) in self._offered or not _may_receive(layer, record):
                continue
            if key not in sources:
                sources[key] = self._source(layer)
            if not record.source.matches(sources[key]):
                continue
            if key not in busy:
                return layer, False
            waiting = True
        return None, waiting

    def _show_recovery(self, offers, others, waiting=()) -> None:
        """Fill the banner: what each offer belongs to, waiting and unrelated autosaves."""
        lines = []
        for layer, _, record in offers:
            lines.append(
                f"Unsaved edits of '{layer.name}' were recovered ({record.describe()}). "
                "Until you Restore or Discard them, this layer is not autosaved."
            )
        for record in waiting:
            lines.append(
                f"Another autosave of the same source ({record.describe()}) is kept; it "
                "is offered once the one above is restored or discarded, or to another "
                "layer of that source."
            )
        for record in others:
            lines.append(
                f"An autosave of another '{record.layer}' ({record.describe()}) is kept but "
                "not offered: it belongs to a different file or image."
            )
        text = "\n".join(lines)
        self.recovery_restore.setVisible(bool(offers))
        self.recovery_discard.setVisible(bool(offers))
        if not lines:
            self.recovery_frame.setVisible(False)
        elif text != self.recovery_label.text():
            self.recovery_frame.setVisible(True)
        self.recovery_label.setText(text)

    def restore_recovery(self) -> list[str]:
        """Apply the offered autosaves to their layers (one undoable step each).

        Each is checked again first: the layer must still be open and match the
        autosave's source, and the labels file its record.  Otherwise nothing is
        written to that layer, the file is kept, and an error says why.
        """
        restored = []
        for layer, path, record in self._recovery_offers:
            try:
                self._restore_one(layer, path, record)
            except (InputError, OSError) as exc:
                show_error(f"Not restored onto '{layer.name}': {exc}")
                continue
            restored.append(layer.name)
        self._recovery_offers = []
        self._show_recovery([], [])
        if self._waiting:
            self._check_recovery()
        if restored:
            show_info(f"Restored the autosaved edits of {', '.join(restored)} (not yet saved).")
        return restored

    def _restore_one(self, layer: Labels, path: Path, record: recovery.Record) -> None:
        if layer not in self._viewer.layers:
            raise InputError("the layer was closed")
        if not _may_receive(layer, record) or not record.source.matches(self._source(layer)):
            raise InputError(
                f"{path.name} holds edits of {record.source.origin}, which is not this "
                "layer's file or image"
            )
        data = recovery.read_record_labels(path, record)
        editor = editor_for(self._viewer, layer)
        current = np.asarray(layer.data)
        changed = np.nonzero(current != data)
        if changed[0].size:
            editor.write(changed, data[changed].astype(current.dtype))
        editor.load_status(record.status)
        editor.dirty = True
        editor.recovery_file = path

    def discard_recovery(self) -> None:
        """Delete the offered autosaves; they are never offered again."""
        for _, path, _ in self._recovery_offers:
            _unlink(path)
        self._recovery_offers = []
        self._show_recovery([], [])
        if self._waiting:
            self._check_recovery()

    # ================================================================== auto-tune

    def _tune_inputs(self):
        pred_layer, gt_layer = self._pred.value, self._gt.value
        if pred_layer is None or gt_layer is None or pred_layer is gt_layer:
            raise _Problem("Choose a prediction and a (different) ground-truth layer first.")
        pp = pred_layer.metadata.get(POSTPROCESSOR_KEY)
        if not isinstance(pp, Postprocessor):
            raise _Problem(
                f"'{pred_layer.name}' has no post-processor: auto-tune needs a prediction made "
                "by the Segment widget (metadata 'napari_medinst_postprocessor')."
            )
        state, text = param_state(pred_layer), pred_layer.metadata.get(PARAMS_KEY)
        if state is not None:  # the live parameters the Segment panel's sliders show
            params = state.params
        else:
            params = PostprocessParams.from_json(text) if text else PostprocessParams()
        _, _, gt, _, mask = self._inputs(live=False)
        if pp.prob.shape != gt.shape:
            raise _Problem(
                f"The post-processor's maps are {pp.prob.shape} but the ground truth is "
                f"{gt.shape}: they must have the same shape."
            )
        # a private copy of the stage cache, so the Segment widget's is never touched
        own = Postprocessor(pp.prob, pp.hv, pp.contour, pp.type_prob, pp.pixel_size)
        return pred_layer, own, params, gt.copy(), None if mask is None else mask.copy()

    def start_autotune(self):
        """Start the parameter search in a worker thread; returns the worker."""
        if self._tune_worker is not None:
            show_info("Auto-tune is already running.")
            return None
        pred_layer, pp, params, gt, mask = self._tune_inputs()
        objective = TUNE_OBJECTIVES[self.tune_objective.currentText()]
        worker = create_worker(_autotune, pp, gt, mask, params, objective, _start_thread=False)
        worker.yielded.connect(self._on_tune_progress)
        worker.returned.connect(lambda res: self._on_tune_done(res, pred_layer, objective))
        worker.errored.connect(lambda exc: show_error(f"Auto-tune failed: {exc}"))
        worker.finished.connect(self._on_tune_finished)
        self._tune_worker = worker
        self._tune_fingerprint = _fingerprint(np.asarray(pred_layer.data))
        self._tuned = None
        self.tune_apply.setEnabled(False)
        self.tune_button.setEnabled(False)
        self.tune_cancel.setEnabled(True)
        self.tune_result.setText("Searching…")
        worker.start()
        return worker

    def cancel_autotune(self) -> None:
        if self._tune_worker is not None:
            self._tune_worker.quit()
            self.tune_result.setText("Cancelling…")

    def _on_tune_progress(self, info: tuple[int, int, float, PostprocessParams]) -> None:
        if self._closed:
            return
        done, total, best, _ = info
        self.tune_progress.setRange(0, total)
        self.tune_progress.setValue(done)
        self.tune_result.setText(f"{done}/{total} tried, best so far {best:.4f}")

    def _on_tune_done(self, res, pred_layer, objective: str) -> None:
        if res is None or self._closed:
            return
        best_params, best_result, base, best = res
        self._tuned = (best_params, best_result, base, best)
        self._tuned_target = weakref.ref(pred_layer)
        shown = ", ".join(f"{k}={getattr(best_params, k)}" for k in TUNE_GRID)
        verdict = "" if best > base else " The current parameters are already the best found."
        self.tune_result.setText(
            f"Best {objective.upper()} {best:.4f} (now {base:.4f}, gain {best - base:+.4f}) "
            f"with {shown}.{verdict}"
        )
        self.tune_apply.setEnabled(best > base)

    def _on_tune_finished(self) -> None:
        self._tune_worker = None
        if self._closed:
            return
        self.tune_button.setEnabled(True)
        self.tune_cancel.setEnabled(False)
        if self._tuned is None:
            self.tune_result.setText("Auto-tune cancelled.")

    def apply_tuned(self) -> bool:
        """Write the best labels and parameters found into the prediction layer."""
        if self._tuned is None:
            raise _Problem("Run auto-tune first.")
        layer = self._tuned_target()
        if layer is None or layer not in self._viewer.layers:
            raise _Problem("The tuned prediction layer is gone.")
        params, result, _, _ = self._tuned
        if layer.metadata.get(GT_KEY):
            raise _Problem(f"'{layer.name}' is a ground truth; auto-tune never writes to one.")
        if _fingerprint(np.asarray(layer.data)) != self._tune_fingerprint:
            raise _Problem(
                f"'{layer.name}' changed since auto-tune started; nothing was overwritten. "
                "Run auto-tune again to tune the current labels."
            )
        layer.data = result.labels
        layer.metadata["scores"] = np.asarray(result.scores)
        ids = np.arange(1, result.n_instances + 1)
        layer.features = pd.DataFrame({"index": ids, "label": ids, "score": result.scores})
        publish(layer, params, "autotune")  # the Segment panel's sliders follow
        self.tune_apply.setEnabled(False)
        show_info(f"Applied the tuned parameters to '{layer.name}'.")
        self._schedule()
        return True


class _WeakCall:
    """A callable holding a weak reference to a bound method."""

    def __init__(self, ref: weakref.WeakMethod) -> None:
        self._ref = ref

    @property
    def __self__(self) -> Any:
        method = self._ref()
        return None if method is None else method.__self__

    def __call__(self, *args: Any) -> None:
        method = self._ref()
        if method is not None:
            method(*args)


def _autotune(
    pp: Postprocessor,
    gt: np.ndarray,
    mask: np.ndarray | None,
    start: PostprocessParams,
    objective: str,
    grid: dict[str, tuple[float, ...]] | None = None,
    rounds: int = TUNE_ROUNDS,
) -> Iterator[tuple[int, int, float, PostprocessParams]]:
    """Coordinate search: one parameter at a time over its grid, keeping improvements.

    Yields ``(tried, total, best value, best params)``; returns ``(best params, best
    result, start value, best value)`` (a generator: quitting the worker cancels it).
    """
    grid = TUNE_GRID if grid is None else grid
    ints = {"min_nucleus_size"}

    def score(params: PostprocessParams):
        res = pp.run(params)
        scores = res.scores_by_id if objective == "map" else None
        s = metrics.evaluate(gt, res.labels, scores=scores, ignore_mask=mask)
        return float(getattr(s, objective)), res

    best_params = start
    base, best_result = score(start)
    best = base
    total = rounds * sum(len(v) for v in grid.values())
    tried = 0
    yield (tried, total, best, best_params)
    for _ in range(rounds):
        improved = False
        for name, values in grid.items():
            for v in values:
                tried += 1
                value = int(v) if name in ints else float(v)
                if value == getattr(best_params, name):
                    continue
                cand = replace(best_params, **{name: value})
                got, res = score(cand)
                if got > best + 1e-12:
                    best, best_params, best_result, improved = got, cand, res, True
                yield (tried, total, best, best_params)
        if not improved:
            break
    return best_params, best_result, base, best
