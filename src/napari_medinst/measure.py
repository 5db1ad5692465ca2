"""Per-nucleus measurements of a label image, and writing them as a CSV or Parquet table.

:func:`measure_nuclei` returns a dict of equally long columns, one row per nucleus, ordered
by label id. Lengths and areas are in micrometres when the pixel size is known, else in
pixels; the unit is part of the column name (``area_um2`` or ``area_px``) so that a table
never has to be read together with its image to be understood. :func:`write_table` writes
the columns atomically.
"""

from __future__ import annotations

import importlib.util
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ._io import InputError, _atomic_write, bytes_writer, check_labels

#: Shape measurements always computed (scikit-image ``regionprops`` names).
_SHAPE = ("centroid", "area", "perimeter", "equivalent_diameter_area", "eccentricity",
          "solidity", "orientation")  # fmt: skip
TABLE_SUFFIXES = (".csv", ".parquet")


def _check_image(image, shape: tuple[int, int]) -> np.ndarray:
    """The image as (Y, X) or (Y, X, C), of the labels' size."""
    img = np.asarray(image)
    if img.ndim not in (2, 3) or img.shape[:2] != shape:
        raise InputError(
            f"image: shape {img.shape} does not match the labels {shape} "
            "(expected (Y, X) or (Y, X, channels))"
        )
    if not (np.issubdtype(img.dtype, np.number) or img.dtype == bool):
        raise InputError(f"image: not numeric (dtype {img.dtype})")
    return img


def _score_column(ids: np.ndarray, scores) -> np.ndarray:
    """Scores by label id: ``scores`` maps id -> score, or ``scores[i]`` is id ``i + 1``'s."""
    out = np.full(ids.shape, np.nan)
    if isinstance(scores, Mapping):
        for k, lab in enumerate(ids):
            if int(lab) in scores:
                out[k] = float(scores[int(lab)])
        return out
    arr = np.asarray(scores, dtype=float).ravel()
    inside = ids <= arr.size
    out[inside] = arr[ids[inside] - 1]
    return out


def _unit_names(pixel_size: float | None) -> tuple[str, str]:
    return ("um", "um2") if pixel_size is not None else ("px", "px")


def measure_nuclei(
    labels: np.ndarray,
    image: np.ndarray | None = None,
    *,
    pixel_size: float | None = None,
    scores=None,
) -> dict[str, np.ndarray]:
    """Measure every nucleus of an instance label image.

    Parameters
    ----------
    labels : ndarray
        2-D instance labels, 0 = background.
    image : ndarray, optional
        The image, (Y, X) or (Y, X, C); adds the mean intensity per channel
        (``mean_intensity``, or ``mean_intensity_0`` ... for several channels).
    pixel_size : float, optional
        µm per pixel. When given, positions and lengths are in µm and areas in µm²
        (columns ``*_um``, ``area_um2``); otherwise in pixels (``*_px``).
    scores : mapping or sequence, optional
        Confidence per nucleus: ``{id: score}``, or an array whose item ``i`` belongs to
        id ``i + 1`` (as ``PostprocessResult.scores``). Missing ids get NaN.

    Returns
    -------
    dict of str to ndarray
        Columns ``label``, ``centroid_y_*``, ``centroid_x_*``, ``area_*``,
        ``perimeter_*``, ``equivalent_diameter_*``, ``eccentricity``, ``solidity``,
        ``orientation_rad`` (angle between the row axis and the major axis, as in
        scikit-image), then the intensity and ``score`` columns when asked for.

    Raises
    ------
    InputError
        The labels, image or pixel size cannot be used.
    """
    from skimage.measure import regionprops_table

    from .preprocess import check_pixel_size

    lab = check_labels(labels)
    scale = 1.0 if pixel_size is None else check_pixel_size(pixel_size)
    props = ["label", *_SHAPE]
    img = None
    if image is not None:
        img = _check_image(image, lab.shape)
        props.append("intensity_mean")
    t = regionprops_table(lab, intensity_image=img, properties=props)
    length, area = _unit_names(pixel_size)
    cols: dict[str, np.ndarray] = {"label": np.asarray(t["label"], dtype=np.int64)}
    cols[f"centroid_y_{length}"] = np.asarray(t["centroid-0"], float) * scale
    cols[f"centroid_x_{length}"] = np.asarray(t["centroid-1"], float) * scale
    cols[f"area_{area}"] = np.asarray(t["area"], float) * scale**2
    cols[f"perimeter_{length}"] = np.asarray(t["perimeter"], float) * scale
    cols[f"equivalent_diameter_{length}"] = np.asarray(t["equivalent_diameter_area"]) * scale
    for key in ("eccentricity", "solidity"):
        cols[key] = np.asarray(t[key], float)
    cols["orientation_rad"] = np.asarray(t["orientation"], float)
    cols.update(_intensity_columns(t, img))
    if scores is not None:
        cols["score"] = _score_column(cols["label"], scores)
    return cols


