"""inotify through watchdog: the file events that name what changed in the sources."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Protocol


class Observing(Protocol):
    """A running file-event source (watchdog's observer satisfies it)."""

    def stop(self) -> None: ...


# (sources, post) -> a started observer that calls post(kind, path) for each rename
# ("moved_from", "moved_to"), close-after-write ("closed"), a file created, written to, its
# attributes changed or deleted ("changed"), a directory deleted or renamed ("gone_dir": its
# files' own events follow a rename) and lost events ("lost": the path is the watched root);
# it raises when it cannot start.
ObserverFactory = Callable[[tuple[str, ...], Callable[[str, bytes], None]], Observing]


def watchdog_observer(sources: tuple[str, ...], post: Callable[[str, bytes], None]) -> Observing:
    """inotify through watchdog: what names a changed file, and lost events."""
    from watchdog import events as ev
    from watchdog.observers import Observer

    # watchdog >= 7 reports an inotify queue overflow (IN_Q_OVERFLOW) as EventsLostEvent;
    # older ones do not, and the hourly full scan is what catches up there.
    lost: type[ev.FileSystemEvent] | None = getattr(ev, "EventsLostEvent", None)
    changed = (ev.FileCreatedEvent, ev.FileModifiedEvent, ev.FileDeletedEvent)

    class Handler(ev.FileSystemEventHandler):
        def on_any_event(self, event: ev.FileSystemEvent) -> None:
            src = os.fsencode(event.src_path)
            if lost is not None and isinstance(event, lost):
                post("lost", src)
            elif isinstance(event, ev.FileMovedEvent):
                post("moved_from", src)
                post("moved_to", os.fsencode(event.dest_path))
            elif isinstance(event, ev.FileClosedEvent):
                post("closed", src)
            elif isinstance(event, changed):
                post("changed", src)
            elif isinstance(event, (ev.DirDeletedEvent, ev.DirMovedEvent)):
                post("gone_dir", src)

    wanted: list[type[ev.FileSystemEvent]] = [
        ev.FileMovedEvent,
        ev.FileClosedEvent,
        *changed,
        ev.DirDeletedEvent,
        ev.DirMovedEvent,
        *([lost] if lost is not None else []),
    ]
    observer = Observer()
    for source in sources:
        if os.path.isdir(source):
            observer.schedule(Handler(), source, recursive=True, event_filter=wanted)
    observer.daemon = True
    try:
        observer.start()
    except BaseException:
        with contextlib.suppress(Exception):
            observer.stop()
        raise
    return observer
