"""Small pieces the dock widgets share."""

from __future__ import annotations

from typing import Any

from magicgui.widgets import FloatSpinBox
from napari.layers import Image

#: Metadata key marking layers our widgets wrote (outputs, previews); such image layers
#: are never offered as input.
ROLE = "napari_medinst_role"


def unwrap(obj: Any) -> Any:
    """The real object behind napari's PublicOnlyProxy (plugins may be handed one)."""
    return getattr(obj, "__wrapped__", obj)


def qt_alive(widget) -> bool:
    """False once the Qt object behind a magicgui widget has been deleted."""
    try:
        widget.native.objectName()
    except RuntimeError:  # the C++ object is gone
        return False
    return True


def input_images(viewer) -> list[tuple[str, Image]]:
    """(name, layer) of the viewer's image layers that are not our own outputs."""
    return [
        (layer.name, layer)
        for layer in viewer.layers
        if isinstance(layer, Image) and layer.metadata.get(ROLE) is None
    ]


def pixel_size_box(tooltip: str) -> FloatSpinBox:
    """The µm/px field both panels show (0 = unknown / estimate)."""
    box = FloatSpinBox(
        label="pixel size (µm/px)", min=0.0, max=50.0, step=0.01, value=0.0, tooltip=tooltip
    )
    box.native.setDecimals(4)
    return box
