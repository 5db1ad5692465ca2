"""Write failures: one line, exit status 2, and nothing half-written.

We run as root in CI, where read-only permission bits stop nothing; failures are made
with RLIMIT_FSIZE in a subprocess, by making a write or rename raise the OSError the
system would raise, or with paths that really cannot be used (a file as folder).
"""

import errno
import os
import re
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_medinst import _io
from napari_medinst._io import (
    InputError,
    bytes_writer,
    check_output_dir,
    remove_stale_parts,
    write_group,
)
from napari_medinst.cli import main
from napari_medinst.samples import DATA

SEGMENT = ["--model", "classical", "--pixel-size", "0.25"]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (hidden ones too) with its bytes."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def parts(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".part")]


@pytest.fixture
def tile(tmp_path):
    path = tmp_path / "tile.tif"
    path.write_bytes((DATA / "he_tile.tif").read_bytes())
    return path


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the model is loaded or run: checks must come before any work."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model ran although the output folder is unusable")

    monkeypatch.setattr("napari_medinst.segment.get_model", refuse)
    monkeypatch.setattr("napari_medinst.demo.segment", refuse)


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# ----------------------------------------------------------------------- write_group


def test_group_failing_write_leaves_previous_files_and_no_part(tmp_path):
    (tmp_path / "a.csv").write_bytes(b"old a")
    (tmp_path / "b.tif").write_bytes(b"old b")
    before = snapshot(tmp_path)

    def disk_full(tmp):
        tmp.write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError) as info:
        write_group(
            [
                (tmp_path / "a.csv", bytes_writer(b"new a")),
                (tmp_path / "c.json", bytes_writer(b"new c")),
                (tmp_path / "b.tif", disk_full),
            ],
            overwrite=True,
        )
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "b.tif")
    assert _io.describe_os_error(info.value) == f"{tmp_path / 'b.tif'}: " + (
        "disk full (no space left on the device)"
    )
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("overwrite", [True, False])
def test_group_failing_rename_restores_what_was_there(tmp_path, monkeypatch, overwrite):
    """The second rename fails: the first file renamed is put back (or removed)."""
    if overwrite:
        for name in ("a.csv", "b.tif"):
            (tmp_path / name).write_bytes(b"old " + name.encode())
    before = snapshot(tmp_path)
    calls = []
    # with overwrite the files are renamed with os.replace, without it linked (no clobber)
    op = "replace" if overwrite else "link"
    real = getattr(os, op)

    def second_fails(src, dst, *args, **kwargs):
        if Path(dst).name in ("a.csv", "b.tif"):
            calls.append(dst)
            if len(calls) == 2:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, op, second_fails)
    with pytest.raises(OSError, match=r"b\.tif"):
        write_group(
            [
                (tmp_path / "a.csv", bytes_writer(b"new a")),
                (tmp_path / "b.tif", bytes_writer(b"new")),
            ],
            overwrite=overwrite,
        )
    assert calls[:2] == [tmp_path / "a.csv", tmp_path / "b.tif"]
    assert snapshot(tmp_path) == before


def test_group_fsyncs_each_file_before_renaming_it(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src)))
        return real_replace(src, dst)

    if not Path("/proc/self/fd").exists():
        pytest.skip("needs /proc to name file descriptors")
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    _io.write_bytes(tmp_path / "x.json", b"{}", overwrite=True)
    (kind, tmp), *rest = events
    assert kind == "fsync" and tmp.endswith(".part") and Path(tmp).name.startswith(".x.json.")
    assert rest[0] == ("replace", tmp)
    assert ("fsync", str(tmp_path)) in rest[1:]  # the folder, after the rename
    assert (tmp_path / "x.json").read_bytes() == b"{}"


def test_existing_file_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "b.tif").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match=r"b\.tif: already exists"):
        write_group(
            [(tmp_path / "a.csv", bytes_writer(b"a")), (tmp_path / "b.tif", bytes_writer(b"b"))]
        )
    assert snapshot(tmp_path) == {"b.tif": b"mine"}


# --------------------------------------------------------------------- the output folder


def test_check_output_dir(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match=r"f: is a file, not a folder"):
        check_output_dir(tmp_path / "f")
    with pytest.raises(InputError, match=r"sub: cannot be created: .*f is a file"):
        check_output_dir(tmp_path / "f" / "sub")
    new = tmp_path / "new" / "deeper"
    assert check_output_dir(new) == new and not (tmp_path / "new").exists()  # nothing made
    assert snapshot(tmp_path) == {"f": b"x"}  # the probe file is gone
    monkeypatch.setattr(_io.shutil, "disk_usage", lambda p: _io.shutil._ntuple_diskusage(9, 9, 9))
    with pytest.raises(InputError, match=r"deeper: only 9 bytes free on its disk"):
        check_output_dir(new)


