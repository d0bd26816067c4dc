"""Ctrl-C that never lands in the middle of a database write.

A KeyboardInterrupt raised inside SQLAlchemy (between a commit and its bookkeeping) can leave
the session unusable, and then marking the trial "interrupted" fails with a database error
instead of a clean stop. So during the trial loop SIGINT is deferred by default and delivered
at once only inside `interruptible()` regions: merging and evaluating, where nearly all the time
goes and nothing is written. A Ctrl-C that arrives during a write takes effect right after it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class InterruptGate:
    def __init__(self) -> None:
        self.pending = False
        self._open = True  # outside `deferred()` Ctrl-C behaves as usual
        self._active = False

    def _handler(self, signum, frame) -> None:
        self.pending = True  # kept even when raised: a __del__ or weakref callback may swallow it
        if self._open:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self) -> Iterator["InterruptGate"]:
        """Installs the gate for the duration of the loop (main thread only; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGINT, self._handler)
        self._open, self._active, self.pending = False, True, False
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)
            self._open, self._active = True, False

    def checkpoint(self) -> None:
        """Raises a Ctrl-C that arrived while deferred (or was swallowed where it landed)."""
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """A region without database writes: Ctrl-C stops it at once."""
        if not self._active:
            yield
            return
        self.checkpoint()
        was_open, self._open = self._open, True
        try:
            yield
        finally:
            self._open = was_open
        self.checkpoint()  # a Ctrl-C swallowed inside the region still stops the loop here
