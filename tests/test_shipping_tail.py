"""The termination tail with shipped history (issue 21 item 1): the final manifest names the
segments that hold the shipped files instead of listing them (format 2), and restore and
verify still check the whole tree file by file, failing with the segment's name when a
segment or its manifest is missing or altered. A format-1 manifest still restores."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest
import zstandard
from conftest import Stack
from support.agentproc import completions, watch
from support.trees import walk
from test_shipping import OLD, _await_shipped, _manifest

from instance_agent import manifest
from instance_agent.manifest import path_from_fields


def _small_tree(root: Path, n: int) -> Path:
    for i in range(n):
        d = root / f"d{i // 1000:02d}"
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"app.log.{i:05d}"
        path.write_bytes(b"%05d request served in 12 ms, status 200\n" % i * (1 + i % 7))
        os.utime(path, (OLD, OLD))
    return root


def _shipped_backup(stack: Stack, src: Path, n: int) -> dict[str, Any]:
    """Ship the `n` files of `src`, then terminate: the final backup's result."""
    with watch(stack, "--source", str(src), "--ship") as w:
        w.wait_for("watching")
        _await_shipped(stack, n, timeout=120)
        stack.scale_in()
        _, done = w.wait_for("response finished", timeout=120)
    assert done["status"] == "succeeded" and completions(stack) == [("CONTINUE", "ok")]
    return done


def _restore(stack: Stack, dest: Path, *extra: str) -> Any:
    args = ("--latest", "--instance-id", stack.instance_id, "--verify", "--json", *extra, str(dest))
    return stack.run("restore", "--bucket", stack.bucket, *args)


def _last_line(proc: Any) -> str:
    lines: list[str] = proc.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def _segment_keys(doc: dict[str, Any]) -> list[str]:
    return [str(s["key"]) for s in doc["segments"]]


def _alter_one_file(stack: Stack, key: str) -> str:
    """Flip one byte of one file inside segment `key`, keeping every size: the segment
    still restores, only its content differs. The member altered."""
    s3 = stack.client("s3")
    raw = (
        zstandard.ZstdDecompressor().stream_reader(s3.get_object(Bucket=stack.bucket, Key=key)["Body"]).read()
    )
    data = bytearray(raw)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        member = next(m for m in tf.getmembers() if m.isfile() and m.size)
    data[member.offset_data] ^= 0x20
    body = zstandard.ZstdCompressor().compress(bytes(data))
    s3.put_object(Bucket=stack.bucket, Key=key, Body=body)
    return member.name


def test_10000_segment_held_files_restore_and_verify_and_an_altered_segment_fails(
    stack: Stack, tmp_path: Path
) -> None:
    src = _small_tree(tmp_path / "logs", 10_000)
    done = _shipped_backup(stack, src, 10_000)
    doc = _manifest(stack, done["key"])
    size = len(json.dumps(doc))
    # What grew with history is gone: a few segments, not ten thousand entries.
    assert doc["format"] == 2 and doc["totals"]["held_files"] == 10_000 and doc["totals"]["files"] == 0
    assert sum(s["held"] for s in doc["segments"]) == 10_000 and len(doc["segments"]) < 10
    assert size < 16_384, size

    proc = _restore(stack, tmp_path / "restored")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["status"] == "verified" and out["files"] == 10_000
    assert out["checked"] >= 10_000 and out["differences"] == []
    assert walk(tmp_path / "restored" / str(src).lstrip("/")) == walk(src)

    altered = _segment_keys(doc)[1]
    name = _alter_one_file(stack, altered)
    proc = _restore(stack, tmp_path / "again")
    assert proc.returncode == 1, proc.stdout
    out = json.loads(proc.stdout)
    assert out["status"] == "differs"
    assert [d["path"] for d in out["differences"]] == [name]
    assert out["differences"][0]["problem"] == f"content differs (sha256) (held in segment {altered})"
    assert altered in _last_line(proc)


