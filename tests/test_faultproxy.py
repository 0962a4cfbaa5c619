"""The fault proxy forwards faithfully and injects the faults tests ask for."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, ConnectionClosedError, ReadTimeoutError
from support.faultproxy import (
    Delay,
    FaultProxy,
    Hold,
    HoldUntil,
    Reset,
    Rule,
    access_denied,
    internal_error,
    slow_down,
    throttling,
    upload_part,
)
from support.seaweed import SeaweedS3

from instance_agent.local.moto_server import MotoServer

BUCKET = "faultproxy-tests"
PART = 5 * 1024 * 1024  # S3's smallest non-final part; SeaweedFS enforces it
NO_RETRIES = Config(retries={"total_max_attempts": 1})


@pytest.fixture(scope="module")
def s3_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with SeaweedS3(tmp_path_factory.mktemp("seaweed")) as s3:
        client = boto3.client(
            "s3",
            endpoint_url=s3.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        client.create_bucket(Bucket=BUCKET)
        yield s3.endpoint


@pytest.fixture
def proxy(s3_upstream: str) -> Iterator[FaultProxy]:
    with FaultProxy(s3_upstream, seed=7) as running:
        yield running


def s3_client(endpoint: str, config: Config = NO_RETRIES) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, config=config)


def multipart(client: Any, key: str, parts: list[bytes]) -> None:
    upload = client.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]
    done = []
    for number, body in enumerate(parts, start=1):
        etag = client.upload_part(Bucket=BUCKET, Key=key, UploadId=upload, PartNumber=number, Body=body)[
            "ETag"
        ]
        done.append({"PartNumber": number, "ETag": etag})
    client.complete_multipart_upload(Bucket=BUCKET, Key=key, UploadId=upload, MultipartUpload={"Parts": done})


def test_pass_through_is_faithful(proxy: FaultProxy) -> None:
    client = s3_client(proxy.endpoint)
    payload = bytes(range(256)) * 4096  # 1 MiB, every byte value
    client.put_object(Bucket=BUCKET, Key="plain", Body=payload)
    assert client.get_object(Bucket=BUCKET, Key="plain")["Body"].read() == payload
    parts = [b"a" * PART, b"tail"]
    multipart(client, "multi", parts)
    assert client.get_object(Bucket=BUCKET, Key="multi")["Body"].read() == b"".join(parts)
    assert client.head_object(Bucket=BUCKET, Key="multi")["ContentLength"] == PART + 4

    log = proxy.requests
    assert not any(r.faulted for r in log)
    assert all(r.status == 200 for r in log)
    methods = [r.method for r in log]
    assert methods == ["PUT", "GET", "POST", "PUT", "PUT", "POST", "GET", "HEAD"]
    uploads = [r for r in log if upload_part(r.query)]
    assert [r.query["partNumber"] for r in uploads] == [["1"], ["2"]]
    assert uploads[0].headers["content-length"] is not None


def test_failing_upload_part_is_retried(proxy: FaultProxy) -> None:
    rule = proxy.add_rule(Rule(method="PUT", query=upload_part, fault=internal_error(), times=1, name="part"))
    retrying = s3_client(proxy.endpoint, Config(retries={"mode": "standard", "max_attempts": 3}))
    multipart(retrying, "retried", [b"r" * PART, b"end"])
    assert rule.hits == 1
    uploads = [r for r in proxy.requests if upload_part(r.query)]
    assert [(r.status, r.fault, r.rule) for r in uploads] == [
        (500, "Respond", "part"),
        (200, None, None),
        (200, None, None),
    ]
    body = s3_client(proxy.endpoint).get_object(Bucket=BUCKET, Key="retried")["Body"].read()
    assert body == b"r" * PART + b"end"


def test_failing_upload_part_without_retries(proxy: FaultProxy) -> None:
    proxy.add_rule(Rule(method="PUT", query=upload_part, fault=internal_error()))
    client = s3_client(proxy.endpoint)
    upload = client.create_multipart_upload(Bucket=BUCKET, Key="fails")["UploadId"]
    with pytest.raises(ClientError) as info:
        client.upload_part(Bucket=BUCKET, Key="fails", UploadId=upload, PartNumber=1, Body=b"x")
    assert info.value.response["Error"]["Code"] == "InternalError"
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    client.abort_multipart_upload(Bucket=BUCKET, Key="fails", UploadId=upload)
    assert client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []


def test_reset_mid_body(proxy: FaultProxy) -> None:
    proxy.add_rule(Rule(method="PUT", query=upload_part, fault=Reset(after_bytes=64 * 1024), times=1))
    client = s3_client(proxy.endpoint)
    upload = client.create_multipart_upload(Bucket=BUCKET, Key="reset")["UploadId"]
    with pytest.raises(ConnectionClosedError):
        client.upload_part(Bucket=BUCKET, Key="reset", UploadId=upload, PartNumber=1, Body=b"z" * PART)
    # The rule is spent: the same part now goes through.
    client.upload_part(Bucket=BUCKET, Key="reset", UploadId=upload, PartNumber=1, Body=b"z" * PART)
    resets = [r for r in proxy.requests if r.fault == "Reset"]
    assert len(resets) == 1
    assert resets[0].status is None
    client.abort_multipart_upload(Bucket=BUCKET, Key="reset", UploadId=upload)


def test_probability_is_seeded(s3_upstream: str) -> None:
    def faulted_pattern() -> list[bool]:
        with FaultProxy(s3_upstream, seed=42) as proxy:
            proxy.add_rule(Rule(method="HEAD", fault=slow_down(), probability=0.5))
            client = s3_client(proxy.endpoint)
            s3_client(s3_upstream).put_object(Bucket=BUCKET, Key="probe", Body=b"p")
            for _ in range(20):
                try:
                    client.head_object(Bucket=BUCKET, Key="probe")
                except ClientError as err:
                    assert err.response["ResponseMetadata"]["HTTPStatusCode"] == 503
            return [r.faulted for r in proxy.requests]

    first = faulted_pattern()
    assert 0 < sum(first) < 20
    assert faulted_pattern() == first


def test_path_regex_and_access_denied(proxy: FaultProxy) -> None:
    client = s3_client(proxy.endpoint)
    client.put_object(Bucket=BUCKET, Key="secret/a", Body=b"a")
    client.put_object(Bucket=BUCKET, Key="public/b", Body=b"b")
    proxy.add_rule(Rule(method="GET", path=re.compile(r"/secret/"), fault=access_denied()))
    with pytest.raises(ClientError) as info:
        client.get_object(Bucket=BUCKET, Key="secret/a")
    assert info.value.response["Error"]["Code"] == "AccessDenied"
    assert client.get_object(Bucket=BUCKET, Key="public/b")["Body"].read() == b"b"


def test_hold_until_event_pauses_a_part(proxy: FaultProxy) -> None:
    release = threading.Event()
    rule = proxy.add_rule(
        Rule(method="PUT", query=upload_part, fault=HoldUntil(release, timeout=30), times=1)
    )
    client = s3_client(proxy.endpoint)
    errors: list[BaseException] = []

    def upload() -> None:
        try:
            multipart(client, "held", [b"h" * PART, b"!"])
        except BaseException as err:
            errors.append(err)

    worker = threading.Thread(target=upload)
    worker.start()
    assert rule.fired.wait(10)
    time.sleep(0.3)
    assert worker.is_alive()  # paused mid-flight
    assert not [r for r in proxy.requests if upload_part(r.query)]
    release.set()
    worker.join(30)
    assert not worker.is_alive()
    assert errors == []
    assert client.head_object(Bucket=BUCKET, Key="held")["ContentLength"] == PART + 1
    held, after = [r for r in proxy.requests if upload_part(r.query)]
    assert (held.fault, held.status) == ("HoldUntil", 200)
    assert (after.fault, after.status) == (None, 200)


def test_black_hole_times_out_and_stop_is_prompt(s3_upstream: str) -> None:
    proxy = FaultProxy(s3_upstream)
    proxy.start()
    proxy.add_rule(Rule(method="GET", fault=Hold()))
    client = s3_client(proxy.endpoint, Config(retries={"total_max_attempts": 1}, read_timeout=0.5))
    with pytest.raises(ReadTimeoutError):
        client.list_objects_v2(Bucket=BUCKET)
    started = time.monotonic()
    proxy.stop()
    assert time.monotonic() - started < 3


def test_delay_adds_latency(proxy: FaultProxy) -> None:
    proxy.add_rule(Rule(method="GET", fault=Delay(0.4)))
    client = s3_client(proxy.endpoint)
    started = time.monotonic()
    client.list_objects_v2(Bucket=BUCKET, MaxKeys=1)
    assert time.monotonic() - started >= 0.4
    assert proxy.requests[-1].status == 200
    assert proxy.requests[-1].fault == "Delay"


def test_clear_removes_rules(proxy: FaultProxy) -> None:
    proxy.add_rule(Rule(method="GET", fault=internal_error()))
    proxy.clear()
    client = s3_client(proxy.endpoint)
    client.list_objects_v2(Bucket=BUCKET, MaxKeys=1)
    assert proxy.requests[-1].faulted is False


def test_query_api_action_matching() -> None:
    # No reset: another server of this process (a session fixture) may hold state.
    with MotoServer(reset=False) as moto, FaultProxy(moto.endpoint) as proxy:
        proxy.add_rule(Rule(api_action="DescribeAutoScalingGroups", fault=throttling(), times=1))
        asg = boto3.client("autoscaling", endpoint_url=proxy.endpoint, config=NO_RETRIES)
        with pytest.raises(ClientError) as info:
            asg.describe_auto_scaling_groups()
        assert info.value.response["Error"] == {
            "Type": "Sender",
            "Code": "Throttling",
            "Message": "Rate exceeded",
        }
        asg.describe_auto_scaling_groups()
        assert asg.describe_lifecycle_hooks(AutoScalingGroupName="none")["LifecycleHooks"] == []
        # JSON-protocol services name the operation in X-Amz-Target.
        proxy.add_rule(Rule(api_action="GetParameter", fault=internal_error(), times=1))
        ssm = boto3.client("ssm", endpoint_url=proxy.endpoint, config=NO_RETRIES)
        with pytest.raises(ClientError):
            ssm.get_parameter(Name="/missing")
        assert [(r.api_action, r.faulted) for r in proxy.requests] == [
            ("DescribeAutoScalingGroups", True),
            ("DescribeAutoScalingGroups", False),
            ("DescribeLifecycleHooks", False),
            ("GetParameter", True),
        ]
