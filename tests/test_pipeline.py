"""The pipeline's parts against real tools and servers: GNU tar, zstd, SeaweedFS, the IMDS stub."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

import boto3
import pytest
from conftest import REGION, Stack
from hypothesis import given, settings
from hypothesis import strategies as st
from support.faultproxy import FaultProxy, Rule, access_denied

from instance_agent import config, keys, notify, tarheader
from instance_agent.archive import Archiver
from instance_agent.compress import open_compressor
from instance_agent.errors import ConfigError, UploadError
from instance_agent.imds import IMDS, IMDSRefused
from instance_agent.local.imds import IMDSStub
from instance_agent.partsize import MAX_PARTS, PartSizer
from instance_agent.s3upload import MultipartUpload

# -- tar writer -------------------------------------------------------------------------


def _archive(tree: Path, **kw: Any) -> tuple[bytes, Any]:
    buf = io.BytesIO()
    arch = Archiver(buf, clock=time.monotonic, **kw)
    arch.add_sources([str(tree)])
    report = arch.finish()
    return buf.getvalue(), report


def test_gnu_tar_reads_long_and_non_utf8_names_without_warnings(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    deep = tree / ("d" * 120) / ("e" * 120)
    deep.mkdir(parents=True)
    (deep / ("f" * 200)).write_bytes(b"long path\n")
    raw = os.fsencode(tree) + b"/\xff\xfename"
    with open(raw, "wb") as fh:
        fh.write(b"raw name\n")
    os.symlink("x" * 150, tree / "long-link")
    data, report = _archive(tree)
    assert len(data) % 10240 == 0
    (tmp_path / "a.tar").write_bytes(data)
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run(
        ["tar", "-xf", str(tmp_path / "a.tar"), "-C", str(out)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0 and proc.stderr == ""
    base = os.fsencode(out) + os.fsencode(str(tree))
    assert (
        Path(os.fsdecode(base + b"/" + b"d" * 120 + b"/" + b"e" * 120 + b"/" + b"f" * 200)).read_bytes()
        == b"long path\n"
    )
    with open(base + b"/\xff\xfename", "rb") as fh:
        assert fh.read() == b"raw name\n"
    assert os.readlink(base + b"/long-link") == b"x" * 150
    # Python's tarfile agrees on every member name.
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        names = {m.name for m in tf}
    assert os.fsdecode(os.fsencode(str(tree)).lstrip(b"/") + b"/\xff\xfename") in names
    assert report.files == 2


def test_file_that_shrinks_is_padded_and_warned(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    tree.mkdir()
    victim = tree / "shrinking.log"
    victim.write_bytes(b"a" * 3_000_000)

    class Truncating(io.BytesIO):
        done = False

        def write(self, data: Any, /) -> int:
            # Once the header is out and the first chunk copied, the file loses its tail.
            if not self.done and self.tell() > 1_000_000:
                victim.write_bytes(b"a" * 1_000)
                self.done = True
            return super().write(data)

    buf = Truncating()
    arch = Archiver(buf, clock=time.monotonic)
    arch.add_sources([str(tree)])
    report = arch.finish()
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tf:
        member = tf.getmember(str(victim).lstrip("/"))
    assert member.size == 3_000_000
    assert len(report.warnings) == 1
    assert report.warnings[0].reason.startswith("shrank during read")


def test_deadline_closes_archive_early_and_lists_what_was_left(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    for d in ("a", "b", "c"):
        (tree / d).mkdir(parents=True)
        for i in range(3):
            (tree / d / f"{i}.log").write_text("x")
    ticks = iter(range(1000))
    arch = Archiver(io.BytesIO(), clock=lambda: float(next(ticks)), deadline=5.0)
    arch.add_sources([str(tree), "/etc/hostname"])
    report = arch.finish()
    archived = {e["path"].encode() for e in report.entries() if e["type"] == "file"}
    omitted = set(report.omitted)
    assert report.stopped_early and archived and omitted
    # Everything is either archived or covered by an omitted path, nothing both.
    for d in ("a", "b", "c"):
        for i in range(3):
            p = os.fsencode(tree / d / f"{i}.log")
            covered = any(p == o or p.startswith(o + b"/") for o in omitted)
            assert (p.lstrip(b"/") in archived) != covered, p
    assert b"/etc/hostname" in omitted


@pytest.mark.parametrize(
    ("kind", "tar_flag", "check"),
    [
        ("zstd", "--zstd", ["zstd", "-t", "-q"]),
        ("gzip", "-z", ["gzip", "-t"]),
        ("none", "", None),
    ],
)
def test_every_compression_opens_with_standard_tools(
    tmp_path: Path, kind: str, tar_flag: str, check: list[str] | None
) -> None:
    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "log").write_bytes(b"line\n" * 100_000)
    buf = io.BytesIO()
    comp = open_compressor(kind, buf)
    arch = Archiver(comp, clock=time.monotonic)
    arch.add_sources([str(tree)])
    arch.finish()
    comp.close()
    path = tmp_path / f"a{keys.EXTENSIONS[kind]}"
    path.write_bytes(buf.getvalue())
    if check:
        assert subprocess.run([*check, str(path)], check=False).returncode == 0
    out = tmp_path / "out"
    out.mkdir()
    args = ["tar", "-xf", str(path), "-C", str(out)] + ([tar_flag] if tar_flag else [])
    assert subprocess.run(args, check=False).returncode == 0
    assert (out / str(tree).lstrip("/") / "log").read_bytes() == b"line\n" * 100_000


# -- multipart upload against SeaweedFS -------------------------------------------------


def test_part_sizes_reach_the_maximum_in_10000_parts() -> None:
    for max_size in (5 * 2**20, 80 * 2**30, 2**40, 5 * 2**40):
        sizer = PartSizer.for_max(max_size)
        assert sizer.capacity() >= max_size
        assert all(5 * 2**20 <= sizer.size(n) <= 5 * 2**30 for n in (1, 5000, MAX_PARTS))
    # docs/usage.md's figures (Memory) for the default 1 TiB.
    sizer = PartSizer.for_max(2**40)
    assert sizer.size(1) == 8 * 2**20 and 200 * 2**20 < sizer.size(MAX_PARTS) < 205 * 2**20


def _s3(stack: Stack) -> Any:
    return boto3.client("s3", region_name=REGION, endpoint_url=stack.s3_endpoint)


def test_producer_failure_aborts_and_leaves_nothing(stack: Stack) -> None:
    up = MultipartUpload(_s3(stack), stack.bucket, "k.tar", sizer=PartSizer(5 * 2**20, 0))
    with pytest.raises(RuntimeError, match="producer died"), up:
        up.write(os.urandom(12 * 2**20))  # two parts in flight
        raise RuntimeError("producer died")
    assert stack.objects() == {}
    assert stack.incomplete_uploads() == []


def test_small_stream_is_one_part_with_a_checksum(stack: Stack) -> None:
    s3 = _s3(stack)
    with MultipartUpload(s3, stack.bucket, "small", sizer=PartSizer.for_max(2**40)) as up:
        up.write(b"hello")
        obj = up.complete()
    assert obj.parts == 1 and obj.size == 5
    head = s3.head_object(Bucket=stack.bucket, Key="small", ChecksumMode="ENABLED")
    assert head["ContentLength"] == 5 and head.get("ChecksumCRC32")


def test_access_denied_is_one_clear_error(stack: Stack) -> None:
    with FaultProxy(stack.s3_endpoint) as proxy:
        proxy.add_rule(Rule(fault=access_denied()))
        s3 = boto3.client("s3", region_name=REGION, endpoint_url=proxy.endpoint)
        up = MultipartUpload(s3, stack.bucket, "k", sizer=PartSizer(5 * 2**20, 0))
        with pytest.raises(UploadError, match="CreateMultipartUpload failed: AccessDenied"):
            up.__enter__()


# -- IMDS client against the stub ------------------------------------------------------


def test_imds_client_uses_tokens_only_and_refreshes_on_401(imds: IMDSStub) -> None:
    imds.instance_id = "i-0123456789abcdef0"
    client = IMDS(imds.endpoint)
    assert client.instance_id() == "i-0123456789abcdef0"
    imds.expire_tokens()
    assert client.region() == imds.region
    assert imds.token_puts == 2 and imds.tokenless_reads == 0
    assert client.get("spot/instance-action") is None  # 404 is "nothing yet"


def test_imds_client_fails_fast_on_403(imds: IMDSStub) -> None:
    imds.fail_status = 403
    started = time.monotonic()
    with pytest.raises(IMDSRefused):
        IMDS(imds.endpoint).instance_id()
    assert time.monotonic() - started < 1.0


def test_imds_client_ignores_proxy_variables(imds: IMDSStub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    assert IMDS(imds.endpoint).instance_id() == imds.instance_id


# -- config -----------------------------------------------------------------------------


def test_precedence_flag_over_env_over_file_over_default(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(
        'bucket = "from-file"\nprefix = "file/"\nlevel = 5\nsource = ["/srv"]\npoll_interval = 1.0\n'
    )
    env = {"INSTANCE_AGENT_PREFIX": "env/", "INSTANCE_AGENT_LEVEL": "7"}
    cfg = config.load({"level": "9"}, env, config_file=str(path))
    assert (cfg.bucket, cfg.prefix, cfg.level, cfg.source) == ("from-file", "env/", 9, ("/srv",))
    assert cfg.compression == "zstd"  # default
    env["INSTANCE_AGENT_SOURCE"] = "/a:/b"
    assert config.load({}, env, config_file=str(path)).source == ("/a", "/b")


@pytest.mark.parametrize(
    ("flags", "env", "message"),
    [
        ({"bucket": "ok-bucket", "max_duration": "-1"}, {}, "must be greater than 0"),
        ({"bucket": "ok-bucket"}, {"INSTANCE_AGENT_COMPLETE": "maybe"}, "expected 1/0/true/false"),
        ({"bucket": "ok-bucket", "key_template": "{group}/{bad}"}, {}, "unknown variable {bad}"),
        ({"bucket": "ok-bucket", "key_template": "{group}"}, {}, "must contain {instance_id}"),
        ({"bucket": "ok-bucket", "prefix": "../up"}, {}, "invalid prefix"),
        ({"bucket": "ok-bucket", "lifecycle_token": "x\n"}, {}, "invalid lifecycle action token"),
        ({"bucket": "192.168.1.1"}, {}, "must not look like an IP address"),
    ],
)
def test_bad_values_name_their_source(flags: dict[str, str], env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("}", r"\}")):
        config.load(flags, env)


# -- keys -------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    group=st.text(min_size=1, max_size=255),
    instance=st.text(max_size=40),
    host=st.text(max_size=64),
    prefix=st.sampled_from(["", "backups/", "a/b/"]),
)
def test_rendered_keys_are_always_safe(group: str, instance: str, host: str, prefix: str) -> None:
    key = keys.render(
        config.Config.defaults().key_template + "/{hostname}",
        {
            "prefix": prefix,
            "group": group,
            "instance_id": instance or "i-1",
            "region": "us-east-1",
            "timestamp": keys.timestamp(),
            "hostname": host,
        },
        "zstd",
    )
    assert not key.startswith("/") and ".." not in key
    assert not any(ord(c) < 32 or ord(c) == 127 for c in key)


# -- notify -----------------------------------------------------------------------------


def test_sns_body_and_subject_stay_within_limits() -> None:
    result = {"status": "failed", "instance_id": "i-1\nwith newline", "error": "e" * 400_000}
    body = notify.body_for(result)
    assert len(body.encode()) <= notify.MAX_BYTES - 1024
    parsed = json.loads(body)
    assert parsed["truncated"] is True and parsed["status"] == "failed"
    subject = notify.subject_for(result)
    assert len(subject) < 100 and "\n" not in subject


def test_tar_header_checksum_is_what_tar_expects() -> None:
    block = tarheader.encode(b"x.log", typeflag=tarheader.REGTYPE, size=5, mtime=1)
    info = tarfile.TarInfo.frombuf(block, "utf-8", "strict")
    assert (info.name, info.size, info.mtime) == ("x.log", 5, 1)


# -- journal ----------------------------------------------------------------------------

FAKE_JOURNALCTL = """#!/bin/sh
# A stand-in for journalctl: export format for the current boot, no previous boot.
case "$*" in
  *"-b -1"*) echo "Data from the specified boot (-1) is not available: No such boot ID" >&2; exit 1;;
  *"-b 0"*) printf '__CURSOR=s=1\\nMESSAGE=hello from the journal\\n\\n'; exit 0;;
