"""The local IMDS stand-in follows the IMDSv2 rules the agent depends on."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import requests

from instance_agent.local.imds import MAX_TTL_SECONDS, TOKEN_HEADER, TTL_HEADER, IMDSStub


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def stub(clock: FakeClock) -> Iterator[IMDSStub]:
    with IMDSStub(instance_id="i-0abc", region="eu-west-1", clock=clock) as running:
        yield running


def token(endpoint: str, ttl: str = "60") -> str:
    response = requests.put(f"{endpoint}/latest/api/token", headers={TTL_HEADER: ttl}, timeout=5)
    assert response.status_code == 200
    return response.text


def get(endpoint: str, path: str, tok: str | None) -> requests.Response:
    headers = {TOKEN_HEADER: tok} if tok is not None else {}
    return requests.get(f"{endpoint}/latest/meta-data/{path}", headers=headers, timeout=5)


def test_token_then_identity(stub: IMDSStub) -> None:
    tok = token(stub.endpoint)
    assert get(stub.endpoint, "instance-id", tok).text == "i-0abc"
    assert get(stub.endpoint, "placement/region", tok).text == "eu-west-1"
    assert get(stub.endpoint, "placement/availability-zone", tok).text == "eu-west-1a"
    assert stub.issued_tokens == [tok]
    assert (stub.token_puts, stub.metadata_gets, stub.tokenless_reads) == (1, 3, 0)
    assert stub.requests[0] == ("PUT", "/latest/api/token", 200)
    assert stub.requests[1] == ("GET", "/latest/meta-data/instance-id", 200)


def test_token_response_echoes_ttl(stub: IMDSStub) -> None:
    response = requests.put(f"{stub.endpoint}/latest/api/token", headers={TTL_HEADER: "21600"}, timeout=5)
    assert response.status_code == 200
    assert response.headers[TTL_HEADER] == "21600"
    assert response.headers["Content-Type"] == "text/plain"


def test_read_without_token_is_401_and_counted(stub: IMDSStub) -> None:
    assert get(stub.endpoint, "instance-id", None).status_code == 401
    assert get(stub.endpoint, "placement/region", None).status_code == 401
    assert stub.tokenless_reads == 2


@pytest.mark.parametrize("ttl", [None, "", "0", "-1", "abc", "1.5", str(MAX_TTL_SECONDS + 1)])
def test_invalid_ttl_is_400(stub: IMDSStub, ttl: str | None) -> None:
    headers = {TTL_HEADER: ttl} if ttl is not None else {}
    response = requests.put(f"{stub.endpoint}/latest/api/token", headers=headers, timeout=5)
    assert response.status_code == 400
    assert stub.issued_tokens == []


def test_forwarded_put_and_versioned_path_are_403(stub: IMDSStub) -> None:
    forwarded = requests.put(
        f"{stub.endpoint}/latest/api/token",
        headers={TTL_HEADER: "60", "X-Forwarded-For": "10.0.0.1"},
        timeout=5,
    )
    versioned = requests.put(f"{stub.endpoint}/2021-07-15/api/token", headers={TTL_HEADER: "60"}, timeout=5)
    assert (forwarded.status_code, versioned.status_code) == (403, 403)
    assert stub.issued_tokens == []


def test_token_expires_after_its_ttl(stub: IMDSStub, clock: FakeClock) -> None:
    tok = token(stub.endpoint, ttl="5")
    clock.now += 4.9
    assert get(stub.endpoint, "instance-id", tok).status_code == 200
    clock.now += 0.2
    assert get(stub.endpoint, "instance-id", tok).status_code == 401


def test_unknown_and_expired_tokens_are_401(stub: IMDSStub) -> None:
    assert get(stub.endpoint, "instance-id", "not-a-token").status_code == 401
    tok = token(stub.endpoint)
    stub.expire_tokens()
    assert get(stub.endpoint, "instance-id", tok).status_code == 401
    fresh = token(stub.endpoint)
    assert get(stub.endpoint, "instance-id", fresh).status_code == 200
    assert stub.tokenless_reads == 0


def test_target_lifecycle_state(stub: IMDSStub) -> None:
    tok = token(stub.endpoint)
    assert get(stub.endpoint, "autoscaling/target-lifecycle-state", tok).status_code == 404
    stub.set_lifecycle_state("Terminated")
    response = get(stub.endpoint, "autoscaling/target-lifecycle-state", tok)
    assert (response.status_code, response.text) == (200, "Terminated")


def test_spot_and_rebalance_notices(stub: IMDSStub) -> None:
    tok = token(stub.endpoint)
    assert get(stub.endpoint, "spot/instance-action", tok).status_code == 404
    assert get(stub.endpoint, "events/recommendations/rebalance", tok).status_code == 404
    stub.spot_action = {"action": "terminate", "time": "2026-11-26T10:00:00Z"}
    stub.rebalance = {"noticeTime": "2026-11-26T09:50:00Z"}
    assert get(stub.endpoint, "spot/instance-action", tok).json() == {
        "action": "terminate",
        "time": "2026-11-26T10:00:00Z",
    }
    assert get(stub.endpoint, "events/recommendations/rebalance", tok).json() == {
        "noticeTime": "2026-11-26T09:50:00Z"
    }


def test_instance_tags(stub: IMDSStub) -> None:
    tok = token(stub.endpoint)
    group_path = "tags/instance/aws:autoscaling:groupName"
    assert get(stub.endpoint, group_path, tok).status_code == 404  # tags not exposed
    stub.tags = {"Name": "web"}
    assert get(stub.endpoint, group_path, tok).status_code == 404  # no such tag
    stub.tags = {"Name": "web", "aws:autoscaling:groupName": "web-asg"}
    assert get(stub.endpoint, group_path, tok).text == "web-asg"
    assert get(stub.endpoint, "tags/instance", tok).text.splitlines() == [
        "Name",
        "aws:autoscaling:groupName",
    ]


def test_attribute_values_are_copied(stub: IMDSStub) -> None:
    tags = {"aws:autoscaling:groupName": "a"}
    stub.tags = tags
    tags["aws:autoscaling:groupName"] = "b"
    assert stub.tags == {"aws:autoscaling:groupName": "a"}


def test_unknown_path_is_404_and_other_methods_405(stub: IMDSStub) -> None:
    tok = token(stub.endpoint)
    assert get(stub.endpoint, "ami-id", tok).status_code == 404
    assert (
        requests.get(f"{stub.endpoint}/latest/user-data", headers={TOKEN_HEADER: tok}, timeout=5)
    ).status_code == 404
    assert requests.post(f"{stub.endpoint}/latest/api/token", timeout=5).status_code == 405


def test_fail_status_applies_after_the_token_check(stub: IMDSStub) -> None:
    tok = token(stub.endpoint)
    stub.fail_status = 500
    assert get(stub.endpoint, "instance-id", None).status_code == 401
    assert get(stub.endpoint, "instance-id", tok).status_code == 500
    assert get(stub.endpoint, "autoscaling/target-lifecycle-state", tok).status_code == 500
    stub.fail_status = None
    assert get(stub.endpoint, "instance-id", tok).status_code == 200


def test_delay_slows_every_answer(stub: IMDSStub) -> None:
    stub.delay = 0.3
    started = time.monotonic()
    token(stub.endpoint)
    assert time.monotonic() - started >= 0.3


def test_black_hole_times_out_and_stop_does_not_hang(clock: FakeClock) -> None:
    stub = IMDSStub(clock=clock)
    endpoint = stub.start()
    stub.delay = 60
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.put(f"{endpoint}/latest/api/token", headers={TTL_HEADER: "60"}, timeout=0.3)
    started = time.monotonic()
    stub.stop()
    assert time.monotonic() - started < 5
    assert stub.issued_tokens == []


def test_stop_drops_pooled_connections(clock: FakeClock) -> None:
    stub = IMDSStub(clock=clock)
    endpoint = stub.start()
    with requests.Session() as session:
        put = session.put(f"{endpoint}/latest/api/token", headers={TTL_HEADER: "60"}, timeout=5)
        assert put.status_code == 200
        stub.stop()
        with pytest.raises(requests.exceptions.ConnectionError):
            session.get(
                f"{endpoint}/latest/meta-data/instance-id",
                headers={TOKEN_HEADER: put.text},
                timeout=2,
            )


def test_request_log_is_bounded(stub: IMDSStub) -> None:
    from instance_agent.local import imds

    assert stub._requests.maxlen == imds.REQUEST_LOG_LIMIT
    for _ in range(3):
        get(stub.endpoint, "instance-id", None)
    assert stub.requests == [("GET", "/latest/meta-data/instance-id", 401)] * 3


def test_standalone_command_serves_until_terminated() -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "instance_agent.local.imds",
            "--instance-id",
            "i-0standalone",
            "--group",
            "web-asg",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        endpoint = process.stdout.readline().strip()
        assert endpoint.startswith("http://127.0.0.1:")
        tok = token(endpoint)
        assert get(endpoint, "instance-id", tok).text == "i-0standalone"
        assert get(endpoint, "tags/instance/aws:autoscaling:groupName", tok).text == "web-asg"
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=10)
    assert process.returncode == 0
    assert stderr == ""  # no access log on the terminal
