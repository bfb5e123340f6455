"""runtime.files: reports and snapshots are written whole or not at all."""

import os
import stat

import pytest

from onsight.runtime.errors import OnsightError
from onsight.runtime.files import current_umask, write_text_atomic


def test_write_text_atomic_replaces_whole_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "reports" / "eval.json"  # the parent is created
    write_text_atomic(target, "old")
    write_text_atomic(target, "new\n")
    assert target.read_text() == "new\n"
    assert os.listdir(target.parent) == ["eval.json"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~current_umask()


def test_write_text_atomic_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "eval.json"
    write_text_atomic(target, "old")

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        write_text_atomic(target, "new")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["eval.json"]


def test_write_text_atomic_names_a_place_it_cannot_write(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OnsightError, match="cannot write .*choose another path"):
        write_text_atomic(blocker / "eval.json", "x")
