"""napari-medinst: nucleus instance segmentation and annotation.

The core (everything outside :mod:`napari_medinst._napari`) depends only on numpy,
scipy, scikit-image, tifffile and torch; napari, magicgui and Qt are imported only by
the adapter package.
"""

__version__ = "0.1.0"
