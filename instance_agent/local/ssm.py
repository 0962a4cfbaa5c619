"""Run Command for moto's SSM backend: managed instances, refusals, throttling.

moto 5.2 has no DescribeInstanceInformation for EC2 instances, sends a command to any id,
checks no document parameter, and marks every command Success without running anything.
`install()` patches moto (in this process: the in-process MotoServer serves it) so that:

- an instance is managed only once `register()`ed; `set_online()` flips its agent between
  Online and ConnectionLost;
- DescribeInstanceInformation answers from that registry, filtered by `InstanceIds` or
  `PingStatus` in either filter form (`InstanceInformationFilterList`, `Filters`), paged;
- SendCommand refuses, as AWS does: an unregistered or offline instance (InvalidInstanceId),
  an unknown document (InvalidDocument), and parameters the document does not declare,
  lacks, or whose allowedPattern refuses under the SSM agent's Go semantics
  (InvalidParameters), more than 50 InstanceIds or a Comment over 100 characters
  (ValidationException). Accepted commands are recorded (`sent_commands()`) and their
  invocations read InProgress until the instance's agent (`local.ssm_agent`, when a test
  attached one) has run the script, or a test-side agent calls `finish()`;
- ListCommands honours the DocumentName and Status filters and pages (`set_page_size`);
- `inject_throttling(every_nth)` makes every n-th call of the actions in PATCHED fail with
  ThrottlingException; `inject_error()` fails the next calls of one action (e.g.
  InvocationDoesNotExist for GetCommandInvocation, which AWS gives right after SendCommand);
- `call_count()` counts SSM calls, throttled and failed ones included.

State lives on moto's backend objects, so moto's reset clears it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from moto.core.responses import ActionResult
from moto.core.utils import camelcase_to_underscores
from moto.ec2.models import ec2_backends
from moto.ssm.models import Command, SimpleSystemManagerBackend, ssm_backends
from moto.ssm.responses import SimpleSystemManagerResponse

from instance_agent.local import ssm_agent
from instance_agent.local.faults import Fault, FaultQueues, Patches, attached

# compile_pattern: re-exported, the callers of the stand-in know it from here.
from instance_agent.local.ssm_params import SSMError, check_parameters
from instance_agent.local.ssm_params import compile_pattern as compile_pattern

DEFAULT_ACCOUNT = "123456789012"
DEFAULT_REGION = "us-east-1"
# The actions the trigger uses; the ones `inject_throttling` counts.
PATCHED = frozenset(
    {
        "DescribeDocument",
        "DescribeInstanceInformation",
        "ListCommands",
        "SendCommand",
        "GetCommandInvocation",
    }
)
# SendCommand's limits (docs/aws-behaviour.md, "Systems Manager Run Command").
MAX_INSTANCE_IDS, MAX_COMMENT = 50, 100
DEFAULT_PAGE_SIZE = 50  # AWS's default MaxResults for both paged actions
AGENT_VERSION = "3.3.1142.0"
_STATE_KEY = "_instance_agent_ssm"
# EC2 states in which AWS refuses to send a command even to a registered instance.
_GONE = ("shutting-down", "terminated", "stopping", "stopped")

# moto's server is threaded; one lock keeps each SSM request and accessor atomic.
_patches = Patches(lambda: _patch())
_lock = _patches.lock


@dataclass(frozen=True)
class SentCommand:
    """One accepted SendCommand, as received."""

    command_id: str
    document: str
    parameters: dict[str, list[str]]
    instance_ids: tuple[str, ...]
    comment: str
    timeout_seconds: int | None


@dataclass
class _Managed:
    instance_id: str
    online: bool
    registered: datetime


@dataclass
class _Book:
    instances: dict[str, _Managed] = field(default_factory=dict)
    sent: list[SentCommand] = field(default_factory=list)
    calls: Counter[str] = field(default_factory=Counter)
    throttled: int = 0
    throttle_every: int = 0
    throttle_seen: int = 0
    faults: FaultQueues = field(default_factory=FaultQueues)
    page_size: int = DEFAULT_PAGE_SIZE


# -- public API ------------------------------------------------------------------------


def install() -> None:
    """Patch moto's SSM classes (idempotent)."""
    _patches.install()


