"""SIGTERM and SIGINT while ``picloud serve`` starts, before uvicorn handles them.

Standard library only: :func:`picloud.cli.main` installs these first thing, before
the imports of a start (SQLAlchemy, the packages) take their second, so that a
signal at any moment of a start stops what was started and exits 0.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


class StartupInterrupted(BaseException):
    """SIGTERM or SIGINT came before the server ran."""


class StartupSignals:
    """SIGTERM and SIGINT from the start of ``picloud serve`` until uvicorn takes them.

    While ``raising``, the first signal raises :class:`StartupInterrupted` in the main
    thread, so that what was started is stopped on the way out; inside :meth:`held`
    (work that must not be cut in the middle, such as ``initdb``) it is raised when
    the block ends. Afterwards, and for any later signal, it is only recorded in
    ``received``: uvicorn's own handlers see it (``picloud.cli``), and stopping is
    never interrupted.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.raising = True
        self._held = 0

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            return  # already stopping
        self.received = signum
        if self.raising and not self._held:
            raise StartupInterrupted(signum)

    @contextmanager
    def held(self) -> Iterator[None]:
        """A signal in this block is raised when the block ends, not in its middle."""
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1
        if not self._held and self.raising and self.received is not None:
            raise StartupInterrupted(self.received)


__all__ = ["StartupInterrupted", "StartupSignals"]
