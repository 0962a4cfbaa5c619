"""Backups are never overwritten, and only the archive takes the storage class."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from conftest import Stack
from support import scoreboard
from support.faultproxy import FaultProxy, Rule, s3_error, upload_part

from instance_agent.partsize import PartSizer
from instance_agent.s3upload import MultipartUpload, put_small

FIXED = "{prefix}{group}/{instance_id}/fixed"  # no {timestamp}: every run renders one key


def _src(tmp: Path, name: str, data: bytes) -> Path:
    src = tmp / name
    src.mkdir()
    (src / "app.log").write_bytes(data)
    return src


def test_a_colliding_key_fails_clearly_and_keeps_the_earlier_backup(stack: Stack) -> None:
    with scoreboard.scenario("S3: a second backup renders the key of an earlier one") as row:
        row.faults = "key_template without {timestamp}; two runs of one instance"
        s3 = stack.client("s3")
        proc, first = stack.backup(
            "--source", str(_src(stack.tmp, "a", os.urandom(4096))), "--key-template", FIXED, "--no-complete"
        )
        assert proc.returncode == 0 and first["status"] == "succeeded", proc.stderr[-2000:]
        kept = {
            k: s3.get_object(Bucket=stack.bucket, Key=k)["Body"].read()
            for k in (first["key"], first["manifest_key"])
        }

        proc, second = stack.backup(
            "--source", str(_src(stack.tmp, "b", os.urandom(8192))), "--key-template", FIXED, "--no-complete"
        )

        assert proc.returncode == 1 and second["status"] == "failed"
        assert second["key"] == first["key"]
        assert "\n" not in second["error"] and "already exists" in second["error"], second
        for key, body in kept.items():  # the earlier backup, byte for byte
            assert s3.get_object(Bucket=stack.bucket, Key=key)["Body"].read() == body
        assert stack.incomplete_uploads() == []  # the refused upload was aborted
        assert '"status": "failed"' in stack.sns()[-1]["message"]  # reported as a failure
        row.outcome = (
            "exit 1, one-line error 'already exists'; earlier archive and manifest "
            "byte-identical; upload aborted"
        )
        row.bytes_lost = 0


def test_put_small_refuses_to_overwrite(stack: Stack) -> None:
    s3 = stack.client("s3")
    put_small(s3, stack.bucket, "k.manifest.json", b"first")
    try:
        put_small(s3, stack.bucket, "k.manifest.json", b"second")
    except Exception as err:  # UploadError
        assert "already exists" in str(err) and "\n" not in str(err)
    else:
        raise AssertionError("the second PutObject replaced the first")
    assert s3.get_object(Bucket=stack.bucket, Key="k.manifest.json")["Body"].read() == b"first"


class _Recorder:
    """An S3Client that records its calls (a fake of the Protocol, no server)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def _note(self, name: str, kw: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((name, kw))
        return {"UploadId": "u", "ETag": '"e"'}

    def create_multipart_upload(self, **kw: Any) -> dict[str, Any]:
        return self._note("create", kw)

    def upload_part(self, **kw: Any) -> dict[str, Any]:
        kw["Body"].read()
        return self._note("part", kw)

    def complete_multipart_upload(self, **kw: Any) -> dict[str, Any]:
        return self._note("complete", kw)

    def abort_multipart_upload(self, **kw: Any) -> dict[str, Any]:
        return self._note("abort", kw)

    def put_object(self, **kw: Any) -> dict[str, Any]:
        return self._note("put", kw)

    def list_multipart_uploads(self, **kw: Any) -> dict[str, Any]:
        return self._note("list", kw)


def test_storage_class_applies_to_the_archive_only() -> None:
    extra = {"StorageClass": "GLACIER", "ServerSideEncryption": "AES256"}
    client = _Recorder()
    for key in ("b/i-1/t.tar.zst", "b/i-1/t.journal.export.zst"):
        with MultipartUpload(client, "bk", key, sizer=PartSizer.for_max(1 << 30), extra=extra) as up:
            up.write(b"data")
            up.complete()
    put_small(client, "bk", "b/i-1/t.tar.zst.manifest.json", b"{}", extra=extra)
    classes = {kw["Key"]: kw.get("StorageClass") for name, kw in client.calls if name in ("create", "put")}
    assert classes == {
        "b/i-1/t.tar.zst": "GLACIER",
        "b/i-1/t.journal.export.zst": None,
        "b/i-1/t.tar.zst.manifest.json": None,
    }
    # Encryption still applies to everything, and creation is conditional everywhere.
    assert all(
        kw.get("ServerSideEncryption") == "AES256" for name, kw in client.calls if name in ("create", "put")
    )
    assert all(kw.get("IfNoneMatch") == "*" for name, kw in client.calls if name in ("complete", "put"))


def test_doctor_probes_kms_decrypt_with_one_part(stack: Stack) -> None:
    denied = s3_error(403, "AccessDenied", "User is not authorized to perform: kms:Decrypt")
    empty = stack.tmp / "agent.toml"
    empty.touch()
    with FaultProxy(stack.s3_endpoint) as proxy:
        proxy.add_rule(Rule(method="PUT", query=upload_part, fault=denied))
        proc = stack.run(
            "doctor",
            "--json",
            "--bucket",
            stack.bucket,
            "--sse",
            "aws:kms",
            env=stack.env(INSTANCE_AGENT_CONFIG=str(empty), AWS_ENDPOINT_URL_S3=proxy.endpoint),
            timeout=120,
        )
    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    assert proc.returncode == 1
    s3 = checks["s3 permissions"]
    assert s3["result"] == "fail" and "UploadPart with SSE-KMS was refused" in s3["message"]
    assert "kms:Decrypt" in s3["fix"]
    assert stack.incomplete_uploads() == []  # the probe's upload, part and all, was aborted
