"""All three panels docked in one window on a laptop screen (issue 17, bug 7).

The window is sized like a 1366×768 (and a 1920×1080) screen *before* the panels are
docked, as on a user's laptop; then every control a user touches must be reachable:
inside the viewport of its panel's scroll area once scrolled to
and not cut off at the right, and the window must not have grown past the screen.
"""

from __future__ import annotations

import pytest
from qtpy.QtCore import QPoint, QRect
from qtpy.QtWidgets import (
    QAbstractButton,
    QAbstractItemView,
    QAbstractSlider,
    QAbstractSpinBox,
    QApplication,
    QComboBox,
    QLineEdit,
    QScrollBar,
    QTabWidget,
)
from skimage.io import imread

from napari_medinst._napari._layout import Section

pytestmark = pytest.mark.gui

PANELS = ("Segment nuclei", "Evaluate", "Fine-tune model")
CONTROLS = (
    QAbstractButton,
    QAbstractSlider,
    QAbstractSpinBox,
    QComboBox,
    QLineEdit,
    QAbstractItemView,
)


def settle(qtbot, rounds: int = 5) -> None:
    for _ in range(rounds):
        QApplication.processEvents()
        qtbot.wait(10)


def controls(panel) -> list:
    """The visible controls of a panel (not scroll bars, not the insides of a table)."""
    found = []
    for w in panel.native.findChildren(CONTROLS):
        if not w.isVisible() or isinstance(w, QScrollBar):
            continue
        parent = w.parentWidget()
        inside_view = False
        while parent is not None and parent is not panel.native:
            if isinstance(parent, QAbstractItemView | QAbstractSpinBox | QComboBox):
                inside_view = True  # a spin box's line edit, a table's editor ...
                break
            parent = parent.parentWidget()
        if not inside_view:
            found.append(w)
    return found


def unreachable(qtbot, dock, panel) -> list[str]:
    """Controls a user could not get to by scrolling, or that are cut off at a side."""
    area = panel.scroll_area
    viewport = area.viewport()
    bad = []
    body = area.widget()
    for w in controls(panel):
        # ensureWidgetVisible aims at the text cursor of an editable field; a user scrolls
        # until the whole control shows, so scroll to the centre with half-size margins
        area.ensureWidgetVisible(w, 0, 0)
        centre = w.mapTo(body, QPoint(w.width() // 2, w.height() // 2))
        area.ensureVisible(centre.x(), centre.y(), w.width() // 2 + 1, w.height() // 2 + 1)
        settle(qtbot, 1)
        rect = QRect(w.mapTo(viewport, QPoint(0, 0)), w.size())
        tall = rect.height() > viewport.height()  # taller than the view: its top shows
        vertical = rect.top() >= 0 and (rect.bottom() < viewport.height() or tall)
        horizontal = rect.left() >= 0 and rect.right() < viewport.width()
        if not (vertical and horizontal and w.width() <= dock.width()):
            name = w.text() if hasattr(w, "text") and w.text() else type(w).__name__
            bad.append(f"{name!r} at {rect.getRect()} in {viewport.width()}x{viewport.height()}")
    return bad


def check_panel(qtbot, dock, panel) -> int:
    """Assert every control of ``panel`` is reachable, folded as opened and unfolded."""
    dock.raise_()
    settle(qtbot)
    assert panel.native.isVisible()
    tabs = panel.native.findChildren(QTabWidget)
    pages = [(t, i) for t in tabs for i in range(t.count())] or [(None, 0)]
    checked = 0
    for unfold in (False, True):
        if unfold:
            for section in panel.native.findChildren(Section):
                section.set_expanded(True)
        for tab, index in pages:
            if tab is not None:
                tab.setCurrentIndex(index)
            settle(qtbot)
            assert unreachable(qtbot, dock, panel) == []
            checked += len(controls(panel))
    return checked


def dock_all(make_napari_viewer, qtbot, size: tuple[int, int]):
    viewer = make_napari_viewer(show=True)
    window = viewer.window._qt_window
    window.resize(*size)
    settle(qtbot)
    viewer.open_sample("napari-medinst", "he")
    docked = []
    for name in PANELS:
        docked.append(viewer.window.add_plugin_dock_widget("napari-medinst", name))
        settle(qtbot)
    return viewer, window, docked


def save_screenshot(window, path) -> None:
    window.grab().save(str(path))
    img = imread(path)
    assert img.shape[:2] == (window.height(), window.width())
    assert img[..., :3].std() > 10, "blank screenshot"


@pytest.mark.parametrize("size", [(1366, 768), (1920, 1080)], ids=["1366x768", "1920x1080"])
def test_three_panels_fit_the_screen(make_napari_viewer, qtbot, tmp_path, size):
    _viewer, window, docked = dock_all(make_napari_viewer, qtbot, size)
    assert window.width() <= size[0] and window.height() <= size[1]
    # the most used controls are open (unfolded) when a panel opens
    segment, evaluate, finetune = (panel for _, panel in docked)
    for dock, key in (
        (docked[0][0], [segment._run, segment._fg_threshold, segment._model]),
        (docked[1][0], [evaluate._pred, evaluate._gt]),
        (docked[2][0], [finetune._start, finetune._image, finetune._base]),
    ):
        dock.raise_()
        settle(qtbot)
        assert all(w.native.isVisible() for w in key)
    evaluate._tabs.setCurrentIndex(0)
    settle(qtbot)
    assert evaluate.summary_table.isVisible()
    save_screenshot(window, tmp_path / f"panels_{size[0]}x{size[1]}.png")
    counts = [check_panel(qtbot, dock, panel) for dock, panel in docked]
    assert min(counts) > 10  # the check saw the panels' controls
    assert window.width() <= size[0] and window.height() <= size[1]
    # the panels share the height: none is squeezed below a usable height
    for dock, _ in docked:
        dock.raise_()
        settle(qtbot)
        assert dock.height() >= 300


def test_tall_window_keeps_two_panels_stacked(make_napari_viewer, qtbot):
    """On a tall window Segment and Evaluate sit one above the other (scores in view)."""
    viewer = make_napari_viewer(show=True)
    window = viewer.window._qt_window
    window.resize(1920, 1080)
    settle(qtbot)
    seg, _ = viewer.window.add_plugin_dock_widget("napari-medinst", "Segment nuclei")
    settle(qtbot)
    ev, _ = viewer.window.add_plugin_dock_widget("napari-medinst", "Evaluate")
    settle(qtbot)
    assert window.tabifiedDockWidgets(seg) == []
    assert seg.isVisible() and ev.isVisible()
    assert seg.geometry().bottom() < ev.geometry().top() or ev.geometry().bottom() < (
        seg.geometry().top()
    )
