"""The "Fine-tune model" dock widget: export corrected nuclei, preview, fine-tune, compare.

A front end to :mod:`napari_medinst.finetune`; the user guide is ``docs/finetune.md``.

1. **Export**: an image layer and its ground-truth Labels layer (all nuclei, or only
   those marked *verified* in the layer's review status) are appended to a
   training-set folder, never overwriting anything.
2. **Augmentation preview**: copy-paste and stain / intensity jitter applied to the
   chosen image, shown as ``"<image> augmented"`` layers with the HV targets recomputed
   from the augmented labels (``"<image> augmented HV"``, hidden: red = horizontal,
   green = vertical offset, blue = contour). The same settings are used for training.
3. **Fine-tune**: :func:`~napari_medinst.finetune.iter_finetune` runs in a napari
   ``thread_worker`` (a generator that yields step and epoch records) with a progress
   bar, a live plot of the loss and the validation AJI, and Cancel (the last finished
   epoch's checkpoint and the best model so far are kept). Optionally the model's
   confident nuclei on an unlabelled image are added (self-training), excluding the
   nuclei the user edited, verified or deleted in a ground-truth layer. A finished model
   is registered (:mod:`napari_medinst.model.registry`) for the Segment widget.
4. **Compare**: the new model and its parent are scored side by side on an image with
   ground truth.

Problems are reported as napari notifications (the workers return them as values), never
as a traceback dialog.
"""

from __future__ import annotations

import logging
import re
import threading
import weakref
from collections.abc import Generator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import napari
import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSlider,
    FloatSpinBox,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    Select,
    SpinBox,
    Table,
)
from napari.layers import Image, Labels, Layer
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning

from .. import finetune as ft
from .._io import InputError, read_image
from ..model import registry
from ..model.augment import AugmentConfig
from ..model.folder import BUNDLED_MODELS, list_models, load_model
from ..model.inference import CancelledError
from ..preprocess import detect_modality, prepare_image
from ._common import (
    ROLE,
    clear_path,
    input_images,
    model_choices,
    pixel_size_box,
    qt_alive,
    show_pixel_size,
    unwrap,
)
from ._editing import existing_editor
from ._layout import cap_height, scroll_panel
from ._segment_widget import _pixel_size_from_layer

__all__ = ["FinetuneWidget"]

logger = logging.getLogger(__name__)

CHOOSE_FOLDER = "Choose folder…"
NO_LAYER = "(none)"
PREVIEW_ROLE = "augmentation preview"
PLOT_HEIGHT = 220


def _folder_value(edit: FileEdit) -> Path | None:
    """The chosen folder, or None when the field is empty."""
    text = str(edit.value or "").strip()
    return None if text in ("", ".") else Path(text).expanduser()


def _plane(layer: Layer) -> np.ndarray:
    """The 2-D (or 2-D RGB) data of a layer, or InputError.

    A multiscale (slide) layer is refused: its level 0 may not fit in memory; use
    :func:`_image_under` to read the part under a ground-truth layer.
    """
    if getattr(layer, "multiscale", False):
        h, w = np.shape(layer.data[0])[:2]
        raise InputError(f"'{layer.name}' is a {w}x{h} px slide: take a region of its result "
                         "into the ground-truth editor (Evaluate panel) and use that region")  # fmt: skip
    arr = np.asarray(layer.data)
    spatial = arr.ndim - (1 if getattr(layer, "rgb", False) else 0)
    if spatial != 2:
        raise InputError(f"'{layer.name}' has {spatial} dimensions; use a 2-D layer")
    return arr


def _image_under(image: Layer, gt: Layer) -> np.ndarray:
    """The pixels of a multiscale (slide) ``image`` under the ground-truth layer ``gt``.

    Reads only the part of the finest-needed level that ``gt`` covers in the world (a
    region taken from a slide result is placed by its scale and translation) and resamples
    it to ``gt``'s grid when the level's pixel size differs from ``gt``'s.
    """
    lab_shape = np.shape(gt.data)[-2:]
    g_scale = np.asarray(gt.scale[-2:], float)
    g_origin = np.asarray(gt.translate[-2:], float)
    i_scale = np.asarray(image.scale[-2:], float)
    i_origin = np.asarray(image.translate[-2:], float)
    level = 0
    for k in range(len(image.data)):
        if np.all(i_scale * np.asarray(image.downsample_factors[k][-2:]) <= g_scale * 1.01):
            level = k
    px = i_scale * np.asarray(image.downsample_factors[level][-2:], float)
    start = np.round((g_origin - i_origin) / px).astype(int)
    size = np.maximum(np.round(np.asarray(lab_shape) * g_scale / px).astype(int), 1)
    data = image.data[level]
    h, w = np.shape(data)[:2]
    if start.min() < 0 or start[0] + size[0] > h or start[1] + size[1] > w:
        raise InputError(f"'{gt.name}' does not lie inside '{image.name}': choose the slide "
                         "the region was taken from")  # fmt: skip
    if size.prod() > 4 * np.prod(lab_shape) + 1:
        raise InputError(f"'{gt.name}' covers {size.prod() / 1e6:.0f} Mpx of '{image.name}': "
                         "use a region taken from the slide's result")  # fmt: skip
    arr = np.asarray(data[start[0] : start[0] + size[0], start[1] : start[1] + size[1]])
    if tuple(arr.shape[:2]) != tuple(lab_shape):
        from skimage.transform import resize

        out = resize(arr, (*lab_shape, *arr.shape[2:]), order=1, preserve_range=True,
                     anti_aliasing=bool(size[0] > lab_shape[0]))  # fmt: skip
        if arr.dtype.kind in "ui":
            out = np.clip(np.round(out), 0, np.iinfo(arr.dtype).max)
        arr = out.astype(arr.dtype)
    return arr


