"""Progress and Cancel latency of the model run (issue 17, bug 9).

* a 1024 x 1024 H&E tile at 0.25 µm/px with mirror averaging (one 512² model tile, four
  passes): how often ``progress`` is called and the longest gap between two calls;
* a 3000 x 3000 image: how long after ``should_stop`` turns true the run stops.

Target: a progress report at least every second, Cancel acting within a second.

    .venv/bin/python benchmarks/bench_progress_cancel.py
"""

from __future__ import annotations

import contextlib
import threading
import time

import numpy as np

from napari_medinst.model.inference import CancelledError
from napari_medinst.samples import load_sample
from napari_medinst.segment import compute_maps, get_model


def progress_gaps(image: np.ndarray) -> None:
    t0 = time.perf_counter()
    stamps = [0.0]
    compute_maps(image, "default", pixel_size=0.25, modality="he", device="cpu",
                 progress=lambda d, t: stamps.append(time.perf_counter() - t0))  # fmt: skip
    total = time.perf_counter() - t0
    gaps = np.diff([*stamps, total])
    print(f"{image.shape[0]}x{image.shape[1]} at 0.25 µm/px with TTA: {total:.2f} s, "
          f"{len(stamps) - 1} progress calls, longest gap {gaps.max():.2f} s")  # fmt: skip


def cancel_latency(image: np.ndarray, delay: float) -> None:
    stop, asked = threading.Event(), []

    def cancel_later() -> None:
        time.sleep(delay)
        asked.append(time.perf_counter())
        stop.set()

    thread = threading.Thread(target=cancel_later)
    thread.start()
    with contextlib.suppress(CancelledError):
        compute_maps(image, "default", pixel_size=0.25, modality="he", device="cpu",
                     should_stop=stop.is_set)  # fmt: skip
    end = time.perf_counter()
    thread.join()
    print(f"{image.shape[0]}x{image.shape[1]}: cancelled after {delay:.0f} s, stopped "
          f"{end - asked[0]:.2f} s after the request")  # fmt: skip


def main() -> None:
    get_model("default", "cpu")  # load once, outside the timings
    img, _, _ = load_sample("he")
    progress_gaps(np.tile(img, (2, 2, 1)))
    big = np.tile(img, (6, 6, 1))[:3000, :3000]
    for delay in (3.0, 5.0):
        cancel_latency(big, delay)


if __name__ == "__main__":
    main()
