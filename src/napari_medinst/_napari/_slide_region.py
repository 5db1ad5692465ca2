"""The Evaluate panel's slide-result actions: correct a region of a whole-slide result.

Shown in the panel's "Ground truth" tab while a ``segment-slide`` result is open (a labels
layer whose metadata hold ``slide_result``, as :mod:`._slide_reader` marks it):

* **Edit region from slide result** reads the part of the result shown in the canvas
  (at most :data:`MAX_VIEW_PIXELS` px of its level 0: zoom in on larger views) with
  :func:`~napari_medinst.slide_edit.read_region`, grown so that its nuclei are whole, and
  adds it as a ground-truth layer placed on the slide (the result's scale, translated to
  the region) with its nuclei's review status, ready for the panel's editor.
* **Write back to slide result** saves the chosen region layer (or the last one taken)
  with :func:`~napari_medinst.slide_edit.write_region`: new nuclei get ids unique over the
  slide (the layer shows them), statuses go to the store's ``review.csv``, and the result
  layers of the store are read again. One message says what was written, or why not.

User-facing documentation: ``docs/slides.md``.
"""

from __future__ import annotations

import dataclasses
import secrets
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from napari.layers import Labels
from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import QLabel, QPushButton, QVBoxLayout, QWidget

from .. import slide_edit
from .._io import InputError
from ..recovery import labels_sha256
from ..slide_engine import labels_path
from ._common import canvas_box
from ._editing import GT_KEY, editor_for

__all__ = ["MAX_VIEW_PIXELS", "REGION_KEY", "SlideRegionActions", "take_region", "write_back"]

#: The largest view taken into the editor (px of the result's level 0).
MAX_VIEW_PIXELS = 4_000_000
#: Metadata of a region layer: ``{"store": path, "box": [r0, r1, c0, c1]}``.
REGION_KEY = "slide_region"

#: The region each region layer was read as (the ``original`` of its write-back).
_REGIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def slide_results(viewer) -> list[Labels]:
    """Labels layers of ``segment-slide`` results, the selected one last."""
    found = [x for x in viewer.layers if isinstance(x, Labels) and x.metadata.get("slide_result")]
    active = viewer.layers.selection.active
    return sorted(found, key=lambda x: x is active)


def region_layers(viewer) -> list[Labels]:
    """Region layers taken from a slide result in this session."""
    return [x for x in viewer.layers if isinstance(x, Labels) and x in _REGIONS]


def view_box(viewer, layer: Labels) -> tuple[int, int, int, int]:
    """Rows and columns of ``layer``'s level 0 shown in the canvas (clipped)."""
    h, w = (int(v) for v in layer.data[0].shape[-2:])
    return canvas_box(viewer, layer, (h, w))


def take_region(viewer, result: Labels) -> Labels:
    """Add the region of ``result`` shown in the canvas as an editable ground-truth layer.

    Raises
    ------
    InputError
        The view is larger than :data:`MAX_VIEW_PIXELS` or shows none of the result,
        or :func:`~napari_medinst.slide_edit.read_region` refuses the store.
    """
    store = Path(result.metadata["slide_result"])
    box = view_box(viewer, result)
    n = (box[1] - box[0]) * (box[3] - box[2])
    if n == 0:
        raise InputError(f"'{result.name}': the view shows none of the slide result")
    if n > MAX_VIEW_PIXELS:
        raise InputError(f"The view shows {n / 1e6:.1f} Mpx of '{result.name}'; zoom in to at "
                         f"most {MAX_VIEW_PIXELS / 1e6:.0f} Mpx to edit it")  # fmt: skip
    region = slide_edit.read_region(store, box)
    scale = np.asarray(result.scale[-2:], float)
    b = region.box
    meta = {GT_KEY: True, "source": f"region of {store.name}",
            REGION_KEY: {"store": str(store), "box": list(b)}}  # fmt: skip
    layer = viewer.add_labels(
        region.labels.copy(),
        name=f"{store.stem} [y {b[0]}:{b[1]} x {b[2]}:{b[3]}] ground truth",
        scale=tuple(scale),
        translate=tuple(np.asarray(result.translate[-2:], float) + np.array([b[0], b[2]]) * scale),
        opacity=0.6,
        metadata=meta,
    )
    _REGIONS[layer] = region
    _start_editing(viewer, layer, region.status)
    return layer


def _start_editing(viewer, layer: Labels, status: dict[int, str]) -> None:
    """The layer's editor (maybe made when the layer was added) with these statuses."""
    editor = editor_for(viewer, layer)
    editor.load_status(status)
    editor.dirty = False
    editor.rebase()


def write_back(viewer, layer: Labels) -> slide_edit.WriteResult:
    """Write a region layer into its slide result; the layer then shows the store's ids."""
    region = _REGIONS.get(layer)
    if region is None:
        raise InputError(f"'{layer.name}' was not taken from a slide result in this session")
    editor = editor_for(viewer, layer)
    result = slide_edit.write_region(region.store, region.box, region.labels,
                                     np.asarray(layer.data), editor.status)  # fmt: skip
    if result.new_ids:  # the new nuclei's ids in the store
        layer.data = result.labels.copy()
    _REGIONS[layer] = dataclasses.replace(region, labels=result.labels.copy(),
                                          status=dict(result.status),
                                          sha256=labels_sha256(result.labels))  # fmt: skip
    _start_editing(viewer, layer, result.status)
    for shown in slide_results(viewer):
        if Path(shown.metadata["slide_result"]) == region.store:
            _reload(shown, region.store)
    return result


