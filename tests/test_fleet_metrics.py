"""CloudWatch metrics of `instance-agent backup`, read back from moto the way an operator
reads them: GetMetricStatistics by namespace, metric and AutoScalingGroupName.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conftest import Stack
from support.faultproxy import FaultProxy, Rule, access_denied

from instance_agent import metrics


def small_source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "app.log").write_text("request ok\n" * 5000)
    return src


def sums(stack: Stack) -> dict[str, float]:
    """Each metric's sum over the last hour for the stack's group; absent metrics left out."""
    found: dict[str, float] = {}
    for name in (
        "BackupSucceeded",
        "BackupPartial",
        "BackupFailed",
        "LifecycleAbandoned",
        "BackupDurationSeconds",
        "BytesUploaded",
    ):
        points = stack.group_metric(name, ["Sum"])
        if points:
            found[name] = sum(p["Sum"] for p in points)
    return found


def log_lines(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def test_failed_backup_counts_one_failure_and_one_abandon(stack: Stack, tmp_path: Path) -> None:
    stack.scale_in()
    with FaultProxy(stack.s3_endpoint) as proxy:  # the role may not write: every S3 call 403
        proxy.add_rule(Rule(fault=access_denied()))
        proc, result = stack.backup(
            "--source", str(small_source(tmp_path)), env=stack.env(AWS_ENDPOINT_URL_S3=proxy.endpoint)
        )

    assert proc.returncode == 1 and result["status"] == "failed"
    assert result["lifecycle_result"] == "ABANDON"
    found = sums(stack)
    assert found["BackupFailed"] == 1 and found["LifecycleAbandoned"] == 1
    assert found["BackupSucceeded"] == 0 and found["BackupPartial"] == 0
    assert found["BytesUploaded"] == 0


def test_successful_backup_counts_one_success_with_its_bytes(stack: Stack, tmp_path: Path) -> None:
    stack.scale_in()
    proc, result = stack.backup("--source", str(small_source(tmp_path)))

    assert proc.returncode == 0 and result["status"] == "succeeded"
    found = sums(stack)
    assert found["BackupSucceeded"] == 1
    assert found["BackupFailed"] == 0 and found["LifecycleAbandoned"] == 0
    assert found["BytesUploaded"] == result["bytes_uploaded"] > 0
    assert found["BackupDurationSeconds"] == result["duration_s"]


def test_no_metrics_publishes_nothing(stack: Stack, tmp_path: Path) -> None:
    stack.scale_in()
    proc, _ = stack.backup("--source", str(small_source(tmp_path)), "--no-metrics")

    assert proc.returncode == 0
    assert sums(stack) == {}


def test_unreachable_cloudwatch_changes_nothing_but_a_warning(stack: Stack, tmp_path: Path) -> None:
    stack.scale_in()
    env = stack.env(AWS_ENDPOINT_URL_CLOUDWATCH="http://127.0.0.1:9")  # nothing listens there
    proc, result = stack.backup("--source", str(small_source(tmp_path)), env=env)

    assert proc.returncode == 0 and result["status"] == "succeeded"
    assert [(c.result, c.outcome) for c in stack.lifecycle_calls("CompleteLifecycleAction")] == [
        ("CONTINUE", "ok")
    ]
    [warning] = [line for line in log_lines(proc.stderr) if line.get("msg") == "metrics not published"]
    assert warning["level"].lower() == "warning" and "127.0.0.1:9" in warning["error"]
    assert sums(stack) == {}


def test_a_duplicate_run_or_a_run_without_group_is_not_counted() -> None:
    base = {
        "status": "succeeded",
        "group": "web",
        "lifecycle_result": "CONTINUE",
        "duration_s": 2.5,
        "bytes_uploaded": 10,
    }
    assert metrics.metric_data({**base, "status": "duplicate"}) == []
    assert metrics.metric_data({**base, "group": None}) == []
    data = {d["MetricName"]: d["Value"] for d in metrics.metric_data(base)}
    assert data == {
        "BackupSucceeded": 1,
        "BackupPartial": 0,
        "BackupFailed": 0,
        "LifecycleAbandoned": 0,
        "BackupDurationSeconds": 2.5,
        "BytesUploaded": 10,
    }


class HangingServer:
    """A TCP server on 127.0.0.1 that accepts, reads the request and never answers: a
    black-holed CloudWatch endpoint. Records when each request's first bytes arrived."""

    def __init__(self) -> None:
        import socket
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.arrived: list[float] = []
        self.conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self) -> None:
        import time

        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.conns.append(conn)
            conn.settimeout(2)
            try:
                if conn.recv(65536):
                    self.arrived.append(time.monotonic())
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for conn in self.conns:
            conn.close()
        self.sock.close()


def test_hanging_cloudwatch_is_tried_before_completion_and_delays_it_by_at_most_the_bound(
    stack: Stack, tmp_path: Path
) -> None:
    import time

    stack.scale_in()
    server = HangingServer()
    try:
        env = stack.env(AWS_ENDPOINT_URL_CLOUDWATCH=server.endpoint)
        started = time.monotonic()
        proc, result = stack.backup("--source", str(small_source(tmp_path)), env=env)
        elapsed = time.monotonic() - started
    finally:
        server.close()

    assert proc.returncode == 0 and result["status"] == "succeeded"
    [complete] = stack.lifecycle_calls("CompleteLifecycleAction")
    assert (complete.result, complete.outcome) == ("CONTINUE", "ok")
    # The metric datum went out before the completion (after it, the instance is gone)...
    assert server.arrived and server.arrived[0] < complete.at
    # ...and the completion waited on the hanging endpoint no longer than the bound. The
    # whole run, with a generous margin for a loaded machine, stays well under what the
    # client's own retries against a black hole would take (3 attempts x 5 s read timeout).
    assert complete.at - server.arrived[0] < 4 * metrics.PUBLISH_BOUND
    assert elapsed < 60
