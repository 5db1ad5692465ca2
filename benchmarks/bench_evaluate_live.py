"""Live-evaluation latency of the "Evaluate" widget on a 1000 x 1000 tile with ~600 nuclei.

Drives the real widget in a real napari viewer: a synthetic ground truth (600 touching
ellipses) and a prediction post-processed from network-like maps (with confidence
scores), live evaluation on, error overlay on.  Then ~40 edits are made one at a time,
each as a user would: delete a nucleus (``D``), merge two (``G``), split one with two
seeds (``K``), paint a brush dab, and delete a predicted nucleus.  For each it measures
the time from the start of the edit to

* **table**: the metric tables holding the new numbers, and
* **all**: overlay, review list and PR curve redrawn and the event queue empty,

and, to show where the time goes, the metrics (``EvaluationResult.seconds``), the overlay
and the PR-curve drawing.  Target: table <= 150 ms (median and p90).

    xvfb-run -a .venv/bin/python benchmarks/bench_evaluate_live.py [--repeat 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _report import print_latencies

sys.path.insert(0, str(Path(__file__).parent))

TARGET_MS = 150.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=8, help="rounds over the 5 kinds of edit")
    args = ap.parse_args()
    os.environ["NAPARI_MEDINST_RECOVERY_DIR"] = tempfile.mkdtemp(prefix="medinst-recovery-")

    import napari
    from qtpy.QtWidgets import QApplication

    from _synthetic import network_like_maps, synthetic_labels
    from napari_medinst._napari._editing import editor_for
    from napari_medinst._napari._evaluate_widget import EvaluateWidget
    from napari_medinst.postprocess import Postprocessor

    gt_data = synthetic_labels()
    res = Postprocessor(*network_like_maps(gt_data)).run()
    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    gt = viewer.add_labels(gt_data, name="gt", metadata={"ground_truth": True}, opacity=0.5)
    pred = viewer.add_labels(res.labels.astype(np.int32), name="instances", opacity=0.5)
    pred.metadata["scores"] = res.scores
    widget = EvaluateWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Evaluate")
    widget._pred.value, widget._gt.value = pred, gt
    editor = editor_for(viewer, gt)
    viewer.layers.selection.active = gt

    stamps: dict[str, list[float]] = {"table": [], "overlay": [], "pr": []}

    def timed(name, method):
        def run(*a, **k):
            t0 = time.perf_counter()
            out = method(*a, **k)
            stamps[name].append((time.perf_counter(), time.perf_counter() - t0))
            return out

        return run

    widget._fill_tables = timed("table", widget._fill_tables)
    widget._write_overlay = timed("overlay", widget._write_overlay)
    canvas_draw = widget.canvas.draw
    widget.canvas.draw = timed("pr", canvas_draw)

    def drain(timeout: float = 10.0, until=None) -> None:
        end = time.perf_counter() + timeout
        while True:
            app.processEvents()
            if (until is None or until()) and not widget._timer.isActive():
                app.processEvents()
                return
            if time.perf_counter() > end:
                raise TimeoutError("the widget did not update in time")
            time.sleep(0.0005)

    t0 = time.perf_counter()
    widget.evaluate_now()
    drain()
    first_s = time.perf_counter() - t0
    s = widget.result.scores
    print(
        f"tile 1000x1000, gt {s.n_gt} nuclei, prediction {s.n_pred} (scores: {s.has_scores}); "
        f"first evaluation incl. overlay layer {first_s:.2f} s; "
        f"AJI {s.aji:.3f}, PQ {s.pq:.3f}, mAP {s.map:.3f}"
    )

    rng = np.random.default_rng(1)

    def ids_of(layer) -> np.ndarray:
        return np.unique(np.asarray(layer.data))[1:]

    def centre(layer, i) -> tuple[int, int]:
        rr, cc = np.nonzero(np.asarray(layer.data) == i)
        k = np.argmin((rr - rr.mean()) ** 2 + (cc - cc.mean()) ** 2)
        return int(rr[k]), int(cc[k])

    def do_delete():
        editor.delete_at(centre(gt, rng.choice(ids_of(gt))))

    def do_merge():
        lab = np.asarray(gt.data)
        touch = (lab[:, :-1] != lab[:, 1:]) & (lab[:, :-1] > 0) & (lab[:, 1:] > 0)
        r, c = np.argwhere(touch)[rng.integers(touch.sum())]
        editor.merge({int(lab[r, c]), int(lab[r, c + 1])})

    def do_split():
        lab = np.asarray(gt.data)
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        i = int(rng.choice(np.argsort(sizes)[-50:]))
        rr, cc = np.nonzero(lab == i)
        order = np.argsort(cc if np.ptp(cc) > np.ptp(rr) else rr)
        n = order.size
        editor.split(
            [(rr[order[n // 5]], cc[order[n // 5]]), (rr[order[-n // 5]], cc[order[-n // 5]])]
        )

    def do_paint():
        gt.brush_size = 12
        gt.paint((int(rng.integers(20, 980)), int(rng.integers(20, 980))), int(gt.data.max()) + 1)

    def do_pred_delete():
        i = rng.choice(ids_of(pred))
        pred.data_setitem(np.nonzero(np.asarray(pred.data) == i), 0)

    edits = [
        ("delete", do_delete),
        ("merge", do_merge),
        ("split", do_split),
        ("paint", do_paint),
        ("pred delete", do_pred_delete),
    ]
    table_ms, all_ms, per_edit, compute_ms = [], [], {}, []
    for k in range(args.repeat * len(edits)):
        name, edit = edits[k % len(edits)]
        drain()
        time.sleep(DEBOUNCE_GAP)
        for xs in stamps.values():
            xs.clear()
        n = widget.evaluations
        t0 = time.perf_counter()
        edit()
        drain(until=lambda n=n: widget.evaluations > n)
        t_all = time.perf_counter()
        table_ms.append(1000 * (stamps["table"][0][0] - t0))
        all_ms.append(1000 * (t_all - t0))
        compute_ms.append(1000 * widget.result.seconds)
        per_edit.setdefault(name, []).append(table_ms[-1])

    overlay_ms = [1000 * d for _, d in stamps["overlay"]]
    print(f"{len(table_ms)} edits (edit start -> updated numbers in the table):")
    rows = [
        ("table", table_ms),
        ("all (overlay, list, PR curve, idle)", all_ms),
        ("  metrics + outcomes + ranking", compute_ms),
    ]
    if overlay_ms:
        print(f"  {'  overlay layer write (last edit)':<38} {overlay_ms[-1]:6.1f} ms")
    print_latencies(rows, per_edit, "per edit kind (median table latency)", TARGET_MS, width=38)
    viewer.close()


#: Pause between edits (s), longer than the widget's debounce, as between a user's clicks.
DEBOUNCE_GAP = 0.2

if __name__ == "__main__":
    main()
