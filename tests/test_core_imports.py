"""The core must not import napari, magicgui or Qt (napari's own boundary rule)."""

import pkgutil
import subprocess
import sys

import napari_medinst


def core_modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(napari_medinst.__path__, "napari_medinst."):
        if not info.name.startswith("napari_medinst._napari"):
            names.append(info.name)
    return names


def test_core_is_free_of_gui_imports():
    mods = core_modules()
    assert "napari_medinst.postprocess" in mods and "napari_medinst.model.train" in mods
    code = (
        "import importlib, sys\n"
        f"for m in {mods!r}: importlib.import_module(m)\n"
        "bad = [m for m in ('napari', 'magicgui', 'qtpy', 'PyQt6', 'PyQt5', 'PySide6') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"core imported GUI packages: {out.stdout}"
