"""The package stands on its own: metadata, README page, version, and a clean install.

The wheel and sdist are built once per module from the working tree
(``python -m build --no-isolation``); the slow test installs the wheel into a fresh
virtual environment and runs the demo and ``npe2 validate`` there.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import os
import re
import subprocess
import sys
import tarfile
import time
import zipfile
from email.parser import Parser
from html import unescape
from pathlib import Path

import pytest
import yaml

import napari_medinst
from napari_medinst import version_text
from napari_medinst.cli import main

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "napari_medinst"
BUNDLED = SRC / "models" / "default"
MAX_WHEEL_BYTES = 15 * 2**20


def _normal(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(line: str) -> str:
    """Distribution name at the start of a ``Requires-Dist`` value."""
    return _normal(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line).group(0))


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    """Wheel and sdist built from the working tree, once for this module."""
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "build", "--no-isolation", "-o", str(out), str(ROOT)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return {"wheel": next(out.glob("napari_medinst-*.whl")), "sdist": next(out.glob("*.tar.gz"))}


@pytest.fixture(scope="module")
def metadata(dist):
    """The wheel's ``METADATA`` as an email message (multi-valued fields via get_all)."""
    with zipfile.ZipFile(dist["wheel"]) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return Parser().parsestr(z.read(name).decode())


# --- version --------------------------------------------------------------------------