def test_a_missing_or_altered_segment_manifest_or_segment_fails_naming_it(
    stack: Stack, tmp_path: Path
) -> None:
    src = _small_tree(tmp_path / "logs", 40)
    done = _shipped_backup(stack, src, 40)
    doc = _manifest(stack, done["key"])
    (segment,) = _segment_keys(doc)
    s3 = stack.client("s3")
    url = f"s3://{stack.bucket}/{done['key']}"

    proc = _restore(stack, tmp_path / "restored")
    assert proc.returncode == 0 and json.loads(proc.stdout)["status"] == "verified", proc.stderr[-2000:]
    restored = tmp_path / "restored"
    proc = stack.run("verify", str(restored), "--manifest", url)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.endswith("entries against the manifest: identical\n")

    # A segment manifest rewritten to match altered content: the backup's digest of it differs.
    good = s3.get_object(Bucket=stack.bucket, Key=segment + ".manifest.json")["Body"].read()
    forged = json.loads(good)
    forged["entries"][-1]["sha256"] = "0" * 64
    s3.put_object(Bucket=stack.bucket, Key=segment + ".manifest.json", Body=json.dumps(forged).encode())
    for proc in (
        _restore(stack, tmp_path / "forged"),
        stack.run("verify", str(restored), "--manifest", url),
    ):
        assert proc.returncode == 1, proc.stdout
        line = _last_line(proc)
        assert f"segment s3://{stack.bucket}/{segment}: its manifest does not match" in line, line
    assert not (tmp_path / "forged").exists()

    s3.delete_object(Bucket=stack.bucket, Key=segment + ".manifest.json")
    for proc in (
        _restore(stack, tmp_path / "no-manifest"),
        stack.run("verify", str(restored), "--manifest", url),
    ):
        assert proc.returncode == 1, proc.stdout
        line = _last_line(proc)
        assert f"segment s3://{stack.bucket}/{segment}: its manifest is missing" in line, line

    s3.put_object(Bucket=stack.bucket, Key=segment + ".manifest.json", Body=good)
    s3.delete_object(Bucket=stack.bucket, Key=segment)
    proc = _restore(stack, tmp_path / "no-segment")
    assert proc.returncode == 1, proc.stdout
    line = _last_line(proc)
    assert line == f"instance-agent: error: s3://{stack.bucket}/{segment} does not exist", line
    assert not (tmp_path / "no-segment").exists()


def _as_format_1(stack: Stack, doc: dict[str, Any]) -> dict[str, Any]:
    """The manifest an agent before format 2 wrote for the same backup: every held file an
    entry naming its segment, and the segments without their counts."""
    entries = [e for e in doc["entries"] if not manifest.is_guard(e)]  # format 2's own
    for seg in doc["segments"]:
        body = stack.client("s3").get_object(Bucket=stack.bucket, Key=seg["key"] + ".manifest.json")["Body"]
        sdoc = json.loads(body.read())
        shipped = {base64.b64decode(x["path"]).lstrip(b"/") for x in sdoc["shipped"]}
        entries += [{**e, "object": seg["key"]} for e in sdoc["entries"] if path_from_fields(e) in shipped]
        for name in ("held", "held_sha256", "members", "renamed"):
            seg.pop(name, None)
    return {**doc, "format": 1, "entries": entries}


def test_a_format_1_manifest_still_restores_and_verifies(stack: Stack, tmp_path: Path) -> None:
    src = _small_tree(tmp_path / "logs", 30)
    done = _shipped_backup(stack, src, 30)
    old = _as_format_1(stack, _manifest(stack, done["key"]))
    assert len([e for e in old["entries"] if e.get("object")]) == 30
    body = json.dumps(old).encode()
    stack.client("s3").put_object(Bucket=stack.bucket, Key=done["key"] + ".manifest.json", Body=body)

    proc = _restore(stack, tmp_path / "restored")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["status"] == "verified" and out["files"] == 30
    assert walk(tmp_path / "restored" / str(src).lstrip("/")) == walk(src)
    local = tmp_path / "old.manifest.json"
    local.write_bytes(body)
    proc = stack.run("verify", str(tmp_path / "restored"), "--manifest", str(local))
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_local_format_2_manifest_asks_for_its_s3_url(stack: Stack, tmp_path: Path) -> None:
    src = _small_tree(tmp_path / "logs", 5)
    done = _shipped_backup(stack, src, 5)
    local = tmp_path / "final.manifest.json"
    local.write_text(json.dumps(_manifest(stack, done["key"])))
    proc = stack.run("verify", str(src), "--manifest", str(local))
    assert proc.returncode == 2
    assert _last_line(proc) == (
        f"instance-agent: error: {local} names the shipped segments that hold its files: "
        "give it as s3://BUCKET/KEY, so that their manifests can be read"
    )


