"""A terminal that hangs up without a signal: notice it, so the app can close down anyway.

When an SSH session drops, sshd closes the pty's master and the kernel hangs the terminal
up, but SIGHUP goes only to the foreground process group of the session whose controlling
terminal it is: a process in another session (setsid, a supervisor's pty) gets nothing.
Textual does not notice by itself. Its writer thread (textual/drivers/_writer_thread.py)
dies on the first write that fails with EIO; the event loop then blocks for good putting
into that thread's bounded queue, and the input thread spins on read() returning EOF. The
process would hang there holding the camera.

So a thread looks at the standard fds that were terminals: a hung-up tty is no longer one
(isatty's TCGETS fails with EIO). Then the dead fds are pointed at /dev/null, so what is
still written to them (Textual restoring a screen nobody sees, the interpreter's last flush
of stderr) succeeds instead of failing, and on_lost is called once.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

WATCH_EVERY_S = 0.25  # how soon a hangup is noticed (an isatty per terminal fd each time)
STD_FDS = (0, 1, 2)


class TerminalWatch:
    """Calls on_lost (in its own thread) once a terminal among `fds` hangs up."""

    def __init__(
        self,
        on_lost: Callable[[], None],
        fds: Sequence[int] = STD_FDS,
        *,
        every_s: float = WATCH_EVERY_S,
    ) -> None:
        self._on_lost = on_lost
        self._fds = list(fds)
        self.every_s = every_s
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._ttys: list[int] = []

    def start(self) -> None:
        """Watches the fds that are terminals now; none (pipes, files): nothing to watch."""
        self._ttys = [fd for fd in self._fds if os.isatty(fd)]
        if not self._ttys:
            return
        self._thread = threading.Thread(
            target=self._watch, args=(self._ttys,), name="onsight terminal watch", daemon=True
        )
        self._thread.start()

    def hung_up(self) -> bool:
        """Whether a terminal among those watched has hung up, checked now (Textual may notice
        first: its input thread fails on the dead terminal and the app exits on its own);
        the dead fds then point at /dev/null, as when the watch sees it."""
        dead = [fd for fd in self._ttys if not os.isatty(fd)]
        if dead:
            _point_at_devnull(dead)
        return bool(dead)

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self, ttys: list[int]) -> None:
        while not self._stopped.wait(self.every_s):
            dead = [fd for fd in ttys if not os.isatty(fd)]
            if dead and not self._stopped.is_set():
                _point_at_devnull(dead)  # first: a handler writing to stderr must not fail
                log.warning("the terminal hung up (fds %s); closing down", dead)
                self._on_lost()
                return


def _point_at_devnull(fds: list[int]) -> None:
    try:
        null = os.open(os.devnull, os.O_RDWR)
    except OSError as e:
        log.warning("cannot open %s (%s); writes to the dead terminal will fail", os.devnull, e)
        return
    try:
        for fd in fds:
            os.dup2(null, fd)
    finally:
        os.close(null)
