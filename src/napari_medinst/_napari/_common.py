"""Small pieces the dock widgets share."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from magicgui.widgets import FloatSpinBox
from napari.layers import Image
from qtpy.QtCore import QEvent, QObject

from ..preprocess import PIXEL_SIZE_RANGE

#: Metadata key marking layers our widgets wrote (outputs, previews); such image layers
#: are never offered as input.
ROLE = "napari_medinst_role"


def unwrap(obj: Any) -> Any:
    """The real object behind napari's PublicOnlyProxy (plugins may be handed one)."""
    return getattr(obj, "__wrapped__", obj)


def qt_alive(widget) -> bool:
    """False once the Qt object behind a magicgui widget has been deleted."""
    try:
        widget.native.objectName()
    except RuntimeError:  # the C++ object is gone
        return False
    return True


class _Undocked(QObject):
    """Calls ``callback`` when the watched widget loses its parent (its dock was removed)."""

    def __init__(self, widget, callback) -> None:
        super().__init__(widget)
        self._callback = callback
        widget.installEventFilter(self)

    def eventFilter(self, obj, event) -> bool:
        # An exception escaping a Qt virtual (this one) aborts the whole process under
        # PyQt, unsaved work included: it is logged instead.
        try:
            if event.type() == QEvent.Type.ParentChange and obj.parent() is None:
                self._callback()
        except Exception:
            logging.getLogger(__name__).exception("stopping the panel's work failed")
        return False


def on_undocked(widget, callback) -> QObject:
    """Run ``callback`` when napari removes ``widget``'s dock (the widget is kept alive).

    ``remove_dock_widget`` only takes the panel out of its dock, so Qt's ``destroyed``
    never fires; work the panel started (a whole-slide run) must still stop.
    """
    return _Undocked(unwrap(widget).native, callback)


def input_images(viewer) -> list[tuple[str, Image]]:
    """(name, layer) of the viewer's image layers that are not our own outputs."""
    return [
        (layer.name, layer)
        for layer in viewer.layers
        if isinstance(layer, Image) and layer.metadata.get(ROLE) is None
    ]


def pixel_size_box(tooltip: str) -> FloatSpinBox:
    """The µm/px field both panels show (0 = unknown / estimate).

    Its maximum is the core's plausible range (:data:`~napari_medinst.preprocess.
    PIXEL_SIZE_RANGE`), so the panel cannot hold a value the model would refuse.
    """
    box = FloatSpinBox(
        label="pixel size (µm/px)",
        min=0.0,
        max=PIXEL_SIZE_RANGE[1],
        step=0.01,
        value=0.0,
        tooltip=tooltip,
    )
    box.native.setDecimals(4)
    return box


def show_pixel_size(box: FloatSpinBox, px: float | None) -> None:
    """Show a layer's pixel size in ``box``; 0 (estimate) when unknown or implausible.

    A layer's scale is not always µm per pixel (a scale of 1 is napari's default, and
    other plugins use other units): a value outside the plausible range is not shown
    as if it were one, and setting it would raise in the spin box.
    """
    lo, hi = PIXEL_SIZE_RANGE
    ok = px is not None and math.isfinite(px) and lo <= px <= hi
    box.value = round(px, 4) if ok else 0.0


def clear_path(edit) -> None:
    """Empty a magicgui ``FileEdit`` without it emitting a change.

    Setting ``edit.value = ""`` does not empty it: magicgui turns "" into the absolute
    current folder, which a later run would then take as the folder the user chose.
    """
    with edit.changed.blocked():
        edit.line_edit.value = ""


def model_choices(values: Iterable[str]) -> list[tuple[str, str]]:
    """(shown name, value) of each model choice: a model folder is shown by its name.

    Registered (fine-tuned) models are listed as absolute paths; the list shows the
    folder's name instead, with its parent folder's name when two share a name. The
    values stay the paths the core takes.
    """
    values = list(dict.fromkeys(values))
    names = [Path(v).name if Path(v).is_absolute() else v for v in values]
    shown = []
    for value, name in zip(values, names, strict=True):
        if name != value and names.count(name) > 1:
            name = f"{name} ({Path(value).parent.name})"
        shown.append((name, value))
    return shown


def _camera(viewer):
    """The viewer's camera (``viewer.scene.camera`` since napari 0.9)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None else viewer.camera


def _canvas_size(viewer) -> tuple[float, float]:
    """(height, width) of the canvas in screen pixels."""
    canvas = getattr(viewer, "canvas", None)
    size = getattr(canvas, "size", None)
    return tuple(size) if size is not None else tuple(viewer._canvas_size)  # napari < 0.9


def canvas_box(viewer, layer, shape: tuple[int, int], downsample: float = 1.0):
    """Rows and columns of an array of ``shape`` shown in the canvas, clipped to it.

    The array is ``layer``'s data (``downsample`` 1) or a pyramid level of it, drawn
    ``downsample`` times coarser.
    """
    import numpy as np

    h, w = shape
    cam = _camera(viewer)
    centre = np.asarray(cam.center[-2:], float)
    half = np.asarray(_canvas_size(viewer), float) / 2.0 / max(cam.zoom, 1e-9)
    point = np.asarray(viewer.dims.point, float)
    corners = []
    for corner in (centre - half, centre + half):
        point[-2:] = corner
        corners.append(np.asarray(layer.world_to_data(point)[-2:], float))
    lo, hi = np.minimum(*corners) / downsample, np.maximum(*corners) / downsample
    r0, r1 = int(np.clip(math.floor(lo[0]), 0, h)), int(np.clip(math.ceil(hi[0]), 0, h))
    c0, c1 = int(np.clip(math.floor(lo[1]), 0, w)), int(np.clip(math.ceil(hi[1]), 0, w))
    return r0, r1, c0, c1
