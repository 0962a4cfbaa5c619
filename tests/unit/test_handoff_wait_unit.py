"""The launch gate's wait for a hand-off (handoff_wait), on a fake clock: how long it waits,
how often it lists, and that it waits only while a peer is in Terminating:Wait."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fakes import FakeClock

from instance_agent import config, handoff_adopt
from instance_agent.clients import Clients
from instance_agent.identity import Identity

ME, PEER = "i-0aaaaaaaaaaaaaaa1", "i-0bbbbbbbbbbbbbbb2"


@dataclass
class FakeS3:
    """A bucket with nothing under the group's handoff/ prefix; counts the listings."""

    listings: int = 0

    def list_objects_v2(self, **kwargs: Any) -> Mapping[str, Any]:
        self.listings += 1
        return {"Contents": [], "IsTruncated": False}


@dataclass
class FakeGroups:
    """DescribeAutoScalingGroups for one group: a peer in `peer_state` (the last repeats)."""

    peer_states: list[str] = field(default_factory=lambda: ["Terminating:Wait"])
    calls: int = 0

    def describe_auto_scaling_groups(self, **kwargs: Any) -> Mapping[str, Any]:
        state = self.peer_states[min(self.calls, len(self.peer_states) - 1)]
        self.calls += 1
        instances = [
            {"InstanceId": ME, "LifecycleState": "Pending:Wait"},
            {"InstanceId": PEER, "LifecycleState": state},
        ]
        return {"AutoScalingGroups": [{"AutoScalingGroupName": "web", "Instances": instances}]}


def gate(wait: float, groups: FakeGroups) -> tuple[dict[str, Any] | None, FakeS3, FakeClock]:
    cfg = config.Config.defaults(
        bucket="my-backups", handoff_path=("/srv/spool",), handoff_to="launching", handoff_wait=wait
    )
    s3, clock = FakeS3(), FakeClock()
    clients = Clients(s3=s3, autoscaling=groups)  # the two calls the gate makes
    result = handoff_adopt.at_launch(
        cfg, Identity(ME, "eu-west-1"), clients, "web", now=clock, sleep=clock.sleep
    )
    return result, s3, clock


def test_without_handoff_wait_the_gate_lists_once_and_goes_on() -> None:
    result, s3, clock = gate(0.0, FakeGroups())
    assert result is None and s3.listings == 1 and clock.sleeps == []


def test_while_a_peer_is_terminating_it_lists_every_poll_until_the_wait_is_over() -> None:
    result, s3, clock = gate(9.0, FakeGroups())
    assert result is None
    assert clock.sleeps == [2.0, 2.0, 2.0, 2.0, 1.0]  # never past handoff_wait
    assert s3.listings == len(clock.sleeps) + 1 and clock.now == 1000.0 + 9.0


def test_it_stops_waiting_once_no_peer_is_terminating() -> None:
    result, s3, clock = gate(
        60.0, FakeGroups(["Terminating:Wait", "Terminating:Wait", "Terminating:Proceed"])
    )
    assert result is None and clock.sleeps == [2.0, 2.0] and s3.listings == 3
