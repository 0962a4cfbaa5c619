"""Continuous shipping: the watcher's thread that ships complete files while the instance runs.

One loop, one segment at a time (a batch of complete files, oldest first, up to
SEGMENT_BYTES or SEGMENT_FILES), at the lowest CPU and best-effort I/O priority:

    inotify (watchdog: creates, writes, closes, renames, deletes) ─► the paths they name ─┐
    a full scan: at start, after lost events, hourly; every 10 s without inotify ─────────┴─►
        pending (files not shipped) ─► settle.Settler ─► batch ─► segment.ship ─► shipstate.Ledger

- Rescans follow what changed: an event makes the loop look again at the one path it names
  (an lstat), and only files not shipped are held as pending. Walking every file of the
  sources every 10 s (every 1 s after an event) kept an idle watcher with 100,000 files
  shipped at 13.9 % of a core and a `>>` writer (a close every 100 ms) at 33.6 % (issue 19
  item 6, benchmarks/results/watch_footprint.md). A full scan still runs: at start; when
  inotify says events were lost (its queue overflowed, watchdog's EventsLostEvent); when a
  source directory appears, or is replaced, after the watch began; and once an hour
  (RESCAN_EVERY) as a safety net for what inotify cannot see at all (a write through mmap,
  a change on a network filesystem made by another host, watchdog older than 7 that does
  not report an overflow): about 1 CPU-second per 100,000 files (the walk alone 0.65 to
  0.69 s, warm cache), under 0.03 % of a core. Without inotify the loop scans every
  SCAN_MAX seconds, as before.
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
import heapq
import logging
import os
import platform
import queue
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple, Protocol, TypeVar

from instance_agent import keys, ledgerseed, metrics, status
from instance_agent.archive import Excluder
from instance_agent.backup import _s3_extra, key_values
from instance_agent.clients import Clients
from instance_agent.config import Config
from instance_agent.errors import AgentError, Cancelled, LifecycleError
from instance_agent.identity import Identity
from instance_agent.lifecycle import instance_state
from instance_agent.logs import fields
from instance_agent.s3upload import abort_stale_uploads
from instance_agent.segment import Changed, Target, ship
from instance_agent.settle import Settler
from instance_agent.shippacked import inode_key
from instance_agent.shipstate import Ledger, refresh_age

log = logging.getLogger(__name__)

STOP_WAIT = 5.0  # "a few seconds" for the segment in flight when termination comes
CANCEL_WAIT = 5.0  # for the cancelled upload's abort to go through
SCAN_MAX = 10.0  # seconds between full scans without inotify; the longest wait of the loop
SCAN_MIN = 1.0  # the shortest spell between passes of the loop: events are gathered meanwhile
RESCAN_EVERY = 3600.0  # the full scan's safety net while inotify watches (see above)
RETRY_FIRST, RETRY_MAX = 5.0, 300.0
# One segment packs complete files up to this many raw bytes or files, whichever comes
# first: big enough that per-object round trips (multipart create/complete, the manifest
# PUT, the ledger fsync) vanish beside compression and upload, small enough that a
# segment cut short by a termination wastes little.
SEGMENT_BYTES, SEGMENT_FILES = 64 * 2**20, 4096
# batch() picks from the oldest due files this many at most: a segment takes SEGMENT_FILES,
# and the rest leaves room for files skipped as over the byte budget.
CANDIDATES = 4 * SEGMENT_FILES
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


def release_memory() -> None:
    """Hand the heap freed by a burst of work (a full scan, a backlog shipped) back to the
    kernel: glibc keeps freed memory in its arenas (one per thread that allocated), and an
    idle watcher would go on holding the peak of its first start (Linux: malloc_trim(3))."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


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


class Sized(Protocol):
    """What batch() needs of a file's lstat (os.stat_result has it)."""

    @property
    def st_size(self) -> int: ...

    @property
    def st_mtime_ns(self) -> int: ...


class Seen(NamedTuple):
    """A pending file's size and time: a few ints, not a whole os.stat_result, since a
    first start may hold a backlog of hundreds of thousands."""

    st_size: int
    st_mtime_ns: int


T = TypeVar("T", Target, bytes)


def _name(item: Target | bytes) -> bytes:
    return item.path if isinstance(item, Target) else item