# --- hostile format-2 manifests: the same checks as on format 1 (test_security_restore) ---

INSTANCE = "i-0123456789abcdef0"
PREFIX = f"logs/web/{INSTANCE}/"
FINAL = f"{PREFIX}20260101T000000Z.tar.zst"
SEGMENT = f"{PREFIX}segments/app.log.1.1files-0123456789abcdef01234567.tar.zst"


def _zst_of(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return zstandard.ZstdCompressor().compress(out.getvalue())


HOSTILE_FORMAT_2 = {
    # (the segment's key in the final manifest, its `renamed`, the segment manifest's entry,
    # what the one-line refusal says)
    "segment of another instance": (
        "logs/web/i-0fedcba9876543210/segments/app.log.1.1files-0.tar.zst",
        [],
        {},
        "it is not under this instance's prefix",
    ),
    "a backup, not a segment": (
        f"{PREFIX}20251231T000000Z.tar.zst",
        [],
        {},
        "not of the form of a segment key",
    ),
    "renamed to a path with '..'": (
        SEGMENT,
        [{"path": "../" * 30 + "SENTINEL", "member": "app.log.1"}],
        {},
        "has an unsafe path",
    ),
    "segment entry with an absolute member": (
        SEGMENT,
        [],
        {"member": "/SENTINEL"},
        "outside the segment's tree",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_FORMAT_2))
def test_a_hostile_format_2_manifest_fails_the_restore_and_touches_nothing(
    stack: Stack, tmp_path: Path, case: str
) -> None:
    secret = tmp_path / "home" / ".aws" / "credentials"
    secret.parent.mkdir(parents=True)
    secret.write_bytes(b"aws_secret_access_key = hunter2\n")
    key, renamed, extra, said = HOSTILE_FORMAT_2[case]
    renamed = [{**r, "path": r["path"].replace("SENTINEL", str(secret).lstrip("/"))} for r in renamed]
    extra = {k: v.replace("SENTINEL", str(secret).lstrip("/")) for k, v in extra.items()}
    s3 = stack.client("s3")
    digest = hashlib.sha256(b"evil").hexdigest()
    s3.put_object(Bucket=stack.bucket, Key=FINAL, Body=_zst_of({"keep.log": b"ok"}))
    # What the manifest names exists and holds a file, so only validation can stop it.
    s3.put_object(Bucket=stack.bucket, Key=key, Body=_zst_of({"app.log.1": b"evil"}))
    entry = {"path": "app.log.1", "type": "file", "size": 4, "mode": "0644", "sha256": digest, **extra}
    segment_doc = {
        "format": 1,
        "key": key,
        "segment_of": INSTANCE,
        "totals": {"tar_bytes": 10240},
        "entries": [entry],
        "shipped": [{"path": base64.b64encode(b"/app.log.1").decode()}],
    }
    s3.put_object(Bucket=stack.bucket, Key=key + ".manifest.json", Body=json.dumps(segment_doc).encode())
    final_doc = {
        "format": 2,
        "key": FINAL,
        "instance_id": INSTANCE,
        "totals": {"held_files": 1, "tar_bytes": 10240},
        "segments": [
            {
                "key": key,
                "tar_bytes": 10240,
                "held": 1,
                "held_sha256": hashlib.sha256(b"app.log.1\0" + digest.encode() + b"\n").hexdigest(),
                **({"renamed": renamed} if renamed else {}),
            }
        ],
        "entries": [{"path": "keep.log", "type": "file", "size": 2, "mode": "0644"}],
    }
    s3.put_object(Bucket=stack.bucket, Key=FINAL + ".manifest.json", Body=json.dumps(final_doc).encode())
    dest = tmp_path / "dest"
    proc = stack.run("restore", "--verify", f"s3://{stack.bucket}/{FINAL}", str(dest))
    assert proc.returncode == 1, proc.stderr[-2000:]
    line = _last_line(proc)
    assert line.startswith("instance-agent: error: refusing the manifest") and said in line, line
    assert secret.read_bytes() == b"aws_secret_access_key = hunter2\n"
    assert not dest.exists() or list(dest.iterdir()) == []


def _restores_exactly(stack: Stack, tmp_path: Path, src: Path) -> None:
    """restore --latest --verify of the final backup gives back exactly the tree at `src`."""
    proc = _restore(stack, tmp_path / "restored")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["status"] == "verified" and out["differences"] == []
    assert walk(tmp_path / "restored" / str(src).lstrip("/")) == walk(src)


@pytest.mark.parametrize("final", ["journal", "walk"])
def test_changes_after_shipping_reach_the_final_archive_by_the_journal_or_the_walk(
    stack: Stack, tmp_path: Path, final: str
) -> None:
    """After everything was shipped: one file appended to, one renamed, one deleted, one
    added; then the termination. With the change journal (the default) or the full walk
    (`ship_final = "walk"`), restore --latest --verify gives back exactly the tree."""
    src = _small_tree(tmp_path / "logs", 60)
    with watch(stack, "--source", str(src), "--ship", "--ship-final", final) as w:
        w.wait_for("watching")
        _await_shipped(stack, 60, timeout=120)
        with open(src / "d00" / "app.log.00003", "ab") as fh:
            fh.write(b"one more line after it was shipped\n")
        os.rename(src / "d00" / "app.log.00004", src / "d00" / "app.log.00004.1")
        os.unlink(src / "d00" / "app.log.00005")
        (src / "d00" / "new.log").write_bytes(b"written after the last segment\n")
        stack.scale_in()
        _, chosen = w.wait_for(
            "final archive: " + ("changes from the journal" if final == "journal" else "walking every file"),
            timeout=60,
        )
        _, done = w.wait_for("response finished", timeout=120)
    assert chosen["final_walk"] == final
    if final == "walk":
        assert chosen["reason"] == "ship_final is walk"
    else:
        # The files shipped since the first scan left the journal: it names about the
        # five paths changed above (the walk lstats only those), not all sixty.
        assert 4 <= chosen["changed"] <= 10, chosen
    assert done["status"] == "succeeded" and completions(stack) == [("CONTINUE", "ok")]

    _restores_exactly(stack, tmp_path, src)


def test_a_termination_with_nothing_changed_since_the_shipper_went_idle_reuses_its_walk(
    stack: Stack, tmp_path: Path
) -> None:
    """The shipper works out the termination's journal walk while idle (finalprep.py); with
    nothing changed since, the termination takes every directory from it, and restore
    --latest --verify still gives back exactly the tree."""
    src = tmp_path / "logs"
    _small_tree(src / "a", 30)
    _small_tree(src / "b", 30)
    with watch(stack, "--source", str(src), "--ship") as w:
        w.wait_for("watching")
        _await_shipped(stack, 60, timeout=120)
        w.wait_for("termination walk prepared", timeout=60, files=60)
        stack.scale_in()
        _, reused = w.wait_for("final archive: reusing the prepared walk", timeout=60)
        _, left_out = w.wait_for("left out: shipped earlier", timeout=60)
        _, done = w.wait_for("response finished", timeout=120)
    assert reused["files"] == 60
    assert left_out["files"] == left_out["prepared"] == 60
    assert done["status"] == "succeeded" and completions(stack) == [("CONTINUE", "ok")]
    _restores_exactly(stack, tmp_path, src)
