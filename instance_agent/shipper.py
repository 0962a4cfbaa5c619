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
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from instance_agent import finalprep, keys, ledgerseed, metrics, status
from instance_agent.archive import Excluder
from instance_agent.backup import key_values
from instance_agent.clients import Clients
from instance_agent.config import Config
from instance_agent.errors import AgentError, Cancelled, LifecycleError
from instance_agent.footprint import lower_priority, release_memory
from instance_agent.identity import Identity
from instance_agent.lifecycle import instance_state
from instance_agent.logs import fields
from instance_agent.s3args import write_args
from instance_agent.s3upload import abort_stale_uploads
from instance_agent.segment import Changed, Target, ship
from instance_agent.settle import Settler
from instance_agent.shipbatch import batch
from instance_agent.shipjournal import Handover, Prepared
from instance_agent.shippending import Pending, Scanner, scan
from instance_agent.shipstate import Ledger, refresh_age
from instance_agent.shipwatch import ObserverFactory, Observing, watchdog_observer

log = logging.getLogger(__name__)

STOP_WAIT = 5.0  # "a few seconds" for the segment in flight when termination comes
CANCEL_WAIT = 5.0  # for the cancelled upload's abort to go through
SCAN_MAX = 10.0  # seconds between full scans without inotify; the longest wait of the loop
SCAN_MIN = 1.0  # the shortest spell between passes of the loop: events are gathered meanwhile
RESCAN_EVERY = 3600.0  # the full scan's safety net while inotify watches (see above)
RETRY_FIRST, RETRY_MAX = 5.0, 300.0
GROUP_RETRY_MAX = 60.0
RESTART_FIRST, RESTART_MAX = 1.0, 300.0  # the supervisor's backoff after an unexpected error


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
        self._settler = Settler(cfg.ship_settle)
        self._retry_at: dict[bytes, tuple[float, int]] = {}
        self._ledger: Ledger | None = None
        self._clean: bool | None = None  # set by stop(): no segment cancelled, thread ended
        self._pending = Pending(cfg.source, Excluder(cfg.exclude), self._settler, scanner)
        self._next_roots = 0.0
        self._observer: Observing | None = None
        self._watched: list[tuple[int, int] | None] = []
        self._worked = False  # a full scan or a segment since the loop last went idle
        self._prepared: Prepared | None = None  # the termination's journal walk, worked out ahead
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
        self._clean = not self._cancel.is_set() and not self._thread.is_alive()
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
        """What was shipped, for the termination archive (None before the ledger is read).
        After stop(), with the change journal handed over (finalwalk.py decides whether
        the archive may trust it)."""
        if self._ledger is None:
            return None
        view = self._ledger.view()
        if self._clean is not None:
            # Stopped: the journal is the job's now (the handover says if the thread ended).
            journal = self._pending.journal if self._block["watch"] == "inotify" else None
            view.handover = Handover(journal, self._clean, self._prepared if journal is not None else None)
        return view

    def snapshot(self) -> dict[str, Any]:
        return dict(self._block)

    # -- the thread -----------------------------------------------------------------------
    def _main(self) -> None:
        """The supervisor: runs the loop, and after an unexpected error logs it, says so in
        the status block and the metric, waits (backoff, capped) and starts it again."""
        refused = lower_priority()
        if refused:
            log.info("shipping thread keeps the process's priority", extra=fields(refused=refused))
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
                    if self._pending.journal is not None:
                        self._pending.journal.lose("the shipping loop restarted after an error")
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
        self._pending.full_due = True  # a restart knows nothing of what happened meanwhile
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
                clients.s3, self.cfg.bucket or "", prefix, ident.instance_id, extra=write_args(self.cfg)
            )
            self._observe()
            self._pending.new_journal(self.cfg.exclude if self._observer is not None else None)
            self._prepared = None  # worked out from the old journal
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
        post, wake = self._pending.events.put, self._wake

        def on_event(kind: str, path: bytes) -> None:
            post((kind, path))
            wake.set()

        self._watched = self._pending.root_ids()
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

    def _check_roots(self, now: float) -> None:
        """A source directory that appeared, or was replaced, since the watch began is not
        watched: watch again, and scan it all (every SCAN_MAX seconds: one stat a source)."""
        if now < self._next_roots:
            return
        self._next_roots = now + SCAN_MAX
        if self._observer is None or self._pending.root_ids() == self._watched:
            return
        log.info("a source directory appeared or was replaced: watching it again, and a full scan")
        self._unobserve()
        self._observe()
        self._pending.full_due = True

    def _loop(self, clients: Clients, ledger: Ledger, values: dict[str, str]) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            now = self._clock()
            pending = self._pending
            pending.take_events(now)
            self._check_roots(now)
            if pending.full_due or now >= pending.next_full:
                rescan_in = RESCAN_EVERY if self._observer is not None else SCAN_MAX
                if not pending.full_scan(ledger, now, self._stopping, rescan_in):
                    return
                self._worked = True
            elif pending.dirty:
                dirty, pending.dirty = pending.dirty, set()
                pending.refresh(ledger, dirty)
            self._recovered()
            complete, candidates = pending.complete(now, self._retry_at)
            # The backlog doctor judges counts complete files waiting for a retry too: a
            # segment failing for good must read as "not keeping up".
            self._publish((len(pending.files), sum(v[1] for v in pending.files.values())), complete)
            if ledger.needs_compaction():
                ledger.compact()  # atomic; the appends then go to the rewritten file
            if candidates:
                chosen = batch(candidates)
                targets = [pending.target(p, pending.files[p][0]) for p in chosen]
                self._ship_batch(clients, ledger, targets, values, now)
                pending.refresh(ledger, [t.path for t in targets])  # shipped, or still pending
                self._worked = True
                if len(pending.files) < pending.peak // 4:
                    # A dict never gives back its table: one sized for a first start's
                    # backlog would stay (5 MB at 100,000 files).
                    pending.files = dict(pending.files)
                    pending.peak = len(pending.files)
                continue
            if self._worked:
                self._worked = False
                ledger.tidy()
                self._prepare(ledger)
                release_memory()
            waits = [self._settler.wake_in(p, v[2] / 1e9, now) for p, v in pending.files.items()]
            waits += [at - now for at, _ in self._retry_at.values()]
            self._wake.wait(max(0.2, min([SCAN_MAX, pending.next_full - now, *waits])))
            # A writer that closes after every line wakes the loop constantly; a pass at
            # most every SCAN_MIN seconds is enough (a stop still wakes it).
            self._stopping.wait(SCAN_MIN)

    def _prepare(self, ledger: Ledger) -> None:
        """Work out the termination archive's journal walk now, while idle (finalprep.py):
        the termination then reuses it for every directory unchanged since. Any surprise
        leaves nothing prepared, which only costs the termination that walk."""
        self._prepared = None
        journal = self._pending.journal
        if journal is None or self._observer is None:
            return
        try:
            self._prepared = finalprep.prepare(journal, ledger)
        except Exception:
            log.exception("termination walk not prepared")

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
