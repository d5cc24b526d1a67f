"""utils/core/file_writes.py: the one way files and folders are written atomically."""
from __future__ import annotations

import json
import os
import stat

import pytest

from utils.core.file_writes import (TMP_SUFFIX, current_umask, replace_folder_atomic, temp_sibling, write_atomic,
                                    write_json_atomic)


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_temp_sibling_is_hidden_unique_and_beside(tmp_path):
    a, b = temp_sibling(tmp_path / "m.safetensors"), temp_sibling(tmp_path / "m.safetensors")
    assert a != b and a.parent == tmp_path and a.name.startswith(".m.safetensors.") and a.name.endswith(TMP_SUFFIX)
    assert f".{os.getpid()}." in a.name


def test_write_atomic_replaces_and_follows_the_umask(tmp_path, umask_027):
    target = tmp_path / "sub" / "f.bin"
    write_atomic(target, lambda tmp: (tmp.write_bytes(b"old"), os.chmod(tmp, 0o600)))
    assert target.read_bytes() == b"old" and mode(target) == 0o640 == 0o666 & ~current_umask()
    write_atomic(target, lambda tmp: tmp.write_bytes(b"new"))
    assert target.read_bytes() == b"new" and os.listdir(target.parent) == ["f.bin"]


def test_a_failing_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "f.json"
    write_json_atomic(target, {"a": 1})
    assert target.read_text() == '{\n  "a": 1\n}\n'

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, fail)
    assert json.loads(target.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["f.json"]
    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, lambda tmp: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert os.listdir(tmp_path) == ["f.json"]


def test_replace_folder_atomic(tmp_path, umask_027):
    final = tmp_path / "ckpt"

    def write(version):
        def contents(tmp):
            (tmp / "unet").mkdir()
            (tmp / "unet" / "w.safetensors").write_text(version)
            os.chmod(tmp / "unet" / "w.safetensors", 0o600)  # as safetensors' save_file creates it
        return contents
    replace_folder_atomic(final, write("1"))
    assert (final / "unet" / "w.safetensors").read_text() == "1"
    assert mode(final / "unet" / "w.safetensors") == 0o640 and mode(final / "unet") == 0o750
    replace_folder_atomic(final, write("2"))  # an existing folder is replaced whole
    assert (final / "unet" / "w.safetensors").read_text() == "2" and os.listdir(tmp_path) == ["ckpt"]

    def fail(tmp):
        (tmp / "half").write_text("x")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        replace_folder_atomic(final, fail)
    assert os.listdir(tmp_path) == ["ckpt"] and (final / "unet" / "w.safetensors").read_text() == "2"


def test_temps_of_writers_that_ended_are_removed_and_live_ones_kept(tmp_path):
    """A save killed halfway leaves its hidden temp folder; the next save in that folder removes it, but never the
    temp of a writer that is still running."""
    from utils.core.file_writes import remove_stale_temps
    dead_pid = 2**22 + 12345   # above the default pid_max: no such process
    stale = tmp_path / f".run-ep01-gs00004.{dead_pid}.abcd1234{TMP_SUFFIX}"
    live = tmp_path / f".run-ep02-gs00008.{os.getpid()}.abcd1234{TMP_SUFFIX}"
    (stale / "unet").mkdir(parents=True)
    live.mkdir()
    keep = tmp_path / "run-ep01-gs00004"
    keep.mkdir()
    assert remove_stale_temps(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and keep.exists()
