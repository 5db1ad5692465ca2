"""The demo's napari window: the sample, the plugin's three panels docked, and the Segment
panel run on the sample, so the window is the one a user gets by doing the same by hand
(the sliders, progress and Run act on the layers shown)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import napari
import numpy as np

from ..segment import Segmentation
from ._segment_widget import SegmentWidget

#: The plugin's widgets (napari.yaml), docked in this order.
PANELS = ("Segment nuclei", "Evaluate", "Fine-tune model")
#: Seconds the screenshot waits for the Segment panel to finish.
RUN_TIMEOUT_S = 600.0


def populate(viewer: napari.Viewer, sample: str, model: str) -> SegmentWidget:
    """Open ``sample``, dock the plugin's panels and start the Segment panel on it.

    Parameters
    ----------
    viewer : napari.Viewer
        An empty viewer.
    sample : str
        Key of the sample (``he`` or ``fluorescence``).
    model : str
        The model the panel runs: a name or a model folder.

    Returns
    -------
    SegmentWidget
        The Segment panel, running (see :attr:`SegmentWidget.idle`).
    """
    viewer.open_sample("napari-medinst", sample)
    widgets = {name: viewer.window.add_plugin_dock_widget("napari-medinst", name)[1]
               for name in PANELS}  # fmt: skip
    segment = widgets["Segment nuclei"]
    segment.run(model)
    return segment


def wait_idle(widget: SegmentWidget, timeout: float = RUN_TIMEOUT_S) -> bool:
    """Process Qt events until the panel is idle; False after ``timeout`` seconds."""
    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + timeout
    while not widget.idle:
        if time.monotonic() > end:
            return False
        QApplication.processEvents()
        time.sleep(0.01)
    return True


def _settle(rounds: int = 10) -> None:
    """Let Qt lay out the window (docks are tabbed or sized after they are shown)."""
    from qtpy.QtWidgets import QApplication

    for _ in range(rounds):
        QApplication.processEvents()
        time.sleep(0.01)


def matches(viewer: napari.Viewer, sample: str, seg: Segmentation) -> bool:
    """Whether the window's instances are the labels the demo wrote."""
    name = f"{sample} sample instances"
    return name in viewer.layers and np.array_equal(viewer.layers[name].data, seg.labels)


def show(sample: str, seg: Segmentation, model: str, screenshot: Path | None = None) -> None:
    """Show the viewer (blocking) or, with ``screenshot``, render the window to a PNG."""
    viewer = napari.Viewer(show=True, title="napari-medinst")
    if screenshot is not None:
        viewer.window.resize(1600, 1000)
    widget = populate(viewer, sample, model)
    if screenshot is None:
        napari.run()
        return
    if not wait_idle(widget):
        print(f"the Segment panel did not finish within {RUN_TIMEOUT_S:g} s", file=sys.stderr)
    elif not matches(viewer, sample, seg):
        print("note: the window's result differs from the files written", file=sys.stderr)
    viewer.reset_view()
    _settle()
    viewer.screenshot(str(screenshot), canvas_only=False, flash=False)
    viewer.close()