def batch(
    due: Sequence[tuple[T, Sized]], max_bytes: int = SEGMENT_BYTES, max_files: int = SEGMENT_FILES
) -> list[T]:
    """The files of the next segment (targets, or their paths): oldest first (then by path,
    so a restarted watcher picks the same batch and its create-only key), as many as fit in
    `max_bytes` and `max_files`. A file larger than the budget goes alone, when it is the
    oldest."""
    order = sorted(due, key=lambda d: (d[1].st_mtime_ns, _name(d[0])))
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
# ("moved_from", "moved_to"), close-after-write ("closed"), a file created, written to, its
# attributes changed or deleted ("changed"), a directory deleted or renamed ("gone_dir": its
# files' own events follow a rename) and lost events ("lost": the path is the watched root);
# it raises when it cannot start.
ObserverFactory = Callable[[tuple[str, ...], Callable[[str, bytes], None]], Observing]
Scanner = Callable[
    [tuple[str, ...], Excluder, "threading.Event | None"], Iterator[tuple[Target, os.stat_result]]
]


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
        # The sources as scan() names them, and what the loop knows of them: the files
        # not shipped (path -> (root index, size, mtime_ns)), the paths events named since
        # the last pass, and when the next full scan is due.
        self._roots = tuple(os.path.normpath(os.fsencode(source)) for source in cfg.source)
        self._pending: dict[bytes, tuple[int, int, int]] = {}
        self._pending_peak = 0
        self._dirty: set[bytes] = set()
        self._full_due = True
        self._next_full = 0.0
        self._next_roots = 0.0
        self._observer: Observing | None = None
        self._watched: list[tuple[int, int] | None] = []
        self._worked = False  # a full scan or a segment since the loop last went idle
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
                    self._publish(None, (0, 0))
                    self._stalled_metric(True)
                    if self._stopping.wait(delay):
                        return
                    delay = min(delay * 2, RESTART_MAX)
        finally:
            if self._ledger is not None:
                self._ledger.close()

    def _attempt(self) -> None:
        self._full_due = True  # a restart knows nothing of what happened meanwhile
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
            self._observe()
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
            self._unobserve()

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

    def _observe(self) -> None:
        """inotify names what changed; without it (the instance limit reached, a source it
        cannot watch), the periodic full scan alone finds what is due, only later."""
        post, wake = self._events.put, self._wake

        def on_event(kind: str, path: bytes) -> None:
            post((kind, path))
            wake.set()

        self._watched = self._root_ids()
        try:
            self._observer = self._observe_with(self.cfg.source, on_event)
        except Exception as err:
            log.warning(
                "inotify unavailable: shipping falls back to a scan of the sources",
                extra=fields(error=f"{type(err).__name__}: {err}", scan_every_s=SCAN_MAX),
            )
            self._block["watch"] = "scan"
            return
        self._block["watch"] = "inotify"

    def _unobserve(self) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            with contextlib.suppress(Exception):
                observer.stop()

    def _root_ids(self) -> list[tuple[int, int] | None]:
        """Each source directory's identity (None: not a directory now)."""
        ids: list[tuple[int, int] | None] = []
        for root in self._roots:
            try:
                st = os.stat(root)  # a source given as a symlink is followed, by intent
            except OSError:
                ids.append(None)
                continue
            ids.append((st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None)
        return ids

    def _check_roots(self, now: float) -> None:
        """A source directory that appeared, or was replaced, since the watch began is not
        watched: watch again, and scan it all (every SCAN_MAX seconds: one stat a source)."""
        if now < self._next_roots:
            return
        self._next_roots = now + SCAN_MAX
        if self._observer is None or self._root_ids() == self._watched:
            return
        log.info("a source directory appeared or was replaced: watching it again, and a full scan")
        self._unobserve()
        self._observe()
        self._full_due = True

    def _take_events(self, now: float) -> None:
        while True:
            try:
                kind, path = self._events.get_nowait()
            except queue.Empty:
                return
            path = os.path.normpath(path)
            if kind == "lost":
                if not self._full_due:
                    log.warning(
                        "inotify lost events (its queue overflowed): a full scan of the sources follows",
                        extra=fields(path=os.fsdecode(path)),
                    )
                self._full_due = True
                continue
            if kind == "gone_dir":
                below = path + b"/"
                for gone in [p for p in self._pending if p.startswith(below)]:
                    del self._pending[gone]
                continue
            if kind == "moved_to":
                self._settler.moved_to(path)
            elif kind == "moved_from":
                self._settler.moved_from(path)
            elif kind == "closed":
                self._settler.closed(path, now)
            self._dirty.add(path)

    def _root_of(self, path: bytes, real: dict[bytes, bool]) -> int | None:
        """The index of the source `path` is in, as scan() would find it: below a source
        directory, through no excluded directory and no symlink (`real` caches the
        directories already looked at); None otherwise."""
        for i, root in enumerate(self._roots):
            below = root if root.endswith(b"/") else root + b"/"
            if not path.startswith(below) or self._excluded(path):
                continue
            parts = path[len(below) :].split(b"/")
            parent = root
            for part in parts[:-1]:
                parent = os.path.join(parent, part)
                ok = real.get(parent)
                if ok is None:
                    try:
                        ok = stat.S_ISDIR(os.lstat(parent).st_mode) and not self._excluded(parent)
                    except OSError:
                        ok = False
                    real[parent] = ok
                if not ok:
                    break
            else:
                return i
        return None

    def _refresh(self, ledger: Ledger, paths: Iterable[bytes]) -> None:
        """Look again at `paths` (an lstat each): pending if a regular file not shipped."""
        real: dict[bytes, bool] = {}
        for path in paths:
            where = self._root_of(path, real)
            st = None
            if where is not None:
                with contextlib.suppress(OSError):
                    st = os.lstat(path)
            if (
                where is None
                or st is None
                or not stat.S_ISREG(st.st_mode)
                or ledger.holds(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            ):
                self._pending.pop(path, None)
            else:
                self._pending[path] = (where, st.st_size, st.st_mtime_ns)

    def _full_scan(self, ledger: Ledger, now: float) -> bool:
        """Every file of the sources: what is pending, and the ledger forgets what is gone.
        False when a stop cut it short."""
        index = {root: i for i, root in reversed(list(enumerate(self._roots)))}
        present: set[int] = set()
        pending: dict[bytes, tuple[int, int, int]] = {}
        self._dirty.clear()  # the scan looks at them all anyway
        for target, st in self._scan(self.cfg.source, self._excluded, self._stopping):
            present.add(inode_key(st.st_dev, st.st_ino))
            if not ledger.holds(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns):
                pending[target.path] = (index.get(target.root, 0), st.st_size, st.st_mtime_ns)
        if self._stopping.is_set():
            return False
        ledger.keep_only_keys(present)
        self._pending, self._pending_peak = pending, len(pending)
        self._full_due = False
        self._next_full = now + (RESCAN_EVERY if self._observer is not None else SCAN_MAX)
        return True

    def _loop(self, clients: Clients, ledger: Ledger, values: dict[str, str]) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            now = self._clock()
            self._take_events(now)
            self._check_roots(now)
            if self._full_due or now >= self._next_full:
                if not self._full_scan(ledger, now):
                    return
                self._worked = True
            elif self._dirty:
                dirty, self._dirty = self._dirty, set()
                self._refresh(ledger, dirty)
            self._recovered()
            complete, candidates = self._complete(now)
            # The backlog doctor judges counts complete files waiting for a retry too: a
            # segment failing for good must read as "not keeping up".
            self._publish((len(self._pending), sum(v[1] for v in self._pending.values())), complete)
            if ledger.needs_compaction():
                ledger.compact()  # atomic; the appends then go to the rewritten file
            if candidates:
                chosen = batch(candidates)
                targets = [self._target(p, self._pending[p][0]) for p in chosen]
                self._ship_batch(clients, ledger, targets, values, now)
                self._refresh(ledger, [t.path for t in targets])  # shipped, or still pending
                self._worked = True
                if len(self._pending) < self._pending_peak // 4:
                    # A dict never gives back its table: one sized for a first start's
                    # backlog would stay (5 MB at 100,000 files).
                    self._pending = dict(self._pending)
                    self._pending_peak = len(self._pending)
                continue
            if self._worked:
                self._worked = False
                ledger.tidy()
                release_memory()
            waits = [self._settler.wake_in(p, v[2] / 1e9, now) for p, v in self._pending.items()]
            waits += [at - now for at, _ in self._retry_at.values()]
            self._wake.wait(max(0.2, min([SCAN_MAX, self._next_full - now, *waits])))
            # A writer that closes after every line wakes the loop constantly; a pass at
            # most every SCAN_MIN seconds is enough (a stop still wakes it).
            self._stopping.wait(SCAN_MIN)

    def _complete(self, now: float) -> tuple[tuple[int, int], list[tuple[bytes, Sized]]]:
        """The complete files (count, bytes), and the oldest of those due, from which the
        next batch is picked: at most CANDIDATES, not a list of every file of a backlog of
        hundreds of thousands at every pass."""
        settler, retry_at, counts = self._settler, self._retry_at, [0, 0]

        def due() -> Iterator[tuple[bytes, Sized]]:
            for path, (_, size, mtime_ns) in self._pending.items():
                if settler.reason(path, mtime_ns / 1e9, now) is None:
                    continue
                counts[0] += 1
                counts[1] += size
                if retry_at.get(path, (0.0, 0))[0] <= now:
                    yield path, Seen(size, mtime_ns)

        oldest = heapq.nsmallest(CANDIDATES, due(), key=lambda d: (d[1].st_mtime_ns, d[0]))
        return (counts[0], counts[1]), oldest

    def _target(self, path: bytes, where: int) -> Target:
        root = self._roots[where]
        return Target(root, path[len(root if root.endswith(b"/") else root + b"/") :])

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

    def _publish(self, pending: tuple[int, int] | None, due: tuple[int, int]) -> None:
        """The `shipping` block (pending counts every file not shipped, the live ones
        included: what the termination archive would carry now), and beside it the backlog
        of complete files waiting, which `doctor` judges."""
        block = dict(self._block)
        if pending is not None:
            block.update(pending_files=pending[0], pending_bytes=pending[1])
        if self._ledger is not None:
            block["shipped_files"], block["shipped_bytes"] = self._ledger.totals()
        if not due[0]:
            self._behind_since = None
        elif self._behind_since is None:
            self._behind_since = self._clock()
        backlog = {
            "due_files": due[0],
            "due_bytes": due[1],
            "behind_since": self._behind_since,
        }
        self._block = block
        # Against what was last written, not self._block: a failure sets last_error there
        # directly, and must still reach the file.
        if (block, backlog) != self._written:
            self._written = (dict(block), backlog)
            status.write_status(status.status_path(self.cfg), shipping=block, shipping_backlog=backlog)
