"""doctor's checks one at a time: each is given a Context (fakes of the IMDS client and the
AWS clients) and the facts the earlier checks found, and returns its lines with the facts
it found. No server, no network: milliseconds each."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import requests

from instance_agent import doctor
from instance_agent.config import Config
from instance_agent.doctor_check import FAIL, OK, SKIP, Check, Context, Facts
from instance_agent.doctor_checks_aws import check_bucket_and_upload, check_topic
from instance_agent.doctor_checks_config import check_identity, check_imds
from instance_agent.doctor_checks_host import check_retained
from instance_agent.doctor_checks_lifecycle import check_hook, check_lifecycle_permission
from instance_agent.errors import IMDSError
from instance_agent.imds import DEFAULT_ENDPOINT, ProbeAnswer
from instance_agent.lifecycle import HookTarget
from tests.unit.fakes import FakeAutoScaling, FakeClock, client_error

INSTANCE = "i-0123456789abcdef0"
ON_EC2 = Facts(imds_endpoint=DEFAULT_ENDPOINT, imds_ok=True)


@dataclass
class FakeIMDS:
    """imds.IMDS as doctor uses it: `probe` answers (or raises) from a script."""

    endpoint: str
    answer: ProbeAnswer | Exception = field(default_factory=lambda: ProbeAnswer(200, 200))
    identity: tuple[str | Exception, str | Exception] = (INSTANCE, "eu-west-1")
    clock: FakeClock | None = None
    closed: bool = False

    def probe(self, *, ttl: int = 60, path: str = "instance-id") -> ProbeAnswer:
        if self.clock:
            self.clock.now += 0.004  # IMDS answers in 4 ms
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    def _value(self, value: str | Exception) -> str:
        if isinstance(value, Exception):
            raise value
        return value

    def instance_id(self, timeout: float = 10.0) -> str:
        return self._value(self.identity[0])

    def region(self, timeout: float = 10.0) -> str:
        return self._value(self.identity[1])

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeS3:
    """The S3 calls of the permission probe; `refuse` maps a call to the error it raises."""

    refuse: dict[str, Exception] = field(default_factory=dict)
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def _call(self, name: str, kwargs: dict[str, Any]) -> None:
        self.calls.append((name, kwargs))
        if name in self.refuse:
            raise self.refuse[name]

    def create_multipart_upload(self, **kwargs: Any) -> dict[str, Any]:
        self._call("CreateMultipartUpload", kwargs)
        return {"UploadId": "upload-1"}

    def upload_part(self, **kwargs: Any) -> dict[str, Any]:
        self._call("UploadPart", kwargs)
        return {}

    def abort_multipart_upload(self, **kwargs: Any) -> dict[str, Any]:
        self._call("AbortMultipartUpload", kwargs)
        return {}

    def list_multipart_uploads(self, **kwargs: Any) -> dict[str, Any]:
        self._call("ListMultipartUploads", kwargs)
        return {}


@dataclass
class FakeClients:
    autoscaling: FakeAutoScaling = field(default_factory=FakeAutoScaling)
    s3: FakeS3 = field(default_factory=FakeS3)
    sns: Any = None


def context(clients: FakeClients | None = None, **cfg: Any) -> Context:
    made = clients or FakeClients()
    return Context(Config.defaults(**{"bucket": "my-backups", **cfg}), lambda region: made)


# --- IMDS and identity ----------------------------------------------------------------------


def test_imds_answering_token_and_read_is_ok_and_says_so_with_its_timing() -> None:
    clock = FakeClock()
    made: list[FakeIMDS] = []

    def imds(endpoint: str) -> FakeIMDS:
        made.append(FakeIMDS(endpoint, clock=clock))
        return made[-1]

    ctx = Context(Config.defaults(), lambda r: None, imds=imds, environ={}, monotonic=clock)
    check = check_imds(ctx, Facts())

    assert check.result == OK
    assert check.message.startswith(f"IMDSv2 at {DEFAULT_ENDPOINT}: token and read in 4 ms")
    assert check.facts == ON_EC2 and check.facts.on_ec2
    assert made[0].closed


def test_a_token_answer_that_never_arrives_is_the_hop_limit() -> None:
    endpoint = "http://127.0.0.1:1338"
    ctx = Context(
        Config.defaults(),
        lambda r: None,
        imds=lambda e: FakeIMDS(e, answer=requests.ReadTimeout()),
        environ={"AWS_EC2_METADATA_SERVICE_ENDPOINT": endpoint + "/"},
    )
    check = check_imds(ctx, Facts())

    assert check.result == FAIL and "hop limit is too low" in check.message
    assert check.fix and "--http-put-response-hop-limit 2" in check.fix
    # The endpoint is known, but IMDS is not usable: later checks skip what needs EC2.
    assert check.facts == Facts(imds_endpoint=endpoint)
    assert check.facts.not_ec2() == "not on an EC2 instance, as far as IMDS can tell (see imds)"


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        (ProbeAnswer(403, None), "IMDS refused the IMDSv2 token request (403)"),
        (ProbeAnswer(500, None), "IMDS token request answered HTTP 500"),
        (ProbeAnswer(200, 401), "IMDS issued a token but refused a read with it (HTTP 401)"),
    ],
)
def test_imds_refusals_fail_with_what_it_answered(answer: ProbeAnswer, says: str) -> None:
    ctx = Context(Config.defaults(), lambda r: None, imds=lambda e: FakeIMDS(e, answer=answer), environ={})
    check = check_imds(ctx, Facts())
    assert (check.result, check.message.split(":")[0]) == (FAIL, says.split(":")[0])
    assert says in check.message and check.facts.imds_ok is None


def test_identity_comes_from_imds_when_the_config_does_not_say() -> None:
    ctx = Context(Config.defaults(), lambda r: None, imds=lambda e: FakeIMDS(e), environ={})
    check = check_identity(ctx, ON_EC2)
    assert check == Check(
        "identity",
        OK,
        f"instance {INSTANCE}, region eu-west-1 (from IMDS)",
        facts=Facts(instance_id=INSTANCE, region="eu-west-1"),
    )


def test_identity_keeps_what_imds_told_before_it_failed() -> None:
    fake = FakeIMDS(DEFAULT_ENDPOINT, identity=(INSTANCE, IMDSError("IMDS has no placement/region")))
    ctx = Context(Config.defaults(), lambda r: None, imds=lambda e: fake, environ={"AWS_REGION": "us-east-1"})
    check = check_identity(ctx, ON_EC2)

    assert check.result == FAIL
    assert check.message == "IMDS answered the token but not the identity: IMDS has no placement/region"
    assert check.facts == Facts(instance_id=INSTANCE)  # no region: the environment is not asked then
    assert fake.closed


def test_off_ec2_the_region_comes_from_the_environment_and_the_instance_id_is_missing() -> None:
    ctx = Context(Config.defaults(), lambda r: None, environ={"AWS_DEFAULT_REGION": "us-west-2"})
    check = check_identity(ctx, Facts(imds_endpoint=DEFAULT_ENDPOINT))  # IMDS failed: never asked again

    assert check.result == FAIL and check.message.startswith("no instance id: ")
    assert check.facts == Facts(region="us-west-2")


# --- Auto Scaling ---------------------------------------------------------------------------

IDENTIFIED = Facts(instance_id=INSTANCE, region="us-east-1")


def test_the_hook_check_finds_the_group_hook_and_state() -> None:
    clients = FakeClients(FakeAutoScaling(states=["InService"]))
    check = check_hook(context(clients), IDENTIFIED)

    assert check.result == OK
    assert check.message == (
        "group web, hook drain, heartbeat timeout 300 s (heartbeats every 100 s); the instance is InService"
    )
    assert check.facts == Facts(target=HookTarget("web", "drain", 300, INSTANCE), state="InService")


def test_an_instance_in_no_group_fails_the_hook_check() -> None:
    check = check_hook(context(FakeClients(FakeAutoScaling(states=[None]))), IDENTIFIED)
    assert check.result == FAIL and "is in no Auto Scaling group" in check.message
    assert check.fix and f"--instance-ids {INSTANCE}" in check.fix and check.facts == Facts()


def test_a_group_other_than_asg_name_fails_but_the_state_is_still_known() -> None:
    clients = FakeClients(FakeAutoScaling(states=["Terminating:Retained"]))
    check = check_hook(context(clients, asg_name="db"), IDENTIFIED)
    assert check.result == FAIL and check.message == "asg_name is 'db', but the instance is in 'web'"
    assert check.facts == Facts(state="Terminating:Retained")  # for the retained check


def test_the_hook_check_skips_without_an_identity() -> None:
    check = check_hook(context(), Facts(region="us-east-1"))
    assert check == Check("lifecycle hook", SKIP, "needs the instance id and region (see identity)")


HOOKED = Facts(
    instance_id=INSTANCE,
    region="us-east-1",
    target=HookTarget("web", "drain", 300, INSTANCE),
    state="InService",
)


def test_a_heartbeat_with_no_action_proves_the_permission_and_changes_nothing() -> None:
    autoscaling = FakeAutoScaling(live=False)
    check = check_lifecycle_permission(context(FakeClients(autoscaling)), HOOKED)

    assert check.result == OK and check.message.startswith("RecordLifecycleActionHeartbeat is allowed")
    assert [name for name, _ in autoscaling.calls] == ["RecordLifecycleActionHeartbeat"]
    assert autoscaling.calls[0][1] == {
        "AutoScalingGroupName": "web",
        "LifecycleHookName": "drain",
        "InstanceId": INSTANCE,
    }


def test_a_refused_heartbeat_fails_with_the_statement_to_add() -> None:
    autoscaling = FakeAutoScaling(
        errors={"RecordLifecycleActionHeartbeat": [client_error("AccessDenied", "not allowed", 403)]}
    )
    check = check_lifecycle_permission(context(FakeClients(autoscaling)), HOOKED)
    assert (
        check.result == FAIL and check.message == "RecordLifecycleActionHeartbeat: AccessDenied: not allowed"
    )
    assert check.fix and "statement CompleteOwnLifecycleAction" in check.fix


def test_launch_probes_no_heartbeat() -> None:
    autoscaling = FakeAutoScaling()
    ctx = Context(Config.defaults(), lambda r: FakeClients(autoscaling), launch=True)
    check = check_lifecycle_permission(ctx, HOOKED)
    assert check.result == SKIP and check.message.startswith("--launch: no terminating action to probe")
    assert autoscaling.calls == []


def test_a_heartbeat_of_a_terminating_instance_says_it_extended_the_timeout() -> None:
    facts = HOOKED.merged(Facts(state="Terminating:Wait"))
    check = check_lifecycle_permission(context(), facts)
    assert check.result == OK and "this heartbeat extended its hook's timeout" in check.message


# --- S3 and SNS -----------------------------------------------------------------------------


def test_the_s3_probe_creates_and_aborts_one_upload_under_the_prefix() -> None:
    clients = FakeClients()
    bucket, perms = check_bucket_and_upload(context(clients, prefix="backups/"), IDENTIFIED)

    assert (bucket.name, bucket.result, bucket.message) == ("bucket", OK, "bucket my-backups exists")
    assert perms.name == "s3 permissions" and perms.result == OK
    names = [name for name, _ in clients.s3.calls]
    assert names == ["CreateMultipartUpload", "AbortMultipartUpload", "ListMultipartUploads"]
    created, aborted = clients.s3.calls[0][1], clients.s3.calls[1][1]
    assert created["Key"].startswith(f"backups/.instance-agent-doctor/{INSTANCE}/")
    assert aborted == {"Bucket": "my-backups", "Key": created["Key"], "UploadId": "upload-1"}


def test_a_missing_bucket_fails_and_skips_the_permissions() -> None:
    clients = FakeClients(s3=FakeS3({"CreateMultipartUpload": client_error("NoSuchBucket", "gone", 404)}))
    bucket, perms = check_bucket_and_upload(context(clients), IDENTIFIED)
    assert (bucket.result, bucket.message) == (FAIL, "bucket my-backups does not exist")
    assert (perms.result, perms.message) == (SKIP, "no bucket to probe")


def test_a_refused_abort_fails_the_permissions_but_not_the_bucket() -> None:
    clients = FakeClients(s3=FakeS3({"AbortMultipartUpload": client_error("AccessDenied", "no", 403)}))
    bucket, perms = check_bucket_and_upload(context(clients), IDENTIFIED)
    assert bucket.result == OK
    assert perms.result == FAIL and "AbortMultipartUpload was refused (AccessDenied: no)" in perms.message


def test_sse_kms_uploads_one_part_and_a_refused_part_fails() -> None:
    clients = FakeClients(s3=FakeS3({"UploadPart": client_error("AccessDenied", "kms:Decrypt", 403)}))
    _, perms = check_bucket_and_upload(context(clients, sse="aws:kms"), IDENTIFIED)
    assert perms.result == FAIL and "UploadPart with SSE-KMS was refused" in perms.message
    assert perms.fix and "kms:GenerateDataKey and kms:Decrypt" in perms.fix
    assert "AbortMultipartUpload" in [name for name, _ in clients.s3.calls]  # the part is discarded


def test_a_topic_in_another_region_fails_before_any_publish() -> None:
    ctx = context(topic_arn="arn:aws:sns:eu-west-1:123456789012:backups")
    check = check_topic(ctx, IDENTIFIED)
    assert check.result == FAIL and check.fix == 'use a topic in us-east-1, or set region = "eu-west-1"'


# --- the host, and the runner ---------------------------------------------------------------


def test_a_retained_instance_nobody_retries_fails(tmp_path: Any) -> None:
    ctx = context(runtime_dir=str(tmp_path / "run"), state_dir=str(tmp_path / "state"))
    check = check_retained(ctx, Facts(instance_id=INSTANCE, state="Terminating:Retained"))
    assert check is not None and check.result == FAIL
    assert check.message == "Terminating:Retained after a failed backup, and no watcher is retrying it"
    assert check_retained(ctx, Facts(instance_id=INSTANCE, state="InService")) is None  # nothing to say


def test_a_check_that_raises_is_one_failed_line_and_the_facts_flow_to_the_next() -> None:
    def broken(ctx: Context, facts: Facts) -> Check:
        raise KeyError("totals")

    def finds(ctx: Context, facts: Facts) -> Check:
        return Check("finds", OK, "found", facts=Facts(region="us-east-1"))

    def reads(ctx: Context, facts: Facts) -> Check:
        return Check("reads", OK, f"region {facts.region}")

    ctx = context()
    facts, lines = Facts(), []
    for step in (broken, finds, reads):
        for line in doctor.run_step(step, ctx, facts):
            lines.append(line)
            facts = facts.merged(line.facts)

    assert [(c.name, c.result) for c in lines] == [("broken", FAIL), ("finds", OK), ("reads", OK)]
    assert lines[0].message == "the check itself failed: KeyError: 'totals'"
    assert lines[2].message == "region us-east-1"
    assert doctor.failed(lines)