def register(
    instance_id: str, online: bool = True, *, account_id: str = DEFAULT_ACCOUNT, region: str = DEFAULT_REGION
) -> None:
    """Make `instance_id` a managed instance whose agent is Online (or ConnectionLost)."""
    with _lock:
        now = datetime.now(timezone.utc)
        _book(_backend(account_id, region)).instances[instance_id] = _Managed(instance_id, online, now)


def set_online(
    instance_id: str, online: bool, *, account_id: str = DEFAULT_ACCOUNT, region: str = DEFAULT_REGION
) -> None:
    with _lock:
        managed = _book(_backend(account_id, region)).instances.get(instance_id)
        if managed is None:
            raise KeyError(f"{instance_id} is not registered")
        managed.online = online


def sent_commands(account_id: str = DEFAULT_ACCOUNT, region: str = DEFAULT_REGION) -> list[SentCommand]:
    with _lock:
        return list(_book(_backend(account_id, region)).sent)


def finish(
    command_id: str,
    instance_id: str,
    status: str = "Success",
    *,
    response_code: int = 0,
    stdout: str = "",
    stderr: str = "",
    status_details: str | None = None,
    account_id: str = DEFAULT_ACCOUNT,
    region: str = DEFAULT_REGION,
) -> None:
    """Record what running the command gave, as the SSM agent reports it (outputs are cut to
    the 24,000/8,000 characters GetCommandInvocation returns). `status_details` is the finer
    status AWS gives beside a TimedOut one, spelled as the API does ("DeliveryTimedOut",
    "ExecutionTimedOut"), or beside a Failed one ("Undeliverable")."""
    with _lock:
        command = _backend(account_id, region).get_command_by_id(command_id)
        invocation = command.get_invocation(instance_id, None)
        invocation.update(
            Status=status,
            StatusDetails=status_details or status,
            ResponseCode=response_code,
            StandardOutputContent=stdout[:24_000],
            StandardErrorContent=stderr[:8_000],
        )
        command.status = status
        command.status_details = status_details or status


def inject_throttling(
    every_nth: int, *, account_id: str = DEFAULT_ACCOUNT, region: str = DEFAULT_REGION
) -> None:
    """From now on every `every_nth` call of the PATCHED actions fails with
    ThrottlingException (0 turns it off)."""
    if every_nth < 0:
        raise ValueError("every_nth must be >= 0")
    with _lock:
        book = _book(_backend(account_id, region))
        book.throttle_every = every_nth
        book.throttle_seen = 0


def inject_error(
    action: str,
    code: str,
    message: str = "",
    times: int = 1,
    *,
    account_id: str = DEFAULT_ACCOUNT,
    region: str = DEFAULT_REGION,
) -> None:
    """Make the next `times` calls of SSM `action` fail with `code` (HTTP 400)."""
    with _lock:
        _book(_backend(account_id, region)).faults.add(action, code, message or code, times)


def call_count(
    action: str | None = None, *, account_id: str = DEFAULT_ACCOUNT, region: str = DEFAULT_REGION
) -> int:
    """SSM calls answered so far (of one action, or all), failed ones included."""
    with _lock:
        calls = _book(_backend(account_id, region)).calls
        return calls[action] if action else sum(calls.values())


def throttled_count(account_id: str = DEFAULT_ACCOUNT, region: str = DEFAULT_REGION) -> int:
    with _lock:
        return _book(_backend(account_id, region)).throttled


def set_page_size(size: int, *, account_id: str = DEFAULT_ACCOUNT, region: str = DEFAULT_REGION) -> None:
    """Largest page of ListCommands/DescribeInstanceInformation when MaxResults is absent."""
    with _lock:
        _book(_backend(account_id, region)).page_size = size


