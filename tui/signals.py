"""SIGTERM and SIGHUP (a kill, a dropped SSH session), or a terminal that hung up without a
signal (hangup.py): close down as q does, even when the terminal is gone.

The handlers are plain signal handlers, not the event loop's: when the SSH session drops,
Textual's writer thread dies on the hung-up terminal and the event loop blocks for good on
its next write, so a handler that waits for the loop never runs and the process hangs,
holding the camera. Here a thread releases the engine, source and transcript first, then
asks the app to exit (restoring a terminal that is still there), and if the process is
still alive after a grace period it leaves without the loop. A hangup seen by the watch
closes down the same way, with SIGHUP's exit code.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable

from .hangup import TerminalWatch

log = logging.getLogger(__name__)

EXIT_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
GRACE_S = 3.0  # time for the app to exit on its own (restoring the terminal) after release
HANGUP_CODE = 128 + signal.SIGHUP  # the exit code for a terminal gone without a signal, too


class ExitOnSignals:
    """Install in the main thread (signal.signal's rule); uninstall restores the old ones."""

    def __init__(
        self,
        release: Callable[[], None],
        request_exit: Callable[[int], None],
        *,
        grace_s: float = GRACE_S,
        hard_exit: Callable[[int], object] = os._exit,
    ) -> None:
        """release: closes engine, source and transcript (any thread, idempotent);
        request_exit(code): asks the app to exit (thread-safe, returns at once)."""
        self._release, self._request_exit = release, request_exit
        self.grace_s, self.hard_exit = grace_s, hard_exit
        self._previous: dict[int, object] = {}
        # Taken once and never released: the first of a signal and a hangup wins. Never
        # waited on, since a second signal can interrupt the main thread inside close_down.
        self._once = threading.Lock()
        self._watch: TerminalWatch | None = None
        self.hung_up = False  # the terminal hung up while installed (seen by the watch)

    def install(self, watch_terminal: bool = False) -> None:
        """watch_terminal: also close down when stdin/stdout/stderr's terminal hangs up
        without a signal (only where the app owns a real terminal, not under run_test)."""
        for sig in EXIT_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)
        if watch_terminal:
            self._watch = TerminalWatch(self._terminal_lost)
            self._watch.start()

    def _terminal_lost(self) -> None:
        self.hung_up = True
        self.close_down(HANGUP_CODE)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]
        self._previous.clear()
        if self._watch is not None:
            self._watch.stop()
            self.hung_up = self.hung_up or self._watch.hung_up()
            self._watch = None

    def _handler(self, signum: int, _frame: object) -> None:
        self.close_down(128 + signum)  # the shell's convention for "ended by a signal"

    def close_down(self, code: int) -> None:
        """Release, ask the app to exit with `code`, and leave without it after the grace
        period; the first call does it, later ones return at once (any thread)."""
        if not self._once.acquire(blocking=False):
            return
        threading.Thread(
            target=self._run, args=(code,), name="onsight close down", daemon=True
        ).start()

    def _run(self, code: int) -> None:
        try:
            self._release()
        except Exception:
            log.exception("closing down after a signal failed")
        self._request_exit(code)
        time.sleep(self.grace_s)
        # Still running: the event loop is stuck on a terminal that hung up. Everything that
        # needs closing is closed; leave without it.
        self.hard_exit(code)