def test_version_prints_release_model_name_and_weights_hash(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    digest = hashlib.sha256((BUNDLED / "weights.pt").read_bytes()).hexdigest()
    assert lines == [
        f"napari-medinst {napari_medinst.__version__}",
        f"bundled model: default (weights sha256 {digest})",
    ]


def test_version_does_not_import_torch_or_napari():
    code = (
        "import sys\n"
        "from napari_medinst.cli import main\n"
        "try:\n    main(['--version'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "heavy = [m for m in ('torch', 'napari', 'qtpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "bundled model: default" in done.stdout


@pytest.mark.parametrize("content", ["{not json", '{"name": "x"}', "[1, 2]"])
def test_version_text_names_an_unreadable_model_config(tmp_path, content):
    (tmp_path / "config.json").write_text(content)
    text = version_text(tmp_path)
    assert text.splitlines()[0] == f"napari-medinst {napari_medinst.__version__}"
    assert text.splitlines()[1].startswith("bundled model: unreadable config.json (")


def test_version_text_of_a_missing_model_folder(tmp_path):
    text = version_text(tmp_path / "absent")
    assert "bundled model: unreadable config.json (FileNotFoundError)" in text


def test_one_version_everywhere(metadata):
    version = napari_medinst.__version__
    assert metadata["Version"] == version
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert str(citation["version"]) == version
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    released = re.findall(r"^## \[(\d[^\]]*)\]", changelog, flags=re.MULTILINE)
    assert released and released[0] == version


# --- wheel and sdist metadata ----------------------------------------------------------


def test_wheel_metadata_license_classifiers_and_readme(metadata, dist):
    assert metadata["License-Expression"] == "BSD-3-Clause"
    license_files = set(metadata.get_all("License-File"))
    assert license_files == {"LICENSE", "LICENSE-models-and-data.md"}
    with zipfile.ZipFile(dist["wheel"]) as z:
        names = z.namelist()
    for name in license_files:
        assert any(n.endswith(f".dist-info/licenses/{name}") for n in names)
    classifiers = set(metadata.get_all("Classifier"))
    for need in (
        "Framework :: napari",
        "Operating System :: OS Independent",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.11",
    ):
        assert need in classifiers
    assert any(c.startswith("Development Status :: ") for c in classifiers)
    assert metadata["Requires-Python"] == ">=3.11"  # the only version tested; numpy 2.4 needs it
    assert metadata["Author"]
    assert metadata["Description-Content-Type"] == "text/markdown"
    assert metadata.get_payload().strip() == (ROOT / "README.md").read_text("utf-8").strip()


def test_wheel_has_manifest_model_and_samples_and_stays_small(dist):
    with zipfile.ZipFile(dist["wheel"]) as z:
        names = set(z.namelist())
        manifest = z.read("napari_medinst/napari.yaml").decode()
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        entry = z.read(entry_points).decode()
    assert manifest == (ROOT / "napari.yaml").read_text()  # the symlink is resolved
    assert yaml.safe_load(manifest)["name"] == "napari-medinst"
    assert "napari-medinst = napari_medinst:napari.yaml" in entry
    assert "napari-medinst = napari_medinst.cli:main" in entry
    for need in (
        "models/default/weights.pt",
        "models/default/config.json",
        "data/he_tile.tif",
        "data/fluo_tile.tif",
        "data/SOURCE.md",
    ):
        assert f"napari_medinst/{need}" in names
    assert dist["wheel"].stat().st_size < MAX_WHEEL_BYTES


def test_sdist_carries_licenses_readme_changelog_and_docs(dist):
    with tarfile.open(dist["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for need in (
        "LICENSE",
        "LICENSE-models-and-data.md",
        "README.md",
        "CHANGELOG.md",
        "constraints.txt",
        "docs/model_card.md",
        "docs/images/segment_contours.png",
        "src/napari_medinst/models/default/weights.pt",
    ):
        assert need in names


def _third_party_imports() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Top-level third-party imports in ``src``: (required, optional) name -> files.

    An import inside ``try: ... except ImportError`` is optional; one under
    ``if TYPE_CHECKING:`` is skipped; every other one is required.
    """
    required: dict[str, set[str]] = {}
    optional: dict[str, set[str]] = {}

    def visit(node, guarded: bool, where: str) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child, guarded, where)
            return
        if isinstance(node, ast.Try):
            catches = {
                ast.unparse(t)
                for h in node.handlers
                if h.type is not None
                for t in (h.type.elts if isinstance(h.type, ast.Tuple) else [h.type])
            }
            inner = guarded or bool(catches & {"ImportError", "ModuleNotFoundError"})
            for child in node.body:
                visit(child, inner, where)
            for child in [*node.handlers, *node.orelse, *node.finalbody]:
                visit(child, guarded, where)
            return
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            top = name.split(".")[0]
            if top not in sys.stdlib_module_names and top != "napari_medinst":
                (optional if guarded else required).setdefault(top, set()).add(where)
        for child in ast.iter_child_nodes(node):
            visit(child, guarded, where)

    for path in sorted(SRC.rglob("*.py")):
        visit(ast.parse(path.read_text(encoding="utf-8")), False, str(path.relative_to(SRC)))
    return required, optional


def _distributions(import_name: str) -> set[str]:
    """Distribution names that provide ``import_name`` here (else the name itself)."""
    found = importlib.metadata.packages_distributions().get(import_name) or [import_name]
    return {_normal(d) for d in found}


def test_every_third_party_import_is_declared(metadata):
    base, extras = set(), set()
    for line in metadata.get_all("Requires-Dist"):
        (extras if "extra ==" in line else base).add(_requirement_name(line))
    required, optional = _third_party_imports()
    assert {"numpy", "torch", "skimage", "PIL", "qtpy", "magicgui"} <= set(required)
    missing = {
        f"{name} ({', '.join(sorted(files))})"
        for name, files in required.items()
        if not _distributions(name) & base
    }
    assert not missing, f"imported but not in the core dependencies: {sorted(missing)}"
    undeclared = {
        f"{name} ({', '.join(sorted(files))})"
        for name, files in optional.items()
        if not _distributions(name) & (base | extras)
    }
    assert not undeclared, f"optional imports in no extra: {sorted(undeclared)}"


def test_dependencies_have_lower_bounds_that_the_tested_versions_meet(metadata):
    from packaging.requirements import Requirement

    for line in metadata.get_all("Requires-Dist"):
        req = Requirement(line)
        lower = [s.version for s in req.specifier if s.operator == ">="]
        assert lower, f"{req.name}: no lower bound"
        try:
            installed = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            continue  # an extra this environment does not install
        assert req.specifier.contains(installed, prereleases=True), (str(req), installed)


def test_extras_bring_something(metadata):
    extras = metadata.get_all("Provides-Extra")
    assert {"pyqt6", "testing"} <= set(extras)
    for extra in extras:
        brought = [r for r in metadata.get_all("Requires-Dist") if f"extra == '{extra}'" in r]
        assert brought, f"extra {extra!r} installs nothing"
    pyqt6 = {_requirement_name(r) for r in metadata.get_all("Requires-Dist") if "'pyqt6'" in r}
    assert pyqt6 == {"pyqt6"}


# --- the package page ------------------------------------------------------------------


def test_twine_check_passes_on_wheel_and_sdist(dist):
    pytest.importorskip("comrak", reason="twine renders Markdown only with readme-renderer[md]")
    cmd = [
        sys.executable,
        "-m",
        "twine",
        "check",
        "--strict",
        str(dist["wheel"]),
        str(dist["sdist"]),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("PASSED") == 2


def test_readme_renders_with_picture_install_and_citation():
    from readme_renderer.markdown import render

    pytest.importorskip("comrak", reason="readme-renderer[md] renders Markdown")
    html = render((ROOT / "README.md").read_text(encoding="utf-8"))
    assert html is not None
    headings = re.findall(r"<h2[^>]*>(.*?)<a ", html)
    for need in ("What it does", "Install", "Command line", "Citation"):
        assert need in headings
    first = headings.index("What it does")
    assert re.search(r'<img src="docs/images/segment_contours.png"', html.split("<h2")[first + 1])
    text = unescape(re.sub(r"<[^>]+>", "", html))  # code blocks come highlighted
    assert 'pip install "napari-medinst[pyqt6]"' in text
    assert "Install/Uninstall Plugins" in text
    assert text.count("bash scripts/setup.sh") >= 2
    for link in re.findall(r'(?:src|href)="([^"#][^"]*)"', html):
        if not link.startswith("https://"):
            assert (ROOT / link.split("#")[0]).exists(), f"README links to a missing file: {link}"


def test_napari_hub_description_and_config():
    config = yaml.safe_load((ROOT / ".napari-hub" / "config.yml").read_text(encoding="utf-8"))
    assert config["labels"]["ontology"].startswith("EDAM-BIOIMAGING:")
    assert "Cell segmentation" in config["labels"]["terms"]
    description = (ROOT / ".napari-hub" / "DESCRIPTION.md").read_text(encoding="utf-8")
    assert description.startswith("# napari-medinst")
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", description):
        assert (ROOT / ".napari-hub" / image).resolve().exists(), image


def test_model_card_states_license_and_intended_use():
    card = (ROOT / "docs" / "model_card.md").read_text(encoding="utf-8")
    section = card.split("## License and intended use", 1)[1].split("\n## ", 1)[0]
    section = " ".join(section.split())
    for need in (
        "CC BY-NC-SA 4.0",
        "non-commercial",
        "not a medical device",
        "LICENSE-models-and-data.md",
    ):
        assert need in section
    digest = hashlib.sha256((BUNDLED / "weights.pt").read_bytes()).hexdigest()
    assert digest in card


# --- a clean install -------------------------------------------------------------------


def _clean_env(venv: Path) -> dict[str, str]:
    """Environment for commands in ``venv``: its bin first, nothing from this checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    return env


@pytest.mark.slow
def test_wheel_installs_and_runs_in_a_fresh_venv(dist, tmp_path):
    venv, work = tmp_path / "venv", tmp_path / "work"
    work.mkdir()
    bin_ = venv / "bin"
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = _clean_env(venv)

    def run(*cmd: str, timeout: float = 600) -> str:
        done = subprocess.run(
            cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout
        )
        assert done.returncode == 0, f"{cmd}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
        return done.stdout

    try:
        run(
            str(bin_ / "python"), "-m", "pip", "install", "--quiet",
            "-c", str(ROOT / "constraints.txt"), f"{dist['wheel']}[pyqt6]",
            timeout=1800,
        )  # fmt: skip
        installed = time.monotonic()
        where = run(
            str(bin_ / "python"), "-c", "import napari_medinst; print(napari_medinst.__file__)"
        )
        assert Path(where.strip()).is_relative_to(venv)  # not this checkout's src
        assert "bundled model: default" in run(str(bin_ / "napari-medinst"), "--version")
        run(str(bin_ / "napari-medinst"), "demo", "--gui", "none", "-o", str(work / "out"))
        for name in ("instances.tif", "instances.csv", "overlay.png", "scores.json"):
            assert (work / "out" / f"he_sample_{name}").stat().st_size > 0
        assert "valid" in run(str(bin_ / "npe2"), "validate", "napari-medinst")
        print(
            f"\nfresh venv: install {installed - start:.0f} s, "
            f"demo + validate {time.monotonic() - installed:.0f} s"
        )
    finally:
        import shutil

        shutil.rmtree(venv, ignore_errors=True)  # ~1.8 GB; pytest keeps old tmp dirs
