import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from napari_medinst.cli import main
from napari_medinst.samples import DATA


@pytest.fixture
def he_image(tmp_path):
    path = tmp_path / "tile.tif"
    path.write_bytes((DATA / "he_tile.tif").read_bytes())
    return path


def test_segment_writes_instances_scores_and_maps(tmp_path, he_image):
    out = tmp_path / "out"
    rc = main(
        [
            "segment",
            str(he_image),
            "-o",
            str(out),
            "--model",
            "classical",
            "--pixel-size",
            "0.25",
            "--save-maps",
        ]
    )
    assert rc == 0
    labels = tifffile.imread(out / "tile_instances.tif")
    assert labels.dtype == np.uint32 and labels.shape == (512, 512) and labels.max() > 20
    rows = (out / "tile_instances.csv").read_text().splitlines()
    assert rows[0] == "label,score" and len(rows) == labels.max() + 1
    assert tifffile.imread(out / "tile_hv.tif").shape == (2, 512, 512)
    # outputs are never overwritten without --overwrite
    assert main(["segment", str(he_image), "-o", str(out), "--model", "classical"]) == 2


def test_segment_stack_plane_by_plane(tmp_path):
    img = tifffile.imread(DATA / "fluo_tile.tif")
    stack = np.stack([img, img[:, ::-1]])
    tifffile.imwrite(tmp_path / "stack.tif", stack)
    assert (
        main(["segment", str(tmp_path / "stack.tif"), "-o", str(tmp_path), "--model", "classical"])
        == 0
    )
    labels = tifffile.imread(tmp_path / "stack_instances.tif")
    assert labels.shape == stack.shape
    ids0, ids1 = set(np.unique(labels[0])) - {0}, set(np.unique(labels[1])) - {0}
    assert ids0 and ids1 and not ids0 & ids1  # ids unique across planes


@pytest.mark.parametrize(
    ("content", "name", "match"),
    [
        (None, "missing.tif", "file not found"),
        (b"not an image at all", "junk.tif", "not a readable image"),
        (b"x", "notes.txt", "unsupported file type"),
        ("2ch", "twochan.tif", "2-channel"),
    ],
)
def test_bad_input_one_clear_line_and_no_output(tmp_path, capsys, content, name, match):
    path = tmp_path / name
    if content == "2ch":
        tifffile.imwrite(path, np.zeros((32, 32, 2), np.uint8))
    elif content is not None:
        path.write_bytes(content)
    out = tmp_path / "out"
    rc = main(["segment", str(path), "-o", str(out), "--model", "classical"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and match in err and name in err
    assert not out.exists() or not any(out.iterdir())


def test_bad_params_and_missing_model(tmp_path, he_image, capsys):
    bad = tmp_path / "p.json"
    bad.write_text('{"fg_threshold": 7}')
    assert main(["segment", str(he_image), "-o", str(tmp_path / "o"), "--params", str(bad)]) == 2
    assert "fg_threshold" in capsys.readouterr().err
    rc = main(
        ["segment", str(he_image), "-o", str(tmp_path / "o"), "--model", str(tmp_path / "none")]
    )
    assert rc == 2 and "model folder not found" in capsys.readouterr().err


def test_segment_then_evaluate_json(tmp_path, he_image):
    out = tmp_path / "out"
    assert (
        main(
            [
                "segment",
                str(he_image),
                "-o",
                str(out),
                "--model",
                "classical",
                "--pixel-size",
                "0.25",
            ]
        )
        == 0
    )
    gt_dir = tmp_path / "gt"
    gt_dir.mkdir()
    (gt_dir / "tile.tif").write_bytes((DATA / "he_tile_labels.tif").read_bytes())
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "napari_medinst.cli",
            "evaluate",
            "--pred",
            str(out),
            "--gt",
            str(gt_dir),
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(proc.stdout)
    img = result["images"][0]
    assert img["name"] == "tile" and 0.2 < img["aji"] < 1.0
    assert set(img["accuracy"]) == {f"{t:.2f}" for t in np.arange(0.5, 0.96, 0.05)}


def test_two_inputs_with_one_output_name_are_refused_before_writing(tmp_path, he_image, capsys):
    other = tmp_path / "b"
    other.mkdir()
    twin = other / "tile.tif"
    twin.write_bytes(he_image.read_bytes())
    out = tmp_path / "out"
    assert main(["segment", str(he_image), str(twin), "-o", str(out), "--model", "classical"]) == 2
    assert "same output name" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_implausible_pixel_size_is_refused(tmp_path, he_image, capsys):
    rc = main(
        [
            "segment",
            str(he_image),
            "-o",
            str(tmp_path / "o"),
            "--model",
            "classical",
            "--pixel-size",
            "40",
        ]
    )
    err = capsys.readouterr().err  # refused before any work, naming the argument
    assert rc == 2 and "--pixel-size" in err and "0.05-5 range" in err


def test_segment_with_mirror_averaging(tmp_path, he_image):
    """--tta runs the default model on the four mirror images; the result differs
    from the plain run but only a little."""
    from napari_medinst.metrics import evaluate

    outs = {}
    for flag in ("--no-tta", "--tta"):
        out = tmp_path / flag.strip("-")
        args = ["segment", str(he_image), "-o", str(out), "--pixel-size", "0.25", flag]
        assert main(args) == 0
        outs[flag] = tifffile.imread(out / "tile_instances.tif")
    assert not np.array_equal(outs["--tta"], outs["--no-tta"])
    assert evaluate(outs["--no-tta"], outs["--tta"]).aji > 0.8


def _subcommands():
    import argparse

    from napari_medinst.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices


def test_help_describes_every_subcommand_and_option_with_its_default():
    """Issue 17: a description for every subcommand, a help text naming the default for
    every option that has one, and no reStructuredText backticks in --help."""
    import argparse
    import re

    parser, commands = _subcommands()
    assert "`" not in parser.format_help()
    for name, sub in commands.items():
        assert sub.description, f"{name}: no description"
        text = sub.format_help()
        assert "`" not in text, f"{name}: backticks in --help"
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest}: no help"
            if action.option_strings and action.default not in (None, False):
                assert re.search(r"\bdefault[:;\s)]", action.help % vars(action)), (
                    f"{name} {action.option_strings}: default not stated"
                )


def test_help_strips_restructuredtext_roles():
    from napari_medinst.cli import _PlainHelpFormatter

    _, commands = _subcommands()
    sub = commands["segment"]
    sub.description = "Uses :func:`napari_medinst.segment.segment` on ``TIFF`` files."
    assert isinstance(sub._get_formatter(), _PlainHelpFormatter)
    text = sub.format_help()
    assert "Uses napari_medinst.segment.segment on TIFF files." in text