def review_status(layer: Labels, *, flush: bool = True) -> dict[int, str] | None:
    """Review status per nucleus of a ground-truth layer (None when it has none).

    With ``flush`` the layer's editor first brings the table up to date with pending
    brush strokes; without, the ``features`` table is read as it is (for notes).
    """
    editor = existing_editor(layer) if flush else None
    if editor is not None:
        return editor.status
    features = getattr(layer, "features", None)
    if features is None or "status" not in features:
        return None
    ids = features["label"] if "label" in features else features.get("index")
    if ids is None or len(features) == 0:
        return None
    return {int(i): str(s) for i, s in zip(ids, features["status"], strict=True)}


def reviewed_mask(viewer, layer: Labels) -> np.ndarray:
    """Pixels of the nuclei the user edited, verified or deleted in a ground-truth layer.

    Edited and verified nuclei come from the review status; deleted ones from the
    prediction the layer was started from (``metadata["source"] == "copy of <name>"``):
    its nuclei where the ground truth now has background.
    """
    gt = np.asarray(_plane(layer))
    status = review_status(layer) or {}
    touched = [i for i, s in status.items() if s != "predicted"]
    mask = np.isin(gt, touched) if touched else np.zeros(gt.shape, bool)
    source = str(layer.metadata.get("source", ""))
    if source.startswith("copy of "):
        name = source[len("copy of ") :]
        pred = next((p for p in viewer.layers if p.name == name), None)
        if isinstance(pred, Labels) and np.shape(pred.data) == gt.shape:
            mask |= (np.asarray(pred.data) > 0) & (gt == 0)
    return mask


def _free_folder(path: Path) -> Path:
    """``path``, or ``path-2``, ``path-3``... : the first that does not exist."""
    k, free = 2, path
    while free.exists():
        free, k = path.with_name(f"{path.name}-{k}"), k + 1
    return free


@dataclass
class _Job:
    """Everything a fine-tuning run needs, copied from the widget in the GUI thread."""

    sets: list[str]
    base: str
    out: Path
    kwargs: dict[str, Any]
    pseudo: dict[str, Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)


def _finetune_job(job: _Job, cancel: threading.Event) -> Generator[dict, None, tuple]:
    """Worker: optional pseudo-labels, then fine-tuning; problems are returned, not raised."""
    try:
        sets = list(job.sets)
        run = ft.read_run(job.out) or {}
        resuming = bool(run.get("staged"))
        if job.pseudo is not None and resuming:  # the pseudo-labels of the first start
            sets = list(run.get("request", {}).get("sets", sets))
        elif job.pseudo is not None:
            p = job.pseudo
            yield {"event": "phase", "text": f"Pseudo-labelling '{p['name']}'…"}
            pl = ft.pseudo_labels(
                p["image"],
                job.base,
                pixel_size=p["pixel_size"],
                modality=p["modality"],
                min_score=p["min_score"],
                exclude_mask=p["exclude"],
                device=job.kwargs.get("device", "auto"),
                should_stop=cancel.is_set,
            )
            res = ft.export_pseudo_labels(
                p["folder"],
                p["image"],
                pl,
                name=p["name"],
                pixel_size=p["pixel_size"],
                modality=p["modality"],
                source=f"pseudo-labels of {p['name']} by {job.base}",
            )
            job.info["pseudo"] = (pl.n_kept, pl.n_low_score, pl.n_excluded, str(p["folder"]))
            sets.append(str(p["folder"]))
            yield {
                "event": "phase",
                "text": f"Added {res.n_nuclei} confident nuclei as pseudo-labels.",
            }
        path = yield from ft.iter_finetune(
            sets, job.base, job.out, should_stop=cancel.is_set, **job.kwargs
        )
        return ("done", path)
    except CancelledError:
        return ("cancelled", None)
    except InputError as exc:  # ModelError included
        return ("error", str(exc))
    except (ValueError, OSError) as exc:
        return ("error", str(exc))
    except Exception as exc:  # unexpected: a notification, and the details in the log
        logger.exception("fine-tuning failed")
        return ("error", f"fine-tuning failed: {type(exc).__name__}: {exc}")


def _training_image_name(model: Path, image: np.ndarray) -> str | None:
    """The name of the training image of ``model`` with exactly ``image``'s pixels, if any.

    Looks in the training sets a fine-tuning run recorded (``config["finetune"]["sets"]``,
    folders with ``images/``); unreadable sets or files are skipped.
    """
    try:
        sets = load_model(model).config.get("finetune", {}).get("sets", [])
    except Exception:  # no readable record: nothing to warn about
        return None
    arr = np.asarray(image)
    for spec in sets if isinstance(sets, list) else []:
        folder = Path(str(spec).rsplit("@", 1)[0]) / "images"
        for path in sorted(folder.glob("*")) if folder.is_dir() else []:
            try:
                seen = read_image(path)
            except (InputError, OSError):
                continue
            if seen.shape == arr.shape and np.array_equal(seen, arr):
                return path.name
    return None


