"""napari-medinst: nucleus instance segmentation and annotation.

The core (everything outside :mod:`napari_medinst._napari`) depends only on numpy,
scipy, scikit-image, tifffile and torch; napari, magicgui and Qt are imported only by
the adapter package.
"""

import json
from pathlib import Path

__version__ = "0.1.0"

_BUNDLED_DEFAULT = Path(__file__).resolve().parent / "models" / "default"


def version_text(model_dir: Path = _BUNDLED_DEFAULT) -> str:
    """Describe this release: package version, bundled model name and weights hash.

    Reads only the model's ``config.json`` (no torch import, no hashing of the
    weights), so it is cheap enough for ``napari-medinst --version``.

    Parameters
    ----------
    model_dir : Path
        The model folder to describe; the bundled ``default`` model by default.

    Returns
    -------
    str
        Two lines: ``napari-medinst VERSION`` and ``bundled model: NAME (weights
        sha256 HASH)``; the second says what is wrong if the config cannot be read.
    """
    head = f"napari-medinst {__version__}"
    config_path = Path(model_dir) / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        name, digest = config["name"], config["weights_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{head}\nbundled model: unreadable {config_path.name} ({type(exc).__name__})"
    return f"{head}\nbundled model: {name} (weights sha256 {digest})"