def _reload(layer: Labels, store: Path) -> None:
    """Read the store's labels again (new dask names: no cached chunk survives)."""
    from ..slide import _dask_array

    da, _ = _dask_array()  # an optional dependency: a clear message when missing
    tag = secrets.token_hex(4)
    paths = [labels_path(store) / str(i) for i in range(len(layer.data))]
    layer.data = [da.from_zarr(str(p), name=f"slide-result-{p.name}-{tag}") for p in paths]


class SlideRegionActions(QWidget):
    """The two buttons and a line of status, shown while a slide result is open.

    Parameters
    ----------
    viewer : napari.Viewer
    chosen : callable
        The panel's chosen ground-truth layer (or None).
    adopt : callable
        ``adopt(layer)``: make a new region layer the panel's ground truth.
    saved : callable
        ``saved(layer)``: the layer's edits are written (its autosave can go).
    """

    def __init__(self, viewer, chosen: Callable[[], Any], adopt: Callable[[Labels], None],
                 saved: Callable[[Labels], None],
                 parent: QWidget | None = None) -> None:  # fmt: skip
        super().__init__(parent)
        self._viewer_ref = weakref.ref(viewer)
        self._chosen, self._adopt, self._saved = chosen, adopt, saved
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        self.take_button = QPushButton("Edit region from slide result")
        self.take_button.setToolTip(
            "Take the part of the slide result shown in the canvas (zoom in to at most "
            f"{MAX_VIEW_PIXELS // 1_000_000} Mpx) into the ground-truth editor."
        )
        self.write_button = QPushButton("Write back to slide result")
        self.write_button.setToolTip(
            "Save the region's corrections and review status into the slide result."
        )
        self.message = QLabel("")
        self.message.setWordWrap(True)
        for w in (self.take_button, self.write_button, self.message):
            lay.addWidget(w)
        self.take_button.clicked.connect(lambda _=False: self.edit_region())
        self.write_button.clicked.connect(lambda _=False: self.write_region())
        for emitter in (viewer.layers.events.inserted, viewer.layers.events.removed):
            emitter.connect(self._on_layers_changed)
        self.destroyed.connect(lambda *_: self._disconnect(viewer))
        self.update_visibility()

    def _disconnect(self, viewer) -> None:
        for emitter in (viewer.layers.events.inserted, viewer.layers.events.removed):
            emitter.disconnect(self._on_layers_changed)

    def _on_layers_changed(self, event=None) -> None:
        try:
            self.update_visibility()
        except RuntimeError:  # the panel is gone
            viewer = self.viewer
            if viewer is not None:
                self._disconnect(viewer)

    @property
    def viewer(self):
        return self._viewer_ref()

    def update_visibility(self) -> None:
        """Shown while a slide result (or a region of one) is in the viewer."""
        viewer = self.viewer
        if self.parent() is None:  # a widget without a parent would show as a window
            return
        results = bool(viewer is not None and slide_results(viewer))
        regions = bool(viewer is not None and region_layers(viewer))
        self.setVisible(results or regions)
        self.take_button.setEnabled(results)
        self.write_button.setEnabled(regions)

    def _say(self, text: str, ok: bool) -> None:
        self.message.setText(text)
        (show_info if ok else show_error)(text)

    def edit_region(self) -> Labels | None:
        """Take the visible region of the (selected) slide result into the editor."""
        viewer = self.viewer
        results = slide_results(viewer) if viewer is not None else []
        if not results:
            self._say("Open a slide result (a segment-slide .zarr) first.", False)
            return None
        try:
            layer = take_region(viewer, results[-1])
        except (InputError, ValueError, OSError) as exc:
            self._say(f"Not taken: {exc}", False)
            return None
        self._adopt(layer)
        self.update_visibility()
        n = len(_REGIONS[layer].status)
        locked = len(_REGIONS[layer].locked)
        extra = f"; {locked} at its edge must stay as they are" if locked else ""
        self._say(f"'{layer.name}': {n} nuclei to edit{extra}.", True)
        return layer

    def _target(self) -> Labels | None:
        chosen = self._chosen()
        if chosen is not None and chosen in _REGIONS:
            return chosen
        layers = region_layers(self.viewer) if self.viewer is not None else []
        return layers[-1] if layers else None

    def write_region(self) -> slide_edit.WriteResult | None:
        """Write the chosen region layer (or the last one taken) back into its store."""
        layer = self._target()
        if layer is None:
            self._say("Take a region with 'Edit region from slide result' first.", False)
            return None
        try:
            res = write_back(self.viewer, layer)
        except (InputError, ValueError, OSError) as exc:
            self._say(f"Not written (your edits are still in '{layer.name}'): {exc}", False)
            return None
        self._saved(layer)
        store = _REGIONS[layer].store
        self._say(f"Written to {store.name}: {res.added} new, {res.changed} changed, "
                  f"{res.deleted} deleted nuclei; review status saved.", True)  # fmt: skip
        return res
