"""The review queue panel: nuclei most likely wrong first, click to zoom, coverage.

A small panel the Segment panel embeds. **Build review queue** ranks the nuclei of the
current 2-D result with :func:`napari_medinst.review.review_scores` (from the maps the
run already computed; nothing is re-run). Clicking a row (or the keys Page Down next and
Page Up previous, on the canvas) centres the viewer on that nucleus, zooms to it and
selects its id in the instances layer. Every view the reviewer looks at closely
enough (at least one screen pixel per image pixel) is recorded in a
:class:`~napari_medinst.review.Coverage`, drawn as a "reviewed" overlay layer, and
summed up as "reviewed: NN % of nuclei".
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from magicgui.widgets import Container, Label, PushButton
from napari.layers import Image, Labels
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QListWidget

from ..review import Coverage, ReviewQueue, review_scores
from ._common import ROLE, _camera, _canvas_size, qt_alive
from ._layout import cap_height

__all__ = ["KEYS", "ReviewPanel", "ReviewSource", "session_source"]

#: Keys on the canvas: (key, step) -- next and previous nucleus of the queue.
#: Next / previous nucleus (not "." / ",": the ground-truth editor grows / shrinks with them)
KEYS: tuple[tuple[str, int], ...] = (("PageDown", 1), ("PageUp", -1))
#: A view counts as looked at from this many screen pixels per image pixel.
MIN_REVIEW_ZOOM = 1.0
#: The nucleus' box is shown this many times larger (context around it).
CONTEXT = 4.0
_CAMERA_DELAY_MS = 200


@dataclass
class ReviewSource:
    """What a queue is built from: the instances layer, its maps and energy."""

    layer: Labels
    maps: Any
    energy: np.ndarray | None = None


def session_source(session) -> ReviewSource | str:
    """The Segment panel's current result as a :class:`ReviewSource`, or why there is none."""
    if session is None or not session.results:
        return "Run the segmentation first; the queue uses its maps."
    layer = session.layers.get("instances")
    if layer is None or () not in session.results:
        return "The review queue works on one 2-D image; segment a single plane."
    return ReviewSource(layer, session.maps[()].maps, session.results[()].energy)