def reset() -> None:
    """Forget calls, sent-command records, injected faults and throttling in every backend.
    Registered instances stay: moto's own reset clears those."""
    with _lock:
        for account in ssm_backends.values():
            for backend in account.values():
                book = _book(backend)
                book.sent.clear()
                book.calls.clear()
                book.faults.clear()
                book.throttled = book.throttle_every = book.throttle_seen = 0
                book.page_size = DEFAULT_PAGE_SIZE


# -- the model -------------------------------------------------------------------------


def _backend(account_id: str, region: str) -> SimpleSystemManagerBackend:
    backend: SimpleSystemManagerBackend = ssm_backends[account_id][region]
    return backend


def _book(backend: SimpleSystemManagerBackend) -> _Book:
    return attached(backend, _STATE_KEY, _Book, _Book)


def _take_fault(book: _Book, action: str) -> Fault | None:
    fault = book.faults.take(action)
    if fault is not None:
        return fault
    if action in PATCHED and book.throttle_every:
        book.throttle_seen += 1
        if book.throttle_seen % book.throttle_every == 0:
            book.throttled += 1
            return Fault("ThrottlingException", "Rate exceeded", 1)
    return None


def _information(managed: _Managed) -> dict[str, Any]:
    return {
        "InstanceId": managed.instance_id,
        "PingStatus": "Online" if managed.online else "ConnectionLost",
        "LastPingDateTime": datetime.now(timezone.utc) if managed.online else managed.registered,
        "AgentVersion": AGENT_VERSION,
        "IsLatestVersion": True,
        "PlatformType": "Linux",
        "PlatformName": "Amazon Linux",
        "PlatformVersion": "2023",
        "ResourceType": "EC2Instance",
        "SourceId": managed.instance_id,
        "SourceType": "AWS::EC2::Instance",
    }


def _information_filters(response: SimpleSystemManagerResponse) -> dict[str, set[str]]:
    wanted: dict[str, set[str]] = {}
    for item in response._get_param("InstanceInformationFilterList") or []:
        wanted.setdefault(str(item.get("key")), set()).update(item.get("valueSet") or [])
    for item in response._get_param("Filters") or []:
        wanted.setdefault(str(item.get("Key")), set()).update(item.get("Values") or [])
    for key in wanted:
        if key not in ("InstanceIds", "PingStatus"):
            raise SSMError(
                "InvalidFilterKey", f"the stand-in filters only by InstanceIds and PingStatus, not {key}"
            )
    return wanted


def _page(items: list[Any], max_results: Any, next_token: Any, default: int) -> tuple[list[Any], str | None]:
    start = int(next_token) if next_token else 0
    size = int(max_results) if max_results else default
    end = start + size
    return items[start:end], (str(end) if end < len(items) else None)


def _ec2_state(account_id: str, region: str, instance_id: str) -> str | None:
    """The instance's EC2 state when moto's EC2 knows it (ids may also be made up)."""
    for reservation in ec2_backends[account_id][region].reservations.values():
        for instance in reservation.instances:
            if instance.id == instance_id:
                return str(instance.state)
    return None


def _check_instances(backend: SimpleSystemManagerBackend, instance_ids: list[str]) -> None:
    book = _book(backend)
    refused = [
        i
        for i in instance_ids
        if i not in book.instances
        or not book.instances[i].online
        or _ec2_state(backend.account_id, backend.region_name, i) in _GONE
    ]
    if refused:
        listed = ", ".join(refused)
        raise SSMError(
            "InvalidInstanceId",
            f"Instances [[{listed}]] not in a valid state for account {backend.account_id}",
        )


# -- patching --------------------------------------------------------------------------


