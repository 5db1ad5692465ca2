"""QuPath GeoJSON: label images to polygons and back, exact to the pixel.

Coordinates follow QuPath: ``x`` = column, ``y`` = row, in pixels of the full-resolution
image (level 0), with pixel ``(r, c)`` covering ``x`` in ``[c, c + 1]`` and ``y`` in
``[r, r + 1]``. A region's labels are placed with ``offset = (row, col)`` of its top-left
pixel in the slide.

Export (:func:`labels_to_features`) traces every nucleus along the pixel edges: vertices
sit on pixel corners only (collinear steps merged), exterior rings are counter-clockwise
and holes clockwise in these coordinates (RFC 7946), and parts of a nucleus that touch
only at a corner become separate polygons of a ``MultiPolygon``. Rasterising the
polygons (a pixel belongs to a polygon when its centre is inside) therefore gives back
exactly the same pixels, holes and touching neighbours included.

Import (:func:`features_to_labels`) accepts what QuPath writes: a ``FeatureCollection``
(or a bare list of features), ``Polygon`` and ``MultiPolygon`` geometries with holes,
annotations, detections and cells (a cell's ``nucleusGeometry`` is used), measurements as
a dict or as QuPath's older list of ``{"name", "value"}``, and the classification's
``name`` (or ``names``) with ``color`` (or the older packed ``colorRGB``).

The review status, model name and version and the label id travel in
``properties.metadata`` (QuPath keeps that string map) under keys starting with
``napari_medinst.``; the feature ``id`` is a UUID kept across round trips.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._io import InputError, _atomic_write, bytes_writer, check_labels

__all__ = [
    "OBJECT_TYPES",
    "STATUSES",
    "ImportResult",
    "features_to_labels",
    "geojson_writer",
    "labels_to_features",
    "measurements_from_columns",
    "read_geojson",
    "trace_labels",
    "write_geojson",
]

#: ``objectType`` values QuPath writes; export offers the first two.
OBJECT_TYPES = ("annotation", "detection", "cell", "tile")
#: Review states of a nucleus.
STATUSES = ("predicted", "edited", "verified")
GEOJSON_SUFFIXES = (".geojson", ".json")
_META = "napari_medinst."
_STEP_X = np.array([0, 1, 1, 0])  # start corner of side d (0 top, 1 right, 2 bottom, 3 left)
_STEP_Y = np.array([0, 0, 1, 1])


# ------------------------------------------------------------------------ tracing


@contextlib.contextmanager
def _no_gc():
    """Pause the cyclic garbage collector while millions of small lists are made.

    Python's collector would otherwise run again and again over them (3-5x slower).
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _boundary_edges(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Every pixel side on a label boundary, as (padded pixel index, side), sorted.

    Sides are numbered 0 top, 1 right, 2 bottom, 3 left; walked with the label on the
    left (in ``x``/``y`` coordinates) they run +x, +y, -x, -y.
    """
    h, w = lab.shape
    pad = np.zeros((h + 2, w + 2), lab.dtype)
    pad[1:-1, 1:-1] = lab
    inner = pad[1:-1, 1:-1]
    fg = inner != 0
    nbrs = (pad[:-2, 1:-1], pad[1:-1, 2:], pad[2:, 1:-1], pad[1:-1, :-2])
    keys = []
    for side, nbr in enumerate(nbrs):
        r, c = np.nonzero(fg & (inner != nbr))
        keys.append(((r + 1) * (w + 2) + (c + 1)) * 4 + side)
    key = np.sort(np.concatenate(keys))
    return pad.ravel(), key, w + 2


def _successors(flat: np.ndarray, key: np.ndarray, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Index of the next edge of each edge's ring, and whether the turn is at a pinch.

    The rule at each end corner: turn left round the same pixel when the pixel ahead is
    not the label's, else go straight when the pixel ahead-right is not, else turn right.
    Where the label touches itself only at the corner (a pinch) this keeps to the same
    pixel; :func:`_split_pinches` later separates rings that meet themselves there.
    """
    p, d = key >> 2, key & 3
    step = np.array([-stride, 1, stride, -1])  # outward neighbour of side d
    a = flat[p]
    ahead = p + step[(d + 1) & 3]
    ahead_right = ahead + step[d]
    left = flat[ahead] != a
    straight = ~left & (flat[ahead_right] != a)
    nxt = np.where(left, p * 4 + ((d + 1) & 3), 0)
    nxt = np.where(straight, ahead * 4 + d, nxt)
    right = ~left & ~straight
    nxt = np.where(right, ahead_right * 4 + ((d - 1) & 3), nxt)
    pinch = left & (flat[ahead_right] == a)
    return np.searchsorted(key, nxt), pinch


def _cycles(succ: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decompose the permutation ``succ`` into cycles.

    Returns
    -------
    cid : ndarray
        Cycle number of each element (cycles numbered by their smallest element).
    order : ndarray
        Elements cycle by cycle, each cycle from its smallest element in walking order.
    starts : ndarray
        Offset of each cycle in ``order``, with the total length appended.
    """
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    n = succ.size
    idx = np.arange(n, dtype=np.int32)
    graph = csr_matrix((np.ones(n, np.int8), (idx, succ.astype(np.int32))), shape=(n, n))
    _, comp = connected_components(graph, directed=True, connection="weak")
    head = np.full(comp.max() + 1, n, np.int32)
    np.minimum.at(head, comp, idx)
    number = np.empty(head.size, np.int64)
    number[np.argsort(head)] = np.arange(head.size)
    cid = number[comp]
    # distance of every element to its cycle's last element, by pointer jumping
    nxt = succ.astype(np.int32)
    tail = nxt == head[comp]
    nxt[tail] = idx[tail]
    dist = (~tail).astype(np.int32)
    while not np.all(tail[nxt]):
        dist += dist[nxt]
        nxt = nxt[nxt]
    length = np.bincount(cid)
    starts = np.concatenate([[0], np.cumsum(length)])
    order = np.empty(n, np.int64)
    order[starts[cid] + (length[cid] - 1 - dist)] = idx
    return cid, order, starts


def _split_pinches(
    succ: np.ndarray, pinch: np.ndarray, end_vertex: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cycles of ``succ`` after splitting every ring that passes a corner twice.

    Two pinch turns of one ring at the same corner exchange their successors, which
    cuts the ring there into two simple rings (the hole of a nucleus whose outline
    touches itself at a corner, or two holes touching at a corner).
    """
    succ = succ.copy()
    at = np.flatnonzero(pinch)
    for _ in range(64):  # one round suffices for outlines that touch without crossing
        cid, order, starts = _cycles(succ)
        if at.size == 0:
            return cid, order, starts
        k = cid[at] * (end_vertex.max() + 1) + end_vertex[at]
        srt = np.argsort(k, kind="stable")
        dup = np.flatnonzero(k[srt][1:] == k[srt][:-1])
        if dup.size == 0:
            return cid, order, starts
        e1, e2 = at[srt[dup]], at[srt[dup + 1]]
        succ[e1], succ[e2] = succ[e2], succ[e1].copy()
    raise RuntimeError("tracing did not converge")  # pragma: no cover


@dataclass
class Rings:
    """Pixel-edge outlines of a label image (see :func:`trace_labels`).

    Attributes
    ----------
    xy : ndarray of int64, (N, 2)
        Corner vertices, ring after ring, each ring not closed (first not repeated).
    starts : ndarray
        Offset of each ring in ``xy``, total appended.
    label : ndarray
        Label of each ring.
    hole : ndarray of bool
        Whether the ring is a hole (clockwise) rather than an exterior.
    pixel : tuple of ndarray
        (row, col) of a pixel of the label on the left of each ring's first edge.
    """

    xy: np.ndarray
    starts: np.ndarray
    label: np.ndarray
    hole: np.ndarray
    pixel: tuple[np.ndarray, np.ndarray]


def trace_labels(labels: np.ndarray) -> Rings:
    """Trace the outline of every label along pixel edges (vectorised).

    Parameters
    ----------
    labels : ndarray
        2-D instance labels, 0 = background.

    Returns
    -------
    Rings
        Simple rings with vertices at corners where the outline turns.
    """
    lab = np.ascontiguousarray(labels)
    flat, key, stride = _boundary_edges(lab)
    if key.size == 0:
        empty = np.zeros(0, np.int64)
        return Rings(np.zeros((0, 2), np.int64), np.zeros(1, np.int64), empty,
                     empty.astype(bool), (empty, empty))  # fmt: skip
    succ, pinch = _successors(flat, key, stride)
    p, d = key >> 2, key & 3
    row, col = p // stride - 1, p % stride - 1
    x, y = col + _STEP_X[d], row + _STEP_Y[d]
    end_vertex = (y * (lab.shape[1] + 1) + x)[succ]
    _, order, starts = _split_pinches(succ, pinch, end_vertex)
    first = order[starts[:-1]]
    prev = np.roll(order, 1)
    prev[starts[:-1]] = order[starts[1:] - 1]
    keep = d[order] != d[prev]
    kept = order[keep]
    new_starts = np.concatenate(
        [[0], np.cumsum(np.add.reduceat(keep.astype(np.int64), starts[:-1]))]
    )
    xy = np.stack([x[kept], y[kept]], axis=1)
    return Rings(
        xy=xy,
        starts=new_starts,
        label=flat[p[first]].astype(np.int64),
        hole=_signed_area2(xy, new_starts) < 0,
        pixel=(row[first], col[first]),
    )


def _signed_area2(xy: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Twice the signed (shoelace) area of each ring in ``xy`` (rings not closed)."""
    if xy.shape[0] == 0:
        return np.zeros(0)
    nxt = np.arange(1, xy.shape[0] + 1)
    nxt[starts[1:] - 1] = starts[:-1]
    cross = xy[:, 0] * xy[nxt, 1] - xy[nxt, 0] * xy[:, 1]
    return np.add.reduceat(cross, starts[:-1]).astype(np.float64)


def _components(lab: np.ndarray, rings: Rings, which: np.ndarray) -> np.ndarray:
    """4-connected part (within its label) of each ring in ``which``."""
    from scipy import ndimage

    out = np.zeros(which.size, np.int64)
    for value in np.unique(rings.label[which]):
        sel = which[rings.label[which] == value]
        rr, cc = rings.pixel[0][sel], rings.pixel[1][sel]
        pts = np.concatenate([rings.xy[rings.starts[i] : rings.starts[i + 1]] for i in sel])
        (c0, r0), (c1, r1) = pts.min(axis=0), pts.max(axis=0)
        box = lab[r0:r1, c0:c1] == value
        parts, _ = ndimage.label(box)  # default structure: 4-connected
        out[np.searchsorted(which, sel)] = parts[rr - r0, cc - c0]
    return out


def _grouped_polygons(lab: np.ndarray, rings: Rings) -> dict[int, list[list[int]]]:
    """Ring indices per label, grouped into polygons (exterior first, then its holes)."""
    values, dense = np.unique(rings.label, return_inverse=True)  # labels may be huge
    n_ext = np.bincount(dense[~rings.hole], minlength=values.size)
    n_hole = np.bincount(dense[rings.hole], minlength=values.size)
    tricky = ((n_ext > 1) & (n_hole > 0))[dense]  # per ring: its label needs components
    which = np.flatnonzero(tricky)
    part = np.zeros(rings.label.size, np.int64)
    if which.size:
        part[which] = _components(lab, rings, which)
    out: dict[int, dict[int, list[int]]] = {}
    for i in np.lexsort((rings.hole, rings.label)).tolist():
        polys = out.setdefault(int(rings.label[i]), {})
        if not rings.hole[i]:
            polys[int(part[i]) if tricky[i] else i] = [i]
        else:
            target = int(part[i]) if tricky[i] else next(iter(polys))
            polys[target].append(i)
    return {k: list(v.values()) for k, v in out.items()}


# ------------------------------------------------------------------------ export


def _geometry(rings: Rings, polys: list[list[int]], coords: list) -> dict:
    """A GeoJSON Polygon or MultiPolygon of the given ring groups (rings closed)."""
    parts = []
    for poly in polys:
        ringlist = []
        for i in poly:
            pts = coords[rings.starts[i] : rings.starts[i + 1]]
            ringlist.append([*pts, pts[0]])
        parts.append(ringlist)
    if len(parts) == 1:
        return {"type": "Polygon", "coordinates": parts[0]}
    return {"type": "MultiPolygon", "coordinates": parts}


def _uuid4s(n: int) -> list[str]:
    """``n`` random (version 4) UUID strings, made in one go."""
    raw = np.frombuffer(os.urandom(16 * n), np.uint8).reshape(n, 16).copy()
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40  # version 4
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80  # RFC 4122 variant
    text = raw.tobytes().hex()
    return [
        f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
        for h in (text[32 * i : 32 * i + 32] for i in range(n))
    ]


def _classification(t: int, type_names: Mapping | None) -> dict:
    name, rgb = (type_names or {}).get(t, (f"Type {t}", None))
    out: dict = {"name": str(name)}
    if rgb is not None:
        out["color"] = [int(v) for v in list(rgb)[:3]]
    return out


def _clean_measurements(values: Mapping) -> dict:
    """Finite numbers only (JSON has no NaN), as plain floats."""
    out = {}
    for k, v in values.items():
        try:
            f = float(v)
        except (TypeError, ValueError, OverflowError):
            continue
        if math.isfinite(f):
            out[str(k)] = f
    return out


def _properties(lab_id: int, object_type: str, extra: dict) -> dict:
    meta = {f"{_META}label": str(lab_id)}
    status = (extra["status"] or {}).get(lab_id)
    if status is not None:
        meta[f"{_META}status"] = str(status)
    model = (extra["models"] or {}).get(lab_id) or extra["model"] or {}
    for key in ("name", "version"):
        if model.get(key) is not None:
            meta[f"{_META}model" + ("" if key == "name" else "_version")] = str(model[key])
    object_type = (extra["object_types"] or {}).get(lab_id) or object_type
    props: dict = {"objectType": object_type, "isLocked": False}
    t = (extra["types"] or {}).get(lab_id)
    if t is not None and int(t) > 0:
        props["classification"] = _classification(int(t), extra["type_names"])
    m = (extra["measurements"] or {}).get(lab_id)
    if m:
        props["measurements"] = _clean_measurements(m)
    props["metadata"] = meta
    return props


def _check_export_args(lab: np.ndarray, object_type: str, status, object_types) -> None:
    if lab.size and lab.max() > 2**32 - 1:
        raise InputError(
            f"labels: id {int(lab.max())} is above 2**32 - 1, the largest id GeoJSON "
            "export keeps; renumber the labels first"
        )
    for value in [object_type, *(object_types or {}).values()]:
        if value not in ("annotation", "detection"):
            raise InputError(f"object_type: expected 'annotation' or 'detection', got {value!r}")
    bad = sorted({str(s) for s in (status or {}).values()} - set(STATUSES))
    if bad:
        raise InputError(f"status: unknown value {bad[0]!r}; expected one of {', '.join(STATUSES)}")


def labels_to_features(
    labels: np.ndarray,
    *,
    offset: tuple[int, int] = (0, 0),
    scale: float = 1.0,
    object_type: str = "detection",
    status: Mapping[int, str] | None = None,
    types: Mapping[int, int] | None = None,
    type_names: Mapping[int, tuple] | None = None,
    measurements: Mapping[int, Mapping] | None = None,
    ids: Mapping[int, str] | None = None,
    model: Mapping[str, str] | None = None,
    object_types: Mapping[int, str] | None = None,
    models: Mapping[int, Mapping[str, str]] | None = None,
) -> dict:
    """A QuPath GeoJSON FeatureCollection with one feature per nucleus.

    Parameters
    ----------
    labels : ndarray
        2-D instance labels, 0 = background.
    offset : (int, int)
        (row, col) of ``labels[0, 0]`` in the slide's level-0 pixels (may be fractional
        when ``scale`` is not 1).
    scale : float
        Level-0 pixels per pixel of ``labels`` (labels of a coarser level: its
        downsample); positions are then ``offset + scale * (x, y)``, floats unless 1.
    object_type : {'detection', 'annotation'}
        QuPath object type of every feature.
    status : mapping, optional
        Label -> ``'predicted'``, ``'edited'`` or ``'verified'``.
    types : mapping, optional
        Label -> type number (0 or missing: no classification).
    type_names : mapping, optional
        Type number -> (name, (r, g, b) or None); default name ``"Type N"``.
    measurements : mapping, optional
        Label -> {measurement name: number}; non-finite values are left out.
    ids : mapping, optional
        Label -> UUID string to keep; other labels get a new UUID.
    model : mapping, optional
        ``{"name": ..., "version": ...}`` of the model that made the labels.
    object_types : mapping, optional
        Label -> object type, overriding ``object_type`` for those labels.
    models : mapping, optional
        Label -> ``{"name": ..., "version": ...}``, overriding ``model`` for those labels.

    Returns
    -------
    dict
        ``{"type": "FeatureCollection", "features": [...]}``, features by label;
        positions are ``(x, y)`` tuples of ints (JSON arrays once serialised).
    """
    lab = check_labels(labels, name="labels")
    _check_export_args(lab, object_type, status, object_types)
    with _no_gc():
        return _feature_collection(lab, offset, object_type, ids, scale=scale, extra={
            "status": status, "types": types, "type_names": type_names,
            "measurements": measurements, "model": model, "object_types": object_types,
            "models": models})  # fmt: skip


def _feature_collection(lab, offset, object_type: str, ids, extra: dict, scale=1.0) -> dict:
    """The FeatureCollection of :func:`labels_to_features` (arguments checked)."""
    rings = trace_labels(lab)
    if scale == 1:
        flat = (rings.xy + np.array([int(offset[1]), int(offset[0])])).ravel().tolist()
    else:  # float positions: a level's downsample need not be a whole number
        origin = np.array([float(offset[1]), float(offset[0])])
        flat = (rings.xy * float(scale) + origin).round(3).ravel().tolist()
    coords = list(zip(flat[::2], flat[1::2], strict=True))  # tuples: far faster than lists
    groups = sorted(_grouped_polygons(lab, rings).items())
    new_ids = iter(_uuid4s(len(groups)))
    features = []
    for lab_id, polys in groups:
        given = (ids or {}).get(lab_id)
        fresh = next(new_ids)
        features.append({
            "type": "Feature",
            "id": str(given) if given else fresh,
            "geometry": _geometry(rings, polys, coords),
            "properties": _properties(lab_id, object_type, extra),
        })  # fmt: skip
    return {"type": "FeatureCollection", "features": features}


def geojson_writer(labels: np.ndarray, **kwargs):
    """A writer (for :func:`napari_medinst._io.write_group`) of a GeoJSON file.

    Keyword arguments are those of :func:`labels_to_features`. The features are made
    now, so that bad arguments fail before anything is written.
    """
    data = json.dumps(labels_to_features(labels, **kwargs), separators=(",", ":"))
    return bytes_writer(data.encode("utf-8"))


def write_geojson(
    path: str | os.PathLike, labels: np.ndarray, *, overwrite: bool = False, **kwargs
) -> Path:
    """Write :func:`labels_to_features` to ``path`` atomically; returns the path."""
    return _atomic_write(Path(path), geojson_writer(labels, **kwargs), overwrite)


_QUPATH_NAMES = {
    "area_um2": "Area µm^2", "area_px": "Area px^2", "perimeter_um": "Perimeter µm",
    "perimeter_px": "Perimeter px", "equivalent_diameter_um": "Equivalent diameter µm",
    "equivalent_diameter_px": "Equivalent diameter px", "eccentricity": "Eccentricity",
    "solidity": "Solidity", "orientation_rad": "Orientation rad", "score": "Score",
    "mean_intensity": "Mean intensity",
}  # fmt: skip


def measurements_from_columns(columns: Mapping[str, np.ndarray]) -> dict[int, dict]:
    """Per-label measurement dicts (QuPath-style names) from table columns.

    ``columns`` is what :func:`napari_medinst.measure.measure_nuclei` returns: a
    ``label`` column and equally long value columns; centroids are left out (the
    geometry says where a nucleus is).
    """
    names = {}
    for col in columns:
        if col == "label" or col.startswith("centroid"):
            continue
        alt = col.replace("mean_intensity_", "Mean intensity channel ")
        names[col] = _QUPATH_NAMES.get(col, alt)
    ids = np.asarray(columns["label"]).astype(int).tolist()
    values = {col: np.asarray(columns[col], float).tolist() for col in names}
    return {i: {names[c]: values[c][k] for c in names} for k, i in enumerate(ids)}


# ------------------------------------------------------------------------ import


@dataclass
class ImportResult:
    """Labels made from GeoJSON features (see :func:`features_to_labels`).

    Attributes
    ----------
    labels : ndarray of uint32
        Instance labels, 0 = background.
    table : list of dict
        One row per label: ``id`` (label), ``uuid``, ``status``, ``type`` (number,
        0 = none), ``name`` (class name or None), ``color``, ``objectType``,
        ``measurements``, ``feature`` (index in the file).
    problems : list of str
        One line per feature skipped, clipped, renumbered or partly covered by an
        earlier one, and one for the features of other object types left out.
    offset : (int, int)
        (row, col) in slide pixels of ``labels[0, 0]``.
    """

    labels: np.ndarray
    table: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    offset: tuple[int, int] = (0, 0)


class _Bad(Exception):
    """A feature that cannot be imported (message without the file name)."""


def _where(i: int, feat) -> str:
    fid = feat.get("id") if isinstance(feat, dict) else None
    return f"feature {i}" + (f" (id {fid})" if fid is not None else "")


def _feature_list(fc, source: str) -> list:
    """The features of a FeatureCollection, a bare list of features or one Feature."""
    if isinstance(fc, dict) and fc.get("type") == "FeatureCollection":
        feats = fc.get("features")
        if not isinstance(feats, list):
            raise InputError(f"{source}: FeatureCollection without a 'features' list")
        return feats
    if isinstance(fc, dict) and fc.get("type") == "Feature":
        return [fc]
    if isinstance(fc, list) and all(isinstance(f, dict) and f.get("type") == "Feature" for f in fc):
        return fc
    what = fc.get("type") if isinstance(fc, dict) else type(fc).__name__
    raise InputError(f"{source}: not a GeoJSON FeatureCollection (found {what!r})")


def _geometry_of(feat) -> dict:
    """The geometry to rasterise: a cell's nucleus, else the feature's geometry."""
    if not isinstance(feat, dict):
        raise _Bad("is not a GeoJSON Feature object")
    props = feat.get("properties") or {}
    nucleus = feat.get("nucleusGeometry") or (
        props.get("nucleusGeometry") if isinstance(props, dict) else None
    )
    geom = nucleus or feat.get("geometry")
    if not isinstance(geom, dict):
        raise _Bad("has no geometry")
    if geom.get("type") not in ("Polygon", "MultiPolygon"):
        raise _Bad(
            f"is a {geom.get('type')}, not a Polygon or MultiPolygon (only areas can be labels)"
        )
    return geom


#: Largest coordinate accepted (pixels); beyond it a file cannot be of a real slide.
MAX_COORDINATE = 2.0**31


def _ring(raw) -> np.ndarray:
    try:
        arr = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise _Bad("has coordinates that are not pairs of numbers") from None
    if arr.ndim != 2 or arr.shape[1] < 2 or arr.shape[0] == 0:
        raise _Bad("has coordinates that are not a list of [x, y] positions")
    arr = arr[:, :2]
    if not np.all(np.isfinite(arr)):
        raise _Bad("has coordinates that are not finite numbers")
    if np.abs(arr).max() > MAX_COORDINATE:
        raise _Bad(f"has coordinates beyond ±{MAX_COORDINATE:.0f} pixels")
    if not np.array_equal(arr[0], arr[-1]):
        arr = np.vstack([arr, arr[:1]])
    return arr


def _polygons_of(geom: dict) -> list[list[np.ndarray]]:
    """Rings per polygon, each ring closed; empty or degenerate rings refused."""
    coords = geom.get("coordinates")
    polys = [coords] if geom["type"] == "Polygon" else coords
    if not isinstance(polys, list) or not polys:
        raise _Bad("has an empty polygon (no coordinates)")
    out = []
    for poly in polys:
        if not isinstance(poly, list) or not poly:
            raise _Bad("has an empty polygon (no coordinates)")
        rings = [_ring(r) for r in poly]
        if any(r.shape[0] < 4 for r in rings):
            raise _Bad("has an empty polygon (a ring of fewer than 3 corners)")
        out.append(rings)
    return out


def _byte(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255


def _color(cls: dict):
    rgb = cls.get("color")
    if rgb is not None:
        if not (isinstance(rgb, list) and len(rgb) in (3, 4) and all(_byte(v) for v in rgb)):
            raise _Bad(f"has a classification color that is not 3 integers 0-255: {rgb!r:.60}")
        return tuple(rgb[:3])
    packed = cls.get("colorRGB")
    if isinstance(packed, int) and not isinstance(packed, bool):
        packed &= 0xFFFFFF
        return ((packed >> 16) & 255, (packed >> 8) & 255, packed & 255)
    return None


def _class_of(props: dict) -> tuple[str | None, tuple | None]:
    cls = props.get("classification")
    if cls is None:
        return None, None
    if isinstance(cls, str):
        return cls, None
    if not isinstance(cls, dict):
        raise _Bad("has a classification that is neither an object nor a name")
    name = cls.get("name")
    if name is None and isinstance(cls.get("names"), list):
        name = ": ".join(str(n) for n in cls["names"])
    return (None if name is None else str(name)), _color(cls)


def _measurements_of(props: dict) -> dict:
    m = props.get("measurements")
    if m is None:
        return {}
    if isinstance(m, list):  # QuPath's older form: [{"name": ..., "value": ...}]
        try:
            m = {str(e["name"]): e.get("value") for e in m}
        except (TypeError, KeyError):
            raise _Bad("has measurements that are not {name, value} entries") from None
    if not isinstance(m, dict):
        raise _Bad("has measurements that are neither a dict nor a list")
    out = {}
    for k, v in m.items():
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        except OverflowError:
            raise _Bad(f"has a measurement {str(k)!r:.40} too large for a number") from None
        if math.isfinite(f):  # QuPath writes "NaN" (or null) for a missing value
            out[str(k)] = f
    return out


def _row_of(i: int, feat: dict) -> dict:
    props = feat.get("properties") or {}
    if not isinstance(props, dict):
        raise _Bad("has properties that are not an object")
    meta = props.get("metadata") if isinstance(props.get("metadata"), dict) else {}
    name, color = _class_of(props)
    status = meta.get(f"{_META}status")
    if status is not None and status not in STATUSES:
        raise _Bad(f"has an unknown review status {status!r} (expected {', '.join(STATUSES)})")
    return {
        "uuid": None if feat.get("id") is None else str(feat["id"]),
        "status": status,
        "name": name,
        "color": color,
        "objectType": props.get("objectType", props.get("object_type")),
        "measurements": _measurements_of(props),
        "model": meta.get(f"{_META}model"),
        "model_version": meta.get(f"{_META}model_version"),
        "feature": i,
        "_label": meta.get(f"{_META}label"),
    }


def _check_shape(shape, source: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in shape)
    except (TypeError, ValueError):
        raise InputError(f"{source}: image shape must be (rows, cols), got {shape!r}") from None
    if h < 1 or w < 1:
        raise InputError(f"{source}: image shape must be positive, got {shape!r}")
    return h, w


@dataclass
class _Parsed:
    rows: list = field(default_factory=list)
    polys: list = field(default_factory=list)  # per accepted feature: list of ring lists
    problems: list = field(default_factory=list)


def _type_numbers(rows: list[dict], type_names: Mapping | None, parsed: _Parsed, source: str,
                  strict: bool) -> None:  # fmt: skip
    """Give each row a type number: from ``type_names`` when given, else by first use."""
    known = {str(v[0]): int(k) for k, v in (type_names or {}).items()}
    auto = type_names is None
    for row in rows:
        name = row["name"]
        if name is None:
            row["type"] = 0
        elif name in known:
            row["type"] = known[name]
        elif auto:
            known[name] = row["type"] = max(known.values(), default=0) + 1
        else:
            msg = (f"{source}: feature {row['feature']}"
                   + (f" (id {row['uuid']})" if row["uuid"] else "")
                   + f": unknown classification {name!r} (known: {', '.join(known) or 'none'})")  # fmt: skip
            if strict:
                raise InputError(msg)
            parsed.problems.append(msg + "; imported without a type")
            row["type"] = 0


def _object_type_of(feat) -> str | None:
    props = feat.get("properties") if isinstance(feat, dict) else None
    if not isinstance(props, dict):
        return None
    value = props.get("objectType", props.get("object_type"))
    return value if isinstance(value, str) else None


def _check_object_types(object_types, source: str) -> tuple[str, ...] | None:
    if object_types is None:
        return None
    kinds = (object_types,) if isinstance(object_types, str) else tuple(object_types)
    bad = [k for k in kinds if k not in OBJECT_TYPES]
    if bad or not kinds:
        raise InputError(f"{source}: object_types: expected some of {', '.join(OBJECT_TYPES)}, "
                         f"got {bad[0] if bad else 'none'!r}")  # fmt: skip
    return kinds


def _select(feats: list, object_types, source: str) -> tuple[list[int], list[str]]:
    """Indices of the features to import, and a problem line for those left out.

    Default: the detections and cells when the file has any (a QuPath export of a
    tissue annotation with its nuclei), else every feature. Features without an
    ``objectType`` are always imported.
    """
    kinds = _check_object_types(object_types, source)
    types = [_object_type_of(f) for f in feats]
    if kinds is None:
        nuclei = {"detection", "cell"}
        kinds = tuple(nuclei) if nuclei & set(types) else OBJECT_TYPES
    keep = [i for i, t in enumerate(types) if t is None or t in kinds]
    out = sorted({t for t in types if t is not None and t not in kinds})
    if not out:
        return keep, []
    left = [i for i, t in enumerate(types) if t is not None and t not in kinds]
    shown = ", ".join(map(str, left[:10])) + (", ..." if len(left) > 10 else "")
    msg = (f"{source}: {len(left)} feature(s) of type {', '.join(out)} left out (features "
           f"{shown}); only {', '.join(sorted(kinds))} imported (choose with object_types / "
           "--object-types)")  # fmt: skip
    return keep, [msg]


def _parse(feats: list, keep: list[int], source: str, strict: bool) -> _Parsed:
    """Check the features ``keep``; keep the good ones (strict: raise on the first bad one)."""
    parsed = _Parsed()
    for i in keep:
        feat = feats[i]
        try:
            polys = _polygons_of(_geometry_of(feat))
            row = _row_of(i, feat)
        except _Bad as exc:
            msg = f"{source}: {_where(i, feat)} {exc}"
            if strict:
                raise InputError(msg) from None
            parsed.problems.append(msg + "; skipped")
            continue
        parsed.rows.append(row)
        parsed.polys.append(polys)
    return parsed


def _edges(polys: list, offset) -> dict[str, np.ndarray]:
    """All polygon edges with their polygon number and winding weight, and ring facts.

    The weight makes the inside of an exterior ring count +1 and the inside of a hole
    -1 whatever the ring's orientation, so a valid polygon's count is 0 or 1 everywhere.
    Also returned: each polygon's feature (``poly_feat``), each ring's feature and area
    (``ring_feat``, ``ring_area``) and each feature's bounding box (``lo``, ``hi``, as
    x, y in the label image's pixels).
    """
    rings, ring_poly, ring_sign, poly_feat, ring_feat = [], [], [], [], []
    for f, fpolys in enumerate(polys):
        for p in fpolys:
            for k, r in enumerate(p):
                rings.append(r)
                ring_poly.append(len(poly_feat))
                ring_sign.append(1.0 if k == 0 else -1.0)
                ring_feat.append(f)
            poly_feat.append(f)
    if not rings:
        rings = [np.zeros((0, 2))]
    lens = np.array([r.shape[0] for r in rings])
    pts = np.concatenate(rings) - np.array([offset[1], offset[0]], dtype=np.float64)
    ends = np.cumsum(lens)
    starts = ends - lens
    area = _signed_area2_closed(pts, starts, ends) if pts.size else np.zeros(0)
    ring_of = np.repeat(np.arange(len(ring_feat)), np.maximum(lens[: len(ring_feat)] - 1, 0))
    i0 = np.delete(np.arange(pts.shape[0]), ends[: len(ring_feat)] - 1)
    dy = pts[i0 + 1, 1] - pts[i0, 1]
    orient = np.sign(area)[ring_of] * np.asarray(ring_sign)[ring_of]
    feat_start = starts[np.searchsorted(ring_feat, np.arange(len(polys)))] if polys else starts[:0]
    return {
        "x0": pts[i0, 0], "y0": pts[i0, 1], "x1": pts[i0 + 1, 0], "y1": pts[i0 + 1, 1],
        "poly": np.asarray(ring_poly, np.int64)[ring_of], "w": -np.sign(dy) * orient,
        "poly_feat": np.asarray(poly_feat, np.int64), "ring_area": area,
        "ring_feat": np.asarray(ring_feat, np.int64),
        "lo": np.minimum.reduceat(pts, feat_start) if polys else pts[:0],
        "hi": np.maximum.reduceat(pts, feat_start) if polys else pts[:0],
    }  # fmt: skip


def _signed_area2_closed(pts: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Twice the signed area of closed rings ``pts[starts[k]:ends[k]]``."""
    cross = pts[:-1, 0] * pts[1:, 1] - pts[1:, 0] * pts[:-1, 1]
    cross = np.append(cross, 0.0)
    cross[ends - 1] = 0.0  # no edge from a ring's last point to the next ring
    return np.add.reduceat(cross, starts)


def _crossings(e: dict, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Where edges cross the rows' pixel centres: (polygon, row, x, weight), sorted."""
    lo, hi = np.minimum(e["y0"], e["y1"]), np.maximum(e["y0"], e["y1"])
    r0 = np.clip(np.ceil(lo - 0.5), 0, height).astype(np.int64)
    r1 = np.clip(np.ceil(hi - 0.5), 0, height).astype(np.int64)  # rows r0 .. r1-1
    n = np.maximum(r1 - r0, 0)
    edge = np.repeat(np.arange(n.size), n)
    row = r0[edge] + (np.arange(edge.size) - np.repeat(np.cumsum(n) - n, n))
    x0, y0 = e["x0"][edge], e["y0"][edge]
    x = x0 + (row + 0.5 - y0) * (e["x1"][edge] - x0) / (e["y1"][edge] - y0)
    poly = e["poly"][edge]
    srt = np.lexsort((x, row, poly))
    return poly[srt], row[srt], x[srt], e["w"][edge][srt]


def _runs(e: dict, shape) -> tuple[np.ndarray, ...]:
    """Pixel runs inside each polygon, and the polygons whose count leaves 0..1.

    Returns (polygon, row, first col, end col) of each run and the sorted numbers of
    polygons that cross themselves or whose holes are not inside them, as seen at the
    pixel centres.
    """
    h, w = shape
    poly, row, x, wt = _crossings(e, h)
    count = np.cumsum(wt)
    col = np.ceil(x - 0.5)
    same = (poly[1:] == poly[:-1]) & (row[1:] == row[:-1])
    c0, c1 = col[:-1], col[1:]
    has_px = same & (c1 > c0) & (c1 > 0) & (c0 < w)
    bad = np.unique(poly[:-1][has_px & ((count[:-1] < -0.5) | (count[:-1] > 1.5))])
    fill = has_px & (np.abs(count[:-1] - 1) < 0.5)
    return (poly[:-1][fill], row[:-1][fill], np.clip(c0[fill], 0, w).astype(np.int64),
            np.clip(c1[fill], 0, w).astype(np.int64), bad)  # fmt: skip


def _paint(shape, runs, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Paint runs in order (an earlier run keeps its pixels).

    Returns the labels and, per run, how many of its pixels went to another value.
    """
    h, w = shape
    poly, row, c0, c1 = runs
    n = c1 - c0
    start = np.repeat(row * w + c0 - (np.cumsum(n) - n), n)
    idx = start + np.arange(start.size)
    val = np.repeat(values[poly], n)
    out = np.zeros(h * w, np.uint32)
    out[idx] = val
    lost = np.zeros(n.size, np.int64)
    if np.count_nonzero(out) != idx.size:  # overlaps: the first run wins
        uniq, first = np.unique(idx, return_index=True)
        out[uniq] = val[first]
        lost = np.add.reduceat((out[idx] != val).astype(np.int64), np.cumsum(n) - n) * (n > 0)
    return out.reshape(h, w), lost


def _label_ids(rows: list[dict], problems: list[str], source: str) -> np.ndarray:
    """Label of each row: its stored label when a unique id 1 .. 2**32 - 1, else a new one.

    New ids are the smallest ids not in use; every stored label that had to change is
    reported in ``problems``.
    """
    want = []
    for row in rows:
        try:
            want.append(int(row["_label"]))
        except (TypeError, ValueError, OverflowError):
            want.append(0)
    out, used = np.zeros(len(rows), np.int64), set()
    for k, v in enumerate(want):
        if 0 < v <= 2**32 - 1 and v not in used:
            out[k] = v
            used.add(v)
    nxt = 0
    for k in np.flatnonzero(out == 0).tolist():
        nxt += 1
        while nxt in used:
            nxt += 1
        out[k] = nxt
        if rows[k]["_label"] is not None:
            why = "already used" if want[k] in used else "not an id from 1 to 2**32 - 1"
            problems.append(_feature_msg(source, rows[k],
                            f"has label {str(rows[k]['_label'])!r:.40} ({why}); renumbered to {nxt}"))  # fmt: skip
    return out


def _guess_region(polys: list, offset, source: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """(shape, offset) of the region: the features' bounding box (from ``offset`` if given).

    Refused when larger than :data:`napari_medinst._io.MAX_DECODE_PIXELS`.
    """
    from ._io import MAX_DECODE_PIXELS

    if not polys:
        return (0, 0), (0, 0) if offset is None else tuple(offset)
    pts = np.concatenate([r for fp in polys for p in fp for r in p])
    lo = np.floor(pts.min(axis=0)).astype(np.int64)
    hi = np.ceil(pts.max(axis=0)).astype(np.int64)
    off = (int(lo[1]), int(lo[0])) if offset is None else (int(offset[0]), int(offset[1]))
    shape = (max(int(hi[1]) - off[0], 0), max(int(hi[0]) - off[1], 0))
    if shape[0] * shape[1] > MAX_DECODE_PIXELS:
        raise InputError(
            f"{source}: the features span {shape[0]}x{shape[1]} px (from row {off[0]}, col "
            f"{off[1]}), above the {MAX_DECODE_PIXELS / 1e9:.0f} Gpx limit; give --shape and "
            "--offset of a smaller region"
        )
    return shape, off


def _drop(parsed: _Parsed, bad_feats: set, msgs: dict) -> None:
    keep = [k for k in range(len(parsed.rows)) if k not in bad_feats]
    for k in sorted(bad_feats):
        parsed.problems.append(msgs[k])
    parsed.rows = [parsed.rows[k] for k in keep]
    parsed.polys = [parsed.polys[k] for k in keep]


def _feature_msg(source: str, row: dict, what: str) -> str:
    uid = f" (id {row['uuid']})" if row["uuid"] else ""
    return f"{source}: feature {row['feature']}{uid} {what}"


def _reject(parsed: _Parsed, bad: set, what: str, source: str, strict: bool) -> None:
    """Bad features: raise for the first (strict), else drop them and list them."""
    msgs = {k: _feature_msg(source, parsed.rows[k], what) for k in bad}
    if strict:
        raise InputError(msgs[min(bad)])
    _drop(parsed, bad, {k: m + "; skipped" for k, m in msgs.items()})


def _check_bounds(e: dict, parsed: _Parsed, shape, offset, source: str, strict: bool) -> None:
    """Features reaching outside the image: an error (strict), else clipped and listed."""
    h, w = shape
    out = np.flatnonzero(np.any(e["lo"] < 0, axis=1) | (e["hi"][:, 0] > w) | (e["hi"][:, 1] > h))
    for k in out.tolist():
        (x0, y0), (x1, y1) = e["lo"][k] + offset[::-1], e["hi"][k] + offset[::-1]
        msg = _feature_msg(source, parsed.rows[k], (
            f"has coordinates outside the image (x {x0:g}..{x1:g}, y {y0:g}..{y1:g}; image "
            f"x {offset[1]}..{offset[1] + w}, y {offset[0]}..{offset[0] + h})"))  # fmt: skip
        if strict:
            raise InputError(msg + "; is the file of another image or region?")
        parsed.problems.append(msg + "; clipped to the image")


def _rasterise(parsed: _Parsed, shape, offset, source: str, strict: bool):
    """Edges and pixel runs of the good features; bad ones raise (strict) or are dropped."""
    e = _edges(parsed.polys, offset)
    empty = set(e["ring_feat"][e["ring_area"] == 0].tolist())
    if empty:
        _reject(parsed, empty, "has an empty polygon (a ring encloses no area)", source, strict)
        e = _edges(parsed.polys, offset)
    _check_bounds(e, parsed, shape, offset, source, strict)
    *runs, bad = _runs(e, shape)
    crossing = set(e["poly_feat"][bad].tolist())
    if crossing:
        what = "has a polygon that crosses itself or a hole outside it"
        _reject(parsed, crossing, what, source, strict)
        e = _edges(parsed.polys, offset)
        *runs, _ = _runs(e, shape)
    return e, runs


def features_to_labels(
    fc,
    shape: tuple[int, int] | None = None,
    *,
    offset: tuple[int, int] | None = None,
    source: str = "GeoJSON",
    strict: bool = True,
    type_names: Mapping[int, tuple] | None = None,
    object_types=None,
) -> ImportResult:
    """Rasterise GeoJSON features into an instance label image.

    A pixel belongs to a feature when its centre lies inside (holes excluded); for
    polygons along pixel edges this is exact. A feature never takes pixels from an
    earlier one (the pixels lost are reported).

    Parameters
    ----------
    fc : dict or list
        A FeatureCollection (or a list of Features, or one Feature), as parsed JSON.
    shape : (int, int), optional
        (rows, cols) of the label image; default: the features' bounding box (from
        ``offset`` when given), refused above 1 Gpx.
    offset : (int, int), optional
        (row, col) in slide pixels of the label image's top-left pixel; default: the
        bounding box's (floored) corner without ``shape``, else (0, 0).
    source : str
        Name of the file, used in every message.
    strict : bool
        True: raise :class:`InputError` at the first bad feature. False: skip bad
        features (clip those outside the image) and list them in ``problems``.
    type_names : mapping, optional
        Type number -> (name, rgb) of the known classes; a classification not among
        them is a problem. Default: every name gets a number in order of appearance.
    object_types : str or sequence of str, optional
        QuPath object types to import (of ``annotation``, ``detection``, ``cell``,
        ``tile``); default: detections and cells when the file has any, else all.
        Features left out are counted in ``problems``; those without a type are kept.

    Returns
    -------
    ImportResult
    """
    feats = _feature_list(fc, source)
    keep, left_out = _select(feats, object_types, source)
    parsed = _parse(feats, keep, source, strict)
    parsed.problems.extend(left_out)
    _type_numbers(parsed.rows, type_names, parsed, source, strict)
    if shape is None:
        shape, offset = _guess_region(parsed.polys, offset, source)
    else:
        shape, offset = _check_shape(shape, source), tuple(offset or (0, 0))
    e, runs = _rasterise(parsed, shape, offset, source, strict)
    ids = _label_ids(parsed.rows, parsed.problems, source)
    poly_value = np.asarray(ids, np.int64)[e["poly_feat"]] if ids.size else np.zeros(0, np.int64)
    labels, lost = _paint(shape, runs, poly_value)
    run_feat = e["poly_feat"][runs[0]]
    n_feat = len(parsed.rows)
    px = np.bincount(run_feat, weights=runs[3] - runs[2], minlength=n_feat).astype(np.int64)
    lost = np.bincount(run_feat, weights=lost, minlength=n_feat).astype(np.int64)
    table = _finish_rows(parsed, ids, px, lost, source, strict)
    problems = sorted(parsed.problems, key=_feature_number)
    return ImportResult(labels=labels, table=table, problems=problems,
                        offset=(int(offset[0]), int(offset[1])))  # fmt: skip


def _feature_number(msg: str) -> int:
    try:
        return int(msg.split(": feature ", 1)[1].split()[0])
    except (IndexError, ValueError):
        return -1


def _finish_rows(parsed: _Parsed, ids, px, lost, source: str, strict: bool) -> list[dict]:
    """Table rows of the features that kept pixels; problems for the others.

    ``px`` and ``lost`` are, per feature, the pixels inside it and those left to an
    earlier feature.
    """
    table = []
    for k, (row, lab_id) in enumerate(zip(parsed.rows, ids.tolist(), strict=True)):
        if px[k] == lost[k]:
            why = "covers no pixel centre" if px[k] == 0 else "lies under earlier features"
            msg = _feature_msg(source, row, why)
            if strict and px[k] == 0:
                raise InputError(msg)
            parsed.problems.append(msg + "; skipped")
            continue
        if lost[k]:
            what = f"overlaps earlier features: {lost[k]} px left to them"
            parsed.problems.append(_feature_msg(source, row, what))
        row = {key: v for key, v in row.items() if key != "_label"}
        table.append({"id": lab_id, **row})
    return table


def read_geojson(
    path: str | os.PathLike,
    shape: tuple[int, int] | None = None,
    *,
    offset: tuple[int, int] | None = None,
    strict: bool = True,
    type_names: Mapping[int, tuple] | None = None,
    object_types=None,
) -> ImportResult:
    """Read a QuPath GeoJSON file into labels (see :func:`features_to_labels`).

    Raises
    ------
    InputError
        The file is missing, not JSON or not a FeatureCollection, or (``strict``) a
        feature is bad; the message names the file and the feature.
    """
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as exc:
        from ._io import os_error_reason

        raise InputError(f"{path}: cannot read ({os_error_reason(exc)})") from None
    try:
        with _no_gc():
            data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a JSON file ({exc})") from None
    except RecursionError:
        raise InputError(f"{path}: not a usable JSON file (nested too deeply)") from None
    return features_to_labels(data, shape, offset=offset, source=str(path), strict=strict,
                              type_names=type_names, object_types=object_types)  # fmt: skip
