"""The restore's writer thread and what `restore --verify` takes from it: every byte lands in
its file in order, a member the archive holds twice ends as its last copy, a write error
reaches the restore, and the digests of the bytes written are what verify compares (a file
changed or replaced after it was written is still a difference)."""

from __future__ import annotations

import hashlib
import io
import os
import random
import tarfile
from pathlib import Path

import pytest

from instance_agent import verify
from instance_agent.restore import Written, extract
from instance_agent.restore_write import SMALL, Job, Writer

OLD = 1_600_000_000


def _tar(*members: tuple[str, bytes], link: bool = False) -> io.BytesIO:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o640, OLD
            tar.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo("again")
            info.type, info.linkname = tarfile.LNKTYPE, members[0][0]
            tar.addfile(info)
    out.seek(0)
    return out


def _entries(*members: tuple[str, bytes]) -> list[dict[str, object]]:
    return [
        {
            "path": name,
            "type": "file",
            "size": len(data),
            "mtime": OLD,
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        for name, data in members
    ]


def test_files_big_and_small_restore_byte_for_byte_with_the_digests_of_what_was_written(
    tmp_path: Path,
) -> None:
    rng = random.Random(5)
    members = [(f"d{i % 3}/f{i}", rng.randbytes(rng.choice((0, 7, 3000, 70_000)))) for i in range(300)]
    members.append(("big", rng.randbytes(5 * 2**20 + 3)))
    report = extract(_tar(*members, link=True), str(tmp_path / "dest"), digests=True)
    assert report.files == len(members) and report.written is not None
    for name, data in members:
        path = tmp_path / "dest" / name
        assert path.read_bytes() == data
        assert (path.stat().st_mode & 0o777, path.stat().st_mtime) == (0o640, OLD)
        assert report.written[name.encode()] == Written(hashlib.sha256(data).hexdigest(), path.stat().st_ino)
    # A hard link is another name of the same file, and of the same record.
    assert report.written[b"again"] == report.written[members[0][0].encode()]


def test_a_member_held_twice_ends_as_its_last_copy(tmp_path: Path) -> None:
    """The second copy truncates the file: the first one's writes, still queued in the
    writer's thread, must land before that, not after (where its longer tail would stay)."""
    first, last = b"A" * (3 * 2**20), b"short"
    report = extract(_tar(("f", first), ("g", b"x"), ("f", last)), str(tmp_path / "dest"), digests=True)
    assert (tmp_path / "dest" / "f").read_bytes() == last
    assert report.written is not None and report.written[b"f"].sha256 == hashlib.sha256(last).hexdigest()


def test_a_write_error_reaches_the_restore_and_every_descriptor_is_closed(tmp_path: Path) -> None:
    readonly = os.open(tmp_path / "ro", os.O_RDONLY | os.O_CREAT, 0o600)
    after = os.open(tmp_path / "after", os.O_WRONLY | os.O_CREAT, 0o600)
    writer = Writer()
    writer.submit(Job(readonly, [memoryview(b"data")], done=(0o600, OLD, None)), 4)
    writer.submit(Job(after, [memoryview(b"never written")], done=(0o600, OLD, None)), 13)
    with pytest.raises(OSError) as caught:
        writer.finish()
    assert caught.value.errno == 9  # EBADF: the descriptor was opened read-only
    for fd in (readonly, after):
        with pytest.raises(OSError):
            os.fstat(fd)  # closed by the writer, written or not
    assert (tmp_path / "after").read_bytes() == b""


def test_a_small_file_written_in_the_restores_thread_is_closed_when_its_write_fails(tmp_path: Path) -> None:
    readonly = os.open(tmp_path / "ro", os.O_RDONLY | os.O_CREAT, 0o600)
    writer = Writer()
    with pytest.raises(OSError) as caught:
        writer.write_here(Job(readonly, [memoryview(b"data")]), (0o600, OLD, None))
    assert caught.value.errno == 9
    with pytest.raises(OSError):
        os.fstat(readonly)
    writer.finish()


def test_the_writers_error_reaches_a_small_file_written_after_it_and_its_descriptor_is_closed(
    tmp_path: Path,
) -> None:
    readonly = os.open(tmp_path / "ro", os.O_RDONLY | os.O_CREAT, 0o600)
    small = os.open(tmp_path / "small", os.O_WRONLY | os.O_CREAT, 0o600)
    writer = Writer()
    writer.submit(Job(readonly, [memoryview(b"x" * 100_000)], done=(0o600, OLD, None)), 100_000)
    with pytest.raises(OSError) as first:
        writer.sync()
    with pytest.raises(OSError) as again:
        writer.write_here(Job(small, [memoryview(b"never written")]), (0o600, OLD, None))
    assert again.value is first.value  # the same error, not a new one about this file
    for fd in (readonly, small):
        with pytest.raises(OSError):
            os.fstat(fd)
    assert (tmp_path / "small").read_bytes() == b""
    writer.close()


def test_small_files_across_chunk_ends_among_large_ones_restore_exactly(tmp_path: Path) -> None:
    """Files at most restore_write.SMALL are written where they are opened, the others in the
    writer's thread; the stream's 1 MiB chunks end inside some of each kind."""
    rng = random.Random(7)
    sizes = (1, 4000, SMALL - 1, SMALL, SMALL + 1, 300_000, 2**20 + 5)
    members = [(f"m{i}", rng.randbytes(rng.choice(sizes))) for i in range(120)]
    report = extract(_tar(*members), str(tmp_path / "dest"), digests=True)
    assert report.files == len(members) and report.written is not None
    for name, data in members:
        assert (tmp_path / "dest" / name).read_bytes() == data
        assert report.written[name.encode()].sha256 == hashlib.sha256(data).hexdigest()


def _restored(tmp_path: Path) -> tuple[Path, list[dict[str, object]], dict[bytes, Written]]:
    members = [("a.log", b"alpha\n" * 1000), ("b.log", b"beta\n" * 10)]
    dest = tmp_path / "dest"
    report = extract(_tar(*members), str(dest), digests=True)
    assert report.written is not None
    return dest, _entries(*members), report.written


def test_verify_with_the_written_digests_needs_no_read_and_catches_bytes_unlike_the_manifest(
    tmp_path: Path,
) -> None:
    dest, entries, written = _restored(tmp_path)
    assert verify.compare(str(dest), {"entries": entries}, written=written).differences == []
    # Bytes restore wrote that are not the manifest's (a forged or damaged archive of the
    # same sizes): caught from the digest of what was written, with no file read back.
    forged = {**written, b"a.log": Written("0" * 64, written[b"a.log"].ino)}
    [diff] = verify.compare(str(dest), {"entries": entries}, written=forged).differences
    assert (diff.path, diff.problem) == (b"a.log", "content differs (sha256)")


def test_a_file_changed_or_replaced_after_restore_wrote_it_is_still_a_difference(tmp_path: Path) -> None:
    dest, entries, written = _restored(tmp_path)
    with open(dest / "a.log", "r+b") as fh:  # same size, one byte, mtime now
        fh.write(b"A")
    # Same bytes, another file. The old inode is kept alive by a link outside the tree:
    # freed, ext4 often hands its number straight to the next file made (seen in CI).
    os.link(dest / "b.log", tmp_path / "b.kept")
    (dest / "b.log").unlink()
    (dest / "b.log").write_bytes(b"beta\n" * 10)
    os.utime(dest / "b.log", (OLD, OLD))
    problems = {
        d.path: d.problem
        for d in verify.compare(str(dest), {"entries": entries}, written=written).differences
    }
    assert problems[b"a.log"].startswith("modified since it was restored: its modification time differs")
    assert problems[b"b.log"] == "replaced since it was restored: another file is at its path"
    # What it leaves to `verify`, which reads every byte: a same-size change whose time was
    # set back.
    os.utime(dest / "a.log", (OLD, OLD))
    assert [d.path for d in verify.compare(str(dest), {"entries": entries}, written=written).differences] == [
        b"b.log"
    ]
    assert {d.path: d.problem for d in verify.compare(str(dest), {"entries": entries}).differences} == {
        b"a.log": "content differs (sha256)"
    }