class ReviewPanel(Container):
    """List of nuclei by risk with click-to-zoom, next/previous keys and coverage.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
        The viewer to navigate and draw the coverage in.
    source : callable
        Returns a :class:`ReviewSource`, or a message saying why there is nothing.
    """

    def __init__(self, viewer, source: Callable[[], ReviewSource | str]) -> None:
        super().__init__(labels=False)
        self._viewer = viewer
        self._source = source
        self.queue: ReviewQueue | None = None
        self.coverage: Coverage | None = None
        self._layer: Labels | None = None
        self._overlay: Image | None = None
        self._build = PushButton(text="Build review queue")
        self._build.changed.connect(self.build)
        self._status = Label(value="")
        self._reviewed = Label(value="")
        for w in (self._status, self._reviewed):
            w.native.setWordWrap(True)
        self.extend([self._build, self._status, self._reviewed])
        self.list = QListWidget()
        cap_height(self.list, 120, 240)
        self.list.currentRowChanged.connect(self._on_row)
        self.list.itemClicked.connect(lambda item: self.go(self.list.row(item)))
        self.native.layout().addWidget(self.list)
        self._timer = QTimer()
        self._timer.setSingleShot(True)
        self._timer.setInterval(_CAMERA_DELAY_MS)
        self._timer.timeout.connect(self.mark_view)
        cam = _camera(viewer)
        cam.events.center.connect(self._on_camera)
        cam.events.zoom.connect(self._on_camera)
        self._bound = []
        for key, step in KEYS:
            viewer.bind_key(key, self._key_action(step), overwrite=True)
            self._bound.append(key)
        self.native.destroyed.connect(self._on_destroyed)

    # ----------------------------------------------------------------- building

    def build(self, *_: Any) -> None:
        """Rank the current result's nuclei; a message (and no change) when there are none."""
        src = self._source()
        if isinstance(src, str):
            self._status.value = src
            return
        labels = np.asarray(src.layer.data)
        try:
            queue = review_scores(labels, src.maps, energy=src.energy)
        except ValueError as exc:
            self._status.value = f"Cannot build the review queue: {exc}"
            return
        self._status.value = queue.message
        if not len(queue):
            return
        self.queue, self._layer = queue, src.layer
        self.coverage = Coverage(labels)
        self.list.blockSignals(True)
        self.list.clear()
        self.list.addItems([queue.row_text(k) for k in range(len(queue))])
        self.list.blockSignals(False)
        self._show_coverage()

    # ---------------------------------------------------------------- navigation

    def _key_action(self, step: int) -> Callable:
        def action(_viewer) -> None:
            self.step(step)

        return action

    def step(self, delta: int) -> None:
        """Go to the next (``delta`` 1) or previous (-1) nucleus of the queue."""
        if self.queue is None or not len(self.queue):
            return
        row = self.list.currentRow()
        row = 0 if row < 0 else min(max(row + delta, 0), len(self.queue) - 1)
        if row == self.list.currentRow():
            self.go(row)
        else:
            self.list.setCurrentRow(row)  # -> _on_row -> go

    def _on_row(self, row: int) -> None:
        if row >= 0:
            self.go(row)

    def go(self, row: int) -> None:
        """Centre on the nucleus of queue place ``row``, zoom to it and select it."""
        queue, layer = self.queue, self._layer
        if queue is None or layer is None or not 0 <= row < len(queue):
            return
        r0, r1, c0, c1 = (float(v) for v in queue.boxes[row])
        centre = layer.data_to_world(((r0 + r1 - 1) / 2, (c0 + c1 - 1) / 2))
        scale = np.abs(np.asarray(layer.scale, float)[-2:])
        extent = CONTEXT * np.array([r1 - r0, c1 - c0]) * scale
        canvas = np.asarray(_canvas_size(self._viewer), float)
        cam = _camera(self._viewer)
        cam.center = tuple(centre[-2:])
        cam.zoom = float(np.min(canvas / np.maximum(extent, 1e-9)))
        layer.selected_label = int(queue.ids[row])
        self.mark_view(force=True)

    # ------------------------------------------------------------------ coverage

    def _on_camera(self, *_: Any) -> None:
        if self.coverage is not None:
            self._timer.start()

    def _visible_box(self) -> tuple[float, float, float, float] | None:
        layer = self._layer
        if layer is None:
            return None
        cam = _camera(self._viewer)
        half = np.asarray(_canvas_size(self._viewer), float) / (2 * cam.zoom)
        centre = np.asarray(cam.center, float)[-2:]
        a = layer.world_to_data(tuple(centre - half))[-2:]
        b = layer.world_to_data(tuple(centre + half))[-2:]
        return min(a[0], b[0]), max(a[0], b[0]), min(a[1], b[1]), max(a[1], b[1])

    def mark_view(self, force: bool = False) -> None:
        """Record the visible region as seen, if zoomed in enough (always with ``force``)."""
        if self.coverage is None or self._layer is None or not qt_alive(self):
            return
        scale = float(np.min(np.abs(np.asarray(self._layer.scale, float)[-2:])))
        if not force and _camera(self._viewer).zoom * scale < MIN_REVIEW_ZOOM:
            return
        box = self._visible_box()
        if box is not None and self.coverage.add_box(*box):
            self._show_coverage()

    def _show_coverage(self) -> None:
        cov, layer = self.coverage, self._layer
        if cov is None or layer is None:
            return
        pct = lambda x: math.floor(100 * x)  # noqa: E731 (never rounds up to 100 %)
        self._reviewed.value = (
            f"reviewed: {pct(cov.nucleus_fraction)} % of nuclei "
            f"({pct(cov.area_fraction)} % of the nuclear area)"
        )
        data = cov.viewed.astype(np.uint8)
        overlay = self._overlay
        if overlay is None or overlay not in self._viewer.layers:
            self._overlay = self._viewer.add_image(
                data,
                name=f"{layer.name} reviewed",
                colormap="green",
                opacity=0.2,
                blending="additive",
                contrast_limits=(0, 1),
                scale=layer.scale,
                translate=layer.translate,
                metadata={ROLE: "review coverage"},
            )
            self._viewer.layers.selection.active = layer
        else:
            overlay.data = data

    # ----------------------------------------------------------------- lifecycle

    def _on_destroyed(self, *_: Any) -> None:
        # at viewer shutdown Qt may have deleted the timer already; an exception in this
        # slot of `destroyed` would make PyQt abort the whole process
        with contextlib.suppress(RuntimeError):
            self._timer.stop()
        for key in self._bound:
            self._viewer.bind_key(key, None)
        self._bound = []
        cam = _camera(self._viewer)
        for ev in (cam.events.center, cam.events.zoom):
            ev.disconnect(self._on_camera)
