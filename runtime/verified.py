"""Which bundle files were already checked against their sha256, so that a bundle of
gigabytes (an 8B model's graphs, TensorRT plans) is hashed once, not at every start.

A file counts as checked while its inode, size, mtime and ctime are those it had when it
matched: writing it (or copying, restoring, `touch -d` on it) changes its ctime, so it is hashed
again. That holds on filesystems with a real ctime (ext4, xfs, btrfs, overlayfs); on FAT/exFAT
cards, squashfs or images built with fixed timestamps a file rewritten to its old size and
mtime may be trusted; a new bundle.json (every export and build writes one) checks its files
afresh anyway. Like git's index this cannot see bits rotting in place; `onsight info --verify`
hashes every file regardless. The record lives in the user's cache (`files.cache_dir()`), is written
atomically, and a record that cannot be read or written only costs the hashing.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from onsight.runtime.errors import OnsightError
from onsight.runtime.files import cache_dir, write_text_atomic

log = logging.getLogger(__name__)

_lock = threading.Lock()
RACY_NS = 2_000_000_000  # files changed in the last 2 s are hashed again next time


def record_path() -> Path:
    return cache_dir() / "verified-files.json"


def signature(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class VerifiedFiles:
    """The record of files that matched their sha256 (read once per `load_bundle`)."""

    def __init__(self, path: Path | None = None):
        self.path = path or record_path()
        self._entries: dict[str, dict] = {}
        self._dirty = False
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                self._entries = {k: v for k, v in data.items() if isinstance(v, dict)}
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:  # unreadable or garbled: start over, hash again
            log.debug("ignoring %s (%s): bundle files are hashed again", self.path, e)

    def known(self, path: Path, sha256: str) -> bool:
        """`path` matched `sha256` before and has not changed since."""
        entry = self._entries.get(str(path.resolve()))
        return (
            entry is not None
            and entry.get("sha256") == sha256
            and entry.get("stat") == signature(path)
        )

    def remember(self, path: Path, sha256: str, before: list[int]) -> None:
        """Record that `path` matched `sha256`; `before` is its signature taken before it was
        hashed. A file that changed while it was hashed, or whose last change is too recent
        to tell from a change in the same clock tick (git's "racy" files), is not recorded."""
        after = signature(path)
        if after != before or time.time_ns() - after[4] < RACY_NS:
            return
        self._entries[str(path.resolve())] = {"sha256": sha256, "stat": after}
        self._dirty = True

    def save(self) -> None:
        """Write the record if it changed, dropping files that are gone; never raises."""
        if not self._dirty:
            return
        with _lock:  # two loads in one process must not interleave their writes
            entries = {k: v for k, v in self._entries.items() if os.path.exists(k)}
            try:
                write_text_atomic(self.path, json.dumps(entries, indent=0, sort_keys=True))
            except (OnsightError, OSError) as e:
                log.debug("could not record verified bundle files in %s: %s", self.path, e)
        self._dirty = False
