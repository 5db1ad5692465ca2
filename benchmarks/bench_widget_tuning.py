"""Live-tuning latency of the "Segment nuclei" widget on a 1000 x 1000 H&E image.

Drives the real widget in a real napari viewer: the H&E sample is tiled to 1000 x 1000,
segmented once with the classical model, then ~24 parameter changes (every parameter,
several values each) are made one at a time. For each change it measures the time from
setting the widget's value to

* **labels**: the instances layer holding the new labels (its data event fired), and
* **all layers**: every output layer updated and the widget idle again,

and, to show where the time goes, the post-processing itself (in the worker thread) and
the writing of the layers (in the GUI thread). Target: labels <= 100 ms (median and p90).

    xvfb-run -a .venv/bin/python benchmarks/bench_widget_tuning.py [--repeat 3]

``--compare-ids`` measures what keeping the nuclei's ids (colours) through a change costs:
the changes alternate between stable ids and ids numbered afresh (each parameter and
value in both modes with ``--repeat 4``), so both see the same machine load.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from _report import print_latencies

TARGET_MS = 100.0

# (parameter, values cycled through); each change moves away from the previous value
CHANGES = [
    ("fg_threshold", (0.45, 0.55)),
    ("marker_threshold", (0.25, 0.35)),
    ("sobel_size", (7, 5)),
    ("contour_weight", (0.7, 0.5)),
    ("smoothing", (1.0, 0.5)),
    ("marker_opening", (2, 1)),
    ("min_marker_size", (8, 4)),
    ("min_nucleus_size", (30, 10)),
]


def _image(size: int = 1000) -> np.ndarray:
    from napari_medinst.samples import load_sample

    img, _, _ = load_sample("he")
    reps = (-(-size // img.shape[0]), -(-size // img.shape[1]), 1)
    return np.ascontiguousarray(np.tile(img, reps)[:size, :size])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="rounds over the 8 parameters")
    ap.add_argument("--size", type=int, default=1000)
    ap.add_argument("--compare-ids", action="store_true", help="also measure without stable ids")
    args = ap.parse_args()

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_medinst._napari import _segment_widget as sw

    post_ms: list[float] = []
    real_tune = sw._tune_job

    def timed_tune(items, params):
        t0 = time.perf_counter()
        out = real_tune(items, params)
        post_ms.append(1000 * (time.perf_counter() - t0))
        return out

    sw._tune_job = timed_tune
    keep_ms: list[float] = []
    real_keep = sw._keep_colours

    def timed_keep(*a):
        t0 = time.perf_counter()
        out = real_keep(*a)
        keep_ms.append(1000 * (time.perf_counter() - t0))
        return out

    def fresh_ids(_layer, labels, features, _results):
        return labels, features

    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    image = viewer.add_image(_image(args.size), name="tile", rgb=True)
    image.metadata["pixel_size_um"] = 0.25
    widget = sw.SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment nuclei")
    write_ms: list[float] = []
    real_write = widget._write_outputs

    def timed_write(s):
        t0 = time.perf_counter()
        real_write(s)
        write_ms.append(1000 * (time.perf_counter() - t0))

    widget._write_outputs = timed_write

    def idle() -> bool:
        return widget._job is None and not widget._tune_timer.isActive() and not widget._pending

    def wait(cond, timeout: float = 60.0) -> None:
        end = time.perf_counter() + timeout
        while not cond():
            app.processEvents()
            time.sleep(0.0005)
            if time.perf_counter() > end:
                raise TimeoutError("the widget did not finish in time")

    widget._model.value = "classical"
    widget._pixel_size.value = 0.25
    t0 = time.perf_counter()
    widget._run.native.click()
    wait(lambda: idle() and "tile instances" in viewer.layers)
    first_s = time.perf_counter() - t0
    layer = viewer.layers["tile instances"]
    n0 = int(layer.data.max())

    stamp: list[float] = []
    layer.events.data.connect(lambda _e: stamp.append(time.perf_counter()))
    labels_ms, all_ms, per_param = [], [], {}
    by_mode: dict[bool, list[float]] = {True: [], False: []}
    write_ms.clear()
    post_ms.clear()
    keep_ms.clear()
    for k in range(args.repeat * len(CHANGES)):
        name, values = CHANGES[k % len(CHANGES)]
        value = values[(k // len(CHANGES)) % len(values)]
        stable = not args.compare_ids or (k % len(CHANGES) + k // (2 * len(CHANGES))) % 2 == 0
        sw._keep_colours = timed_keep if stable else fresh_ids
        wait(idle)
        app.processEvents()
        stamp.clear()
        t0 = time.perf_counter()
        getattr(widget, f"_{name}").value = value
        wait(lambda: bool(stamp) and idle())
        t_all = time.perf_counter()
        labels_ms.append(1000 * (stamp[0] - t0))
        all_ms.append(1000 * (t_all - t0))
        per_param.setdefault(name, []).append(labels_ms[-1])
        by_mode[stable].append(labels_ms[-1])
    assert viewer.layers["tile instances"] is layer, "tuning must update the layer in place"

    print(
        f"image {args.size}x{args.size} RGB, {n0} nuclei, first run (classical maps + "
        f"post-processing + layers) {first_s:.2f} s"
    )
    print(f"{len(labels_ms)} parameter changes (slider change -> new labels in the layer):")
    rows = [
        ("labels", labels_ms),
        ("all layers", all_ms),
        ("  post-processing (worker)", post_ms),
        ("  writing layers (GUI)", write_ms),
        ("    of it: keeping ids", keep_ms),
    ]
    if args.compare_ids:
        rows[1:1] = [("labels, stable ids", by_mode[True]), ("labels, ids afresh", by_mode[False])]
    print_latencies(rows, per_param, "per parameter (median labels latency)", TARGET_MS)
    viewer.close()


if __name__ == "__main__":
    main()
