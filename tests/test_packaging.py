"""The wheel carries what a plain ``pip install .`` user needs: manifest, model, samples."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_has_manifest_model_and_samples(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("napari_medinst-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        manifest = z.read("napari_medinst/napari.yaml").decode()
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        entry = z.read(entry_points).decode()
    assert manifest == (ROOT / "napari.yaml").read_text()  # the symlink is resolved
    assert yaml.safe_load(manifest)["name"] == "napari-medinst"
    assert "napari-medinst = napari_medinst:napari.yaml" in entry
    for need in (
        "models/default/weights.pt",
        "models/default/config.json",
        "data/he_tile.tif",
        "data/fluo_tile.tif",
        "data/SOURCE.md",
    ):
        assert f"napari_medinst/{need}" in names
    assert wheel.stat().st_size < 15 * 2**20
