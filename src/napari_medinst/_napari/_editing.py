"""Ground-truth editing in napari: start a ground truth, edit it in one undoable step per action.

The pure operations live in :mod:`napari_medinst.editing`; this module applies them to a
:class:`napari.layers.Labels` layer.  Every action writes only the pixels that change,
through :meth:`Labels.data_setitem`, inside :meth:`Labels.block_history`, so it is *one*
step in the layer's undo history (Ctrl+Z / Ctrl+Shift+Z).

Key bindings on a ground-truth layer (none of them is a napari Labels default):

====================  =======================================================
key                   action
====================  =======================================================
``N``                 new nucleus: select the next free id and the paint brush
``D``                 delete the nucleus under the cursor
``S``                 add / remove the nucleus under the cursor to the selection
``G``                 merge the selected nuclei (with fewer than two selected:
                      merge the nucleus under the cursor into the current label)
``K``                 split ("knife"): then click two seeds in one nucleus, or
                      drag a line across it; the mode stays on for the next
                      cut until ``K`` or ``Escape``
``J``                 join: drag across the pieces of one nucleus (a split
                      prediction) to make them one; stays on like ``K``
``A``                 add the nucleus under the cursor, grown from the model maps
                      (or the image)
``O``                 refine the outline of the nucleus under the cursor
``.`` / ``,``         grow / shrink the nucleus under the cursor by one pixel
``Q``                 outline a nucleus: click its corners, then ``Enter`` or a
                      double-click (or drag a lasso). Over most of a nucleus it
                      redraws that one, else adds one; it never takes pixels of
                      verified or edited nuclei. Stays on like ``K``: ``Q`` or
                      ``Escape`` ends it (and drops unfinished corners)
``H``                 fill the holes of every nucleus
``R``                 remove nuclei and fragments smaller than the minimum size
``Shift-R``           relabel sequentially (1..N)
``W``                 mark the nucleus under the cursor verified (again: unmark)
``C``                 show / hide the review status colours
====================  =======================================================

The three modes (``K``, ``J``, ``Q``) stay on through the one-key actions under the
cursor (``D``, ``A``, ``O``, ``.``, ``,``, ``S``, ``G``, ``W`` ...), so a whole tile can
be corrected in, say, the outline mode: a lasso per wrong outline and a key per false
positive.  Choosing another mode, the brush (``N``) or one of napari's own tools ends
the one that is on; while a split seed or outline corners are pending, the tools that
redraw outlines (``A``, ``O``, ``.``, ``,``, ``K``, ``J``, ``Q``, ``N``) refuse.  In a mode a
drag draws: hold ``Space`` to pan with the mouse, as elsewhere in napari.

Per-nucleus review status (``predicted`` / ``edited`` / ``verified``) is kept in the
layer's ``features`` table (columns ``index``, ``label``, ``status``): a nucleus changed
by any edit (these actions or the brush) becomes ``edited``; ``W`` marks it
``verified``.  It is saved inside the labels TIFF and as CSV beside it
(:func:`status_path`; see :mod:`napari_medinst.recovery` for why a stale CSV is never
paired with newer labels).

The model-aware tools (``A``, ``O``, and ``K``'s two-click split) use the model maps of
the prediction the ground truth was copied from (``metadata["source"] == "copy of
<name>"``): that layer's cached post-processor (:data:`._contract.POSTPROCESSOR_KEY`,
read, never run) and its parameters.  ``A`` and ``O`` also read the image under the
labels (the prediction's source image, else an image layer of the same size): without
maps both grow from it; with maps ``O`` moves the outline to its strongest edge.
Without maps ``K`` floods the distance transform (:mod:`napari_medinst.correct`).  A tool that
cannot act leaves the labels unchanged and says why (a warning and the status bar).

Each editor also remembers where its editing began (:meth:`GroundTruthEditor.rebase`):
the source file (:func:`layer_origin`), the hash of the labels and their statuses then.
The autosave of the Evaluate widget uses these to name what the edits belong to.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from napari.layers import Image, Labels
from napari.utils.colormaps import DirectLabelColormap
from napari.utils.notifications import show_info, show_warning
from qtpy.QtCore import QTimer

from .. import correct, editing, recovery
from .._io import InputError, check_labels, free_name
from ..postprocess import PostprocessParams
from ._common import ROLE, unwrap
from ._contract import PARAMS_KEY, POSTPROCESSOR_KEY, param_state

__all__ = [
    "GT_KEY",
    "KEY_BINDINGS",
    "STATUS_COLOURS",
    "GroundTruthEditor",
    "editor_for",
    "existing_editor",
    "layer_origin",
    "load_ground_truth",
    "start_from_prediction",
    "status_path",
]

logger = logging.getLogger(__name__)

#: Metadata key marking a Labels layer as ground truth (never written by the model).
GT_KEY = "ground_truth"
#: Colour of each review status when the status colours are shown.
STATUS_COLOURS = {"predicted": "#8c96a8", "edited": "#ff9f1a", "verified": "#27c24c"}
#: Minimum nucleus size (px) used by "remove fragments" unless changed in the widget.
DEFAULT_MIN_SIZE = 30

#: (key, method name, description) of every key binding on a ground-truth layer.
KEY_BINDINGS: tuple[tuple[str, str, str], ...] = (
    ("N", "paint_new", "new nucleus: next free id + paint brush"),
    ("D", "delete_at_cursor", "delete the nucleus under the cursor"),
    ("S", "toggle_select_at_cursor", "add/remove the nucleus under the cursor to the selection"),
    ("G", "merge_at_cursor", "merge the selected nuclei"),
    ("K", "toggle_split_mode", "split: two clicks (seeds) or drags (cut lines); K again ends"),
    ("J", "toggle_join_mode", "join: drag across the pieces of one nucleus; J again ends"),
    ("A", "add_nucleus_at_cursor", "add the nucleus under the cursor (from the model maps)"),
    ("O", "refine_outline_at_cursor", "refine the outline of the nucleus under the cursor"),
    (".", "grow_at_cursor", "grow the nucleus under the cursor by one pixel"),
    (",", "shrink_at_cursor", "shrink the nucleus under the cursor by one pixel"),
    ("Q", "toggle_polygon_mode", "outline or redraw nuclei: clicks + Enter, or drags; Q ends"),
    ("H", "fill_holes", "fill holes in every nucleus"),
    ("R", "remove_small", "remove nuclei/fragments below the minimum size"),
    ("Shift-R", "relabel", "relabel sequentially"),
    ("W", "toggle_verified_at_cursor", "mark the nucleus under the cursor verified"),
    ("C", "toggle_status_colours", "show/hide the review status colours"),
)

_ATTR = "_napari_medinst_editor"  # the layer keeps its editor alive (not in metadata)
#: Metadata key of the Segment panel's outputs naming the image they were made from.
SOURCE_KEY = "napari_medinst_source"


def _drag_path(layer, event, path: list) -> Iterator[None]:
    """Collect a mouse press and its drag into ``path`` (data row, col), for a callback."""
    path.append(tuple(layer.world_to_data(event.position)[-2:]))
    yield
    while event.type == "mouse_move":
        path.append(tuple(layer.world_to_data(event.position)[-2:]))
        yield


def status_path(labels_path: str | Path) -> Path:
    """Where the status table of a labels file is saved: ``<stem>_status.csv`` beside it."""
    p = Path(labels_path)
    return p.with_name(f"{p.stem}_status.csv")


def layer_origin(layer: Any) -> tuple[str | None, str]:
    """The labels file a layer comes from (absolute path, or None) and a short description.

    The path is ``metadata["path"]`` (set when loaded or saved here) or the file napari
    opened the layer from (``layer.source.path``); its description is ``folder/name``.
    Without one the description says what the layer was started from, e.g.
    ``new from prediction 'x'``.
    """
    md = layer.metadata if isinstance(layer.metadata, dict) else {}
    path = md.get("path") or getattr(getattr(layer, "source", None), "path", None)
    if path:
        p = Path(str(path)).expanduser().resolve()
        return str(p), f"{p.parent.name}/{p.name}" if p.parent.name else p.name
    source = str(md.get("source") or "")
    if source.startswith("copy of "):
        return None, f"new from prediction '{source[len('copy of ') :]}'"
    return None, f"new layer '{layer.name}'" + (f" ({source})" if source else "")


def _free_name(viewer, base: str) -> str:
    return free_name(base, {layer.name for layer in viewer.layers})


def start_from_prediction(viewer, prediction: Labels, name: str | None = None) -> Labels:
    """Add a ground-truth layer that starts as a *copy* of ``prediction``.

    The copy never shares memory with the prediction, so editing one never changes
    the other; re-running the model writes only the prediction layer.
    """
    data = np.array(prediction.data, copy=True)
    layer = viewer.add_labels(
        data,
        # a copy of "x ground truth" is "x ground truth (2)", not "... ground truth ground truth"
        name=_free_name(
            viewer, name or f"{prediction.name.removesuffix(' ground truth')} ground truth"
        ),
        scale=prediction.scale,
        translate=prediction.translate,
        opacity=0.6,
        metadata={GT_KEY: True, "source": f"copy of {prediction.name}"},
    )
    editor_for(viewer, layer, default_status="predicted")
    return layer


def load_ground_truth(viewer, path: str | Path, like: Any = None) -> Labels:
    """Add a ground-truth layer read from a labels file (and its statuses if saved).

    ``like`` (a layer) gives scale and translate, and its shape is checked.  The
    statuses come from :func:`napari_medinst.recovery.read_ground_truth`: a status CSV
    that belongs to other labels is ignored with a warning when the TIFF carries its own
    table (a crash during a save), else loaded for the ids still present, with a warning.

    Raises
    ------
    InputError
        If the file is not a 2-D non-negative integer label image, its shape differs
        from ``like``'s, or the status CSV is malformed.
    """
    path = Path(path)
    data, status, warning = recovery.read_ground_truth(path, status_path(path))
    if like is not None and tuple(like.data.shape[-2:]) != data.shape:
        raise InputError(
            f"{path}: labels shape {data.shape} differs from '{like.name}' "
            f"{tuple(like.data.shape[-2:])}"
        )
    if warning:
        show_warning(warning)
    kwargs = {}
    if like is not None:
        kwargs = {"scale": like.scale[-2:], "translate": like.translate[-2:]}
    layer = viewer.add_labels(
        np.array(data, copy=True),
        name=_free_name(viewer, path.stem),
        opacity=0.6,
        metadata={GT_KEY: True, "source": str(path), "path": str(path)},
        **kwargs,
    )
    editor = editor_for(viewer, layer)  # may exist already (made on the layer's insertion)
    if status:
        editor.load_status(status)
    editor.dirty = False
    editor.rebase()  # editing begins here: this file, these labels and statuses
    return layer


def editor_for(viewer, layer: Labels, **kwargs: Any) -> GroundTruthEditor:
    """The editor attached to ``layer`` (created, with key bindings, on first use)."""
    viewer, layer = unwrap(viewer), unwrap(layer)
    editor = getattr(layer, _ATTR, None)
    if editor is None:
        editor = GroundTruthEditor(viewer, layer, **kwargs)
        setattr(layer, _ATTR, editor)
    return editor


def existing_editor(layer: Any) -> GroundTruthEditor | None:
    """The editor already attached to ``layer``, if any."""
    return getattr(unwrap(layer), _ATTR, None)


def _layer_params(layer: Any) -> PostprocessParams | None:
    """The post-processing parameters a prediction layer was made with, if recorded."""
    state = param_state(layer)
    if state is not None:
        return state.params
    text = layer.metadata.get(PARAMS_KEY)
    try:
        return PostprocessParams.from_json(text) if text else None
    except ValueError:
        return None


def _atom_ids(atom: Any) -> np.ndarray:
    """Label ids touched by one napari history atom (old and new values)."""
    if hasattr(atom, "old_values"):  # _MaskedPaintAtom
        old, new = atom.old_values, atom.new_value
    else:  # (indices, old values, new values)
        _, old, new = atom
    return np.union1d(np.asarray(old).ravel(), np.asarray(new).ravel())


class GroundTruthEditor:
    """Editing actions, key bindings and review status on one ground-truth Labels layer.

    Parameters
    ----------
    viewer : napari.Viewer
    layer : Labels
        A 2-D labels layer; it is marked ``metadata["ground_truth"] = True``.
    status : dict, optional
        Initial status per id (e.g. read from CSV); others get ``default_status``.
    default_status : str
        Status of nuclei without one.
    bind_keys : bool
        Install the key bindings (:data:`KEY_BINDINGS`) on the layer.
    """

    def __init__(
        self,
        viewer,
        layer: Labels,
        *,
        status: dict[int, str] | None = None,
        default_status: str = "predicted",
        bind_keys: bool = True,
    ) -> None:
        if layer.ndim != 2:
            raise InputError(f"'{layer.name}': ground-truth editing needs a 2-D labels layer")
        check_labels(np.asarray(layer.data), f"'{layer.name}'")
        self._viewer_ref = weakref.ref(viewer)
        self._layer_ref = weakref.ref(layer)
        self.min_size = DEFAULT_MIN_SIZE
        self.selection: set[int] = set()
        self.split_seeds: list[tuple[float, float]] = []
        self.split_mode = False
        self.join_mode = False
        self.polygon_mode = False
        self.polygon_points: list[tuple[float, float]] = []
        #: Model maps for the correction tools (None: those of the source prediction).
        self.maps: Any = None
        #: Image for the correction tools without maps (None: the image under the labels).
        self.image: Any = None
        #: ``callback(text)`` for the message of every refused action (a panel's status).
        self.on_message: list[Callable[[str], None]] = []
        self.dirty = False
        #: Counts the changes (every notification); a change of it means new edits.
        self.revision = 0
        #: The autosave file holding this layer's edits, once written or restored.
        self.recovery_file: Path | None = None
        #: ``revision`` at which the user discarded the unsaved edits (no autosave then).
        self.discarded_revision: int | None = None
        self.on_change: list[Callable[[], None]] = []
        self._default = default_status
        self._known: dict[int, str] = dict(status or {})
        self._before_verify: dict[int, str] = {}
        self._applying = False
        self._stale = False
        self._pending_prev: dict[int, str | None] = {}
        self._flush_timer = QTimer()
        self._flush_timer.setSingleShot(True)
        self._flush_timer.timeout.connect(self._flush)
        self._status_cmap = None
        self._saved_cmap = None
        self._saved_mouse_pan = True
        self._entering = False  # a mode is being entered: its own tool changes are not napari's
        layer.metadata[GT_KEY] = True
        self._sync_status(edited=())
        self.rebase()
        layer.events.paint.connect(self._on_paint)
        layer.events.data.connect(self._on_data)
        layer.events.set_data.connect(self._on_set_data)
        layer.events.mode.connect(self._on_layer_mode)
        if bind_keys:
            self._bind_keys(layer)

    # ------------------------------------------------------------------ plumbing

    @property
    def layer(self) -> Labels | None:
        return self._layer_ref()

    @property
    def viewer(self):
        return self._viewer_ref()

    def _say(self, text: str) -> None:
        viewer = self.viewer
        if viewer is not None:
            viewer.status = text

    def _bind_keys(self, layer: Labels) -> None:
        for key, method, _ in KEY_BINDINGS:
            action = getattr(self, method)

            def run(_layer, action=action):
                self._guarded(action)

            layer.bind_key(key, run, overwrite=True)

    def _guarded(self, action: Callable[[], Any]) -> Any:
        """Run a key action; problems become a warning (and a message) instead of a traceback."""
        try:
            return action()
        except (ValueError, InputError) as exc:
            self.tell(str(exc))
            show_warning(str(exc))
        return None

    def tell(self, text: str) -> None:
        """Show ``text`` in the status bar and pass it to the ``on_message`` callbacks."""
        self._say(text)
        for callback in list(self.on_message):
            try:
                callback(text)
            except Exception:  # a broken listener must not break editing
                logger.exception("ground-truth message listener failed")

    def cursor_point(self) -> tuple[float, float]:
        """Cursor position in the layer's data coordinates (row, col)."""
        layer = self.layer
        viewer = self.viewer
        if viewer is None:
            raise ValueError("the viewer is closed")
        pos = layer.world_to_data(viewer.cursor.position)
        return float(pos[-2]), float(pos[-1])

    def _data(self) -> np.ndarray:
        return np.asarray(self.layer.data)

    def apply(self, edit: editing.Edit, what: str) -> bool:
        """Write ``edit`` to the layer as one undoable step; False when nothing changed."""
        if not edit.changed:
            show_info(f"{what}: nothing to change.")
            return False
        self.write(edit.indices, edit.values)
        return True

    def write(self, indices: tuple[np.ndarray, ...], values: np.ndarray) -> None:
        """Set pixels as one undoable step (``Labels.data_setitem`` in one history block)."""
        layer = self.layer
        if not layer.visible:
            # napari writes into the displayed slice too, which a never-shown layer lacks;
            # and an edit should be seen anyway
            layer.visible = True
        with layer.block_history():
            layer.data_setitem(indices, values)

    def write_rerun(
        self, indices: tuple[np.ndarray, ...], values: np.ndarray, kept: Iterable[int]
    ) -> None:
        """Write a re-segmentation as one undoable step: it is not an edit of the nuclei.

        The nuclei in ``kept`` (left unchanged by the re-run) keep their status; every
        other nucleus present afterwards is new and gets the default status.
        """
        self._flush()
        self._applying = True
        try:
            self.write(indices, values)
        finally:
            self._applying = False
        keep = {int(i) for i in kept}
        for i in editing.present_ids(self._data()).tolist():
            if i not in keep:
                self._known[i] = self._default
                self._before_verify.pop(i, None)
        self._stale = False
        self._pending_prev = {}
        self._sync_status(edited=())
        self.dirty = True
        self._notify()

    @property
    def busy(self) -> str | None:
        """What is in progress (a split or an outline), or None when idle."""
        if self.split_mode and self.split_seeds:
            return "a split is in progress (click the second seed, or press K to cancel)"
        if self.polygon_mode and self.polygon_points:
            return "an outline is in progress (finish it with Enter, or press Escape to cancel)"
        return None

    def rebase(self) -> None:
        """Take the layer as it is now as the start of editing (on creation, load, save).

        Sets ``source_path`` and ``origin`` (:func:`layer_origin`), ``base_sha256``
        (:func:`napari_medinst.recovery.labels_sha256` of the labels) and
        ``base_status`` (the status of every nucleus).
        """
        self._flush()
        self.source_path, self.origin = layer_origin(self.layer)
        self.base_sha256 = recovery.labels_sha256(self._data())
        self.base_status = dict(self._current)

    def changed_nuclei(self) -> int:
        """Nuclei added, deleted or with a new status since editing began."""
        return recovery.changed_nuclei(self.base_status, self.status)

    def _notify(self) -> None:
        self.revision += 1
        for callback in list(self.on_change):
            try:
                callback()
            except Exception:  # a broken listener must not break editing
                logger.exception("ground-truth change listener failed")

    # ------------------------------------------------------------------ status

    @property
    def status(self) -> dict[int, str]:
        """Status of every nucleus present, by id."""
        self._flush()
        return dict(self._current)

    def _sync_status(self, edited: Iterable[int]) -> None:
        ids = editing.present_ids(self._data())
        self._current = editing.update_status(
            self._known, ids, edited=edited, default=self._default
        )
        self._known.update(self._current)
        self._write_features()

    def _write_features(self) -> None:
        layer = self.layer
        layer.features = pd.DataFrame(editing.status_columns(self._current))
        if self._status_cmap is not None:
            self._apply_status_colours()

    def set_status(self, ids: Iterable[int], status: str) -> None:
        """Set the review status of nuclei (ids not present are ignored)."""
        if status not in editing.STATUSES:
            raise ValueError(f"unknown status {status!r}")
        self._flush()
        for i in ids:
            if int(i) in self._current:
                self._current[int(i)] = status
                self._known[int(i)] = status
        self.dirty = True
        self._write_features()
        self._notify()

    def load_status(self, status: dict[int, str]) -> None:
        """Replace the known statuses (e.g. read from CSV) and refresh the table."""
        self._flush()
        self._known.update({int(k): str(v) for k, v in status.items()})
        for i, v in status.items():
            if int(i) in self._current:
                self._current[int(i)] = str(v)
        self._sync_status(edited=())

    def status_csv(self) -> str:
        """The status table as CSV with the labels' hash (:func:`recovery.status_csv`)."""
        self._flush()
        return recovery.status_csv(self._current, recovery.labels_sha256(self._data()))

    def _on_paint(self, event) -> None:
        # napari emits "paint" when it records the history, which for a single
        # data_setitem / paint call is *before* the pixels are written: remember the
        # touched ids as edited now and read the ids present once the write is done
        # (on the next event-loop turn, or whenever the status is read).
        if not self._applying:
            try:
                touched = [_atom_ids(atom) for atom in event.value]
                for i in np.unique(np.concatenate(touched)) if touched else ():
                    i = int(i)
                    if i != 0:
                        self._pending_prev.setdefault(i, self._known.get(i))
                        self._known[i] = "edited"
            except Exception:  # an unknown history format: resync without marking
                logger.debug("could not read the paint event's history item", exc_info=True)
        self.dirty = True
        self._stale = True
        self._flush_timer.start(0)
        self._notify()

    def _flush(self) -> None:
        """Bring the status table up to date with the pixels, if an edit is pending."""
        if self._stale and self.layer is not None:
            self._stale = False
            present = set(editing.present_ids(self._data()).tolist())
            for i, prev in self._pending_prev.items():
                if i not in present:  # deleted: keep its old status should an undo bring it back
                    if prev is None:
                        self._known.pop(i, None)
                    else:
                        self._known[i] = prev
            self._pending_prev = {}
            self._sync_status(edited=())

    def _on_data(self, event=None) -> None:
        if self._applying:
            return
        self.dirty = True
        self._stale = True
        self._flush()
        self._notify()

    def _on_set_data(self, event=None) -> None:
        # undo / redo only refresh the layer: resync the ids present
        if self._applying:
            return
        if self._stale:
            self._flush()
            return
        ids = editing.present_ids(self._data())
        if set(ids.tolist()) != set(self._current):
            self.dirty = True
            self._sync_status(edited=())
            self._notify()

    # ------------------------------------------------------------------ actions

    def paint_new(self) -> int:
        """Select the next free id and the paint brush; returns that id."""
        self._require_idle("New nucleus", tool="paint")
        layer = self.layer
        new_id = editing.next_free_id(self._data())
        layer.selected_label = new_id
        layer.mode = "paint"
        return new_id

    def delete_at(self, point: Sequence[float]) -> bool:
        """Delete the nucleus at ``point`` (data row, col)."""
        edit = editing.delete_at(self._data(), point)
        if not edit.changed:
            show_info("No nucleus under the cursor.")
            return False
        self.selection -= set(edit.removed_ids)
        return self.apply(edit, "Delete")

    def delete_at_cursor(self) -> bool:
        return self.delete_at(self.cursor_point())

    def toggle_select(self, point: Sequence[float]) -> set[int]:
        """Add the nucleus at ``point`` to the merge selection, or remove it."""
        i = editing.label_at(self._data(), point)
        if i == 0:
            show_info("No nucleus under the cursor.")
        elif i in self.selection:
            self.selection.discard(i)
        else:
            self.selection.add(i)
        self._say(f"Selected nuclei: {sorted(self.selection) or 'none'}")
        return set(self.selection)

    def toggle_select_at_cursor(self) -> set[int]:
        return self.toggle_select(self.cursor_point())

    def merge(self, ids: Iterable[int]) -> bool:
        """Merge nuclei into the smallest of their ids."""
        edit = editing.merge(self._data(), ids)
        ok = self.apply(edit, "Merge")
        self.selection.clear()
        return ok

    def merge_at_cursor(self) -> bool:
        """Merge the selection; without one, the nucleus under the cursor and the current label."""
        ids = set(self.selection)
        if len(ids) < 2:
            ids |= {editing.label_at(self._data(), self.cursor_point()), self.layer.selected_label}
        return self.merge(ids)

    def split(self, seeds: Sequence[Sequence[float]]) -> bool:
        """Split the nucleus holding two ``seeds`` (data row, col) between them.

        Floods the model's HV energy when maps are available, else the distance
        transform, fairly from both seeds (:func:`napari_medinst.correct.split_two_seeds`).
        """
        maps, _, params = self.correction_inputs(need_image=False)
        edit = correct.split_two_seeds(self._data(), seeds, maps, params=params)
        return self.apply(edit, "Split")

    def split_along(self, line: Sequence[Sequence[float]]) -> bool:
        """Cut the nuclei a polyline (data row, col vertices) crosses."""
        edit = editing.split_by_line(self._data(), line)
        if not edit.changed:
            show_info("The line does not cut any nucleus in two; draw it across a nucleus.")
            return False
        return self.apply(edit, "Cut")

    def add_split_seed(self, point: Sequence[float]) -> bool | None:
        """Record a split seed; the second one performs the split (True if it changed)."""
        self.split_seeds.append((float(point[-2]), float(point[-1])))
        if len(self.split_seeds) < 2:
            self._say("Split: click the second seed in the same nucleus.")
            return None
        seeds, self.split_seeds = self.split_seeds, []
        done = self.split(seeds)
        self._say_still_splitting(done)
        return done

    def _say_still_splitting(self, done: bool) -> None:
        if done and self.split_mode:  # the mode stays on: merged clusters take several cuts
            self._say("Split done. Cut the next nucleus, or press K or Escape to finish.")

    def toggle_split_mode(self) -> bool:
        """Enter split mode (clicks are seeds, a drag is a cut line), or leave it.

        The mode stays on after each split or cut (a cluster of merged nuclei takes
        several), until ``K`` again or ``Escape``; each cut is its own undo step.
        """
        if self.split_mode:
            self._stroke_escape()
            return False
        self._require_idle("Split", tool="split")
        layer = self.layer
        self.split_mode = True
        self.split_seeds = []
        self._enter_stroke_mode(layer, self._split_mouse, self._stroke_escape)
        self._say("Split: click two seeds in a nucleus, or drag lines across nuclei "
                  "(K or Escape ends).")  # fmt: skip
        return True

    def _on_layer_mode(self, _event=None) -> None:
        """napari's own tool (paint, erase, fill ...) chosen: a mode of ours ends.

        Otherwise one drag would both paint and cut (or outline).  napari's tool keeps the
        mouse as napari set it.
        """
        layer = self.layer
        if layer is None or layer.mode == "pan_zoom" or self._entering:
            return
        modes = (
            (self.split_mode, self._leave_split_mode, "Split"),
            (self.join_mode, self._leave_join_mode, "Join"),
            (self.polygon_mode, self._leave_polygon_mode, "Outline"),
        )
        for on, leave, name in modes:
            if on:
                pan, cursor = layer.mouse_pan, layer.cursor
                leave()
                layer.mouse_pan, layer.cursor = pan, cursor
                self._say(f"{name} mode off: napari's {layer.mode} tool is on.")

    def _stroke_escape(self, _layer=None) -> None:
        """Escape in the split or the join mode: leave it."""
        for on, leave, name in ((self.split_mode, self._leave_split_mode, "Split"),
                                (self.join_mode, self._leave_join_mode, "Join")):  # fmt: skip
            if on:
                leave()
                self._say(f"{name} mode off.")

    def _leave_split_mode(self) -> None:
        was = self.split_mode
        self.split_mode = False
        self.split_seeds = []
        self._exit_stroke_mode(self._split_mouse, was)

    def _enter_stroke_mode(self, layer: Labels, callback, escape) -> None:
        """Give the mouse to a tool mode: pan / zoom off, drags to ``callback``, Escape ends."""
        # shown first: napari gives an unhidden layer back the tool it had when hidden,
        # which would end the mode at the first edit (each edit shows the layer)
        self._entering = True
        try:
            layer.visible = True
            layer.mode = "pan_zoom"
        finally:
            self._entering = False
        viewer = self.viewer
        if viewer is not None and layer in viewer.layers:
            viewer.layers.selection.active = layer
        self._saved_mouse_pan = layer.mouse_pan
        layer.mouse_pan = False
        layer.cursor = "crosshair"  # a mode stays on: the cursor shows it
        layer.mouse_drag_callbacks.append(callback)
        layer.bind_key("Escape", escape, overwrite=True)
        layer.bind_key("Space", self._hold_to_pan, overwrite=True)

    def _hold_to_pan(self, layer: Labels):
        """Space held in a mode: the mouse pans and zooms, as napari's Space does elsewhere.

        (napari's own hold-to-pan does nothing here: the layer is in pan / zoom already.)
        """
        ours = (self._split_mouse, self._join_mouse, self._polygon_mouse)
        taken = [cb for cb in layer.mouse_drag_callbacks if cb in ours]
        for cb in taken:
            layer.mouse_drag_callbacks.remove(cb)
        layer.mouse_pan = True
        yield
        on = {self._split_mouse: self.split_mode, self._join_mouse: self.join_mode,
              self._polygon_mouse: self.polygon_mode}  # fmt: skip
        back = [cb for cb in taken if on[cb] and cb not in layer.mouse_drag_callbacks]
        layer.mouse_drag_callbacks.extend(back)
        if back:
            layer.mouse_pan = False

    def _exit_stroke_mode(self, callback, was: bool) -> None:
        """Undo :meth:`_enter_stroke_mode` (``was``: the mode was on)."""
        layer = self.layer
        if layer is None:
            return
        if callback in layer.mouse_drag_callbacks:
            layer.mouse_drag_callbacks.remove(callback)
        if was:
            layer.bind_key("Escape", None)
            layer.bind_key("Space", None)
            layer.mouse_pan = self._saved_mouse_pan
            if layer.mode == "pan_zoom":
                layer.cursor = "standard"

    def _split_mouse(self, layer, event):
        """Mouse callback in split mode: a click adds a seed, a drag draws a cut line."""
        path: list[tuple[float, float]] = []
        yield from _drag_path(layer, event, path)
        span = np.ptp(np.asarray(path, float), axis=0).max() if len(path) > 1 else 0.0
        if span >= 3:
            self.split_seeds = []  # a drag after one seed: the cut, not a seed pair
            self._guarded(lambda: self._say_still_splitting(self.split_along(path)))
        else:
            self._guarded(lambda: self.add_split_seed(path[0]))

    def join_along(self, line: Sequence[Sequence[float]]) -> bool:
        """Join the nuclei a stroke (data row, col vertices) touches into one."""
        return self.apply(editing.join_along(self._data(), line), "Join")

    def toggle_join_mode(self) -> bool:
        """Enter join mode (each drag across pieces joins them into one nucleus), or leave it.

        Like the split mode it stays on for the next stroke, until ``J`` again, ``Escape``
        or another mode; each join is its own undo step.
        """
        if self.join_mode:
            self._stroke_escape()
            return False
        self._require_idle("Join", tool="join")
        layer = self.layer
        self.join_mode = True
        self._enter_stroke_mode(layer, self._join_mouse, self._stroke_escape)
        self._say("Join: drag across the pieces of one nucleus (J or Escape ends).")
        return True

    def _leave_join_mode(self) -> None:
        was = self.join_mode
        self.join_mode = False
        self._exit_stroke_mode(self._join_mouse, was)

    def _join_mouse(self, layer, event):
        """Mouse callback in join mode: a drag joins what it touches; a click says how."""
        path: list[tuple[float, float]] = []
        yield from _drag_path(layer, event, path)
        if len(path) < 2:
            self._say("Join: drag across the pieces (a click joins nothing).")
            return
        if self._guarded(lambda: self.join_along(path)):
            self._say("Joined. Drag across the next pieces, or press J or Escape to finish.")

    # ------------------------------------------------------------ correction tools

    def correction_inputs(self, need_image: bool = True) -> tuple[Any, Any, Any]:
        """``(maps, image, params)`` the correction tools use; each may be None.

        Maps: :attr:`maps` if set, else the cached post-processor of this layer or of
        the prediction it was copied from, when its maps have the labels' shape; params:
        that prediction's post-processing parameters.  Image (when ``need_image``; with
        maps too, as ``O`` moves the outline to its edge): :attr:`image` if set,
        else the data of the prediction's source image, or of the topmost (visible first)
        2-D image layer of the labels' size.
        """
        shape = tuple(self._data().shape)
        pred = self._source_prediction()
        maps, params = self.maps, None
        if maps is None:
            for layer in (self.layer, pred):
                pp = None if layer is None else layer.metadata.get(POSTPROCESSOR_KEY)
                if pp is not None and tuple(np.shape(getattr(pp, "prob", None))) == shape:
                    maps, params = pp, _layer_params(layer)
                    break
        image = self.image
        if image is None and need_image:
            image = self._image_under(pred, shape)
        return maps, image, params

    def _source_prediction(self) -> Labels | None:
        """The labels layer this ground truth was copied from, if it is still open."""
        source = str(self.layer.metadata.get("source") or "")
        viewer = self.viewer
        if not source.startswith("copy of ") or viewer is None:
            return None
        name = source[len("copy of ") :]
        layer = next((x for x in viewer.layers if x.name == name), None)
        return layer if isinstance(layer, Labels) and layer is not self.layer else None

    def _image_under(self, pred: Labels | None, shape: tuple[int, ...]) -> Any:
        viewer = self.viewer
        if viewer is None:
            return None
        wanted = pred.metadata.get(SOURCE_KEY) if pred is not None else None
        images = [
            x
            for x in reversed(viewer.layers)
            if isinstance(x, Image)
            and x.metadata.get(ROLE) is None
            and not x.multiscale
            and x.ndim == 2
            and tuple(x.data.shape[:2]) == shape
        ]
        images.sort(key=lambda x: (x.name != wanted, not x.visible))
        return images[0].data if images else None

    def _require_idle(self, what: str, *, tool: str | None = None) -> None:
        """Refuse an action while a split or an outline is half done.

        A mode (``K`` split, ``J`` join, ``Q`` outline) is only a tool choice: it stays on
        through the one-key actions under the cursor (``D``, ``A``, ``O``, ``.``, ``,``,
        ``W`` ...), so a tile can be corrected without leaving it; choosing another mode
        or the brush (``tool``: "split", "join", "outline" or "paint") ends it.
        """
        if self.split_mode and self.split_seeds:
            raise correct.CorrectionRefused(
                f"{what}: finish the split first (the second seed), or press K to cancel it"
            )
        if self.polygon_mode and self.polygon_points:
            raise correct.CorrectionRefused(
                f"{what}: finish the outline first (Enter), or press Escape to cancel it"
            )
        if tool is None:
            return
        if self.split_mode and tool != "split":
            self._leave_split_mode()
        if self.join_mode and tool != "join":
            self._leave_join_mode()
        if self.polygon_mode and tool != "outline":
            self._leave_polygon_mode()

    def _nucleus_at(self, point: Sequence[float], what: str) -> int:
        i = editing.label_at(self._data(), point)
        if i == 0:
            raise correct.CorrectionRefused(f"{what}: no nucleus under the cursor")
        return i

    def add_nucleus_at(self, point: Sequence[float]) -> bool:
        """Add the missed nucleus at ``point`` (data row, col), grown from the maps or image."""
        self._require_idle("Add nucleus")
        maps, image, params = self.correction_inputs()
        edit = correct.add_nucleus_at(self._data(), point, maps, image, params=params)
        ok = self.apply(edit, "Add nucleus")
        if ok:
            what = "model maps" if maps is not None else "image"
            self._say(f"Added nucleus {edit.new_ids[0]} ({edit.n_pixels} px, from the {what}).")
        return ok

    def add_nucleus_at_cursor(self) -> bool:
        return self.add_nucleus_at(self.cursor_point())

    def refine_outline_at(self, point: Sequence[float]) -> bool:
        """Re-fit the outline of the nucleus at ``point`` to the maps (or the image)."""
        self._require_idle("Refine outline")
        i = self._nucleus_at(point, "Refine outline")
        maps, image, params = self.correction_inputs()
        edit = correct.refine_outline(self._data(), i, maps, image, near=point, params=params)
        return self.apply(edit, f"Refine nucleus {i}")

    def refine_outline_at_cursor(self) -> bool:
        return self.refine_outline_at(self.cursor_point())

    def _outline_step(self, point: Sequence[float], px: int, what: str, tool) -> bool:
        """Grow or shrink (``tool``) the nucleus at ``point`` by ``px`` pixels."""
        self._require_idle(what)
        i = self._nucleus_at(point, what)
        return self.apply(tool(self._data(), i, px, near=point), f"{what} nucleus {i}")

    def grow_at(self, point: Sequence[float], px: int = 1) -> bool:
        """Grow the nucleus at ``point`` by ``px`` pixels into the background."""
        return self._outline_step(point, px, "Grow", correct.grow)

    def grow_at_cursor(self) -> bool:
        return self.grow_at(self.cursor_point())

    def shrink_at(self, point: Sequence[float], px: int = 1) -> bool:
        """Shrink the nucleus at ``point`` by ``px`` pixels."""
        return self._outline_step(point, px, "Shrink", correct.shrink)

    def shrink_at_cursor(self) -> bool:
        return self.shrink_at(self.cursor_point())

    def toggle_polygon_mode(self) -> bool:
        """Start outlining a new nucleus (clicks are corners, a drag a lasso), or cancel."""
        if self.polygon_mode:
            return self.cancel_polygon()
        self._require_idle("Outline", tool="outline")
        layer = self.layer
        self.polygon_mode = True
        self.polygon_points = []
        self._enter_stroke_mode(layer, self._polygon_mouse, self._polygon_escape)
        layer.mouse_double_click_callbacks.append(self._polygon_double_click)
        layer.bind_key("Enter", self._polygon_enter, overwrite=True)
        self._say("Outline: click the corners, then Enter or double-click; or drag a lasso.")
        return True

    def _polygon_enter(self, _layer=None) -> None:
        self._guarded(self.finish_polygon)

    def _polygon_escape(self, _layer=None) -> None:
        self._guarded(self.cancel_polygon)

    def add_polygon_point(self, point: Sequence[float]) -> int:
        """Add a corner to the outline in progress; returns the number of corners."""
        self.polygon_points.append((float(point[-2]), float(point[-1])))
        n = len(self.polygon_points)
        self._say(f"Outline: {n} point(s); Enter or double-click finishes, Escape cancels.")
        return n

    def finish_polygon(self, points: Sequence[Sequence[float]] | None = None) -> bool:
        """Draw the outline (``points``, default: the corners clicked) as a nucleus.

        Replace mode of :func:`napari_medinst.correct.polygon_nucleus`: an outline over
        most of one nucleus redraws it (same id); otherwise it is a new nucleus.  Either
        takes pixels from neighbours that are not verified or edited; those keep every
        pixel.  The drawn nucleus becomes *edited*; a neighbour that only lost pixels
        keeps its status (nobody reviewed the rest of it), so the next outline may still
        take from it.  The status bar says what happened.  A refused outline (too few
        corners, nothing it may fill) keeps its corners.  Like ``K`` and ``J`` the mode
        stays on for the next outline, until ``Q`` again, ``Escape`` or another mode.
        """
        pts = list(self.polygon_points if points is None else points)
        before = self.status
        keep = [i for i, s in before.items() if s in ("edited", "verified")]
        edit = correct.polygon_nucleus(self._data(), pts, replace=True, keep=keep)
        self.polygon_points = []
        ok = self.apply(edit, "Outline")
        if ok:
            self._restore_status({k: before[k] for k in edit.taken if k in before})
            more = " Outline the next nucleus, or press Q or Escape to finish."
            self._say(edit.message[:1].upper() + edit.message[1:] + "."
                      + (more if self.polygon_mode else ""))  # fmt: skip
        return ok

    def _restore_status(self, status: dict[int, str]) -> None:
        """Give nuclei (those still present) back the status they had."""
        for value in set(status.values()):
            self.set_status([k for k, v in status.items() if v == value], value)

    def cancel_polygon(self) -> bool:
        """Leave the outline mode without changing anything."""
        self._leave_polygon_mode()
        self._say("Outline cancelled.")
        return False

    def _leave_polygon_mode(self) -> None:
        layer = self.layer
        was = self.polygon_mode
        self.polygon_mode = False
        self.polygon_points = []
        if layer is None or not was:
            return
        self._exit_stroke_mode(self._polygon_mouse, was)
        if self._polygon_double_click in layer.mouse_double_click_callbacks:
            layer.mouse_double_click_callbacks.remove(self._polygon_double_click)
        layer.bind_key("Enter", None)

    def _polygon_mouse(self, layer, event):
        """Mouse callback in outline mode: a click adds a corner, a drag is a lasso."""
        path: list[tuple[float, float]] = []
        yield from _drag_path(layer, event, path)
        span = np.ptp(np.asarray(path, float), axis=0).max() if len(path) > 1 else 0.0
        if span >= 3:
            self._guarded(lambda: self.finish_polygon(self.polygon_points + path))
        else:
            self.add_polygon_point(path[0])

    def _polygon_double_click(self, layer, event) -> None:
        self._guarded(self.finish_polygon)

    # ------------------------------------------------------------------ cleanup

    def fill_holes(self) -> bool:
        return self.apply(editing.fill_holes(self._data()), "Fill holes")

    def remove_small(self, min_size: int | None = None) -> bool:
        size = self.min_size if min_size is None else int(min_size)
        return self.apply(editing.remove_small(self._data(), size), f"Remove below {size} px")

    def relabel(self) -> bool:
        """Renumber the nuclei 1..N, carrying their status along."""
        self._flush()
        edit = editing.relabel_sequential(self._data())
        if not edit.changed:
            show_info("Relabel: the ids are already 1..N.")
            return False
        self._applying = True
        try:
            self.apply(edit, "Relabel")
        finally:
            self._applying = False
        old = dict(self._current)
        self._known = {new: old[o] for o, new in edit.mapping.items() if o in old}
        self.selection = {edit.mapping[i] for i in self.selection if i in edit.mapping}
        self._stale = False
        self._pending_prev = {}
        self._sync_status(edited=())
        self.dirty = True
        self._notify()
        return True

    def toggle_verified(self, point: Sequence[float]) -> str | None:
        """Mark the nucleus at ``point`` verified; if it already is, restore its status."""
        i = editing.label_at(self._data(), point)
        if i == 0:
            show_info("No nucleus under the cursor.")
            return None
        self._flush()
        if self._current.get(i) == "verified":
            new = self._before_verify.pop(i, "edited")
        else:
            self._before_verify[i] = self._current.get(i, self._default)
            new = "verified"
        self.set_status([i], new)
        self._say(f"Nucleus {i}: {new}")
        return new

    def toggle_verified_at_cursor(self) -> str | None:
        return self.toggle_verified(self.cursor_point())

    # ------------------------------------------------------------------ colours

    @property
    def showing_status(self) -> bool:
        return self._status_cmap is not None

    def toggle_status_colours(self) -> bool:
        """Colour the nuclei by review status, or restore the normal colours."""
        layer = self.layer
        if self._status_cmap is None:
            self._saved_cmap = layer.colormap
            self._apply_status_colours()
            return True
        self._status_cmap = None
        if self._saved_cmap is not None:
            layer.colormap = self._saved_cmap
        return False

    def _apply_status_colours(self) -> None:
        colours = {None: "transparent", 0: "transparent"}
        colours.update({i: STATUS_COLOURS[s] for i, s in self._current.items()})
        self._status_cmap = DirectLabelColormap(color_dict=colours)
        self.layer.colormap = self._status_cmap

    def detach(self) -> None:
        """Remove the key bindings and event connections."""
        layer = self.layer
        if layer is None:
            return
        self._leave_split_mode()
        self._leave_join_mode()
        self._leave_polygon_mode()
        for key, _, _ in KEY_BINDINGS:
            layer.bind_key(key, None)
        for emitter, cb in (
            (layer.events.paint, self._on_paint),
            (layer.events.data, self._on_data),
            (layer.events.set_data, self._on_set_data),
            (layer.events.mode, self._on_layer_mode),
        ):
            emitter.disconnect(cb)
        if getattr(layer, _ATTR, None) is self:
            delattr(layer, _ATTR)
