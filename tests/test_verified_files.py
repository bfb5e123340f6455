"""Bundle files are hashed once: a load trusts a file that matched its sha256 before and has not
changed since, and hashes again one that was rewritten, copied, just written, or when asked."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from onsight.runtime import bundle as bundle_mod
from onsight.runtime import verified
from onsight.runtime.bundle import load_bundle
from onsight.runtime.errors import BundleError

DEMO = Path(__file__).resolve().parents[1] / "engines" / "demo"

pytestmark = pytest.mark.skipif(
    not (DEMO / "bundle.json").is_file(), reason="the shipped demo bundle is missing"
)


@pytest.fixture()
def hashed(monkeypatch, tmp_path) -> list[str]:
    """The names of the files load_bundle hashes; the record lives in tmp_path's cache, and
    files count as settled at once (no 2 s racy window to wait out)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(verified, "RACY_NS", 0)
    names: list[str] = []
    real = bundle_mod.sha256_file

    def counting(path: Path) -> str:
        names.append(path.name)
        return real(path)

    monkeypatch.setattr(bundle_mod, "sha256_file", counting)
    return names


@pytest.fixture()
def demo(tmp_path) -> Path:
    return Path(shutil.copytree(DEMO, tmp_path / "demo"))


def test_a_second_load_hashes_nothing_and_info_verify_hashes_everything(demo, hashed):
    load_bundle(demo)
    files = sorted(json.loads((demo / "bundle.json").read_text())["files"])
    assert sorted(hashed) == files
    hashed.clear()
    load_bundle(demo)
    assert hashed == []
    load_bundle(demo, memo=False)  # what `onsight info --verify` does
    assert sorted(hashed) == files


def test_a_file_rewritten_in_place_with_its_size_is_hashed_again_and_refused(demo, hashed):
    load_bundle(demo)
    time.sleep(0.05)  # past the filesystem's timestamp tick
    f = demo / "vision.onnx"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    with open(f, "r+b") as fh:  # same inode, same size
        fh.write(data)
    with pytest.raises(BundleError, match="vision.onnx does not match its sha256"):
        load_bundle(demo)


def test_a_file_restored_with_its_old_mtime_is_hashed_again(demo, hashed):
    load_bundle(demo)
    f = demo / "text_step.onnx"
    st = f.stat()
    time.sleep(0.05)
    data = bytearray(f.read_bytes())
    data[0] ^= 0xFF
    f.write_bytes(data)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back; ctime cannot be
    with pytest.raises(BundleError, match="text_step.onnx does not match its sha256"):
        load_bundle(demo)


def test_files_written_just_now_are_not_trusted_yet(demo, hashed, monkeypatch):
    monkeypatch.setattr(verified, "RACY_NS", 60 * 10**9)  # copied a moment ago: "racy"
    load_bundle(demo)
    hashed.clear()
    load_bundle(demo)
    assert sorted(hashed) == sorted(json.loads((demo / "bundle.json").read_text())["files"])


def test_a_garbled_or_unwritable_record_only_costs_the_hashing(demo, hashed, tmp_path):
    record = verified.record_path()
    record.parent.mkdir(parents=True)
    record.write_text("{not json")
    load_bundle(demo)  # no error: hashed, and the record rewritten
    assert json.loads(record.read_text())
    hashed.clear()
    load_bundle(demo)
    assert hashed == []
    record.unlink()
    record.mkdir()  # cannot be written as a file
    hashed.clear()
    load_bundle(demo)
    load_bundle(demo)
    assert len(hashed) == 2 * len(json.loads((demo / "bundle.json").read_text())["files"])


def test_onsight_info_verify_says_every_file_matched(demo, hashed, capsys):
    from onsight.runtime.cli import main

    assert main(["info", str(demo), "--verify"]) == 0
    assert "all 4 files match their sha256" in capsys.readouterr().out
