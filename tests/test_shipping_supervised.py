"""The shipper is supervised (issue 19 item 5): an unexpected error in its loop restarts it
with backoff, and inotify that cannot start leaves it on its periodic scan. In process, with
the real S3 (SeaweedFS) and moto, through the Shipper's own seams: the observer factory and
the scanner are constructor parameters, and the fakes here are ours."""

from __future__ import annotations

import errno
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from conftest import REGION, Stack
from support import scoreboard
from support.agentproc import watch

from instance_agent import config, doctor, status, wiring
from instance_agent.archive import Excluder
from instance_agent.identity import Identity
from instance_agent.segment import Target
from instance_agent.shippending import scan
from instance_agent.shipper import Shipper
from instance_agent.shipwatch import Observing

OLD = time.time() - 3600  # rotated an hour ago: settled at once


def _segments(stack: Stack) -> list[str]:
    return sorted(k for k in stack.objects() if "/segments/" in k and k.endswith(".tar.zst"))


def no_inotify(sources: tuple[str, ...], post: Callable[[str, bytes], None]) -> Observing:
    """What watchdog raises when inotify_init1 meets fs.inotify.max_user_instances."""
    raise OSError(errno.EMFILE, "inotify instance limit reached")


class FlakyScanner:
    """The real scan, but it raises an unexpected error until `heal` is set."""

    def __init__(self) -> None:
        self.heal = threading.Event()
        self.failures = 0

    def __call__(
        self, sources: tuple[str, ...], excluded: Excluder, stop: threading.Event | None
    ) -> Iterator[tuple[Target, os.stat_result]]:
        if not self.heal.is_set():
            self.failures += 1
            raise RuntimeError("an unexpected bug in the loop")
        return scan(sources, excluded, stop)


def _wait(what: Callable[[], Any], timeout: float = 60.0) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = what()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _stalled_points(stack: Stack) -> list[float]:
    points = stack.group_metric("ShippingStalled", ["Maximum", "Minimum"], period=60)
    return [p["Maximum"] for p in points] + [p["Minimum"] for p in points]


def _shipper(stack: Stack, src: Path, tmp: Path, **seams: Any) -> tuple[config.Config, Shipper]:
    cfg = config.load(
        {
            "bucket": stack.bucket,
            "source": [str(src)],
            "ship": True,
            "asg_name": stack.group,
            "journal": False,
            "state_dir": str(tmp / "state"),
            "runtime_dir": str(tmp / "run"),
        },
        {},
        command=config.WATCH,
    )
    ident = Identity(stack.instance_id, REGION)
    return cfg, Shipper(cfg, lambda stop: ident, wiring.make_clients, **seams)


def _doctor(cfg: config.Config) -> doctor.Check:
    d = doctor.Doctor(cfg, None, wiring.make_clients)
    d.check_shipping()
    return d.checks[-1]


def _status(cfg: config.Config) -> dict[str, Any]:
    found = status.find_status((cfg.runtime_dir, cfg.state_dir))
    return status.shipping_block(found[1] if found else None)


def test_an_unexpected_error_restarts_shipping_and_no_inotify_falls_back_to_scans(
    in_process: Stack, tmp_path: Path
) -> None:
    stack = in_process
    src = tmp_path / "logs"
    src.mkdir()
    first = src / "app.log.1"
    first.write_bytes(b"GET /a 200\n" * 5000)
    os.utime(first, (OLD, OLD))
    flaky = FlakyScanner()
    with scoreboard.scenario(
        "Shipping: inotify cannot start (instance limit), and the loop raises an unexpected error"
    ) as row:
        cfg, shipper = _shipper(stack, src, tmp_path, observe=no_inotify, scanner=flaky)
        shipper.start()
        try:
            _wait(lambda: flaky.failures >= 2)  # restarted after the first error
            stalled = _status(cfg)
            assert stalled["state"] == "restarting" and stalled["restarts"] >= 1, stalled
            assert "unexpected bug" in (stalled["last_error"] or "")
            check = _doctor(cfg)
            assert check.result == doctor.FAIL and "stalled" in check.message, check
            assert _wait(lambda: 1.0 in _stalled_points(stack))
            assert _segments(stack) == []

            flaky.heal.set()  # the bug passes: shipping resumes on its own
            _wait(lambda: _segments(stack))
            second = src / "app.log.2"  # no inotify: only the periodic scan can find this one
            second.write_bytes(b"GET /b 200\n" * 5000)
            os.utime(second, (OLD, OLD))
            _wait(lambda: len(_segments(stack)) == 2)
            running = _wait(
                lambda: (b := _status(cfg))["state"] == "running" and b["shipped_files"] == 2 and b
            )
            assert running["watch"] == "scan" and running["last_error"] is None, running
            check = _doctor(cfg)
            assert check.result == doctor.OK and "scanning" in check.message, check
            assert _wait(lambda: 0.0 in _stalled_points(stack))
        finally:
            assert shipper.stop()
        row.faults = f"inotify_init EMFILE; {flaky.failures} × RuntimeError in the loop"
        row.outcome = (
            "restarted with backoff; periodic scan ships both files; doctor and ShippingStalled say so"
        )
        row.bytes_lost = 0


def test_sigterm_on_an_idle_watcher_cancels_the_segment_in_flight(stack: Stack, tmp_path: Path) -> None:
    src = tmp_path / "logs"
    src.mkdir()
    big = src / "big.log.1"  # 12 MiB at 256 KiB/s: the segment is in flight for most of a minute
    big.write_bytes(random.Random(3).randbytes(12 * 2**20))
    os.utime(big, (OLD, OLD))
    with (
        scoreboard.scenario("Shipping: SIGTERM on an idle watcher while a segment uploads") as row,
        watch(stack, "--source", str(src), "--ship", "--ship-bandwidth", str(256 * 1024)) as w,
    ):
        _wait(stack.incomplete_uploads)  # the segment's multipart upload is open
        w.send(signal.SIGTERM)
        assert w.wait(60) == 0, w.text()
        # The stop cancelled the segment rather than waiting for it ...
        _, cancelled = w.wait_for(
            "stop: the segment in flight is cancelled; it ships again at the next start"
        )
        assert cancelled["waited_s"] == 0, cancelled
        # ... and left nothing behind: no open upload, no segment, nothing in the ledger.
        assert stack.incomplete_uploads() == []
        assert _segments(stack) == []
        assert w.find("segment shipped") == []
        row.faults = "SIGTERM during a segment's upload (paced by --ship-bandwidth)"
        row.outcome = "exit 0; upload aborted; nothing recorded; the file ships when the watcher starts again"
        row.bytes_lost = 0
    # The next start ships it (nothing was recorded that is not in S3).
    with watch(stack, "--source", str(src), "--ship") as w:
        w.wait_for("segment shipped", timeout=60, path=str(big))
        w.proc.kill()
    assert len(_segments(stack)) == 1
