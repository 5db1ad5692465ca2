"""Undo / redo of the Segment panel: post-processing parameters and markers.

The panel records one :class:`PanelState` per user step (a slider released, a value
typed, a parameters file loaded, a reset, a marker added, moved or deleted) in a bounded
:class:`History`; undo hands back the state before the step and the panel shows it again
(sliders, markers) and re-runs the post-processing, so the labels follow.

Division of work with napari's own history of the instances layer: the panel history
holds parameters and markers only; brush, fill and ground-truth editor edits stay in the
layer's history. Ctrl+Z on the instances layer first undoes brush edits (while the layer
differs from what the panel last wrote), then steps back through the panel history.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

from ..postprocess import PostprocessParams

__all__ = ["UNDO_STEPS", "History", "PanelState"]

#: How many steps the panel keeps (older ones are dropped).
UNDO_STEPS = 50

T = TypeVar("T")


@dataclass(frozen=True, eq=False)
class PanelState:
    """What one undo step of the Segment panel restores.

    Parameters
    ----------
    params : PostprocessParams
        The post-processing parameters shown in the sliders.
    seeds : Mapping[tuple[int, ...], numpy.ndarray]
        The user's markers (row, col) per plane; empty while the markers are automatic.
    points : numpy.ndarray or None
        The markers layer's points when the markers are the user's (all planes).
    """

    params: PostprocessParams
    seeds: Mapping[tuple[int, ...], np.ndarray] = field(default_factory=dict)
    points: np.ndarray | None = None

    def same(self, other: PanelState | None) -> bool:
        """Whether ``other`` shows the same parameters and markers."""
        if other is None or self.params != other.params or set(self.seeds) != set(other.seeds):
            return False
        return all(np.array_equal(a, other.seeds[p]) for p, a in self.seeds.items())


class History(Generic[T]):
    """A bounded undo / redo history of states.

    Parameters
    ----------
    limit : int
        The most undo steps kept; the oldest is dropped beyond it.
    on_change : callable, optional
        Called with no argument after every change (e.g. to enable Undo / Redo buttons).
    """

    def __init__(self, limit: int = UNDO_STEPS, on_change: Callable[[], None] | None = None):
        if limit < 1:
            raise ValueError(f"limit: must be at least 1, got {limit}")
        self._undo: deque[T] = deque(maxlen=limit)
        self._redo: deque[T] = deque(maxlen=limit)
        self._on_change = on_change

    @property
    def can_undo(self) -> bool:
        """True when there is a step to undo."""
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        """True when there is an undone step to redo."""
        return bool(self._redo)

    def record(self, before: T) -> None:
        """Record a step: ``before`` is the state it left. Clears the redo steps."""
        self._undo.append(before)
        self._redo.clear()
        self._changed()

    def undo(self, current: T) -> T | None:
        """The state before the last step (None: nothing to undo); ``current`` can be redone."""
        return self._move(self._undo, self._redo, current)

    def redo(self, current: T) -> T | None:
        """The state the last undo left (None: nothing to redo); ``current`` can be undone."""
        return self._move(self._redo, self._undo, current)

    def clear(self) -> None:
        """Forget every step (e.g. when a new result starts a new history)."""
        self._undo.clear()
        self._redo.clear()
        self._changed()

    def _move(self, source: deque[T], target: deque[T], current: T) -> T | None:
        if not source:
            return None
        state = source.pop()
        target.append(current)
        self._changed()
        return state

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()