def _compare_job(models: dict[str, str], image, gt, px, modality, device, cancel):
    try:
        scores = ft.compare_models(
            models, image, gt, px, modality, device=device, should_stop=cancel.is_set
        )
        return ("done", ft.summarise_scores(scores))
    except CancelledError:
        return ("cancelled", None)
    except (InputError, ValueError) as exc:
        return ("error", str(exc))
    except Exception as exc:
        logger.exception("model comparison failed")
        return ("error", f"comparison failed: {type(exc).__name__}: {exc}")


class FinetuneWidget(Container):
    """Export corrected nuclei, preview augmentation, fine-tune, compare (see module doc)."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        # not magicgui's scrollable=True: napari docks the widget inside its scroll area
        super().__init__(labels=False)
        self._section_specs: list[tuple[str, Container, bool]] = []
        self._viewer = unwrap(viewer)
        self._closed = False
        self._cancel = threading.Event()
        self._compare_cancel = threading.Event()
        self._worker = None
        self._compare_worker = None
        self._seen: str | None = None  # training image the comparison runs on, if any
        self._job: _Job | None = None
        self._history: list[dict[str, Any]] = []
        self._last_model: Path | None = None
        self._set_paths: list[str] = []
        self._watched_gt: weakref.ref | None = None
        self._bundled_specs = ft.bundled_training_data("default")
        self._build_export()
        self._build_preview()
        self._build_finetune()
        self._build_compare()
        self._sections = scroll_panel(self, self._section_specs)  # fits 1366×768 (issue 17)
        self._connect_viewer()
        registry.add_listener(self._on_registry_changed)
        self.native.destroyed.connect(self._on_destroyed)
        self._on_gt_changed()
        self._on_image_changed()

    # ------------------------------------------------------------------ building

    def _section(self, title: str, widgets: list, expanded: bool = True) -> None:
        """A foldable section of the panel (titles head it; see ``_layout.scroll_panel``)."""
        body = Container(widgets=widgets, labels=False, label="")
        self.append(body)  # a magicgui child: reset_choices reaches its combo boxes
        self._section_specs.append((title, body, expanded))

    @staticmethod
    def _note(value: str = "") -> Label:
        label = Label(label="", value=value)
        label.native.setWordWrap(True)  # long notes must not widen the dock
        return label

    @staticmethod
    def _form(widgets: list) -> Container:
        """Labelled controls of one section (titles, notes and buttons span the width)."""
        return Container(widgets=widgets, labels=True, label="")

    def _build_export(self) -> None:
        self._image = ComboBox(label="image", choices=self._image_choices)
        self._image.changed.connect(self._on_image_changed)
        self._gt = ComboBox(label="ground truth", choices=self._labels_choices)
        self._gt.changed.connect(self._on_gt_changed)
        self._gt_note = self._note()
        self._verified_only = CheckBox(
            text="verified nuclei only",
            value=False,
            tooltip="Export only the nuclei marked verified (key W on the ground-truth "
            "layer); the rest of the image is masked and cropped away.",
        )
        self._set_folder = FileEdit(label="training-set folder", mode="d")
        self._sample_name = LineEdit(label="name", value="")
        self._pixel_size = pixel_size_box(
            "Microns per pixel; 0 = unknown (the nucleus size sets the scale)."
        )
        self._export_button = PushButton(text="Export to training set")
        self._export_button.changed.connect(self._on_export)
        self._section(
            "1. Export corrected nuclei",
            [
                self._form([self._image, self._gt]),
                self._gt_note,
                self._verified_only,
                self._form([self._set_folder, self._sample_name, self._pixel_size]),
                self._export_button,
            ],
        )

    def _build_preview(self) -> None:
        d = AugmentConfig()
        self._paste_count = SpinBox(
            label="nuclei pasted",
            min=0,
            max=500,
            value=d.copy_paste_max,
            tooltip="Nuclei copied and pasted per training crop (0: no copy-paste).",
        )
        self._paste_min = FloatSpinBox(
            label="paste scale min", min=0.25, max=4.0, step=0.05, value=d.copy_paste_scale[0]
        )
        self._paste_max = FloatSpinBox(
            label="paste scale max", min=0.25, max=4.0, step=0.05, value=d.copy_paste_scale[1]
        )
        self._overlap = FloatSlider(
            label="max overlap",
            min=0.0,
            max=1.0,
            step=0.01,
            value=d.copy_paste_max_overlap,
            tooltip="Largest share of a pasted nucleus that may cover existing nuclei.",
        )
        self._stain = FloatSpinBox(
            label="stain / intensity jitter",
            min=0.0,
            max=0.6,
            step=0.05,
            value=d.stain_sigma,
            tooltip="H&E: relative jitter of each stain. Fluorescence: relative gain jitter.",
        )
        self._seed = SpinBox(label="seed", min=0, max=1_000_000, value=0)
        self._preview_button = PushButton(text="Preview augmentation")
        self._preview_button.changed.connect(self._on_preview)
        self._preview_note = self._note()
        self._section(
            "2. Augmentation preview",
            [
                self._form(
                    [
                        self._paste_count,
                        self._paste_min,
                        self._paste_max,
                        self._overlap,
                        self._stain,
                        self._seed,
                    ]
                ),
                self._preview_button,
                self._preview_note,
            ],
            expanded=False,
        )

    def _build_finetune(self) -> None:
        self._base = ComboBox(label="base model", choices=self._model_choices)
        self._base.changed.connect(self._on_base_changed)
        self._base_folder = FileEdit(label="base model folder", mode="d", visible=False)
        self._sets = Select(label="training sets", choices=self._set_choices)
        self._sets.native.setMaximumHeight(90)
        self._add_set = FileEdit(label="add training set", mode="d")
        self._add_set.line_edit.native.setReadOnly(True)  # the dialog sets it
        self._add_set.changed.connect(self._on_add_set)
        self._remove_sets = PushButton(text="Remove selected sets")
        self._remove_sets.changed.connect(self._on_remove_sets)
        self._bundled = CheckBox(
            text="also train on the bundled training data",
            value=False,
            enabled=bool(self._bundled_specs),
            tooltip="Mix in the data the bundled model was trained on, so that the model "
            "does not forget other tissues and stains.",
        )
        self._bundled_note = self._note(
            (
                f"Bundled data found: {len(self._bundled_specs)} folder(s)."
                if self._bundled_specs
                else "The bundled training data is not on this computer (set "
                f"{ft.DATA_ENV_VAR} to its folder to use it)."
            ),
        )
        self._epochs = SpinBox(label="epochs", min=1, max=1000, value=10)
        self._steps = SpinBox(label="steps per epoch", min=1, max=100_000, value=50)
        self._lr = FloatSpinBox(label="learning rate", min=1e-6, max=1.0, step=1e-4, value=5e-4)
        self._lr.native.setDecimals(6)
        self._batch = SpinBox(label="batch size", min=1, max=128, value=8)
        self._crop = SpinBox(label="crop size (px)", min=32, max=1024, step=16, value=256)
        self._device = ComboBox(label="device", choices=["auto", "cpu", "cuda"])
        self._model_name = LineEdit(label="new model name", value="")
        self._out = FileEdit(label="output folder", mode="d")
        self._self_train = CheckBox(
            text="add pseudo-labels (self-training)",
            value=False,
            tooltip="Add the base model's confident nuclei on an unlabelled image.",
        )
        self._self_train.changed.connect(self._on_self_train_changed)
        self._pl_image = ComboBox(
            label="unlabelled image", choices=self._image_choices, visible=False
        )
        self._pl_exclude = ComboBox(
            label="exclude nuclei reviewed in",
            choices=self._exclude_choices,
            visible=False,
            tooltip="Nuclei edited, verified or deleted in this ground-truth layer are "
            "left out of the pseudo-labels.",
        )
        self._pl_min_score = FloatSpinBox(
            label="min confidence", min=0.0, max=1.0, step=0.05, value=0.8, visible=False
        )
        self._pl_form = self._form([self._pl_image, self._pl_exclude, self._pl_min_score])
        self._pl_form.visible = False
        self._start = PushButton(text="Start fine-tuning")
        self._start.changed.connect(self._on_start)
        self._cancel_button = PushButton(text="Cancel", enabled=False)
        self._cancel_button.changed.connect(self._on_cancel)
        buttons = Container(
            widgets=[self._start, self._cancel_button], layout="horizontal", labels=False, label=""
        )
        self._progress = ProgressBar(label="progress", min=0, max=1, value=0)
        self._status = self._note()
        self._section(
            "3. Fine-tune: training data",
            [
                self._form([self._base, self._base_folder, self._sets, self._add_set]),
                self._remove_sets,
                self._bundled,
                self._bundled_note,
            ],
        )
        self._section(
            "3. Fine-tune: settings (epochs, output, self-training)",
            [
                self._form(
                    [
                        self._epochs,
                        self._steps,
                        self._lr,
                        self._batch,
                        self._crop,
                        self._device,
                        self._model_name,
                        self._out,
                    ]
                ),
                self._self_train,
                self._pl_form,
            ],
            expanded=False,
        )
        run = [buttons, self._progress, self._status, self._build_plot()]
        self._section("3. Fine-tune: run", run)

    def _build_plot(self) -> Container:
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        self.figure = Figure(figsize=(4, 2.6))
        self.figure.subplots_adjust(left=0.2, right=0.8, bottom=0.18, top=0.95)
        self._ax_loss = self.figure.add_subplot(111)
        self._ax_aji = self._ax_loss.twinx()
        self._ax_loss.set_xlabel("epoch")
        self._ax_loss.set_ylabel("training loss", color="tab:blue")
        self._ax_aji.set_ylabel("validation AJI", color="tab:orange")
        self._ax_aji.set_ylim(0, 1)
        self._ax_loss.set_xlim(0.5, 1.5)
        self._ax_loss.set_ylim(0, 1)
        self._ax_loss.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        (self._loss_line,) = self._ax_loss.plot([], [], "o-", color="tab:blue", ms=3)
        (self._aji_line,) = self._ax_aji.plot([], [], "s-", color="tab:orange", ms=3)
        self._ax_loss.grid(alpha=0.3)
        self.canvas = FigureCanvasQTAgg(self.figure)
        cap_height(self.canvas, PLOT_HEIGHT, PLOT_HEIGHT + 100)
        box = Container(labels=False, label="")
        box.native.layout().addWidget(self.canvas)
        return box

    def _build_compare(self) -> None:
        self._cmp_image = ComboBox(label="image", choices=self._image_choices)
        self._cmp_gt = ComboBox(label="ground truth", choices=self._labels_choices)
        self._compare_button = PushButton(text="Compare with parent", enabled=False)
        self._compare_button.changed.connect(self._on_compare)
        self._table = Table(value={"data": [], "index": [], "columns": []}, label="scores")
        cap_height(self._table, 100, 260)
        self._table.visible = False  # shown with the first comparison
        self._verdict = self._note()
        self._forget_button = PushButton(
            text="Remove fine-tuned model from the list", enabled=False
        )
        self._forget_button.changed.connect(self._on_forget)
        self._section(
            "4. Compare",
            [
                self._form([self._cmp_image, self._cmp_gt]),
                self._compare_button,
                self._verdict,  # above the table: a tall table must not push it out of view
                self._table,
                self._forget_button,
            ],
            expanded=False,
        )

    # ------------------------------------------------------------------ lifecycle

    def _connect_viewer(self) -> None:
        ev = self._viewer.layers.events
        for emitter in (ev.inserted, ev.removed, ev.reordered):
            emitter.connect(self._on_layers_changed)
        for layer in self._viewer.layers:
            layer.events.name.connect(self._on_layers_changed)

    def _on_destroyed(self, *_: Any) -> None:
        self._closed = True
        self._cancel.set()
        self._compare_cancel.set()
        registry.remove_listener(self._on_registry_changed)
        gt = self._watched_gt() if self._watched_gt is not None else None
        if gt is not None:
            gt.events.features.disconnect(self._refresh_gt_note)
        ev = self._viewer.layers.events
        for emitter in (ev.inserted, ev.removed, ev.reordered):
            emitter.disconnect(self._on_layers_changed)

    def _alive(self) -> bool:
        if not self._closed and not qt_alive(self):
            self._closed = True
        return not self._closed

    # ------------------------------------------------------------------ choices

    def _image_choices(self, _w=None) -> list[tuple[str, Image]]:
        return input_images(self._viewer)

    def _labels_choices(self, _w=None) -> list[tuple[str, Labels]]:
        labels = [
            layer
            for layer in self._viewer.layers
            if isinstance(layer, Labels) and layer.metadata.get(ROLE) is None
        ]
        labels.sort(key=lambda layer: not layer.metadata.get("ground_truth", False))
        return [(layer.name, layer) for layer in labels]

    def _exclude_choices(self, _w=None) -> list[tuple[str, Any]]:
        return [(NO_LAYER, None), *self._labels_choices()]

    def _model_choices(self, _w=None) -> list[tuple[str, str]]:
        # list_models() may include the registered models itself: model_choices dedupes
        return model_choices([*list_models(), *registry.registered_models(), CHOOSE_FOLDER])

    def _set_choices(self, _w=None) -> list[str]:
        return list(self._set_paths)

    def _on_layers_changed(self, event=None) -> None:
        if not self._alive():
            return
        if event is not None and getattr(event, "type", None) == "inserted":
            event.value.events.name.connect(self._on_layers_changed)
        for w in (
            self._image,
            self._gt,
            self._pl_image,
            self._pl_exclude,
            self._cmp_image,
            self._cmp_gt,
        ):
            w.reset_choices()

    def _on_registry_changed(self) -> None:
        if self._alive():
            keep = self._base.value
            self._base.reset_choices()
            if keep in self._base.choices:
                self._base.value = keep

    def _on_image_changed(self, *_: Any) -> None:
        layer = self._image.value
        if layer is None:
            return
        show_pixel_size(self._pixel_size, _pixel_size_from_layer(layer))
        self._sample_name.value = layer.name
        if self._cmp_image.value is None:
            self._cmp_image.value = layer

    def _on_gt_changed(self, *_: Any) -> None:
        layer = self._gt.value
        old = self._watched_gt() if self._watched_gt is not None else None
        if old is not None and old is not layer:
            old.events.features.disconnect(self._refresh_gt_note)
        self._watched_gt = None
        if layer is not None:
            layer.events.features.connect(self._refresh_gt_note)
            self._watched_gt = weakref.ref(layer)
        n_verified = self._refresh_gt_note()
        self._verified_only.value = n_verified > 0

    def _refresh_gt_note(self, *_: Any) -> int:
        """Describe the ground truth's review status; returns the number verified."""
        layer = self._gt.value
        if layer is None:
            self._gt_note.value = "Open or create a ground-truth Labels layer to export it."
            return 0
        status = review_status(layer, flush=False)
        if not status:
            self._gt_note.value = "No review status on this layer: all its nuclei are exported."
            return 0
        n_ver = sum(s == "verified" for s in status.values())
        self._gt_note.value = f"{n_ver} of {len(status)} nuclei verified."
        return n_ver

    def _on_base_changed(self, value: str) -> None:
        self._base_folder.visible = value == CHOOSE_FOLDER

    def _on_self_train_changed(self, on: bool) -> None:
        self._pl_form.visible = bool(on)
        for w in (self._pl_image, self._pl_exclude, self._pl_min_score):
            w.visible = bool(on)

    def _on_add_set(self, *_: Any) -> None:
        folder = _folder_value(self._add_set)
        if folder is not None:
            self.add_training_set(folder)

    def add_training_set(self, folder: str | Path) -> None:
        """Add a training-set folder to the list (no duplicates)."""
        text = str(Path(folder).expanduser().resolve())
        if text not in self._set_paths:
            self._set_paths.append(text)
            self._sets.reset_choices()

    def _on_remove_sets(self, *_: Any) -> None:
        chosen = set(self._sets.value or ())
        self._set_paths = [p for p in self._set_paths if p not in chosen]
        self._sets.reset_choices()

    # ------------------------------------------------------------------ export

    def _modality(self, layer: Image, data: np.ndarray) -> str:
        mod = layer.metadata.get("modality")
        return mod if mod in ("he", "fluorescence") else detect_modality(data)

    def _image_and_gt(self, image_w: ComboBox, gt_w: ComboBox, what: str):
        image, gt = image_w.value, gt_w.value
        if image is None or gt is None:
            raise InputError(f"choose an image layer and its ground-truth layer to {what}")
        lab = np.asarray(_plane(gt))
        img = _image_under(image, gt) if getattr(image, "multiscale", False) else _plane(image)
        if img.shape[:2] != lab.shape:
            raise InputError(
                f"'{image.name}' is {img.shape[0]}x{img.shape[1]} px but '{gt.name}' is "
                f"{lab.shape[0]}x{lab.shape[1]} px: choose the ground truth of this image"
            )
        return image, gt, img, lab

    def export(self):
        """Append the chosen ground truth to the training-set folder; returns the result."""
        image, gt, img, lab = self._image_and_gt(self._image, self._gt, "export")
        folder = _folder_value(self._set_folder)
        if folder is None:
            raise InputError("choose a training-set folder to export to")
        px = float(self._pixel_size.value or 0.0)
        if px <= 0 and getattr(image, "multiscale", False) and image.metadata.get("pixel_size_um"):
            px = float(gt.scale[-1])  # the slide's scale is in µm: so is the region's
        name = self._sample_name.value.strip() or image.name
        res = ft.export_ground_truth(
            folder,
            img,
            lab,
            name=name,
            status=review_status(gt),
            verified_only=bool(self._verified_only.value),
            pixel_size=px if px > 0 else None,
            modality=self._modality(image, img),
            source=str(image.metadata.get("source", image.name)),
        )
        self.add_training_set(folder)
        what = "verified nuclei" if self._verified_only.value else "nuclei"
        show_info(
            f"Exported {res.n_nuclei} {what} of '{image.name}' as '{res.sample_id}' to {folder}."
        )
        return res

    def _on_export(self, *_: Any) -> None:
        self._guard(self.export, "Export failed")

    def _guard(self, action, what: str):
        try:
            return action()
        except (InputError, ValueError) as exc:
            show_error(f"{what}: {exc}")
        except OSError as exc:
            show_error(f"{what}: {exc.strerror or exc}")
        return None

    # ------------------------------------------------------------------ preview

    def augment_config(self) -> AugmentConfig:
        """The augmentation settings of the widget (also used for fine-tuning)."""
        lo, hi = sorted((float(self._paste_min.value), float(self._paste_max.value)))
        j = float(self._stain.value)
        gain = (max(0.05, 1 - 1.6 * j), 1 + 1.6 * j)
        return AugmentConfig(
            copy_paste_prob=0.5 if self._paste_count.value > 0 else 0.0,
            copy_paste_max=int(self._paste_count.value),
            copy_paste_scale=(lo, hi),
            copy_paste_max_overlap=float(self._overlap.value),
            stain_sigma=j,
            intensity_gain=gain,
        )

    def preview(self) -> list[Layer]:
        """Add (or update) the augmentation preview layers; returns them."""
        image, _, img, lab = self._image_and_gt(self._image, self._gt, "preview augmentation")
        modality = self._modality(image, img)
        aug, aug_labels, targets = ft.augmentation_preview(
            img, lab, modality, self.augment_config(), seed=int(self._seed.value)
        )
        hv = targets.hv
        hv_rgb = np.stack(
            [(hv[0] + 1) / 2, (hv[1] + 1) / 2, targets.contour.astype(np.float32)], -1
        )
        geo = {"scale": image.scale[-2:], "translate": image.translate[-2:]}
        specs = [
            ("image", Image, aug, {"rgb": aug.ndim == 3, "visible": True}),
            ("labels", Labels, aug_labels, {"opacity": 0.4}),
            ("HV", Image, hv_rgb.astype(np.float32), {"rgb": True, "visible": False}),
        ]
        layers = []
        for kind, cls, data, kw in specs:
            name = f"{image.name} augmented" + ("" if kind == "image" else f" {kind}")
            meta = {ROLE: PREVIEW_ROLE, "preview": kind, "preview_of": image.name}
            old = next(
                (
                    x
                    for x in self._viewer.layers
                    if isinstance(x, cls)
                    and x.metadata.get(ROLE) == PREVIEW_ROLE
                    and x.metadata.get("preview") == kind
                    and x.metadata.get("preview_of") == image.name
                ),
                None,
            )
            if old is not None:
                old.data = data
                layers.append(old)
                continue
            if cls is Image:
                if not kw["rgb"]:
                    kw = {**kw, "contrast_limits": (0.0, 1.0), "colormap": "gray"}
                layer = self._viewer.add_image(data, name=name, metadata=meta, **geo, **kw)
            else:
                layer = self._viewer.add_labels(data, name=name, metadata=meta, **geo, **kw)
            layers.append(layer)
        n_new = int(aug_labels.max()) - int(len(np.unique(lab)) - (lab == 0).any())
        self._preview_note.value = (
            f"{max(n_new, 0)} nuclei pasted into the whole image (training pastes up to "
            f"{self._paste_count.value} per crop). The targets are in the hidden layer "
            f"'{layers[2].name}' (red: horizontal, green: vertical, blue: contour)."
        )
        return layers

    def _on_preview(self, *_: Any) -> None:
        self._guard(self.preview, "Preview failed")

    # ------------------------------------------------------------------ fine-tune

    def _base_spec(self) -> str:
        value = self._base.value
        if value == CHOOSE_FOLDER:
            folder = _folder_value(self._base_folder)
            if folder is None:
                raise InputError("choose the base model's folder (base model ▸ Choose folder…)")
            return str(folder)
        return str(value)

    def _default_out(self, name: str) -> Path:
        root = registry.user_models_dir()
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "finetuned"
        stem = f"{stem}-{datetime.now():%Y%m%d-%H%M}"
        path, k = root / stem, 2
        while path.exists():
            path, k = root / f"{stem}-{k}", k + 1
        return path

    def _pseudo_request(self, out: Path) -> dict[str, Any] | None:
        if not self._self_train.value:
            return None
        layer = self._pl_image.value
        if layer is None:
            raise InputError("choose the unlabelled image for self-training")
        img = prepare_image(_plane(layer), name=f"'{layer.name}'")
        exclude = None
        ex_layer = self._pl_exclude.value
        if ex_layer is not None:
            exclude = reviewed_mask(self._viewer, ex_layer)
            if exclude.shape != img.shape[:2]:
                raise InputError(
                    f"'{ex_layer.name}' ({exclude.shape[0]}x{exclude.shape[1]} px) does not "
                    f"match '{layer.name}' ({img.shape[0]}x{img.shape[1]} px)"
                )
        px = _pixel_size_from_layer(layer)
        return {
            "image": np.array(img, copy=True),
            "name": layer.name,
            "pixel_size": px,
            "modality": self._modality(layer, img),
            "min_score": float(self._pl_min_score.value),
            "exclude": exclude,
            "folder": _free_folder(out.with_name(f"{out.name}-pseudo-labels")),
        }

    def start(self):
        """Start fine-tuning in a worker thread; returns the worker (None if refused)."""
        if self._worker is not None:
            show_info("Fine-tuning is already running; wait or press Cancel.")
            return None
        base = self._base_spec()
        parent = load_model(base)  # ModelError now rather than in the worker
        sets = list(self._set_paths)
        if not sets and not self._self_train.value:
            raise InputError("add at least one training-set folder (export ground truth first)")
        parent_name = str(parent.config.get("name") or parent.name)
        name = self._model_name.value.strip() or f"{parent_name} fine-tuned"
        out = _folder_value(self._out)
        if out is None:
            out = self._default_out(name)
            self._out.value = out
        pseudo = self._pseudo_request(out)
        bundled = list(self._bundled_specs) if self._bundled.value else []
        kwargs = {
            "epochs": int(self._epochs.value),
            "steps_per_epoch": int(self._steps.value),
            "lr": float(self._lr.value),
            "batch_size": int(self._batch.value),
            "crop": int(self._crop.value),
            "augment": self.augment_config(),
            "include_bundled_data": bundled,
            "name": name,
            "device": self._device.value,
        }
        job = _Job(sets=sets, base=base, out=out, kwargs=kwargs, pseudo=pseudo)
        self._job = job
        self._cancel.clear()
        self._history = []
        self._redraw()
        self._progress.max = max(1, kwargs["epochs"] * kwargs["steps_per_epoch"])
        self._progress.value = 0
        self._status.value = "Starting…"
        worker = create_worker(_finetune_job, job, self._cancel, _start_thread=False)
        worker.yielded.connect(self._on_event)
        worker.returned.connect(lambda outcome: self._on_done(job, outcome))
        worker.errored.connect(lambda exc: self._on_done(job, ("error", str(exc))))
        worker.finished.connect(self._on_finished)
        worker.aborted.connect(self._cancel.set)  # quit from napari's activity dock
        self._worker = worker
        self._start.enabled = False
        self._cancel_button.enabled = True
        worker.start()
        return worker

    def _on_start(self, *_: Any) -> None:
        self._guard(self.start, "Cannot start fine-tuning")

    def cancel(self) -> None:
        """Ask the running fine-tuning (or comparison) to stop after the current step."""
        if self._worker is None and self._compare_worker is None:
            return
        if self._worker is not None:
            self._cancel.set()
            self._status.value = "Cancelling after the current step…"
        if self._compare_worker is not None:
            self._compare_cancel.set()

    def _on_cancel(self, *_: Any) -> None:
        self.cancel()

    def _on_event(self, event: dict[str, Any]) -> None:
        if not self._alive():
            return
        kind = event.get("event")
        if kind == "step":
            self._progress.max = max(1, int(event["total"]))
            self._progress.value = int(event["done"])
        elif kind == "phase":
            self._status.value = str(event["text"])
        elif kind == "warning":
            show_warning(f"Fine-tuning: {event['text']}.")
        elif kind == "history":
            self._history = list(event["records"])
            self._redraw()
        elif kind == "epoch":
            self._history.append(event)
            self._status.value = (
                f"Epoch {event['epoch']}: loss {event['loss']:.4f}, validation AJI "
                f"{event['val_aji']:.4f} (best {event['best_aji']:.4f})"
            )
            self._redraw()

    def _redraw(self) -> None:
        epochs = [h["epoch"] for h in self._history]
        self._loss_line.set_data(epochs, [h["loss"] for h in self._history])
        self._aji_line.set_data(epochs, [h["val_aji"] for h in self._history])
        if epochs:
            top = max(h["loss"] for h in self._history)
            self._ax_loss.set_ylim(0, top * 1.1 if np.isfinite(top) and top > 0 else 1)
            self._ax_loss.set_xlim(0.5, max(epochs) + 0.5)
        self.canvas.draw_idle()

    def _on_done(self, job: _Job, outcome: tuple) -> None:
        if self._closed:
            return
        kind, value = outcome
        model_dir = job.out / "model"
        epochs = len(self._history)
        if kind == "done":
            self._last_model = Path(value)
            self._progress.value = self._progress.max
            try:
                registry.register_model(value)
                listed = " and added to the model list of the Segment widget"
            except OSError as exc:
                listed = ""
                show_warning(f"Could not add the model to the model list: {exc}")
            best = max((h["val_aji"] for h in self._history), default=float("nan"))
            self._status.value = (
                f"Done: the best model (validation AJI {best:.4f}) is in {value}{listed}."
            )
            if job.info.get("pseudo"):
                kept, low, excl, _ = job.info["pseudo"]
                self._status.value += (
                    f" Pseudo-labels: {kept} nuclei kept, {low} below the confidence, "
                    f"{excl} excluded."
                )
            show_info(f"Fine-tuned model saved in {value}{listed}.")
            self._forget_button.enabled = True
            clear_path(self._out)  # the next Start trains a new model in a new folder
        elif kind == "cancelled":
            if (model_dir / "config.json").exists():
                msg = (
                    f"Fine-tuning cancelled after epoch {epochs}: the best model so far is kept "
                    f"in {model_dir} and the last checkpoint in {job.out / 'checkpoint.pt'}. "
                    "Start again with the same settings and output folder to resume."
                )
                self._last_model = model_dir
            else:
                msg = "Fine-tuning cancelled before the first epoch finished: nothing was saved."
            self._status.value = msg
            show_info(msg)
        else:
            self._status.value = f"Fine-tuning failed: {value}"
            show_error(f"Fine-tuning failed: {value}")
        self._compare_button.enabled = self._last_model is not None

    def _on_finished(self) -> None:
        self._worker = None
        if self._alive():
            self._start.enabled = True
            self._cancel_button.enabled = self._compare_worker is not None

    # ------------------------------------------------------------------ compare

    def _model_to_compare(self) -> Path:
        model = self._last_model
        if model is None:
            out = _folder_value(self._out)
            if out is not None and (out / "model" / "config.json").exists():
                model = out / "model"
        if model is None:
            raise InputError("fine-tune a model first (or choose the output folder of a run)")
        return model

    def compare(self):
        """Score the fine-tuned model and its parent on the chosen image; returns the worker."""
        if self._compare_worker is not None:
            show_info("A comparison is already running.")
            return None
        model = self._model_to_compare()
        config = load_model(model).config
        parent = config.get("parent")
        if not parent:
            raise InputError(f"{model}: the model does not record its parent model")
        image, _, img, lab = self._image_and_gt(self._cmp_image, self._cmp_gt, "compare")
        parent_name = Path(parent).name
        if Path(parent).parent.resolve() == BUNDLED_MODELS.resolve():
            parent = parent_name
        models = {
            f"parent ({parent_name})": parent,
            f"fine-tuned ({config.get('name', model.name)})": str(model),
        }
        px = _pixel_size_from_layer(image)
        self._seen = _training_image_name(model, img)
        self._compare_cancel.clear()
        self._verdict.value = "Segmenting with both models…"
        worker = create_worker(
            _compare_job,
            models,
            np.array(img, copy=True),
            np.array(lab, copy=True),
            px,
            self._modality(image, img),
            self._device.value,
            self._compare_cancel,
            _start_thread=False,
        )
        worker.returned.connect(self._on_compared)
        worker.errored.connect(lambda exc: self._on_compared(("error", str(exc))))
        worker.finished.connect(self._on_compare_finished)
        self._compare_worker = worker
        self._compare_button.enabled = False
        self._cancel_button.enabled = True
        worker.start()
        return worker

    def _on_compare(self, *_: Any) -> None:
        self._guard(self.compare, "Cannot compare")

    def _on_compared(self, outcome: tuple) -> None:
        if self._closed:
            return
        kind, value = outcome
        if kind == "cancelled":
            self._verdict.value = "Comparison cancelled."
            return
        if kind == "error":
            self._verdict.value = ""
            show_error(f"Comparison failed: {value}")
            return
        names = list(value)
        rows = list(next(iter(value.values())))
        self._table.visible = True
        self._table.value = {
            "data": [[round(value[n][r], 4) for n in names] for r in rows],
            "index": rows,
            "columns": names,
        }
        parent, child = names
        gain = value[child]["AJI"] - value[parent]["AJI"]
        if gain > 0.005:
            text = f"The fine-tuned model is better here (AJI {gain:+.4f}): keep it."
        elif gain < -0.005:
            text = (
                f"The parent model is better here (AJI {gain:+.4f}): keep the parent, and "
                "remove the fine-tuned model from the list."
            )
        else:
            text = f"Both models score alike here (AJI {gain:+.4f})."
        if self._seen is not None:  # scores on its own training image say little
            text = (
                f"⚠ The fine-tuned model was trained on this image ('{self._seen}'): the "
                f"comparison overstates it (AJI {gain:+.4f}). Compare on an annotated image "
                "it has not seen before deciding."
            )
            show_warning(text)
        self._verdict.value = text

    def _on_compare_finished(self) -> None:
        self._compare_worker = None
        if self._alive():
            self._compare_button.enabled = self._last_model is not None
            self._cancel_button.enabled = self._worker is not None

    def _on_forget(self, *_: Any) -> None:
        if self._last_model is None:
            return
        if registry.unregister_model(self._last_model):
            show_info(
                f"Removed {self._last_model} from the model list (its files are kept; "
                "use Choose folder… to load it again)."
            )
        self._forget_button.enabled = False
