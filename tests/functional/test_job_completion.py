"""Report, then complete: retryable and permanent errors within --complete-timeout,
--on-failure, a failed backup (ABANDON, never "succeeded"), SNS and metrics that fail, and a
stop while the action is live."""

from __future__ import annotations

import pytest

from functional.conftest import World, command_options, no_backup, the_backup, the_message, watcher_options
from functional.fakes import client_error, precondition_failed
from instance_agent.poller import TERMINATION
from instance_agent.termination import Options


def leaving(world: World) -> Options:
    world.asg.set_state("Terminating:Wait")
    return watcher_options(world, TERMINATION, "Terminated")


def throttled(n: int) -> list[Exception]:
    return [client_error("Throttling", "Rate exceeded") for _ in range(n)]


# -- completion errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "errors",
    [
        throttled(3),
        [client_error("ServiceUnavailable", "try again", 503)] * 2,
        [client_error("InternalFailure", "internal", 500)],
    ],
    ids=["throttling", "503", "500"],
)
def test_retryable_completion_errors_are_retried_and_complete_once(
    world: World, errors: list[Exception]
) -> None:
    world.asg.errors["CompleteLifecycleAction"] = list(errors)
    out = world.run(leaving(world))
    assert out.exit_code == 0
    assert world.asg.completed == ["CONTINUE"]
    assert world.asg.count("CompleteLifecycleAction") == len(errors) + 1
    the_backup(world)
    record = world.record()
    assert record is not None and record["completed"] is True


def test_completion_retries_stop_at_complete_timeout(world: World) -> None:
    world.configure(complete_timeout=60.0)
    world.asg.errors["CompleteLifecycleAction"] = throttled(1000)
    out = world.run(leaving(world))
    assert out.exit_code == 1  # the instance still waits: Run Command must show it
    assert world.asg.completed == []
    assert world.clock.elapsed <= 60
    assert (out.result.status, out.result.lifecycle_result) == ("succeeded", "none")
    assert "gave up after 60 s" in (out.result.lifecycle_error or "")
    first, second = world.messages()  # the planned result, then the failure to complete it
    assert first["lifecycle_result"] == "CONTINUE" and first.get("event") is None
    assert second["event"] == "lifecycle_completion_failed"
    record = world.record()
    assert record is not None
    assert (record["backup_ok"], record["completed"]) == (True, False)


# Not ValidationError: to a call that names one action, AWS's ValidationError means "no active
# lifecycle action" (lifecycle.ACTION_CALLS), which is the test below.
@pytest.mark.parametrize("code", ["AccessDenied", "InvalidClientTokenId"])
def test_a_permanent_completion_error_is_not_retried(world: World, code: str) -> None:
    world.asg.errors["CompleteLifecycleAction"] = [client_error(code, "refused", 400)]
    out = world.run(leaving(world))
    assert out.exit_code == 1
    assert world.asg.count("CompleteLifecycleAction") == 1
    assert code in (out.result.lifecycle_error or "")
    the_backup(world)
    # The report of the archive, then the report of the failed completion.
    assert [m.get("event") for m in world.messages()] == [None, "lifecycle_completion_failed"]


def test_an_action_completed_elsewhere_meanwhile_is_not_a_failure(world: World) -> None:
    world.asg.errors["CompleteLifecycleAction"] = [
        client_error(
            "ValidationError", "No active Lifecycle Action found with instance ID i-0123456789abcdef0"
        )
    ]
    out = world.run(leaving(world))
    assert out.exit_code == 0
    assert out.result.lifecycle_result == "none"
    assert world.asg.count("CompleteLifecycleAction") == 1
    the_backup(world)


# -- a failed backup ----------------------------------------------------------------------------

FAILURES = {
    "create-denied": ("CreateMultipartUpload", lambda: client_error("AccessDenied", "Access Denied", 403)),
    "part-500": (
        "UploadPart",
        lambda: client_error("InternalError", "We encountered an internal error", 500),
    ),
    "complete-500": ("CompleteMultipartUpload", lambda: client_error("InternalError", "internal", 500)),
    "manifest-denied": ("PutObject", lambda: client_error("AccessDenied", "Access Denied", 403)),
    "kms-denied": ("CreateMultipartUpload", lambda: client_error("KMS.AccessDeniedException", "no kms", 400)),
}


