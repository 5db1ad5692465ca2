"""Models the user trained: where they are kept and which ones the widgets list.

A fine-tuned model is an ordinary model folder (see :mod:`.folder`) anywhere on disk.
*Registering* it records its absolute path in ``registered.json`` inside the user models
folder, so the Segment widget and the Fine-tune widget can offer it by name next to the
bundled models. Model folders placed directly inside the user models folder are listed
too, registered or not.

The user models folder is ``$NAPARI_MEDINST_MODELS`` when set, else
``$XDG_DATA_HOME/napari-medinst/models`` (``~/.local/share/napari-medinst/models``).

Only complete model folders (with ``config.json`` and ``weights.pt``) are ever listed;
a folder being written (``save_model_folder`` writes a hidden temporary sibling and
renames it into place) or deleted since it was registered is skipped. Listeners added
with :func:`add_listener` are called after every change (from the thread that made it).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from .._io import write_bytes

__all__ = [
    "ENV_VAR",
    "add_listener",
    "is_registered",
    "register_model",
    "registered_models",
    "remove_listener",
    "unregister_model",
    "user_models_dir",
]

logger = logging.getLogger(__name__)

#: Environment variable that overrides the user models folder.
ENV_VAR = "NAPARI_MEDINST_MODELS"
_INDEX = "registered.json"
_LOCK = threading.Lock()
_LISTENERS: list[Callable[[], None]] = []


def user_models_dir() -> Path:
    """The folder for the user's own models (not created here)."""
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME", "").strip() or Path.home() / ".local" / "share"
    return Path(base).expanduser() / "napari-medinst" / "models"


def _complete(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "weights.pt").is_file()


def _read_index(root: Path) -> list[str]:
    try:
        data = json.loads((root / _INDEX).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:  # unreadable: list the folder's own models only
        logger.warning("ignoring %s: %s", root / _INDEX, exc)
        return []
    models = data.get("models", []) if isinstance(data, dict) else []
    return [str(m) for m in models if isinstance(m, str)]


def _write_index(root: Path, paths: list[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"models": paths}, indent=2) + "\n"
    write_bytes(root / _INDEX, text.encode("utf-8"), overwrite=True)


def _notify() -> None:
    for callback in list(_LISTENERS):
        try:
            callback()
        except Exception:  # a broken listener must not break registration
            logger.exception("model registry listener failed")


def registered_models() -> list[str]:
    """Absolute paths of the user's complete model folders, registered first, no duplicates."""
    root = user_models_dir()
    out: list[str] = []
    for text in _read_index(root):
        if text not in out and _complete(Path(text)):
            out.append(text)
    if root.is_dir():
        for p in sorted(root.iterdir()):
            text = str(p.resolve())
            if not p.name.startswith(".") and text not in out and _complete(p):
                out.append(text)
    return out


def is_registered(path: str | os.PathLike) -> bool:
    """Whether the model folder ``path`` is listed by :func:`registered_models`."""
    return str(Path(path).expanduser().resolve()) in registered_models()


def register_model(path: str | os.PathLike) -> str:
    """Add a complete model folder to the user's list; returns its absolute path.

    Raises
    ------
    FileNotFoundError
        If ``path`` is not a complete model folder (``config.json`` and ``weights.pt``).
    OSError
        If the user models folder cannot be written.
    """
    p = Path(path).expanduser().resolve()
    if not _complete(p):
        raise FileNotFoundError(f"{p}: not a complete model folder (config.json, weights.pt)")
    root = user_models_dir()
    with _LOCK:
        paths = _read_index(root)
        if str(p) not in paths:
            _write_index(root, [*paths, str(p)])
    _notify()
    return str(p)


def unregister_model(path: str | os.PathLike) -> bool:
    """Drop a model folder from the list (its files are kept); False if it was not listed."""
    p = str(Path(path).expanduser().resolve())
    root = user_models_dir()
    with _LOCK:
        paths = _read_index(root)
        if p not in paths:
            return False
        _write_index(root, [q for q in paths if q != p])
    _notify()
    return True


def add_listener(callback: Callable[[], None]) -> None:
    """Call ``callback()`` after every registration change."""
    if callback not in _LISTENERS:
        _LISTENERS.append(callback)


def remove_listener(callback: Callable[[], None]) -> None:
    """Stop calling ``callback`` (no error if it was not added)."""
    if callback in _LISTENERS:
        _LISTENERS.remove(callback)
