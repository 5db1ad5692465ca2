"""The main job: segment a bundled sample, write labels + overlay, optionally show napari.

Outputs in ``out``: ``<sample>_instances.tif`` (uint32), ``<sample>_instances.csv``
(confidence per nucleus), ``<sample>_overlay.png``, ``<sample>_scores.json`` (scores
against the sample's manual annotation) and, with ``gui='screenshot'``,
``napari_window.png`` rendered by napari (needs a display; use ``xvfb-run`` headless).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ._io import (
    bytes_writer,
    check_output_dir,
    png_writer,
    remove_stale_parts,
    tiff_writer,
    write_group,
)
from .metrics import evaluate
from .overlay import overlay_rgb
from .samples import load_sample
from .segment import segment

__all__ = ["run_demo"]


def run_demo(out: Path, model: str = "default", sample: str = "he", gui: str = "auto") -> int:
    """Segment the sample and write the outputs; returns a process exit code.

    The output folder is checked before the model runs (see
    :func:`napari_medinst._io.check_output_dir`); the outputs are written as one unit.
    """
    out = check_output_dir(out)
    remove_stale_parts(out)
    image, truth, info = load_sample(sample)
    seg = segment(image, model, pixel_size=info.pixel_size, modality=info.modality)
    scores = evaluate(truth, seg.labels, scores=seg.result.scores_by_id)
    stem = f"{sample}_sample"
    rows = ["label,score"] + [f"{i + 1},{s:.5f}" for i, s in enumerate(seg.scores)]
    summary = {
        "sample": info.title,
        "model": seg.maps.model_name,
        "pixel_size_um": seg.maps.pixel_size,
        "n_nuclei": seg.result.n_instances,
        "against_manual_annotation": {
            k: round(v, 4) for k, v in scores.to_dict().items() if k in ("aji", "pq", "map", "dice")
        },
    }
    write_group(
        [
            (out / f"{stem}_instances.csv", bytes_writer(("\n".join(rows) + "\n").encode())),
            (out / f"{stem}_overlay.png", png_writer(overlay_rgb(image, seg.labels))),
            (out / f"{stem}_scores.json", bytes_writer(json.dumps(summary, indent=2).encode())),
            (out / f"{stem}_instances.tif", tiff_writer(seg.labels)),
        ],
        overwrite=True,
    )
    print(json.dumps(summary, indent=2))
    print(f"wrote {out / f'{stem}_instances.tif'} and {out / f'{stem}_overlay.png'}")
    if gui == "auto":
        gui = "open" if os.environ.get("DISPLAY") and not os.environ.get("CI") else "none"
    if gui in ("open", "screenshot"):
        if not os.environ.get("DISPLAY") and sys.platform.startswith("linux"):
            print("no display: run under xvfb-run for a screenshot", file=sys.stderr)
            return 2
        from ._napari._demo import show

        shot = out / "napari_window.png" if gui == "screenshot" else None
        show(sample, seg, model, screenshot=shot)
        if shot is not None:
            print(f"wrote {shot}")
    return 0
