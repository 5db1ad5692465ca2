"""Panel layout shared by the dock widgets: foldable sections inside a scroll area.

napari stacks docked panels in one column, so on a small screen (1366×768) each panel
gets a few hundred pixels of height. Every panel therefore puts its body in a
:class:`QScrollArea` (nothing is ever out of reach, and the panel never forces the main
window to grow), groups its controls into :class:`Section` s that fold away, and keeps
tall controls (tables, plots, lists) within :func:`cap_height` limits.

napari docks ``widget.native`` of a magicgui container, which for a ``scrollable=True``
container is the widget *inside* the scroll area: the scroll area would be dropped. So
the scroll area is built here, inside the panel's own widget.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qtpy.QtCore import QEvent, QObject, QSize, Qt, QTimer
from qtpy.QtWidgets import (
    QDockWidget,
    QFrame,
    QLabel,
    QMainWindow,
    QScrollArea,
    QSizePolicy,
    QStyle,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

__all__ = ["MIN_PANEL_HEIGHT", "PANEL_PROPERTY", "Section", "cap_height", "scroll_panel"]

#: A docked panel should get at least this many pixels of height; a panel that would get
#: less next to the other docks of its area opens as a tab of another napari-medinst panel.
MIN_PANEL_HEIGHT = 420
#: Qt property that marks the widget of a napari-medinst panel.
PANEL_PROPERTY = "napari_medinst_panel"

#: (title, body, expanded): ``body`` is a magicgui widget or a QWidget; a title of
#: None puts the body in the scroll area as it is (never folded, e.g. a warning banner).
SectionSpec = tuple[str | None, Any, bool]


def _qt(widget: Any) -> QWidget:
    """The QWidget of a magicgui widget, or the QWidget itself."""
    return widget if isinstance(widget, QWidget) else widget.native


class Section(QWidget):
    """A titled group of controls whose body can be folded away with its header button.

    Parameters
    ----------
    title : str
        Text of the header button.
    body : QWidget
        The controls of the section.
    expanded : bool
        Whether the body is shown at first.

    Notes
    -----
    A folded body is hidden (not squeezed to zero height), so the controls in it are
    not visible, take no room and cannot take the keyboard focus.
    """

    def __init__(self, title: str, body: QWidget, expanded: bool = True) -> None:
        super().__init__()
        self.header = QToolButton()
        self.header.setText(title)
        self.header.setCheckable(True)
        self.header.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.header.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.header.setAutoRaise(True)
        font = self.header.font()
        font.setBold(True)
        self.header.setFont(font)
        self.header.toggled.connect(self.set_expanded)
        self.body = body
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(0)
        lay.addWidget(self.header)
        lay.addWidget(body)
        self.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Maximum)
        self.set_expanded(expanded)

    @property
    def title(self) -> str:
        """The header's text."""
        return self.header.text()

    @property
    def expanded(self) -> bool:
        """Whether the body is shown."""
        return self.header.isChecked()

    def set_expanded(self, on: bool) -> None:
        """Show (``on``) or fold away the body."""
        self.header.blockSignals(True)
        self.header.setChecked(on)
        self.header.blockSignals(False)
        self.header.setArrowType(Qt.ArrowType.DownArrow if on else Qt.ArrowType.RightArrow)
        self.body.setVisible(on)


class _PanelArea(QScrollArea):
    """A vertical scroll area never narrower than the widest control it holds.

    Its minimum width follows the content (after napari's style sheet is applied, and
    when a control changes), counting folded sections too, so unfolding one never cuts
    a control off at the right: no horizontal scrolling is needed or offered.
    """

    def __init__(self, body: QWidget, folded: Sequence[QWidget]) -> None:
        super().__init__()
        self._folded = list(folded)
        self._width = 0
        self.setObjectName("medinst_panel_scroll")
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAsNeeded)
        self.setWidget(body)
        body.installEventFilter(self)

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:
        if obj is self.widget() and event.type() == QEvent.Type.LayoutRequest:
            width = self.minimumSizeHint().width()
            if width != self._width:  # relayout the window only when the width changed
                self._width = width
                self.updateGeometry()
        return super().eventFilter(obj, event)

    def minimumSizeHint(self) -> QSize:
        hint = super().minimumSizeHint()
        body = self.widget()
        if body is None:
            return hint
        margins = body.layout().contentsMargins()
        inner = [w.minimumSizeHint().width() for w in self._folded]
        widest = max(
            [body.minimumSizeHint().width()] + [w + margins.left() + margins.right() for w in inner]
        )
        bar = self.style().pixelMetric(QStyle.PixelMetric.PM_ScrollBarExtent, None, self)
        return QSize(max(hint.width(), widest + bar + 2 * self.frameWidth()), hint.height())