def _patch() -> None:
    original_call_action = SimpleSystemManagerResponse.call_action
    original_send = SimpleSystemManagerBackend.send_command

    def call_action(self: SimpleSystemManagerResponse) -> Any:
        with _lock:
            action = self._get_action()
            book = _book(self.ssm_backend)
            book.calls[action] += 1
            fault = _take_fault(book, action)
            if fault is not None:
                # An instance attribute shadows the class's method for this request only.
                setattr(self, camelcase_to_underscores(action), _raiser(fault))
            return original_call_action(self)

    def send_command(self: SimpleSystemManagerBackend, **kwargs: Any) -> Command:
        instance_ids = list(kwargs.get("instance_ids") or [])
        document = str(kwargs.get("document_name") or "")
        parameters: dict[str, list[str]] = kwargs.get("parameters") or {}
        if len(instance_ids) > MAX_INSTANCE_IDS or len(str(kwargs.get("comment") or "")) > MAX_COMMENT:
            raise SSMError("ValidationException", "at most 50 InstanceIds and a Comment of 100 characters")
        check_parameters(self, document, parameters)
        _check_instances(self, instance_ids)
        command = original_send(self, **kwargs)
        # Nothing runs it: it stays InProgress until a test's agent calls finish().
        command.status = command.status_details = "InProgress"
        command.completed_count = 0
        for invocation in command.invocations:
            invocation.update(Status="InProgress", StatusDetails="InProgress", ResponseCode=-1)
        _book(self).sent.append(
            SentCommand(
                command_id=command.command_id,
                document=document,
                parameters=dict(parameters),
                instance_ids=tuple(instance_ids),
                comment=str(kwargs.get("comment") or ""),
                timeout_seconds=kwargs.get("timeout_seconds"),
            )
        )
        content = self._documents[document].get_default_version().content_json
        account, region = self.account_id, self.region_name
        ssm_agent.dispatch(
            content,
            command.command_id,
            parameters,
            instance_ids,
            lambda iid, rc, out, err: finish(
                command.command_id,
                iid,
                "Success" if rc == 0 else "Failed",
                response_code=rc,
                stdout=out,
                stderr=err,
                account_id=account,
                region=region,
            ),
        )
        return command

    def describe_instance_information(self: SimpleSystemManagerResponse) -> ActionResult:
        book = _book(self.ssm_backend)
        wanted = _information_filters(self)
        rows = [_information(m) for m in book.instances.values()]
        rows = [r for r in rows if all(r.get(_FILTER_FIELD[k]) in v for k, v in wanted.items())]
        page, token = _page(rows, self._get_param("MaxResults"), self._get_param("NextToken"), book.page_size)
        result: dict[str, Any] = {"InstanceInformationList": page}
        if token:
            result["NextToken"] = token
        return ActionResult(result)

    def list_commands(self: SimpleSystemManagerResponse) -> ActionResult:
        backend = self.ssm_backend
        commands = backend.list_commands(self._get_param("CommandId"), self._get_param("InstanceId"))
        for item in self._get_param("Filters") or []:
            key, value = item.get("key"), item.get("value")
            if key == "DocumentName":
                commands = [c for c in commands if c.document_name == value]
            elif key == "Status":
                commands = [c for c in commands if c.status == value]
        page, token = _page(
            commands, self._get_param("MaxResults"), self._get_param("NextToken"), _book(backend).page_size
        )
        result: dict[str, Any] = {"Commands": [c.response_object() for c in page]}
        if token:
            result["NextToken"] = token
        return ActionResult(result)

    SimpleSystemManagerResponse.call_action = call_action  # type: ignore[method-assign,assignment]
    SimpleSystemManagerResponse.describe_instance_information = describe_instance_information  # type: ignore[attr-defined]
    SimpleSystemManagerResponse.list_commands = list_commands  # type: ignore[method-assign]
    SimpleSystemManagerBackend.send_command = send_command  # type: ignore[method-assign,assignment]


_FILTER_FIELD = {"InstanceIds": "InstanceId", "PingStatus": "PingStatus"}


def _raiser(fault: Fault) -> Any:
    def fail() -> ActionResult:
        raise SSMError(fault.code, fault.message)

    return fail
