"""Continuous shipping: the watcher's thread that ships complete files while the instance runs.

One loop, one segment at a time (a batch of complete files, oldest first, up to
SEGMENT_BYTES or SEGMENT_FILES), at the lowest CPU and best-effort I/O priority:

    inotify (watchdog: renames, closes) ─┐
    a scan of the sources every few s ───┴─► settle.Settler ─► batch ─► segment.ship ─► shipstate.Ledger

- It learns where segments go (the instance's prefix: identity and group) before the first
  one, and aborts the multipart uploads a killed watcher left under the segment prefix.
- A failed segment is tried again with backoff (5 s doubling to 5 min); other files go on
  meanwhile. Nothing here ever blocks the termination path.
- `stop()` (before a termination job): no new segment starts; the one in flight gets a few
  seconds, then is cancelled (its upload aborted). Whatever is not recorded in the ledger is
  archived by the final backup: nothing is lost either way.
- Supervised: an unexpected error in the loop (or before it) restarts it with backoff (1 s
  doubling to 5 min); when inotify cannot start (the instance limit reached, a source it
  cannot watch) the loop runs on its periodic scan alone. `state` (running | restarting),
  `watch` (inotify | scan) and `restarts` in the status block, `doctor` and the
  `ShippingStalled` metric say so.
- `snapshot()` is the `shipping` block of `status --json`; the block is written into the
  watcher's status file as it changes.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import platform
import queue
import stat
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from instance_agent import keys, ledgerseed, metrics, status
from instance_agent.archive import Excluder
from instance_agent.backup import Clients, Identity, _s3_extra, key_values
from instance_agent.config import Config
from instance_agent.errors import AgentError, Cancelled, LifecycleError
from instance_agent.lifecycle import instance_state
from instance_agent.logs import fields
from instance_agent.s3upload import abort_stale_uploads
from instance_agent.segment import Changed, Target, ship
from instance_agent.settle import Settler
from instance_agent.shipstate import FileId, Ledger, refresh_age

log = logging.getLogger(__name__)

STOP_WAIT = 5.0  # "a few seconds" for the segment in flight when termination comes
CANCEL_WAIT = 5.0  # for the cancelled upload's abort to go through
SCAN_MAX = 10.0  # seconds between scans, at most (inotify wakes the loop earlier)
SCAN_MIN = 1.0  # and at least, while nothing is due
RETRY_FIRST, RETRY_MAX = 5.0, 300.0
# One segment packs complete files up to this many raw bytes or files, whichever comes
# first: big enough that per-object round trips (multipart create/complete, the manifest
# PUT, the ledger fsync) vanish beside compression and upload, small enough that a
# segment cut short by a termination wastes little.
SEGMENT_BYTES, SEGMENT_FILES = 64 * 2**20, 4096
GROUP_RETRY_MAX = 60.0
RESTART_FIRST, RESTART_MAX = 1.0, 300.0  # the supervisor's backoff after an unexpected error
# ioprio_set(2): IOPRIO_WHO_PROCESS with a thread id sets that thread's I/O priority;
# class 2 (best effort) level 7 is the lowest that still makes progress on a busy disk.
_IOPRIO_SYSCALL = {"x86_64": 251, "aarch64": 30}
_IOPRIO_WHO_PROCESS, _IOPRIO_CLASS_BE, _IOPRIO_CLASS_SHIFT = 1, 2, 13


def lower_priority() -> None:
    """Nice 19 and best-effort I/O level 7 for the calling thread (Linux: per thread).
    Threads it starts (the upload worker) inherit both."""
    tid = threading.get_native_id()
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, tid, 19)
    number = _IOPRIO_SYSCALL.get(platform.machine())
    if number is not None:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).syscall(
                number, _IOPRIO_WHO_PROCESS, tid, (_IOPRIO_CLASS_BE << _IOPRIO_CLASS_SHIFT) | 7
            )


def scan(
    sources: tuple[str, ...], excluded: Excluder, stop: threading.Event | None = None
) -> Iterator[tuple[Target, os.stat_result]]:
    """Every regular file under the sources (symlinks not followed), with its lstat; it
    ends early once `stop` is set (a scan of tens of thousands of files must not hold up
    the termination that stops shipping)."""
    for source in sources:
        root = os.path.normpath(os.fsencode(source))
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            if stop is not None and stop.is_set():
                return
            dirnames[:] = [d for d in dirnames if not excluded(os.path.join(dirpath, d))]
            for name in filenames:
                path = os.path.join(dirpath, name)
                if excluded(path):
                    continue
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    yield Target(root, os.path.relpath(path, root)), st


def batch(
    due: list[tuple[Target, os.stat_result]], max_bytes: int = SEGMENT_BYTES, max_files: int = SEGMENT_FILES
) -> list[Target]:
    """The files of the next segment: oldest first (then by path, so a restarted watcher
    picks the same batch and its create-only key), as many as fit in `max_bytes` and
    `max_files`. A file larger than the budget goes alone, when it is the oldest."""
    order = sorted(due, key=lambda d: (d[1].st_mtime_ns, d[0].path))
    out, total = [order[0][0]], order[0][1].st_size
    if total >= max_bytes:
        return out
    for target, st in order[1:]:
        if len(out) >= max_files:
            break
        if total + st.st_size <= max_bytes:
            out.append(target)
            total += st.st_size
    return out


class Observing(Protocol):
    """A running file-event source (watchdog's observer satisfies it)."""

    def stop(self) -> None: ...


# (sources, post) -> a started observer that calls post(kind, path) for each rename
# ("moved_from", "moved_to") and close-after-write ("closed"); it raises when it cannot start.
ObserverFactory = Callable[[tuple[str, ...], Callable[[str, bytes], None]], Observing]
Scanner = Callable[
    [tuple[str, ...], Excluder, "threading.Event | None"], Iterator[tuple[Target, os.stat_result]]
]


def watchdog_observer(sources: tuple[str, ...], post: Callable[[str, bytes], None]) -> Observing:
    """inotify through watchdog: renames and closes-after-write."""
    from watchdog.events import (
        FileClosedEvent,
        FileMovedEvent,
        FileSystemEvent,
        FileSystemEventHandler,
    )
    from watchdog.observers import Observer

    class Handler(FileSystemEventHandler):
        def on_any_event(self, event: FileSystemEvent) -> None:
            if isinstance(event, FileMovedEvent):
                post("moved_from", os.fsencode(event.src_path))
                post("moved_to", os.fsencode(event.dest_path))
            elif isinstance(event, FileClosedEvent):
                post("closed", os.fsencode(event.src_path))

    observer = Observer()
    for source in sources:
        if os.path.isdir(source):
            observer.schedule(
                Handler(), source, recursive=True, event_filter=[FileMovedEvent, FileClosedEvent]
            )
    observer.daemon = True
    try:
        observer.start()
    except BaseException:
        with contextlib.suppress(Exception):
            observer.stop()
        raise
    return observer


class Shipper:
    def __init__(
        self,
        cfg: Config,
        identity: Callable[[threading.Event], Identity],
        make_clients: Callable[[Config, str], Clients],
        *,
        clock: Callable[[], float] = time.time,
        observe: ObserverFactory = watchdog_observer,
        scanner: Scanner = scan,
    ) -> None:
        self.cfg = cfg
        self._observe_with = observe
        self._scan = scanner
        self._restarts = 0
        self._stalled_since: float | None = None
        self._ran = False  # the current attempt made a full pass of the loop
        self._in_flight = False  # a segment is being shipped
        self._group_name: str | None = None
        self._cloudwatch: metrics.CloudWatchClient | None = None
        self._identity = identity
        self._make_clients = make_clients
        self._clock = clock
        self._stopping = threading.Event()  # no new segment
        self._cancel = threading.Event()  # abort the one in flight
        self._wake = threading.Event()
        self._events: queue.SimpleQueue[tuple[str, bytes]] = queue.SimpleQueue()
        self._settler = Settler(cfg.ship_settle)
        self._excluded = Excluder(cfg.exclude)
        self._retry_at: dict[bytes, tuple[float, int]] = {}
        self._ledger: Ledger | None = None
        self._block: dict[str, Any] = {
            "enabled": True,
            "pending_files": 0,
            "pending_bytes": 0,
            "shipped_files": 0,
            "shipped_bytes": 0,
            "last_error": None,
            "state": "starting",
            "watch": None,
            "restarts": 0,
            "stalled_since": None,
        }
        self._written: tuple[dict[str, Any], dict[str, Any]] | None = None  # last published
        self._behind_since: float | None = None
        self._thread = threading.Thread(target=self._main, name="shipper", daemon=True)

    # -- control (watcher's threads) ------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, wait: float = STOP_WAIT) -> bool:
        """Stop shipping: True when no segment was left in flight (it finished in time).
        `wait` 0 (the watcher itself stopping, SIGTERM while idle) cancels the segment in
        flight at once: its upload is aborted and nothing is recorded, so the next start
        ships it again; the only wait left is for that abort (at most CANCEL_WAIT)."""
        self._stopping.set()
        self._wake.set()
        if wait > 0:
            self._thread.join(wait)
        if self._thread.is_alive() and (wait > 0 or self._in_flight):
            self._cancel_segment(wait)
        self._thread.join(CANCEL_WAIT)
        if self._thread.is_alive() and not self._cancel.is_set():
            self._cancel_segment(wait)  # a segment began just as the stop came
            self._thread.join(CANCEL_WAIT)
        return not self._cancel.is_set()

    def _cancel_segment(self, waited: float) -> None:
        if waited > 0:
            log.warning(
                "termination: the segment in flight is cancelled; its file is archived instead",
                extra=fields(waited_s=waited),
            )
        else:
            log.info(
                "stop: the segment in flight is cancelled; it ships again at the next start",
                extra=fields(waited_s=0),
            )
        self._cancel.set()

    def ledger(self) -> Ledger | None:
        """What was shipped, for the termination archive (None before the ledger is read)."""
        return self._ledger.view() if self._ledger is not None else None

    def snapshot(self) -> dict[str, Any]:
        return dict(self._block)

    # -- the thread -----------------------------------------------------------------------
    def _main(self) -> None:
        """The supervisor: runs the loop, and after an unexpected error logs it, says so in
        the status block and the metric, waits (backoff, capped) and starts it again."""
        lower_priority()
        delay = RESTART_FIRST
        try:
            while not self._stopping.is_set():
                self._ran = False
                try:
                    self._attempt()
                    return
                except Cancelled:
                    return
                except Exception as err:  # shipping must never take the watcher down, nor stop
                    if self._ran:
                        delay = RESTART_FIRST  # it had recovered: a new failure starts the backoff again
                    self._restarts += 1
                    if self._stalled_since is None:
                        self._stalled_since = self._clock()
                    log.exception(
                        "shipping stopped by an error; restarting it",
                        extra=fields(restarts=self._restarts, retry_in_s=delay),
                    )
                    self._block.update(
                        last_error=f"{type(err).__name__}: {err}",
                        state="restarting",
                        restarts=self._restarts,
                        stalled_since=self._stalled_since,
                    )
                    self._publish(None, [])
                    self._stalled_metric(True)
                    if self._stopping.wait(delay):
                        return
                    delay = min(delay * 2, RESTART_MAX)
        finally:
            if self._ledger is not None:
                self._ledger.close()

    def _attempt(self) -> None:
        observer: Observing | None = None
        try:
            ident = self._identity(self._stopping)
            clients = self._make_clients(self.cfg, ident.region)
            self._cloudwatch = clients.cloudwatch
            self._group_name = self._group(clients, ident)
            values = key_values(self.cfg, ident, self._group_name)
            if self._ledger is None:  # kept across restarts: the termination archive may hold a view
                ledger = Ledger.load(self.cfg.state_dir, ident.instance_id)
                ledger.compact()  # drops forgotten files and torn lines: the file stays small
                self._ledger = ledger
            prefix = keys.segment_prefix(self.cfg.key_template, values)
            # Shipped state counts only where it was shipped: a file recorded in another
            # bucket or under another prefix is shipped again here (issue 19 item 2).
            self._ledger.aim(self.cfg.bucket or "", prefix, refresh_age(self.cfg.retention_days))
            if self._ledger.fresh:
                # No ledger: a first start, or the state directory went with a replaced
                # root volume while the instance and its data volumes stayed. What S3
                # holds for this instance is not shipped again (ledgerseed.py).
                self._ledger.fresh = False
                ledgerseed.seed(self._ledger, clients.s3, self.cfg.bucket or "", prefix, ident.instance_id)
            # A watcher killed mid-segment left its multipart upload; nothing else of ours
            # uploads under the segment prefix now.
            abort_stale_uploads(
                clients.s3, self.cfg.bucket or "", prefix, ident.instance_id, extra=_s3_extra(self.cfg)
            )
            observer = self._observe()
            log.info(
                "shipping",
                extra=fields(
                    prefix=prefix,
                    settle_s=self.cfg.ship_settle,
                    bandwidth=self.cfg.ship_bandwidth,
                    watch=self._block["watch"],
                ),
            )
            self._loop(clients, self._ledger, values)
        finally:
            if observer is not None:
                with contextlib.suppress(Exception):
                    observer.stop()

    def _stalled_metric(self, stalled: bool) -> None:
        metrics.publish_shipping_stalled(self._cloudwatch, self._group_name, stalled)

    def _recovered(self) -> None:
        """A full pass of the loop: running again (said once, after a restart)."""
        self._ran = True
        if self._block["state"] == "running":
            return
        was_stalled = self._stalled_since is not None
        self._stalled_since = None
        self._block.update(state="running", stalled_since=None)
        if was_stalled:
            log.info("shipping running again", extra=fields(restarts=self._restarts))
            self._stalled_metric(False)

    def _group(self, clients: Clients, ident: Identity) -> str | None:
        """The group for the key, as the termination job names it (termination._name_group)."""
        if self.cfg.asg_name or clients.autoscaling is None:
            return self.cfg.asg_name
        wait = 2.0
        while True:
            try:
                found = instance_state(clients.autoscaling, ident.instance_id)
                return found[0] if found else None
            except LifecycleError as err:
                log.warning("group unknown; retrying", extra=fields(error=str(err), wait_s=wait))
            if self._stopping.wait(wait):
                raise Cancelled("stopped")
            wait = min(wait * 2, GROUP_RETRY_MAX)

    def _observe(self) -> Observing | None:
        """inotify wakes the loop early; without it (the instance limit reached, a source it
        cannot watch), the periodic scan alone finds what is due, only later."""
        post, wake = self._events.put, self._wake

        def on_event(kind: str, path: bytes) -> None:
            post((kind, path))
            wake.set()

        try:
            observer = self._observe_with(self.cfg.source, on_event)
        except Exception as err:
            log.warning(
                "inotify unavailable: shipping falls back to a scan of the sources",
                extra=fields(error=f"{type(err).__name__}: {err}", scan_every_s=SCAN_MAX),
            )
            self._block["watch"] = "scan"
            return None
        self._block["watch"] = "inotify"
        return observer

    def _take_events(self, now: float) -> None:
        while True:
            try:
                kind, path = self._events.get_nowait()
            except queue.Empty:
                return
            if kind == "moved_to":
                self._settler.moved_to(os.path.normpath(path))
            elif kind == "moved_from":
                self._settler.moved_from(os.path.normpath(path))
            else:
                self._settler.closed(os.path.normpath(path), now)

    def _loop(self, clients: Clients, ledger: Ledger, values: dict[str, str]) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            now = self._clock()
            self._take_events(now)
            files = list(self._scan(self.cfg.source, self._excluded, self._stopping))
            if self._stopping.is_set():
                return
            self._recovered()
            ledger.keep_only({(st.st_dev, st.st_ino) for _, st in files})
            pending = [(t, st) for t, st in files if ledger.get(FileId.of(st)) is None]
            complete = [
                (t, st) for t, st in pending if self._settler.reason(t.path, st.st_mtime, now) is not None
            ]
            due = [(t, st) for t, st in complete if self._retry_at.get(t.path, (0.0, 0))[0] <= now]
            # The backlog doctor judges counts complete files waiting for a retry too: a
            # segment failing for good must read as "not keeping up".
            self._publish(pending, complete)
            if ledger.needs_compaction():
                ledger.compact()  # atomic; the appends then go to the rewritten file
            if due:
                self._ship_batch(clients, ledger, batch(due), values, now)
                continue
            waits = [self._settler.wake_in(t.path, st.st_mtime, now) for t, st in pending]
            waits += [at - now for at, _ in self._retry_at.values()]
            self._wake.wait(max(0.2, min([SCAN_MAX, *waits])))
            # A writer that closes after every line wakes the loop constantly; a rescan of
            # the sources at most every SCAN_MIN seconds is enough (a stop still wakes it).
            self._stopping.wait(SCAN_MIN)

    def _ship_batch(
        self, clients: Clients, ledger: Ledger, targets: list[Target], values: dict[str, str], now: float
    ) -> None:
        try:
            self._in_flight = True
            try:
                ship(
                    self.cfg,
                    clients,
                    ledger,
                    targets,
                    values,
                    stop=self._cancel,
                    clock=time.monotonic,
                    wall=self._clock,
                )
            finally:
                self._in_flight = False
        except Cancelled:
            raise
        except (Changed, FileNotFoundError) as err:
            log.info(
                "not shipped: changed while read; waits to settle again",
                extra=fields(path=os.fsdecode(targets[0].path), files=len(targets), reason=str(err)),
            )
        except (AgentError, OSError) as err:
            for target in targets:
                _, failures = self._retry_at.get(target.path, (0.0, 0))
                delay = min(RETRY_FIRST * 2**failures, RETRY_MAX)
                self._retry_at[target.path] = (now + delay, failures + 1)
            self._block["last_error"] = str(err)
            log.warning(
                "segment failed; retrying later",
                extra=fields(
                    path=os.fsdecode(targets[0].path), files=len(targets), error=str(err), retry_in_s=delay
                ),
            )
            return
        else:
            self._block["last_error"] = None
            for target in targets:
                self._retry_at.pop(target.path, None)
        # Shipped, or changed while read: either way only a new rename, close or the
        # settle time makes these files due again (an unrecorded one is still pending).
        for target in targets:
            self._settler.forget(target.path)

    def _publish(
        self, pending: list[tuple[Target, os.stat_result]] | None, due: list[tuple[Target, os.stat_result]]
    ) -> None:
        """The `shipping` block (pending counts every file not shipped, the live ones
        included: what the termination archive would carry now), and beside it the backlog
        of complete files waiting, which `doctor` judges."""
        block = dict(self._block)
        if pending is not None:
            block.update(pending_files=len(pending), pending_bytes=sum(st.st_size for _, st in pending))
        if self._ledger is not None:
            block["shipped_files"], block["shipped_bytes"] = self._ledger.totals()
        if not due:
            self._behind_since = None
        elif self._behind_since is None:
            self._behind_since = self._clock()
        backlog = {
            "due_files": len(due),
            "due_bytes": sum(st.st_size for _, st in due),
            "behind_since": self._behind_since,
        }
        self._block = block
        # Against what was last written, not self._block: a failure sets last_error there
        # directly, and must still reach the file.
        if (block, backlog) != self._written:
            self._written = (dict(block), backlog)
            status.write_status(status.status_path(self.cfg), shipping=block, shipping_backlog=backlog)