def scroll_panel(panel: Any, sections: Sequence[SectionSpec]) -> dict[str, Section]:
    """Move a panel's controls into foldable sections inside a vertical scroll area.

    Parameters
    ----------
    panel : magicgui.widgets.Container
        The panel; its own layout ends up holding only the scroll area. The section
        bodies stay the magicgui children they were (``reset_choices`` still reaches
        every combo box); only their Qt parent changes.
    sections : sequence of (title, body, expanded)
        In order, top to bottom. A title of None adds the body without a header.

    Returns
    -------
    dict
        The :class:`Section` of each title.
    """
    body = QWidget()
    lay = QVBoxLayout(body)
    lay.setContentsMargins(2, 2, 2, 2)
    lay.setSpacing(4)
    made: dict[str, Section] = {}
    for title, widget, expanded in sections:
        qw = _qt(widget)
        if title is None:
            lay.addWidget(qw)
            continue
        made[title] = Section(title, qw, expanded)
        lay.addWidget(made[title])
    lay.addStretch(1)
    for label in body.findChildren(QLabel):
        if label.wordWrap():  # a wrapped note takes the panel's width, not a narrow column
            label.setSizePolicy(QSizePolicy.Policy.Expanding, label.sizePolicy().verticalPolicy())
    area = _PanelArea(body, [_qt(w) for _, w, _ in sections])
    native = panel.native
    outer = native.layout()
    outer.setContentsMargins(0, 0, 0, 0)
    outer.addWidget(area)
    # expanding: napari then adds no stretch under the panel, and the area takes the height
    native.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Expanding)
    panel.scroll_area = area
    native.setProperty(PANEL_PROPERTY, True)
    native.installEventFilter(_DockOnShow(native))
    return made


class _DockOnShow(QObject):
    """At the panel's first show, tab it with a sibling panel if stacking squeezes it."""

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:
        if event.type() == QEvent.Type.Show:
            obj.removeEventFilter(self)
            # after napari has finished adding the dock to the window
            QTimer.singleShot(0, lambda: _tab_if_squeezed(obj))
        return False


def _dock_of(widget: QWidget) -> QDockWidget | None:
    parent = widget.parentWidget()
    return parent if isinstance(parent, QDockWidget) else None


def _slots(window: QMainWindow, area) -> list[QDockWidget]:
    """The docks shown in one side's column, one per place (a tab group takes one)."""
    slots: list[QDockWidget] = []
    for d in window.findChildren(QDockWidget):
        if not d.isVisible() or d.isFloating() or window.dockWidgetArea(d) != area:
            continue
        if not any(d in window.tabifiedDockWidgets(s) for s in slots):
            slots.append(d)
    return slots


def _is_panel(dock: QDockWidget) -> bool:
    inner = dock.widget()
    return inner is not None and bool(inner.property(PANEL_PROPERTY))


def _tab_if_squeezed(widget: QWidget) -> None:
    """Tab the panel's dock with another panel's when stacking leaves it too little height.

    napari stacks the docks of one side in a column. On a small screen (1366×768) a
    third or even a second panel would get a strip of a hundred pixels; it then opens
    as a tab of the last napari-medinst panel of that side instead. On a tall enough
    window the panels stay stacked (e.g. Segment above Evaluate, to watch the scores
    while tuning), sharing the height evenly. A tab can be dragged out to stack it anyway.
    """
    try:
        dock = _dock_of(widget)
    except RuntimeError:  # deleted meanwhile
        return
    window = dock.parentWidget() if dock is not None else None
    if not isinstance(window, QMainWindow) or dock.isFloating() or not dock.isVisible():
        return
    area = window.dockWidgetArea(dock)
    if area not in (Qt.DockWidgetArea.LeftDockWidgetArea, Qt.DockWidgetArea.RightDockWidgetArea):
        return
    slots = _slots(window, area)
    ours = [d for d in slots if d is not dock and _is_panel(d)]
    if ours and window.height() / len(slots) < MIN_PANEL_HEIGHT:
        window.tabifyDockWidget(ours[-1], dock)
        dock.raise_()
        slots = _slots(window, area)
    if len(slots) > 1:  # Qt gives a new dock only its size hint: share the height
        share = window.height() // len(slots)
        window.resizeDocks(slots, [share] * len(slots), Qt.Orientation.Vertical)


def cap_height(widget: Any, minimum: int, maximum: int) -> None:
    """Keep a tall control (table, list, plot) between ``minimum`` and ``maximum`` px."""
    qw = _qt(widget)
    qw.setMinimumHeight(minimum)
    qw.setMaximumHeight(maximum)
