"""Errors carry AWS's code, and a create-only conflict is a type of its own: callers decide
on those, never on the message text (which AWS may reword, and which we scrub)."""

from __future__ import annotations

from typing import Any

import pytest
from fakes import FakeAutoScaling, FakeClock, client_error

from instance_agent import lifecycle, s3upload
from instance_agent.clients import Clients
from instance_agent.config import Config
from instance_agent.doctor_check import OK, Context, Facts
from instance_agent.doctor_checks_lifecycle import check_lifecycle_permission
from instance_agent.errors import LifecycleError, NoActiveLifecycleAction, ObjectExists, UploadError


class _RefusingS3:
    """The one call put_small makes, answering with a fixed AWS error."""

    def __init__(self, code: str, message: str, status: int) -> None:
        self.err = client_error(code, message, status)

    def put_object(self, **kwargs: Any) -> dict[str, Any]:
        raise self.err


def test_a_create_only_conflict_is_object_exists_whatever_its_message() -> None:
    # SeaweedFS and S3 word the 412 differently; some proxies send no message at all.
    s3 = _RefusingS3("PreconditionFailed", "", 412)
    with pytest.raises(ObjectExists) as caught:
        s3upload.put_small(s3, "b", "k.manifest.json", b"{}")  # type: ignore[arg-type]
    assert caught.value.code == "PreconditionFailed"


def test_any_other_refusal_is_a_plain_upload_error_with_its_code() -> None:
    s3 = _RefusingS3("AccessDenied", "the object already exists?  (a misleading text)", 403)
    with pytest.raises(UploadError) as caught:
        s3upload.put_small(s3, "b", "k.manifest.json", b"{}")  # type: ignore[arg-type]
    assert not isinstance(caught.value, ObjectExists)
    assert caught.value.code == "AccessDenied"


def test_auto_scaling_errors_carry_their_code() -> None:
    err = lifecycle.translate(
        client_error("AccessDeniedException", "not authorized"), "DescribeLifecycleHooks"
    )
    assert err.code == "AccessDeniedException"
    assert not err.retryable


# AWS's refusal of an action that is not live, in other words than the documented "No active
# Lifecycle Action found with …": the agent must read the code, not the sentence.
REWORDED = "Lifecycle action for instance i-0123456789abcdef0 is no longer pending"
TARGET = lifecycle.HookTarget("web", "drain", 300, "i-0123456789abcdef0")


def _lifecycle(asg: FakeAutoScaling) -> lifecycle.Lifecycle:
    clock = FakeClock()
    return lifecycle.Lifecycle(asg, TARGET, clock=clock, sleep=clock.sleep)  # type: ignore[arg-type]


def test_a_heartbeat_refused_with_validation_error_means_no_live_action_whatever_its_text() -> None:
    asg = FakeAutoScaling(
        errors={"RecordLifecycleActionHeartbeat": [client_error("ValidationError", REWORDED)]}
    )
    assert _lifecycle(asg).probe(deadline=2000.0) is False  # not live: no error, no retry
    assert asg.count("RecordLifecycleActionHeartbeat") == 1


def test_a_completion_refused_after_heartbeats_is_final_whatever_its_text() -> None:
    asg = FakeAutoScaling(errors={"CompleteLifecycleAction": [client_error("ValidationError", "")]})
    life = _lifecycle(asg)
    assert life.probe(deadline=2000.0) is True
    error = life.complete("CONTINUE", timeout=60.0)
    assert error is not None and "ValidationError" in error
    assert life.gone.is_set()  # the action ended elsewhere: the job does not wait for it
    assert asg.count("CompleteLifecycleAction") == 1


def test_a_validation_error_of_a_lookup_is_not_a_missing_action() -> None:
    # DescribeLifecycleHooks of a group that does not exist: a refusal, not "no action yet".
    err = lifecycle.translate(
        client_error("ValidationError", "No active Lifecycle Action (a misleading text)"),
        "DescribeLifecycleHooks",
    )
    assert isinstance(err, LifecycleError) and not isinstance(err, NoActiveLifecycleAction)
    assert err.code == "ValidationError" and not err.retryable


def test_doctor_reads_a_reworded_no_action_answer_as_the_permission_granted() -> None:
    asg = FakeAutoScaling(
        errors={"RecordLifecycleActionHeartbeat": [client_error("ValidationError", REWORDED)]}
    )
    clients = Clients(s3=None, autoscaling=asg)  # type: ignore[arg-type]
    ctx = Context(Config.defaults(bucket="my-backups"), lambda region: clients)
    check = check_lifecycle_permission(ctx, Facts(region="us-east-1", target=TARGET, state="InService"))
    assert check.result == OK, check.message
    assert check.message.startswith("RecordLifecycleActionHeartbeat is allowed")
