"""napari adapters: sample data, dock widgets. The only part of the package that imports napari/Qt."""
