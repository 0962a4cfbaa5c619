"""When is a file complete, so that shipping it now will not have to be redone?

Pure decisions over what the shipper saw, with the clock passed in:

- **renamed into place** (inotify IN_MOVED_TO, as watchdog reports it): a rotation
  (`app.log` -> `app.log.1`) or a finished write moved into place. Complete at once.
- **closed after writing** (IN_CLOSE_WRITE): complete once neither a close nor its
  modification time is more recent than `close_quiet` seconds (5 s, or the settle time when
  shorter). A writer that opens, appends
  and closes for every line (a shell's `>>`) closes constantly: the quiet period keeps such
  a live file from being shipped after every line.
- otherwise, **settled**: not modified for `settle` seconds, judged by its modification time
  against the wall clock, so a restart of the watcher loses nothing it had waited for.

Files that were never seen to change (the rotated logs of the last weeks, at start) are
settled at once when their modification time is old enough.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CLOSE_QUIET = 5.0


@dataclass
class Settler:
    settle: float
    close_quiet: float = CLOSE_QUIET
    _moved: set[bytes] = field(default_factory=set)
    _closed: dict[bytes, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.close_quiet = min(self.close_quiet, self.settle)

    # -- what inotify said --------------------------------------------------------------
    def moved_to(self, path: bytes) -> None:
        self._moved.add(path)
        self._closed.pop(path, None)

    def moved_from(self, path: bytes) -> None:
        self.forget(path)

    def closed(self, path: bytes, now: float) -> None:
        self._closed[path] = now

    def forget(self, path: bytes) -> None:
        self._moved.discard(path)
        self._closed.pop(path, None)

    # -- the decision -------------------------------------------------------------------
    def reason(self, path: bytes, mtime: float, now: float) -> str | None:
        """Why `path` (last modified at `mtime`, wall clock) is complete at `now`, or None
        while it may still be written."""
        if path in self._moved:
            return "renamed"
        closed = self._closed.get(path)
        if closed is not None and now - max(closed, mtime) >= self.close_quiet:
            return "closed"
        if now - mtime >= self.settle:
            return "settled"
        return None

    def wake_in(self, path: bytes, mtime: float, now: float) -> float:
        """Seconds until `path` may be complete if nothing else happens (for the loop)."""
        closed = self._closed.get(path)
        wait = self.settle - (now - mtime)
        if closed is not None:
            wait = min(wait, self.close_quiet - (now - max(closed, mtime)))
        return max(wait, 0.0)
