"""A whole-slide result as one QuPath GeoJSON file, written chunk by chunk.

``napari-medinst segment-slide`` stores millions of nuclei as labels in a zarr store;
QuPath imports nuclei as GeoJSON objects in the slide's level-0 pixel coordinates. A
store's labels never fit in memory at once, so :func:`export_geojson` walks its chunks:
each nucleus is exported by the chunk that holds its centroid (the chunk's table rows,
``chunks/<k>.npy``, as the engine and the region edits keep them), traced on the chunk
grown by its largest nucleus' extent so that its outline is whole (in parts of
:data:`SUB` px), and written at once. Memory is one grown chunk, its rows and the
features of one part, whatever the slide's size.

Each feature carries the nucleus' id (``napari_medinst.label`` in its metadata), its
score (and area) as measurements, its class when the model has types (names and
colours from the model when it can be loaded, else ``Type N``) and its review status
when the result was corrected (``review.csv``). The file is written atomically: an
interrupted export leaves no partial file.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from . import slide_edit as ed
from . import slide_engine as se
from ._io import InputError, _atomic_write
from .geojson import labels_to_features

__all__ = ["SUB", "export_geojson", "is_slide_store"]

#: Side (label px) of the parts of a chunk whose nuclei are traced at once.
SUB = 512


def is_slide_store(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by ``segment-slide``."""
    try:
        ed._root_attrs(Path(path))
    except InputError:
        return False
    return True


def _type_names(model: str) -> dict | None:
    """Type number -> (name, rgb) of the store's model, or None when it cannot be loaded."""
    from .segment import get_model

    try:
        return getattr(get_model(model, "cpu"), "type_classes", None)
    except Exception:  # a model folder moved or deleted since the run: Type N names
        return None


def export_geojson(
    store: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    object_type: str = "detection",
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Write every nucleus of a ``segment-slide`` store to ``dest`` as QuPath GeoJSON.

    Parameters
    ----------
    store : path-like
        A complete store (an interrupted correction is finished first).
    dest : path-like
        The ``.geojson`` file; refused when it exists unless ``overwrite``.
    object_type : {'detection', 'annotation'}
        QuPath object type of the nuclei.
    progress : callable, optional
        Called with (chunks done, chunks) after each chunk.

    Returns
    -------
    int
        The number of nuclei written.
    """
    if object_type not in ("detection", "annotation"):
        raise InputError(f"object type must be detection or annotation, got {object_type!r}")
    out = Path(store).expanduser()
    if not is_slide_store(out):
        raise InputError(f"{out}: not a store written by napari-medinst segment-slide")
    ed.recover(out)  # refuses an incomplete store; finishes an interrupted correction
    st = ed._open_store(out)
    meta = ed._root_attrs(out)[se.STORE_KEY]
    scale = float(meta.get("downsample", 1.0))  # level-0 px per label px
    model = str(meta.get("plan", {}).get("model", ""))
    names = functools.cache(lambda: _type_names(model or "default"))
    status = ed._read_review(out)
    level0 = ed._level(st, 0)
    rows, cols = st.n_chunks
    ch = st.chunk
    count = 0

    def features(lab: np.ndarray, origin: tuple[int, int], part: np.ndarray) -> list:
        """The features of the nuclei of table rows ``part`` in ``lab`` (at ``origin``)."""
        ids = part["id"].astype(np.int64)
        lab = np.where(np.isin(lab, ids), lab, 0)
        extra = {int(i): {"Score": round(float(s), 4), "Area µm^2": round(float(a), 4)}  # as nuclei.csv
                 for i, s, a in zip(ids, part["score"], part["area_um2"], strict=True)}  # fmt: skip
        typed = bool((part["type"] > 0).any())
        kinds = dict(zip(ids.tolist(), part["type"].tolist(), strict=True)) if typed else None
        return labels_to_features(
            lab, offset=(origin[0] * scale, origin[1] * scale), scale=scale,
            object_type=object_type, types=kinds, type_names=names() if typed else None,
            measurements=extra, status=status or None, model={"name": model},
        )["features"]  # fmt: skip

    def write(tmp: Path) -> None:
        nonlocal count
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write('{"type":"FeatureCollection","features":[')
            for k in range(rows * cols):
                table = ed._load_table(st, k)  # the nuclei whose centroid lies in chunk k
                if table.size:
                    r, c = divmod(k, cols)
                    extent = np.maximum(table["bbox_y1_um"] - table["bbox_y0_um"],
                                        table["bbox_x1_um"] - table["bbox_x0_um"])  # fmt: skip
                    margin = math.ceil(float(extent.max()) / st.px) + 2
                    r0, c0 = max(0, r * ch - margin), max(0, c * ch - margin)
                    r1 = min(st.shape[0], (r + 1) * ch + margin)
                    c1 = min(st.shape[1], (c + 1) * ch + margin)
                    lab = np.asarray(level0[r0:r1, c0:c1])
                    # traced in parts of SUB px: the features of a dense chunk at once
                    # would take hundreds of MB of Python objects
                    sub_r = np.clip((table["centroid_y_um"] / st.px - r * ch) // SUB, 0, None)
                    sub_c = np.clip((table["centroid_x_um"] / st.px - c * ch) // SUB, 0, None)
                    for sr, sc in sorted(set(zip(sub_r.tolist(), sub_c.tolist(), strict=True))):
                        part = table[(sub_r == sr) & (sub_c == sc)]
                        a0 = max(r0, r * ch + int(sr) * SUB - margin)
                        b0 = max(c0, c * ch + int(sc) * SUB - margin)
                        a1 = min(r1, r * ch + (int(sr) + 1) * SUB + margin)
                        b1 = min(c1, c * ch + (int(sc) + 1) * SUB + margin)
                        win = lab[a0 - r0 : a1 - r0, b0 - c0 : b1 - c0]
                        for feat in features(win, (a0, b0), part):
                            fh.write(("," if count else "") +
                                     json.dumps(feat, separators=(",", ":")))  # fmt: skip
                            count += 1
                if progress is not None:
                    progress(k + 1, rows * cols)
            fh.write("]}\n")

    dest = Path(dest).expanduser()
    if dest.suffix.lower() not in (".geojson", ".json"):
        raise InputError(f"{dest}: the GeoJSON file must end in .geojson or .json")
    _atomic_write(dest, write, overwrite)
    return count
