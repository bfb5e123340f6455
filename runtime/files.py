"""Small file helpers shared by the runtime, the exporter and the TUI."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from onsight.runtime.errors import OnsightError


def cache_dir() -> Path:
    """~/.cache/onsight, or $XDG_CACHE_HOME/onsight."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "onsight"


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` so that a reader (or a crash) sees the old file or the new one,
    never half of it: a temporary sibling, flushed to disk, renamed into place. Creates the
    parent directory; an unwritable place is an OnsightError naming it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise OnsightError(f"cannot write {path}: {e.strerror}; choose another path") from e
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes 0600; follow the umask as open() does
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def why_unwritable(out: Path) -> str | None:
    """Why `out` (not there yet) could not be created, or None: checked before long work."""
    blocker = file_above(out)
    if blocker is not None:
        return f"{blocker} is a file, not a directory"
    nearest = next(p for p in (out.parent, *out.parent.parents) if p.exists())
    if not os.access(nearest, os.W_OK | os.X_OK):
        return f"{nearest} is not writable (read-only or no permission)"
    return None


def file_above(out: Path) -> Path | None:
    """The first of `out`'s parents that exists but is no directory."""
    return next((p for p in reversed(out.parents) if p.exists() and not p.is_dir()), None)


def current_umask() -> int:
    """The process umask (os.umask only reads it by setting it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
