"""What a prediction layer carries between the panels: metadata keys and shared state.

The Segment panel writes an instances layer; the Evaluate panel reads it (auto-tune) and
may rewrite it (auto-tune's Apply). Both go through this module, so the contract is
written down once:

``layer.metadata`` of a prediction written by the Segment panel
    * :data:`POSTPROCESSOR_KEY` - the cached :class:`~napari_medinst.postprocess.Postprocessor`
      of a 2-D prediction (auto-tune re-runs it; nobody else may call it).
    * :data:`PARAMS_KEY` - the parameters of the labels as JSON text (survives a save of
      the metadata); always equal to ``param_state(layer).params``.
    * :data:`STATE_KEY` - the layer's :class:`ParamState`: the one live parameter set of
      that prediction, shared by the Segment panel's sliders and auto-tune.

Whoever changes the parameters of a prediction (and writes the labels they give) calls
:func:`publish`; every other panel that listens (:meth:`ParamState.connect`) follows, so
two panels never hold two different parameter sets for one layer.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from ..postprocess import PostprocessParams

__all__ = [
    "PARAMS_KEY",
    "POSTPROCESSOR_KEY",
    "STATE_KEY",
    "ParamState",
    "param_state",
    "publish",
]

POSTPROCESSOR_KEY = "napari_medinst_postprocessor"
PARAMS_KEY = "postprocess_params"
STATE_KEY = "napari_medinst_param_state"

#: ``listener(layer, params, origin)``; ``origin`` names who changed the parameters.
Listener = Callable[[Any, PostprocessParams, str], None]


class ParamState:
    """The post-processing parameters of one prediction layer, with change listeners.

    Parameters
    ----------
    params : PostprocessParams
        The parameters the layer's labels were made with.

    Notes
    -----
    Listeners that are bound methods are held weakly: a closed panel does not stay
    alive (or get called) because a layer still refers to it.
    """

    def __init__(self, params: PostprocessParams) -> None:
        self.params = params
        self._listeners: list[Any] = []

    def connect(self, listener: Listener) -> None:
        """Call ``listener(layer, params, origin)`` after every :func:`publish`."""
        if any(_resolve(ref) == listener for ref in self._listeners):
            return
        owner = getattr(listener, "__self__", None)
        self._listeners.append(weakref.WeakMethod(listener) if owner is not None else listener)

    def disconnect(self, listener: Listener) -> None:
        """Stop calling ``listener``; nothing happens when it was not connected."""
        self._listeners = [r for r in self._listeners if _resolve(r) not in (None, listener)]

    def notify(self, layer: Any, origin: str) -> None:
        """Call the listeners (dead weak references are dropped)."""
        alive = [(r, _resolve(r)) for r in self._listeners]
        self._listeners = [r for r, fn in alive if fn is not None]
        for _, fn in alive:
            if fn is not None:
                fn(layer, self.params, origin)


def _resolve(ref: Any) -> Any:
    return ref() if isinstance(ref, weakref.WeakMethod) else ref


def param_state(layer: Any) -> ParamState | None:
    """The layer's :class:`ParamState`, or None for a layer no panel wrote parameters to."""
    md = getattr(layer, "metadata", None)
    state = md.get(STATE_KEY) if isinstance(md, dict) else None
    return state if isinstance(state, ParamState) else None


def publish(layer: Any, params: PostprocessParams, origin: str) -> ParamState:
    """Record that ``layer`` now holds the labels of ``params`` and tell the listeners.

    Creates the layer's state on first use and keeps :data:`PARAMS_KEY` equal to it.

    Parameters
    ----------
    layer : napari.layers.Labels
        The prediction layer, whose data already holds the new labels.
    params : PostprocessParams
        The parameters those labels were made with.
    origin : str
        Who changed them (``"segment"``, ``"autotune"``); listeners skip their own.
    """
    state = param_state(layer)
    if state is None:
        state = ParamState(params)
        layer.metadata[STATE_KEY] = state
    state.params = params
    layer.metadata[PARAMS_KEY] = params.to_json()
    state.notify(layer, origin)
    return state