def _intensity_columns(table: dict, img: np.ndarray | None) -> dict[str, np.ndarray]:
    if img is None:
        return {}
    if img.ndim == 2:
        return {"mean_intensity": np.asarray(table["intensity_mean"], float)}
    return {
        f"mean_intensity_{c}": np.asarray(table[f"intensity_mean-{c}"], float)
        for c in range(img.shape[2])
    }


def _check_columns(columns: Mapping[str, Sequence]) -> dict[str, np.ndarray]:
    cols = {str(k): np.asarray(v) for k, v in columns.items()}
    if not cols:
        raise InputError("table: no columns to write")
    lengths = {len(v) if v.ndim else -1 for v in cols.values()}
    if len(lengths) != 1 or -1 in lengths:
        raise InputError(f"table: columns must be 1-D and equally long, got lengths {lengths}")
    return cols


def _parquet_writer(frame):
    if importlib.util.find_spec("pyarrow") is None:
        return None
    return lambda tmp: frame.to_parquet(tmp, engine="pyarrow", index=False)


def write_table(
    path: str | os.PathLike, columns: Mapping[str, Sequence], *, overwrite: bool = False
) -> Path:
    """Write columns (e.g. from :func:`measure_nuclei`) as a CSV or Parquet file, atomically.

    Parameters
    ----------
    path : path-like
        Ends in ``.csv`` (always available) or ``.parquet`` (needs ``pyarrow``).
    columns : mapping of str to sequence
        Equally long 1-D columns.
    overwrite : bool
        Whether an existing file may be replaced.

    Returns
    -------
    Path
        The file written.

    Raises
    ------
    InputError
        Unknown suffix, unequal columns, or Parquet without ``pyarrow``.
    FileExistsError
        ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    return _atomic_write(path, table_writer(path, columns), overwrite)


def table_writer(path: str | os.PathLike, columns: Mapping[str, Sequence]):
    """A writer ``f(tmp_path)`` of the table for ``path``'s format (for ``_io.write_group``).

    Raises
    ------
    InputError
        Unknown suffix, unequal columns, or Parquet without ``pyarrow``.
    """
    import pandas as pd

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise InputError(
            f"{path}: a table must end in .csv or .parquet, not {suffix or '(none)'!r}"
        )
    frame = pd.DataFrame(_check_columns(columns))
    if suffix == ".csv":
        buf = io.StringIO()
        frame.to_csv(buf, index=False, lineterminator="\n")
        return bytes_writer(buf.getvalue().encode("utf-8"))
    write = _parquet_writer(frame)
    if write is None:
        raise InputError(
            f"{path}: writing Parquet needs the pyarrow package "
            "(pip install 'napari-medinst[io]'); or write a .csv instead"
        )
    return write


def as_features(columns, existing=None):
    """A napari Labels ``features`` table: one row per label, ``index`` = the label id.

    Parameters
    ----------
    columns : mapping or DataFrame
        Measurements with a ``label`` column (as :func:`measure_nuclei` returns).
    existing : DataFrame, optional
        The layer's current features (e.g. ``score``, ``type``); kept, matched on
        ``label`` (or ``index``); its columns of the same name as a measurement are
        replaced by the new values.

    Returns
    -------
    pandas.DataFrame
    """
    import pandas as pd

    frame = pd.DataFrame(columns).reset_index(drop=True)
    frame.insert(0, "index", frame["label"].astype("int64"))
    if existing is None or len(existing.columns) == 0:
        return frame
    old = pd.DataFrame(existing).reset_index(drop=True)
    if "label" in old:
        old = old.drop(columns=["index"], errors="ignore")
    elif "index" in old:
        old = old.rename(columns={"index": "label"})
    else:
        return frame
    old = old.drop(columns=[c for c in frame if c in old and c != "label"])
    return frame.merge(old.drop_duplicates("label"), how="left", on="label")
