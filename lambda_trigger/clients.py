"""AWS clients of the functions, and the one retry policy every call goes through.

Owns: building the boto3 clients (once per container, replaceable with `use_clients`), and
`Caller`, which retries throttling with exponential backoff and full jitter inside the
invocation's remaining time. A throttled call was certainly not executed, so retrying even
SendCommand cannot send twice. botocore's own retries are off so that there is one policy
and it knows the deadline. Any other AWS error raises: Lambda's async retry runs the whole
flow again. boto3's own settings (AWS_ENDPOINT_URL, AWS_REGION, …) apply, so the functions
run against a local stand-in unchanged.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from botocore.exceptions import BotoCoreError, ClientError

from lambda_trigger import __version__
from lambda_trigger.logs import fields, log

if TYPE_CHECKING:
    from mypy_boto3_autoscaling import AutoScalingClient
    from mypy_boto3_sns import SNSClient
    from mypy_boto3_ssm import SSMClient

T = TypeVar("T")

# Every error a botocore call can raise: AWS's answers (ClientError) and the ones that never
# got an answer (BotoCoreError: ReadTimeoutError, EndpointConnectionError, ...). Code that
# is documented as never raising catches both.
AWS_ERRORS = (ClientError, BotoCoreError)
AwsError = ClientError | BotoCoreError

THROTTLING = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "Throttled",
    }
)
BACKOFF_BASE = 0.05  # seconds; doubles per attempt
BACKOFF_CAP = 5.0
# Kept back from Lambda's remaining time so the final log line and return always happen.
SAFETY_MARGIN = 3.0
DEFAULT_BUDGET = 60.0  # without a Lambda context (a direct call from Python)


@dataclass(frozen=True)
class Clients:
    ssm: SSMClient
    autoscaling: AutoScalingClient
    sns: SNSClient


_clients: Clients | None = None
_clients_lock = threading.Lock()


def use_clients(clients: Clients | None) -> None:
    """Use these clients from now on; None builds them again from boto3 on next use."""
    global _clients
    with _clients_lock:
        _clients = clients


def get_clients() -> Clients:
    global _clients
    with _clients_lock:
        if _clients is None:
            _clients = _boto3_clients()
        return _clients


def _boto3_clients() -> Clients:
    import boto3
    from botocore.config import Config

    # One attempt per call: the retry policy is Caller's (module docstring).
    config = Config(
        retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=5,
        read_timeout=15,
        user_agent_extra=f"instance-agent-trigger/{__version__}",
    )
    session = boto3.session.Session()
    return Clients(
        ssm=session.client("ssm", config=config),
        autoscaling=session.client("autoscaling", config=config),
        sns=session.client("sns", config=config),
    )


def deadline(context: object, clock: Callable[[], float]) -> float:
    """When this invocation's own work must stop: Lambda's remaining time less a margin."""
    remaining = getattr(context, "get_remaining_time_in_millis", None)
    budget = remaining() / 1000.0 - SAFETY_MARGIN if callable(remaining) else DEFAULT_BUDGET
    return clock() + max(budget, 0.0)


@dataclass
class Caller:
    """AWS calls of one invocation, bounded by its deadline."""

    deadline: float
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep

    def call(self, name: str, fn: Callable[..., T], **kwargs: Any) -> T:
        """`fn(**kwargs)`, retrying throttling with backoff until the deadline."""
        attempt = 0
        while True:
            try:
                return fn(**kwargs)
            except ClientError as err:
                if error_code(err) not in THROTTLING:
                    raise
                attempt += 1
                # Full jitter: a burst of invocations must not retry in lockstep.
                delay = random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt))  # noqa: S311
                if self.clock() + delay > self.deadline:
                    raise
                log.info(
                    "throttled; retrying", extra=fields(call=name, attempt=attempt, wait_s=round(delay, 3))
                )
                self.sleep(delay)


def error_code(err: ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


def describe_error(err: AwsError) -> str:
    if not isinstance(err, ClientError):
        return f"{type(err).__name__}: {err}"
    error = err.response.get("Error", {})
    return f"{error.get('Code', '')}: {error.get('Message', '')}"
