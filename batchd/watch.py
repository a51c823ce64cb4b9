"""inotify on the inbox folder, read without blocking the event loop.

The producer protocol (DESIGN §3) maps onto two kernel events: a file renamed
into the inbox (IN_MOVED_TO) and a file whose writer closed it (IN_CLOSE_WRITE)
are ready at once. A write (IN_MODIFY) means a writer has the file open: the
daemon waits for its close, however long the writer pauses. A create or a
change of attributes alone (a hard link, a touch) waits for the rescan's settle
time.
Events are hints; the periodic rescan is the truth, and a queue overflow or a
lost watch simply asks for one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import anyio
import structlog
from inotify_simple import INotify, flags

from batchd.inbox import is_ignored_name

log = structlog.get_logger("batchd.watch")

_MASK = (
    flags.MOVED_TO
    | flags.CLOSE_WRITE
    | flags.CREATE
    | flags.MODIFY
    | flags.ATTRIB
    | flags.DELETE_SELF
    | flags.MOVE_SELF
)


@dataclass(frozen=True)
class WatchEvent:
    #: ready: take it now; writing: open for writing, wait for its close; changed: wait until it
    #: settles; rescan: look at everything
    kind: Literal["ready", "writing", "changed", "rescan"]
    path: Path


class InboxWatcher:
    """inotify events for the entries directly inside one folder."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._inotify: INotify | None = None
        #: the folder went away (deleted or moved): watch it again once it is back
        self._lost = False
        self._open()

    def _open(self) -> None:
        try:
            self._inotify = INotify(nonblocking=True)
            self._inotify.add_watch(str(self._folder), _MASK)
        except OSError as exc:
            # No inotify (another OS, a full watch table): the rescans still find every file.
            log.warning("watch.unavailable", folder=str(self._folder), error=str(exc))
            self.close()

    def close(self) -> None:
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None

    async def read(self, *, timeout: float, stop: anyio.Event) -> list[WatchEvent]:
        """Events that arrive within `timeout` seconds (an empty list when none or when stopped)."""
        if self._inotify is None and self._lost and self._folder.is_dir():
            # Checked on every read, not only when the folder vanished: it may come back later
            # (re-created by an operator), and without a watch only the rescans would see files.
            self._open()
            if self._inotify is not None:
                self._lost = False
                return [WatchEvent("rescan", self._folder)]
        if self._inotify is None:
            with anyio.move_on_after(timeout):
                await stop.wait()
            return []
        fd = self._inotify.fileno()
        # Wait for the first of: events, the timeout, `stop`. Waiting on the descriptor alone
        # would hold a stopping caller for the whole timeout (the rescan interval).
        async with anyio.create_task_group() as tg:

            async def until_stopped() -> None:
                await stop.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(until_stopped)
            with anyio.move_on_after(timeout):
                await anyio.wait_readable(fd)
            tg.cancel_scope.cancel()
        if self._inotify is None or stop.is_set():
            return []
        try:
            raw = self._inotify.read(timeout=0)
        except BlockingIOError:
            return []
        events: list[WatchEvent] = []
        for ev in raw:
            if ev.mask & (flags.Q_OVERFLOW | flags.IGNORED | flags.DELETE_SELF | flags.MOVE_SELF):
                events.append(WatchEvent("rescan", self._folder))
                if ev.mask & (flags.IGNORED | flags.DELETE_SELF | flags.MOVE_SELF):
                    # The folder itself went away or moved: watch it again when it is back.
                    self.close()
                    self._lost = True
                    if self._folder.is_dir():
                        self._open()
                        self._lost = self._inotify is None
                continue
            if not ev.name or is_ignored_name(ev.name):
                continue
            path = self._folder / ev.name
            if ev.mask & (flags.MOVED_TO | flags.CLOSE_WRITE):
                events.append(WatchEvent("ready", path))
            elif ev.mask & flags.ISDIR:
                continue
            elif ev.mask & flags.MODIFY:
                events.append(WatchEvent("writing", path))
            else:
                events.append(WatchEvent("changed", path))
        return events
