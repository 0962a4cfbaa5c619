"""Restore cannot escape DEST: hostile archives are refused in one line, with nothing left."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest
import zstandard
from conftest import Stack
from support import scoreboard

from instance_agent import keys, manifest_check
from instance_agent.restore import RestoreError, UnsafeArchive, extract

Member = tuple[str, str, str]  # (name, kind: file|dir|sym|lnk|chr, data or link target)


def _tar(members: list[Member]) -> io.BytesIO:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            info.mode = 0o755 if kind == "dir" else 0o644
            if kind == "file":
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data.encode()))
                continue
            info.type = {
                "dir": tarfile.DIRTYPE,
                "sym": tarfile.SYMTYPE,
                "lnk": tarfile.LNKTYPE,
                "chr": tarfile.CHRTYPE,
            }[kind]
            info.linkname = data
            tar.addfile(info)
    out.seek(0)
    return out


HOSTILE = {
    "symlink chain (passwd through b -> .)": [
        ("d", "dir", ""),
        ("d/passwd", "sym", "b/b/b/../../../../etc/passwd"),
        ("d/b", "sym", "."),
    ],
    "absolute name": [("/etc/cron.d/x", "file", "* * * * * root sh\n")],
    "'..' in a name": [("a/../../x", "file", "x")],
    "hard link to outside": [("a", "dir", ""), ("a/h", "lnk", "../../etc/passwd")],
    "hard link to a file not in the archive": [("h", "lnk", "etc/passwd")],
    "device file": [("null", "chr", "")],
    "absolute symlink": [("l", "sym", "/etc")],
    "symlink then a file through it": [("sub", "dir", ""), ("l", "sym", "sub"), ("l/x", "file", "x")],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archives_are_refused_and_leave_nothing(tmp_path: Path, case: str) -> None:
    dest = tmp_path / "dest"
    with pytest.raises(UnsafeArchive) as info:
        extract(_tar(HOSTILE[case]), str(dest))
    assert "\n" not in str(info.value) and str(info.value).startswith("refusing")
    assert not dest.exists()  # created by the restore, removed with everything in it
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_refused_into_an_existing_empty_dest_leaves_it_empty(tmp_path: Path) -> None:
    with scoreboard.scenario(
        "Restore: the link chain passwd -> b/b/b/../../../../etc/passwd, then b -> ."
    ) as row:
        row.faults = "hostile archive; DEST exists and is empty"
        dest = tmp_path / "dest"
        dest.mkdir()
        with pytest.raises(UnsafeArchive) as info:
            extract(_tar(HOSTILE["symlink chain (passwd through b -> .)"]), str(dest))
        assert list(dest.iterdir()) == []
        assert "passes through the symlink" in str(info.value)
        row.outcome = "refused in one line (target passes through a symlink); DEST left empty"


def test_links_inside_the_tree_still_restore(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    extract(
        _tar(
            [
                ("a", "dir", ""),
                ("a/f", "file", "data"),
                ("a/l", "sym", "f"),
                ("up", "sym", "a/../a/f"),
                ("h", "lnk", "a/f"),
            ]
        ),
        str(dest),
    )
    assert (dest / "a" / "l").read_text() == "data" and os.readlink(dest / "a" / "l") == "f"
    assert (dest / "up").read_text() == "data" and (dest / "h").read_text() == "data"


def test_paths_longer_than_path_max_restore(tmp_path: Path) -> None:
    parts = [f"{i:02d}" + "d" * 198 for i in range(30)]  # about 6,000 bytes, over PATH_MAX
    members: list[Member] = [("/".join(parts[: i + 1]), "dir", "") for i in range(len(parts))]
    members.append(("/".join([*parts, "deep.log"]), "file", "at the bottom\n"))
    dest = tmp_path / "dest"
    report = extract(_tar(members), str(dest))
    assert (report.files, report.dirs) == (1, 30)
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        leaf = os.open("deep.log", os.O_RDONLY, dir_fd=fd)
        assert os.read(leaf, 100) == b"at the bottom\n"
        os.close(leaf)
        assert os.stat(".", dir_fd=fd).st_mode & 0o777 == 0o755  # modes applied by descriptor
    finally:
        os.close(fd)


def test_a_truncated_archive_is_still_a_restore_error(tmp_path: Path) -> None:
    data = _tar([("f", "file", "x" * 5000)]).getvalue()[:1024]
    with pytest.raises(RestoreError):
        extract(io.BytesIO(data), str(tmp_path / "dest"))
    assert not (tmp_path / "dest").exists()


# --- a hostile manifest of an assembled (continuous-shipping) backup ---------------------

INSTANCE = "i-0123456789abcdef0"
PREFIX = f"logs/web/{INSTANCE}/"
FINAL = f"{PREFIX}20260101T000000Z.tar.zst"
SEGMENT = f"{PREFIX}segments/app.log.1-2-3.tar.zst"


def _zst(members: list[Member]) -> bytes:
    return zstandard.ZstdCompressor().compress(_tar(members).getvalue())


def _hostile_manifest(member: str | None, obj: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"path": "app.log", "type": "file", "size": 4, "mode": "0644", "object": obj}
    if member is not None:
        entry["member"] = member
    return {
        "format": 1,
        "key": FINAL,
        "instance_id": INSTANCE,
        "totals": {"held_files": 1},
        "segments": [{"key": obj}],
        "entries": [{"path": "keep.log", "type": "file", "size": 2, "mode": "0644"}, entry],
    }


HOSTILE_MANIFESTS: dict[str, tuple[str | None, str]] = {
    # (member, object); "SENTINEL" is replaced by the sentinel's absolute path.
    "absolute member": ("SENTINEL", SEGMENT),
    "member with '..'": ("../" * 30 + "SENTINEL_REL", SEGMENT),
    "object of another instance": (None, "logs/web/i-0fedcba9876543210/segments/app.log.1-2-3.tar.zst"),
    "object not of segment form": (None, f"{PREFIX}20251231T000000Z.tar.zst"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_MANIFESTS))
def test_a_hostile_manifest_fails_the_restore_and_touches_nothing_outside(
    stack: Stack, tmp_path: Path, case: str
) -> None:
    secret = tmp_path / "home" / ".aws" / "credentials"
    secret.parent.mkdir(parents=True)
    secret.write_bytes(b"aws_secret_access_key = hunter2\n")
    member, obj = HOSTILE_MANIFESTS[case]
    if member is not None:
        member = member.replace("SENTINEL_REL", str(secret).lstrip("/")).replace("SENTINEL", str(secret))
    s3 = stack.client("s3")
    s3.put_object(Bucket=stack.bucket, Key=FINAL, Body=_zst([("keep.log", "file", "ok")]))
    # What the object names exists and holds a file, so only validation can stop it.
    s3.put_object(Bucket=stack.bucket, Key=obj, Body=_zst([("app.log", "file", "evil")]))
    s3.put_object(
        Bucket=stack.bucket,
        Key=FINAL + ".manifest.json",
        Body=json.dumps(_hostile_manifest(member, obj)).encode(),
    )
    dest = tmp_path / "dest"
    shown = (HOSTILE_MANIFESTS[case][0] or "(none)").replace("../" * 30, "../…/")
    shown = shown.replace("SENTINEL_REL", "home/.aws/credentials").replace(
        "SENTINEL", "/home/.aws/credentials"
    )

    with scoreboard.scenario(f"Restore: a hostile manifest of a shipped backup, {case}") as row:
        row.faults = f"entry 'app.log': member {shown}, object {obj}"
        proc = stack.run("restore", f"s3://{stack.bucket}/{FINAL}", str(dest))

        assert proc.returncode == 1, proc.stderr[-2000:]
        line = proc.stderr.strip().splitlines()[-1]
        assert line.startswith("instance-agent: error: refusing the manifest"), line
        assert "'app.log'" in line
        assert secret.read_bytes() == b"aws_secret_access_key = hunter2\n"
        assert not dest.exists() or list(dest.iterdir()) == []
        row.outcome = (
            "exit 1, refused in one line naming the entry; the host's file untouched; DEST left empty"
        )


@pytest.mark.parametrize(
    "template",
    [
        "{prefix}{group}/{instance_id}/{timestamp}",
        "{prefix}{timestamp}-{instance_id}",
        "{prefix}{instance_id}",
    ],
)
def test_the_segment_keys_the_shipper_writes_are_accepted_and_a_neighbours_are_not(template: str) -> None:
    values = {"prefix": "logs/", "group": "web", "instance_id": INSTANCE, "region": "r", "hostname": "h"}
    final = keys.render(template, dict(values, timestamp="20260101T000000Z"), "zstd")
    mine = keys.segment_key(template, values, "app.log", "1-2-3", "zstd")
    other = keys.segment_key(
        template, dict(values, instance_id="i-0fedcba9876543210"), "app.log", "1-2-3", "zstd"
    )
    assert manifest_check.segment_key_problem(final, INSTANCE, mine) is None
    assert manifest_check.segment_key_problem(final, INSTANCE, other) is not None
    assert manifest_check.segment_key_problem(final, "i-0fedcba9876543210", other) is not None


def test_verify_refuses_a_manifest_path_that_leaves_the_tree(stack: Stack, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tmp_path / "secret").write_bytes(b"x")
    doc = tmp_path / "m.manifest.json"
    entry = {"path": "../secret", "type": "file", "size": 1, "mode": "0600"}
    doc.write_text(json.dumps({"format": 1, "entries": [entry]}))
    proc = stack.run("verify", str(tree), "--manifest", str(doc))
    assert proc.returncode == 1, proc.stdout
    line = proc.stderr.strip().splitlines()[-1]
    assert line == "instance-agent: error: refusing the manifest: entry '../secret' has an unsafe path"


# --- a tiny archive whose metadata header declares gigabytes ---------------------------


class _DeclaredHuge(io.RawIOBase):
    """A header block declaring `size` bytes of metadata, then zeros made as they are read:
    what a few hundred KB of zstd expand to, without this test holding them."""

    def __init__(self, header: bytes, size: int) -> None:
        self._header = header
        self._left = size + 2 * 512

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        if self._header:
            n = min(len(view), len(self._header))
            view[:n] = self._header[:n]
            self._header = self._header[n:]
            return n
        n = min(len(view), self._left)
        view[:n] = bytes(n)
        self._left -= n
        return n


@pytest.mark.parametrize(
    ("kind", "fmt", "name"),
    [
        (tarfile.XHDTYPE, tarfile.USTAR_FORMAT, "././@PaxHeader"),
        (tarfile.XGLTYPE, tarfile.USTAR_FORMAT, "././@PaxHeader"),
        (tarfile.GNUTYPE_LONGNAME, tarfile.GNU_FORMAT, "././@LongLink"),
        (tarfile.GNUTYPE_LONGLINK, tarfile.GNU_FORMAT, "././@LongLink"),
    ],
    ids=["pax", "pax-global", "gnu-longname", "gnu-longlink"],
)
def test_a_metadata_header_of_gigabytes_is_refused_before_it_is_read(
    tmp_path: Path, kind: bytes, fmt: int, name: str
) -> None:
    """A pax or GNU long-name header is read whole into memory by tarfile: one declaring
    64 MiB (a real attack would declare gigabytes; zeros compress about 32,000:1) must be
    refused from its header, not after the allocation. The watcher adopts peers' hand-offs
    unattended, so this is a peer's way to kill it."""
    import tracemalloc

    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = 64 << 20
    dest = tmp_path / "dest"
    tracemalloc.start()
    try:
        with pytest.raises(UnsafeArchive) as refused:
            extract(_DeclaredHuge(info.tobuf(fmt), info.size), str(dest))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    line = str(refused.value)
    assert line.startswith("refusing") and "\n" not in line and str(64 << 20) in line, line
    assert peak < 16 << 20, peak
    assert not dest.exists()
