"""Regenerate the documentation screenshots (run under a virtual display).

    xvfb-run -a -s "-screen 0 1920x1080x24" .venv/bin/python scripts/make_screenshots.py
    xvfb-run -a -s "-screen 0 1920x1080x24" .venv/bin/python scripts/make_screenshots.py \
        --size 1366x768 --size 1920x1080

Writes docs/images/*.png from the real widgets on the bundled samples. With ``--size``,
only the window of that screen size with all three panels docked is drawn
(docs/images/panels_<W>x<H>.png).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import napari
from qtpy.QtWidgets import QApplication

OUT = Path(__file__).resolve().parents[1] / "docs" / "images"


def wait_for(cond, timeout: float = 120.0) -> None:
    end = time.time() + timeout
    while not cond():
        QApplication.processEvents()
        time.sleep(0.02)
        if time.time() > end:
            raise TimeoutError("timed out waiting for the widget")
    for _ in range(10):
        QApplication.processEvents()


def shot(viewer, name: str, canvas_only: bool = False) -> None:
    for _ in range(10):
        QApplication.processEvents()
    viewer.screenshot(str(OUT / name), canvas_only=canvas_only, flash=False)
    print("wrote", OUT / name)


def segment_screens(viewer) -> None:
    viewer.open_sample("napari-medinst", "he")
    _, widget = viewer.window.add_plugin_dock_widget("napari-medinst", "Segment nuclei")
    widget._model.value = "default"
    widget._show_maps.value = True  # the energy and contours screenshots below
    widget._run.native.click()
    wait_for(lambda: "he sample instances" in viewer.layers and widget._job is None)
    viewer.reset_view()
    shot(viewer, "segment_widget.png")
    for layer in viewer.layers:
        layer.visible = layer.name in ("he sample", "he sample HV energy", "he sample markers")
    shot(viewer, "segment_energy_markers.png", canvas_only=True)
    for layer in viewer.layers:
        layer.visible = layer.name in ("he sample", "he sample contours")
    shot(viewer, "segment_contours.png", canvas_only=True)


def evaluate_screens(viewer) -> None:
    """Needs segment_screens first (the instances layer)."""
    for layer in viewer.layers:
        layer.visible = layer.name in ("he sample",)
    _, widget = viewer.window.add_plugin_dock_widget("napari-medinst", "Evaluate")
    widget._pred.value = viewer.layers["he sample instances"]
    widget._gt.value = viewer.layers["he sample ground truth"]
    widget.evaluate_now()
    wait_for(lambda: any(layer.name.endswith("errors") for layer in viewer.layers), 30)
    viewer.reset_view()
    shot(viewer, "evaluate_widget.png")


def finetune_screens(viewer) -> None:
    """In a fresh viewer, so the window holds just this panel."""
    viewer.open_sample("napari-medinst", "he")
    _, widget = viewer.window.add_plugin_dock_widget("napari-medinst", "Fine-tune model")
    widget._image.value = viewer.layers["he sample"]
    widget._gt.value = viewer.layers["he sample ground truth"]
    widget._paste_count.value = 40
    layers = widget.preview()
    for layer in viewer.layers:
        layer.visible = layer in layers[:2]
    viewer.reset_view()
    shot(viewer, "finetune_preview.png")

    # a deliberately tiny fine-tune (a few steps) so the screenshot shows a finished run;
    # in a neutral temporary folder, so no path of this machine shows in the picture
    work = Path(tempfile.gettempdir()) / "napari-medinst-example"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    os.chdir(work)
    widget._set_folder.value = work / "my_set"
    widget._verified_only.value = False
    widget.export()
    widget._epochs.value, widget._steps.value = 2, 4
    widget._batch.value, widget._crop.value = 2, 128
    widget._out.value = work / "finetuned"
    widget.start()
    wait_for(lambda: widget._worker is None, timeout=900)
    widget.compare()
    wait_for(lambda: widget._compare_worker is None, timeout=300)
    for title, section in widget._sections.items():  # the run and the comparison
        section.set_expanded(title in ("3. Fine-tune: run", "4. Compare"))
    for _ in range(10):
        QApplication.processEvents()
    # the panel alone, all of its (scrolled) content
    widget.scroll_area.widget().grab().save(str(OUT / "finetune_widget.png"))
    print("wrote", OUT / "finetune_widget.png")
    shutil.rmtree(work, ignore_errors=True)


def panels_screen(width: int, height: int) -> None:
    """All three panels docked in a window of a ``width`` x ``height`` screen."""
    viewer = napari.Viewer(show=True, title="napari-medinst")
    viewer.window.resize(width, height)  # before docking, as on that screen
    for _ in range(10):
        QApplication.processEvents()
    viewer.open_sample("napari-medinst", "he")
    dock, seg = viewer.window.add_plugin_dock_widget("napari-medinst", "Segment nuclei")
    seg._model.value = "default"
    seg._run.native.click()
    wait_for(lambda: "he sample instances" in viewer.layers and seg._job is None)
    ev_dock, ev = viewer.window.add_plugin_dock_widget("napari-medinst", "Evaluate")
    ev._pred.value = viewer.layers["he sample instances"]
    ev._gt.value = viewer.layers["he sample ground truth"]
    ev.evaluate_now()
    wait_for(lambda: ev.result is not None, 30)
    viewer.window.add_plugin_dock_widget("napari-medinst", "Fine-tune model")
    for layer in viewer.layers:
        layer.visible = layer.name in ("he sample", "he sample instances")
    for _ in range(10):
        QApplication.processEvents()
    ev_dock.raise_()  # the scores, where Evaluate shares a tab group with Fine-tune
    if viewer.window._qt_window.tabifiedDockWidgets(dock):
        dock.raise_()  # all three share one: Segment's tab
    viewer.reset_view()
    shot(viewer, f"panels_{width}x{height}.png")
    viewer.close()


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text!r}: expected WIDTHxHEIGHT") from None
    return width, height


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=_size, action="append", help="e.g. 1366x768 (repeatable)")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.size:
        for width, height in args.size:
            panels_screen(width, height)
        return
    viewer = napari.Viewer(show=True, title="napari-medinst")
    viewer.window.resize(1600, 1000)
    segment_screens(viewer)
    evaluate_screens(viewer)
    viewer.close()
    viewer = napari.Viewer(show=True, title="napari-medinst")
    viewer.window.resize(1600, 1000)
    finetune_screens(viewer)
    viewer.close()


if __name__ == "__main__":
    main()
