"""doctor's S3 and SNS checks: the bucket and the permissions a backup needs there (one
multipart upload created and aborted: nothing is stored), and the topic (probed only with
--publish-test, by a message)."""

from __future__ import annotations

import json
import uuid
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from instance_agent import __version__, awserror, s3args
from instance_agent.doctor_check import FAIL, OK, SKIP, Check, Context, Facts

_code, _describe, _denied = awserror.code_of, awserror.describe, awserror.denied


def check_bucket_and_upload(ctx: Context, facts: Facts) -> tuple[Check, ...]:
    cfg = ctx.cfg
    if not cfg.bucket:
        return Check("bucket", SKIP, "no bucket configured (see config)"), Check(
            "s3 permissions", SKIP, "no bucket configured"
        )
    if not facts.region:
        return Check("bucket", SKIP, "needs the region (see identity)"), Check(
            "s3 permissions", SKIP, "needs the region (see identity)"
        )
    s3 = ctx.clients(facts.region).s3
    where = f"s3://{cfg.bucket}/{cfg.prefix}"
    key = f"{cfg.prefix}.instance-agent-doctor/{facts.instance_id or 'unknown'}/{uuid.uuid4().hex}"
    owner = s3args.owner_args(cfg)
    write_fix = (
        f"allow s3:PutObject and s3:AbortMultipartUpload on arn:aws:s3:::{cfg.bucket}/"
        f"{cfg.prefix}* in the instance role (packaging/template.yaml, statement "
        "WriteBackups)"
    )
    if cfg.expected_bucket_owner:
        write_fix += (
            f"; S3 also answers AccessDenied when account {cfg.expected_bucket_owner} does not own the bucket"
        )
    if cfg.sse == "aws:kms":
        write_fix += "; with SSE-KMS the role needs kms:GenerateDataKey and kms:Decrypt on the key"
    try:
        upload_id = s3.create_multipart_upload(Bucket=cfg.bucket, Key=key, **s3args.write_args(cfg))[
            "UploadId"
        ]
    except (ClientError, BotoCoreError) as err:
        if _code(err) == "NoSuchBucket":
            return Check(
                "bucket",
                FAIL,
                f"bucket {cfg.bucket} does not exist",
                f"create it (packaging/template.yaml makes one), or fix `bucket` in "
                f"{cfg.config_file or 'the flags or environment'}",
            ), Check("s3 permissions", SKIP, "no bucket to probe")
        if _denied(err):
            return Check("bucket", SKIP, "cannot tell: S3 refused the probe (see s3 permissions)"), Check(
                "s3 permissions",
                FAIL,
                f"CreateMultipartUpload under {where} was "
                f"denied ({_describe(err)}): the backup could not upload",
                write_fix,
            )
        return Check(
            "bucket",
            FAIL,
            f"CreateMultipartUpload under {where}: {_describe(err)}",
            "check the bucket's region and the network path to S3 (a VPC endpoint or NAT)",
        ), Check("s3 permissions", SKIP, "the bucket did not answer")
    owned = f", owned by {cfg.expected_bucket_owner}" if cfg.expected_bucket_owner else ""
    bucket = Check("bucket", OK, f"bucket {cfg.bucket} exists{owned}")
    kms_refused = _probe_kms_part(ctx, s3, key, upload_id, owner)
    try:
        s3.abort_multipart_upload(Bucket=cfg.bucket, Key=key, UploadId=upload_id, **owner)
    except (ClientError, BotoCoreError) as err:
        return bucket, Check(
            "s3 permissions",
            FAIL,
            f"s3:PutObject works but AbortMultipartUpload was "
            f"refused ({_describe(err)}): a failed backup could not remove its partial "
            "upload (the probe's stays until the bucket's lifecycle rule expires it)",
            write_fix,
        )
    try:
        # What a run after a crash does to find the killed run's upload and abort it.
        s3.list_multipart_uploads(Bucket=cfg.bucket, Prefix=cfg.prefix, MaxUploads=1, **owner)
    except (ClientError, BotoCoreError) as err:
        return bucket, Check(
            "s3 permissions",
            FAIL,
            "s3:PutObject and s3:AbortMultipartUpload work, but "
            f"ListMultipartUploads was refused ({_describe(err)}): after a crash the next "
            "run cannot find and abort the killed run's upload (the bucket's lifecycle "
            "rule still expires it)",
            f"allow s3:ListBucketMultipartUploads on arn:aws:s3:::{cfg.bucket} in the "
            "instance role (packaging/template.yaml, statement ListOwnUploads)",
        )
    if kms_refused:
        return bucket, Check(
            "s3 permissions",
            FAIL,
            f"CreateMultipartUpload works but UploadPart with "
            f"SSE-KMS was refused ({kms_refused}): every backup would fail on its "
            "first part",
            write_fix,
        )
    return bucket, Check(
        "s3 permissions",
        OK,
        f"s3:PutObject, s3:AbortMultipartUpload and "
        f"s3:ListBucketMultipartUploads under {where} (a multipart upload was created "
        "and aborted; nothing stored)",
    )


def _probe_kms_part(ctx: Context, s3: Any, key: str, upload_id: str, owner: dict[str, str]) -> str | None:
    """With SSE-KMS, upload one tiny part: CreateMultipartUpload needs only
    kms:GenerateDataKey, while UploadPart and CompleteMultipartUpload also need
    kms:Decrypt (Amazon S3 user guide, "Multipart upload API and permissions"), so without
    this a role lacking Decrypt passes and the backup fails on its first part. The part is
    discarded by the abort that follows. Returns S3's refusal, or None."""
    if ctx.cfg.sse != "aws:kms":
        return None
    try:
        s3.upload_part(
            Bucket=ctx.cfg.bucket,
            Key=key,
            UploadId=upload_id,
            PartNumber=1,
            Body=b"instance-agent doctor",
            **owner,
        )
    except (ClientError, BotoCoreError) as err:
        return _describe(err)
    return None


def check_topic(ctx: Context, facts: Facts) -> Check:
    name, topic = "topic", ctx.cfg.topic_arn
    if not topic:
        return Check(name, SKIP, "no topic_arn: the backup reports to no one")
    topic_region = topic.split(":")[3]
    if facts.region and topic_region != facts.region:
        return Check(
            name,
            FAIL,
            f"the topic is in {topic_region}, the agent's clients use {facts.region}: the report would fail",
            f'use a topic in {facts.region}, or set region = "{topic_region}"',
        )
    if not ctx.publish_test:
        return Check(
            name,
            SKIP,
            "not probed: the instance role grants only sns:Publish, so only "
            "a message proves the topic; `instance-agent doctor --publish-test` sends one",
        )
    sns = ctx.clients(facts.region).sns if facts.region else None
    if sns is None:
        return Check(name, SKIP, "needs the region (see identity)")
    body = {"event": "doctor_test", "instance_id": facts.instance_id, "agent_version": __version__}
    try:
        resp = sns.publish(
            TopicArn=topic,
            Message=json.dumps(body),
            Subject=f"instance-agent doctor: test message from {facts.instance_id}",
        )
    except (ClientError, BotoCoreError) as err:
        if _code(err) == "NotFound":
            return Check(name, FAIL, f"topic {topic} does not exist", "create it, or fix topic_arn")
        return Check(
            name,
            FAIL,
            f"Publish: {_describe(err)}",
            "allow sns:Publish on the topic in the instance role (packaging/template.yaml, statement Report)"
            if _denied(err)
            else None,
        )
    return Check(name, OK, f"published a test message to {topic} (id {resp.get('MessageId')})")