@pytest.mark.parametrize("failure", list(FAILURES))
def test_a_failed_backup_abandons_once_and_never_says_succeeded(world: World, failure: str) -> None:
    operation, error = FAILURES[failure]
    world.s3.errors[operation] = [error()]
    out = world.run(leaving(world))
    assert out.exit_code == 1
    assert world.asg.completed == ["ABANDON"]
    assert world.asg.count("CompleteLifecycleAction") == 1
    msg = the_message(world)
    assert (msg["status"], msg["lifecycle_result"]) == ("failed", "ABANDON")
    assert msg["error"]
    record = world.record()
    assert record is not None
    assert (record["backup_ok"], record["lifecycle_result"], record["exit_code"]) == (False, "ABANDON", 1)
    assert "succeeded" not in {out.result.status, msg["status"], record["result"]["status"]}
    assert world.s3.uploads == {}  # the failed multipart upload was aborted
    assert world.cloudwatch.values("BackupFailed") == [1.0]
    assert world.cloudwatch.values("LifecycleAbandoned") == [1.0]


def test_a_missing_bucket_fails_the_backup_and_abandons(world: World) -> None:
    world.s3.buckets.clear()
    out = world.run(leaving(world))
    assert out.exit_code == 1
    assert world.asg.completed == ["ABANDON"]
    assert "NoSuchBucket" in (out.result.error or "")


def test_on_failure_continue_lets_the_instance_go_after_a_failed_backup(world: World) -> None:
    world.configure(on_failure="CONTINUE")
    world.s3.errors["CreateMultipartUpload"] = [client_error("AccessDenied", "Access Denied", 403)]
    out = world.run(leaving(world))
    assert out.exit_code == 1
    assert world.asg.completed == ["CONTINUE"]
    assert the_message(world)["status"] == "failed"


def test_on_success_abandon_is_what_a_good_backup_completes_with(world: World) -> None:
    world.configure(on_success="ABANDON")
    out = world.run(leaving(world))
    assert out.exit_code == 0
    assert world.asg.completed == ["ABANDON"]
    the_backup(world)


def test_a_backup_never_replaces_an_earlier_object_at_its_key(world: World) -> None:
    # A fixed key (no {timestamp}) already taken: the create-only write is refused (412).
    world.configure(key_template="{prefix}{group}/{instance_id}/fixed")
    world.s3.put_object(Bucket="backups", Key="web/i-0123456789abcdef0/fixed.tar", Body=b"the earlier backup")
    out = world.run(leaving(world))
    assert out.exit_code == 1
    assert world.s3.body("web/i-0123456789abcdef0/fixed.tar") == b"the earlier backup"
    assert "PreconditionFailed" in (out.result.error or "")
    assert world.asg.completed == ["ABANDON"]


def test_the_fake_s3_refuses_a_create_only_write_as_s3_does(world: World) -> None:
    world.s3.put_object(Bucket="backups", Key="k", Body=b"1", IfNoneMatch="*")
    with pytest.raises(type(precondition_failed())) as caught:
        world.s3.put_object(Bucket="backups", Key="k", Body=b"2", IfNoneMatch="*")
    assert caught.value.response["Error"]["Code"] == "PreconditionFailed"
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert world.s3.body("k") == b"1"


# -- SNS and metrics never change the outcome ---------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        client_error("AuthorizationError", "not authorized", 403),
        client_error("Throttled", "Rate exceeded", 429),
    ],
)
def test_a_report_that_cannot_be_published_does_not_stop_the_completion(
    world: World, error: Exception
) -> None:
    world.sns.errors = [error]
    out = world.run(leaving(world))
    assert out.exit_code == 0
    assert world.asg.completed == ["CONTINUE"]
    assert out.result.notify_error
    assert world.messages() == []
    the_backup(world)


