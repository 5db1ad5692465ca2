"""Which axes of an image are space, channels and planes, and which channel to segment.

The axes come from the file when it records them (OME-TIFF, ImageJ hyperstacks, TIFFs
written by tifffile with axes, PNG/JPEG colour), else from the shape
(:func:`napari_medinst._io.guess_axes`: a last axis of at most 16 entries is channels,
never space). The user can override both: ``channel_axis`` names the channel axis and
``channel`` picks the nuclear channel.

Colour or channels: a channel axis of 3 (or 4, RGBA) entries is read as one colour image
(H&E, brightfield) when it holds colour samples in the file, when it was guessed from a
channels-last shape, or when the image is 8-bit and the file does not itself call the axis
channels (an 8-bit ImageJ/OME composite of three stains is fluorescence). Any other channel
axis is multi-channel
fluorescence: the nuclear channel must be picked (``--channel N``, 0-based), unless there
is only one. Every other axis (Z, T, ...) is a plane, segmented one by one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ._io import InputError, guess_axes

__all__ = ["Layout", "iter_planes", "plan_layout", "trailing_channels"]

#: At most this many entries on an axis make it a candidate channel axis.
MAX_CHANNELS = 16


@dataclass(frozen=True)
class Layout:
    """How to cut an array into 2-D images to segment.

    Attributes
    ----------
    axes : str
        The axes used, one letter per axis (after any ``channel_axis`` override).
    order : tuple of int
        Transposition to ``(planes..., Y, X[, C])``.
    lead : tuple of int
        Shape of the plane axes (empty for a single image).
    n_channels : int
        Entries on the channel axis (0 when there is none).
    channel : int or None
        The channel segmented; None when there is no channel axis or it is colour.
    colour : bool
        True when the channel axis is kept as RGB(A).
    """

    axes: str
    order: tuple[int, ...]
    lead: tuple[int, ...]
    n_channels: int
    channel: int | None
    colour: bool


def _at(name: str | None) -> str:
    return f"{name}: " if name else ""


def _override_axes(shape: tuple[int, ...], channel_axis: int, name: str | None) -> str:
    """Axes with ``channel_axis`` as C, the last two other axes as YX, the rest planes."""
    ndim = len(shape)
    if ndim < 3 or not -ndim <= channel_axis < ndim:
        raise InputError(
            f"{_at(name)}--channel-axis {channel_axis} does not exist in an image of shape {shape}"
        )
    k, n_lead = channel_axis % ndim, ndim - 3
    rest = {0: "", 1: "Z", 2: "TZ"}.get(n_lead, "Q" * n_lead) + "YX"
    return rest[:k] + "C" + rest[k:]


def _channel_axis(shape, axes: str, from_metadata: bool, channel, name: str | None) -> str:
    """The axes string, with a channel axis found for ``channel`` when there was none."""
    if "C" in axes and "S" in axes:
        raise InputError(f"{_at(name)}both channels and colour samples (axes {axes}) unsupported")
    if channel is None or "C" in axes or "S" in axes:
        return axes
    if len(shape) == 3 and not from_metadata and shape[0] <= MAX_CHANNELS:
        return "CYX"  # the user says there are channels: the short first axis
    raise InputError(
        f"{_at(name)}no channel axis (axes {axes}, shape {shape}); "
        "say which axis holds the channels with --channel-axis"
    )


def _pick(
    n: int, axes: str, c_axis: int, guessed: bool, dtype, channel, name: str | None, file_c: bool
):
    """(channel, colour) for a channel axis of ``n`` entries; see the module docstring.

    ``file_c``: the file's own metadata calls the axis channels (``C``, not colour samples
    ``S``): then 8-bit alone does not make it colour (an 8-bit DAPI/GFP/RFP composite).
    """
    if channel is not None:
        if not 0 <= channel < n:
            raise InputError(
                f"{_at(name)}--channel {channel} is out of range ({n} channels: 0-{n - 1})"
            )
        return channel, False
    if n == 1:
        return 0, False
    letter = axes[c_axis]
    if n in (3, 4) and (letter == "S" or guessed or (np.dtype(dtype) == np.uint8 and not file_c)):
        return None, True
    raise InputError(
        f"{_at(name)}{n}-channel image (axes {axes}); pick the nuclear channel with --channel N (0-{n - 1})"
    )


def plan_layout(
    shape: tuple[int, ...],
    dtype,
    axes: str,
    *,
    from_metadata: bool,
    channel: int | None = None,
    channel_axis: int | None = None,
    name: str | None = None,
) -> Layout:
    """Decide space, channel and plane axes; see the module docstring for the rule.

    Parameters
    ----------
    shape, dtype, axes, from_metadata
        As in :class:`napari_medinst._io.ImageInfo`.
    channel : int, optional
        The nuclear channel (0-based); required for multi-channel fluorescence.
    channel_axis : int, optional
        Overrides which axis holds the channels (negative counts from the end).
    name : str, optional
        Names the image at the start of error messages.

    Raises
    ------
    InputError
        Multi-channel image without ``channel``, channel out of range, or an axis
        that does not exist.
    """
    shape = tuple(int(n) for n in shape)
    file_c = from_metadata and channel_axis is None and "C" in axes
    if channel_axis is not None:
        axes, from_metadata = _override_axes(shape, channel_axis, name), True
    axes = _channel_axis(shape, axes, from_metadata, channel, name)
    c_axis = next((i for i, a in enumerate(axes) if a in "CS"), None)
    n = shape[c_axis] if c_axis is not None else 0
    colour = False
    if c_axis is not None:
        guessed = not from_metadata and c_axis == len(shape) - 1
        channel, colour = _pick(n, axes, c_axis, guessed, dtype, channel, name, file_c)
    y, x = axes.index("Y"), axes.index("X")
    lead_idx = tuple(i for i in range(len(shape)) if i not in (y, x, c_axis))
    order = (*lead_idx, y, x) + ((c_axis,) if c_axis is not None else ())
    return Layout(
        axes=axes,
        order=order,
        lead=tuple(shape[i] for i in lead_idx),
        n_channels=n,
        channel=channel,
        colour=colour,
    )


def iter_planes(arr: np.ndarray, layout: Layout) -> Iterator[tuple[object, np.ndarray]]:
    """Yield ``(index, image)``: ``(H, W)`` or colour ``(H, W, 3/4)`` images to segment.

    ``index`` is None for a single image, the plane number for one plane axis, and a
    tuple for several.
    """
    view = np.asarray(arr).transpose(layout.order)
    if layout.channel is not None:
        view = view[..., layout.channel]
    if not layout.lead:
        yield None, view
        return
    for idx in np.ndindex(*layout.lead):
        yield (idx[0] if len(idx) == 1 else idx), np.asarray(view[idx])


def trailing_channels(shape: tuple[int, ...], rgb: bool) -> int:
    """Channels on the last axis of a non-RGB array by the shape rule, else 0.

    A napari image layer of shape ``(..., H, W, C)`` with ``C`` ≤ 16 that napari did not
    take as RGB holds channels, not a row of space.
    """
    if rgb or len(shape) < 3:
        return 0
    return int(shape[-1]) if guess_axes(tuple(shape)).endswith("C") else 0
