"""Open napari with a sample, its segmentation and the plugin's widgets docked."""

from __future__ import annotations

from pathlib import Path

import napari
from skimage.segmentation import find_boundaries

from ..segment import Segmentation


def show(sample: str, seg: Segmentation, screenshot: Path | None = None) -> None:
    """Show the viewer (blocking) or, with ``screenshot``, render the window to a PNG."""
    viewer = napari.Viewer(show=True, title="napari-medinst")
    viewer.open_sample("napari-medinst", sample)
    image_layer = viewer.layers[f"{sample} sample"]
    viewer.add_labels(
        find_boundaries(seg.labels, mode="inner") * seg.labels, name=f"{image_layer.name} contours"
    )
    viewer.add_labels(seg.labels, name=f"{image_layer.name} instances", opacity=0.35)
    viewer.window.add_plugin_dock_widget("napari-medinst", "Segment nuclei")
    viewer.reset_view()
    if screenshot is None:
        napari.run()
        return
    from qtpy.QtWidgets import QApplication

    for _ in range(5):
        QApplication.processEvents()
    viewer.window.resize(1600, 1000)
    viewer.screenshot(str(screenshot), canvas_only=False, flash=False)
    viewer.close()