def test_a_topic_that_does_not_exist_is_recorded_and_never_blocks_completion(world: World) -> None:
    world.sns.topics.clear()
    out = world.run(leaving(world))
    assert (out.exit_code, out.result.status) == (0, "succeeded")
    assert (out.result.notify_error or "").startswith("SNS publish failed")
    assert "NotFound" in (out.result.notify_error or "")
    assert world.asg.completed == ["CONTINUE"]


def test_without_a_topic_no_message_is_sent_and_the_job_is_the_same(world: World) -> None:
    world.configure(topic_arn=None)
    out = world.run(leaving(world))
    assert out.exit_code == 0
    assert world.messages() == []
    assert world.asg.completed == ["CONTINUE"]


def test_metrics_that_fail_change_nothing(world: World) -> None:
    world.cloudwatch.errors = [client_error("AccessDenied", "no", 403)]
    out = world.run(leaving(world))
    assert out.exit_code == 0
    assert world.asg.completed == ["CONTINUE"]
    assert the_message(world)["status"] == "succeeded"


def test_the_metrics_describe_the_result_that_is_completed(world: World) -> None:
    world.run(leaving(world))
    (call,) = world.cloudwatch.calls
    assert call["Namespace"] == "InstanceAgent"
    dims = {d["Value"] for datum in call["MetricData"] for d in datum["Dimensions"]}
    assert dims == {"web"}
    assert world.cloudwatch.values("BackupSucceeded") == [1.0]
    assert world.cloudwatch.values("BackupFailed") == [0.0]
    assert world.cloudwatch.values("LifecycleAbandoned") == [0.0]


# -- a stop while the action is live ------------------------------------------------------------


def test_a_stop_during_the_backup_aborts_it_and_completes_with_on_failure(world: World) -> None:
    world.s3.before["CreateMultipartUpload"] = world.cancel.set  # SIGTERM as the upload starts
    out = world.run(leaving(world))
    assert out.exit_code == 1
    no_backup(world)
    assert world.s3.aborted  # the upload was aborted, not left to the bucket's rule
    assert world.asg.completed == ["ABANDON"]
    msg = the_message(world)
    assert (msg["status"], msg["lifecycle_result"]) == ("failed", "ABANDON")
    assert "cancelled" in msg["error"]


def test_a_stop_while_completion_retries_cuts_them_to_20_seconds(world: World) -> None:
    world.configure(complete_timeout=600.0)
    world.asg.errors["CompleteLifecycleAction"] = throttled(1000)
    world.cancel.cancel_after(5)
    out = world.run(leaving(world))
    assert out.exit_code == 1
    assert world.clock.elapsed <= 5 + 20 + 10  # STOP_GRACE after the stop, one backoff at most
    assert world.asg.completed == []


def test_run_command_stopped_during_the_backup_also_completes_with_on_failure(world: World) -> None:
    world.asg.set_state("Terminating:Wait")
    world.s3.before["CreateMultipartUpload"] = world.cancel.set
    out = world.run(command_options(world))
    assert out.exit_code == 1
    assert world.asg.completed == ["ABANDON"]
    no_backup(world)


# -- multipart: parts, and a part that fails -------------------------------------------------


def big_file(world: World, mib: int) -> None:
    import os

    (world.source / "big.bin").write_bytes(os.urandom(mib * 1024 * 1024))


def test_an_archive_of_several_parts_is_the_bytes_on_disk(world: World) -> None:
    big_file(world, 20)  # three 8 MiB parts
    out = world.run(leaving(world))
    assert out.exit_code == 0
    the_backup(world)
    assert world.s3.count("UploadPart") == 3
    assert world.asg.completed == ["CONTINUE"]


def test_a_failed_second_part_aborts_the_upload_and_abandons(world: World) -> None:
    big_file(world, 12)  # two parts; the second is refused
    world.s3.errors["UploadPart"] = []
    calls = {"n": 0}

    def second_part_fails() -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            world.s3.errors["UploadPart"].append(client_error("InternalError", "internal", 500))

    world.s3.before["UploadPart"] = second_part_fails
    out = world.run(leaving(world))
    assert out.exit_code == 1
    assert "UploadPart" in (out.result.error or "")
    assert world.s3.object_keys() == []
    no_backup(world)
    assert world.asg.completed == ["ABANDON"]
    assert the_message(world)["status"] == "failed"