def test_segment_output_path_is_a_file(tmp_path, tile, capsys, no_model):
    (tmp_path / "out").write_bytes(b"my notes")
    for out, what in [("out", "is a file"), ("out/sub", "cannot be created")]:
        rc = main(["segment", str(tile), "-o", str(tmp_path / out), *SEGMENT])
        err = one_line(capsys)
        assert rc == 2 and what in err and str(tmp_path / out) in err
    assert (tmp_path / "out").read_bytes() == b"my notes"


@pytest.mark.parametrize("exists", [True, False])
def test_segment_read_only_output_folder(tmp_path, tile, capsys, monkeypatch, no_model, exists):
    """Read-only (existing, or its parent when it is to be created): refused before work."""
    ro = tmp_path / "ro"
    ro.mkdir()
    out = ro if exists else ro / "new"
    real = _io.tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == ro:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(ro))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(_io.tempfile, "mkstemp", mkstemp)
    rc = main(["segment", str(tile), "-o", str(out), *SEGMENT])
    err = one_line(capsys)
    assert rc == 2 and str(out) in err and "read-only file system" in err
    assert not any(ro.iterdir())


def test_segment_refuses_when_the_disk_is_clearly_too_full(tmp_path, tile, capsys, monkeypatch):
    free = 200_000  # the maps of a 512 x 512 tile need about 1 MB
    monkeypatch.setattr(
        _io.shutil, "disk_usage", lambda p: _io.shutil._ntuple_diskusage(10**9, 10**9, free)
    )
    monkeypatch.setattr("napari_medinst.segment.get_model", pytest.fail)
    rc = main(["segment", str(tile), "-o", str(tmp_path / "o"), *SEGMENT, "--save-maps"])
    err = one_line(capsys)
    assert rc == 2 and "only 200.0 KB free" in err and str(tmp_path / "o") in err


def test_demo_refuses_an_unusable_output_folder_before_the_model(tmp_path, capsys, no_model):
    (tmp_path / "file").write_text("x")
    rc = main(["demo", "-o", str(tmp_path / "file"), "--gui", "none"])
    err = one_line(capsys)
    assert rc == 2 and "is a file" in err and str(tmp_path / "file") in err


# ------------------------------------------------------------- failures while writing


def fill_disk_at_hv(monkeypatch):
    """Writing the HV map (the only 2 x H x W float TIFF) fills the disk half-way."""
    real = tifffile.imwrite

    def imwrite(path, data, **kwargs):
        data = np.asarray(data)
        if data.ndim == 3 and data.shape[0] == 2 and data.dtype == np.float32:
            Path(path).write_bytes(b"II*\0" + bytes(1000))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, data, **kwargs)

    monkeypatch.setattr(tifffile, "imwrite", imwrite)


def test_disk_full_during_save_maps_leaves_nothing(tmp_path, tile, capsys, monkeypatch):
    out = tmp_path / "out"
    fill_disk_at_hv(monkeypatch)
    rc = main(["segment", str(tile), "-o", str(out), *SEGMENT, "--save-maps"])
    err = one_line(capsys)
    assert rc == 2 and f"{out / 'tile_hv.tif'}: disk full" in err
    assert not out.exists() or snapshot(out) == {}  # no instances, no CSV, no .part


def test_disk_full_with_overwrite_keeps_the_previous_outputs(tmp_path, tile, capsys, monkeypatch):
    out = tmp_path / "out"
    assert main(["segment", str(tile), "-o", str(out), *SEGMENT, "--save-maps"]) == 0
    before = snapshot(out)
    fill_disk_at_hv(monkeypatch)  # from now on the disk is full
    args = ["segment", str(tile), "-o", str(out), *SEGMENT[:2], "--pixel-size", "0.3"]
    rc = main([*args, "--save-maps", "--overwrite"])
    capsys.readouterr()
    assert rc == 2 and snapshot(out) == before


def _limited(limit: int):
    """preexec_fn: files of this process may not grow beyond ``limit`` bytes (ulimit -f)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_file_size_limit_one_line_and_nothing_written(tmp_path, tile):
    """ulimit -f: without ignoring SIGXFSZ the kernel kills the process mid-write."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "napari_medinst.cli",
            "segment",
            str(tile),
            "-o",
            str(out),
            *SEGMENT,
        ],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=_limited(4096),  # the CSV (< 1 KB) fits, the instances TIFF does not
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (
        f"napari-medinst segment: error: {out / 'tile_instances.tif'}: "
        "file size limit reached (file too large; see ulimit -f)"
    )
    assert snapshot(out) == {"keep.txt": b"mine"}


# --------------------------------------------------------------- a killed run's leftovers

KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from napari_medinst._io import write_group

    def slow(tmp):
        tmp.write_bytes(b"half a TIFF")
        print("writing", flush=True)
        time.sleep(120)

    write_group([(Path(sys.argv[1]) / "tile_instances.tif", slow)])
    """
)


def test_a_killed_runs_part_file_is_removed_by_the_next_run(tmp_path, tile):
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(out)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    (left,) = parts(out)
    assert left.name.startswith(".tile_instances.tif.")
    # not ours, or a live process's: never touched
    others = [".notes.part", "draft.part", f".x.tif.{os.getpid()}-abcdefgh.part"]
    for name in others:
        (out / name).write_text("keep")
    assert main(["segment", str(tile), "-o", str(out), *SEGMENT]) == 0
    assert not left.exists()
    assert all((out / name).read_text() == "keep" for name in others)
    assert tifffile.imread(out / "tile_instances.tif").max() > 20


def test_remove_stale_parts_only_touches_our_pattern(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".a.tif.{dead.pid}-abc_1234.part"
    stale.write_text("x")
    staging = tmp_path / f".staging.{dead.pid}-zzzzzzzz.part"
    (staging / "images").mkdir(parents=True)
    keep = [
        tmp_path / f".a.tif.{dead.pid}-short.part",
        tmp_path / "a.tif",
        tmp_path / f"a.tif.{dead.pid}-abc_1234.part",  # no leading dot
    ]
    for p in keep:
        p.write_text("keep")
    old = tmp_path / f".b.tif.{os.getpid()}-abcdefgh.part"  # ours, alive, but a day old
    old.write_text("x")
    os.utime(old, (0, 0))
    assert sorted(remove_stale_parts(tmp_path)) == sorted([stale, staging, old])
    assert all(p.read_text() == "keep" for p in keep)
    assert remove_stale_parts(tmp_path / "missing") == []


def _b36(n: int) -> str:
    return np.base_repr(n, 36).lower()


def test_parts_of_another_host_are_removed_only_by_age(tmp_path):
    """An array job on another node (or container) shares the folder: its pids mean nothing here."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    now, host = int(time.time()), _io._host_tag()
    assert re.fullmatch(r"[A-Za-z0-9-]{1,20}", host)
    ours_dead = tmp_path / f".a.tif.{dead.pid}@{host}.t{_b36(now)}-abcdefgh.part"
    theirs = tmp_path / f".b.tif.{dead.pid}@node-17-beef.t{_b36(now)}-abcdefgh.part"
    their_staging = tmp_path / f".staging.{dead.pid}@node-17-beef.t{_b36(now)}-abcdefgh.part"
    their_old = tmp_path / f".c.tif.{dead.pid}@node-17-beef.t{_b36(now - 2 * 86400)}-abcdefgh.part"
    for p in (ours_dead, theirs, their_old):
        p.write_text("x")
    (their_staging / "images").mkdir(parents=True)
    os.utime(their_old, (0, 0))
    assert sorted(remove_stale_parts(tmp_path)) == sorted([ours_dead, their_old])
    assert theirs.read_text() == "x" and (their_staging / "images").is_dir()
    # what this process writes carries this host
    part = _io._new_part(tmp_path / "d.tif")
    assert f"@{host}.t" in part.name and _io._PART_RE.match(part.name)["pid"] == str(os.getpid())


def test_the_backup_of_an_old_file_is_not_stale(tmp_path):
    """A hard link keeps the file's old mtime: the age comes from the name, not the mtime."""
    out = tmp_path / "gt_instances.tif"
    out.write_bytes(b"precious v1")
    os.utime(out, (0, 0))  # written long ago
    backup = _io._backup(out)
    assert os.path.getmtime(backup) == 0
    assert remove_stale_parts(tmp_path) == []  # e.g. by a concurrent run
    assert backup.read_bytes() == b"precious v1"


def test_a_restore_that_fails_is_reported_and_the_old_file_kept(tmp_path, monkeypatch):
    """The group fails, then putting back a.csv fails too: never claim nothing changed."""
    for name in ("a.csv", "b.tif"):
        (tmp_path / name).write_bytes(b"old " + name.encode())
    calls = []
    real = os.replace

    def fails(src, dst, *args, **kwargs):
        calls.append(Path(dst).name)
        if Path(dst).name == "b.tif" or calls.count("a.csv") == 2:  # b's rename, a's restore
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", fails)
    items = [
        (tmp_path / "a.csv", bytes_writer(b"new a")),
        (tmp_path / "b.tif", bytes_writer(b"new")),
    ]
    with pytest.raises(OSError) as info:
        write_group(items, overwrite=True)
    (kept,) = tmp_path.glob("a.previous-*.csv")
    message = _io.describe_os_error(info.value)
    assert isinstance(info.value, _io.RollbackError) and "\n" not in message
    assert f"{tmp_path / 'b.tif'}: input/output error" in message
    assert f"{tmp_path / 'a.csv'} could not be restored" in message and str(kept) in message
    assert kept.read_bytes() == b"old a.csv" and (tmp_path / "b.tif").read_bytes() == b"old b.tif"
    assert parts(tmp_path) == [] and remove_stale_parts(tmp_path) == []