esac
exit 2
"""


def test_journal_is_streamed_beside_the_archive(stack: Stack, tmp_path: Path) -> None:
    import zstandard

    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "journalctl"
    fake.write_text(FAKE_JOURNALCTL)
    fake.chmod(0o755)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.log").write_text("a\n")
    env = stack.env(INSTANCE_AGENT_JOURNAL="1", PATH=f"{bindir}:{os.environ['PATH']}")
    proc, result = stack.backup("--source", str(src), "--no-complete", env=env)
    assert proc.returncode == 0 and result["status"] == "succeeded", proc.stderr[-2000:]
    assert result["journal_key"].endswith(".journal.export.zst")
    body = _s3(stack).get_object(Bucket=stack.bucket, Key=result["journal_key"])["Body"].read()
    assert zstandard.ZstdDecompressor().decompressobj().decompress(body) == (
        b"__CURSOR=s=1\nMESSAGE=hello from the journal\n\n"
    )
    man = json.loads(_s3(stack).get_object(Bucket=stack.bucket, Key=result["manifest_key"])["Body"].read())
    assert man["journal"]["key"] == result["journal_key"]
    assert any("-b -1 exited 1: Data from the specified boot" in w for w in man["journal"]["warnings"])
    assert result["warnings"] == 1


def test_sparse_file_is_archived_by_extent_and_restores_identical(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    tree.mkdir()
    sparse = tree / "sparse.img"
    with open(sparse, "wb") as fh:
        fh.truncate(2 * 1024**3)  # 2 GiB of hole ...
        fh.seek(1024**3)
        fh.write(b"data in the middle")  # ... with one extent
    buf = io.BytesIO()
    comp = open_compressor("zstd", buf)
    started = time.monotonic()
    arch = Archiver(comp, clock=time.monotonic)
    arch.add_sources([str(tree)])
    report = arch.finish()
    comp.close()
    assert report.bytes_read <= 2 * 1024**2  # the holes were never read
    import zstandard

    with (
        zstandard.ZstdDecompressor().stream_reader(io.BytesIO(buf.getvalue())) as raw,
        tarfile.open(fileobj=raw, mode="r|") as tf,
    ):
        member = next(m for m in tf if m.name.endswith("sparse.img"))
        assert member.size == 2 * 1024**3
        data = tf.extractfile(member)
        assert data is not None
        left = 1024**3
        while left:  # the first GiB is all zeros, in 8 MiB steps to keep memory small
            chunk = data.read(min(left, 8 * 2**20))
            assert chunk and not chunk.strip(b"\0")
            left -= len(chunk)
        assert data.read(18) == b"data in the middle"
    assert time.monotonic() - started < 120


def test_max_file_size_and_one_file_system_skip_with_warnings(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "big.log").write_bytes(b"x" * 5000)
    (tree / "small.log").write_bytes(b"x" * 10)
    _, report = _archive(tree, max_file_size=1000)
    assert [w.reason for w in report.warnings] == ["5000 bytes is over --max-file-size; skipped"]
    assert report.files == 1
    # /dev/shm is another file system than the tmp dir here (tmpfs): not descended.
    if os.stat("/dev/shm").st_dev != os.stat(tmp_path).st_dev:
        os.symlink("/dev/shm", tree / "shm-link")  # links are stored, never followed
        _, report = _archive(Path("/dev"), one_file_system=True, excludes=["/dev/pts/**"])
        assert any(w.reason.startswith("on another file system") for w in report.warnings)


def test_listing_prefix_stops_at_the_first_per_run_variable() -> None:
    values = {
        "prefix": "fleet/",
        "group": "web asg",
        "instance_id": "i-1",
        "region": "r",
        "timestamp": "T",
        "hostname": "h",
    }
    assert keys.listing_prefix(config.Config.defaults().key_template, values) == "fleet/web_asg/i-1/"
    assert keys.listing_prefix("{prefix}{timestamp}/{instance_id}", values) == "fleet/"
