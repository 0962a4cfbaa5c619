"""In-memory fakes of the project's own Protocols, and a clock that only moves when told."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import ClientError, EndpointConnectionError


class FakeClock:
    """Monotonic seconds that advance only through `sleep` (or by hand)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> bool:
        self.sleeps.append(seconds)
        self.now += seconds
        return False  # the shape of Event.wait: "not set"


def client_error(code: str, message: str, status: int = 400) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}, "op"
    )


@dataclass
class FakeAutoScaling:
    """An Auto Scaling that answers from a script: `states` is the sequence of lifecycle
    states DescribeAutoScalingInstances returns (the last repeats), `live` whether a
    heartbeat finds an action, and `errors` per call name the exceptions to raise first."""

    instance_id: str = "i-0123456789abcdef0"
    group: str = "web"
    states: list[str | None] = field(default_factory=lambda: ["Terminating:Wait"])
    live: bool = True
    errors: dict[str, list[Exception]] = field(default_factory=dict)
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    hooks: list[dict[str, Any]] = field(
        default_factory=lambda: [
            {
                "LifecycleHookName": "drain",
                "LifecycleTransition": "autoscaling:EC2_INSTANCE_TERMINATING",
                "HeartbeatTimeout": 300,
            }
        ]
    )

    def _enter(self, name: str, kwargs: dict[str, Any]) -> None:
        self.calls.append((name, kwargs))
        queue = self.errors.get(name) or []
        if queue:
            raise queue.pop(0)

    def count(self, name: str) -> int:
        return sum(1 for n, _ in self.calls if n == name)

    def describe_auto_scaling_instances(self, **kwargs: Any) -> Mapping[str, Any]:
        self._enter("DescribeAutoScalingInstances", kwargs)
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        if state is None:
            return {"AutoScalingInstances": []}
        return {
            "AutoScalingInstances": [
                {"InstanceId": self.instance_id, "AutoScalingGroupName": self.group, "LifecycleState": state}
            ]
        }

    def describe_lifecycle_hooks(self, **kwargs: Any) -> Mapping[str, Any]:
        self._enter("DescribeLifecycleHooks", kwargs)
        return {"LifecycleHooks": self.hooks}

    def _action(self, name: str, kwargs: dict[str, Any]) -> Mapping[str, Any]:
        self._enter(name, kwargs)
        if not self.live:
            ident = kwargs.get("LifecycleActionToken") or kwargs.get("InstanceId")
            what = "token" if "LifecycleActionToken" in kwargs else "instance ID"
            raise client_error("ValidationError", f"No active Lifecycle Action found with {what} {ident}")
        return {}

    def record_lifecycle_action_heartbeat(self, **kwargs: Any) -> Mapping[str, Any]:
        return self._action("RecordLifecycleActionHeartbeat", kwargs)

    def complete_lifecycle_action(self, **kwargs: Any) -> Mapping[str, Any]:
        out = self._action("CompleteLifecycleAction", kwargs)
        self.live = False  # a completed action is over
        return out


def connection_error() -> Exception:
    return EndpointConnectionError(endpoint_url="https://autoscaling.us-east-1.amazonaws.com")
