"""Stream an archive back out of S3 and extract it safely, all or nothing, with no temp file.

Safety. Each refusal fails the whole restore before the member writes anything:
- absolute member names and names with a `..` component;
- symlinks whose target is absolute or resolves outside the destination, and hard links to
  anything outside it;
- device nodes and FIFOs (a backup never holds them; a hostile archive might);
- regular files with setuid or setgid bits, unless `allow_setuid`.
Extraction works on descriptors: every member's directory is reached one component at a time
from the staging directory's descriptor (openat with O_NOFOLLOW | O_DIRECTORY), and the member
is created relative to it. So no write ever goes through a symlink, and paths of any length
restore (nothing is ever opened by its full path, which PATH_MAX would limit). Symlinks are
created last, after every target has been checked against the staged tree: lexically inside
the destination, and through no other link (a chain such as `passwd -> b/b/b/../../../../etc`
with `b -> .` resolves differently from how it reads). Ownership is not restored (everything
belongs to the user who restores); modes are, directories' last.

All or nothing. Members go into a staging directory, `DEST/.instance-agent-partial-XXXXXXXX`.
Only when the whole archive has been read and checked are its contents moved into DEST (a
rename each, on the same filesystem); on any failure the staging directory is removed. That is
why DEST must be new or empty. A restore killed outright leaves only that clearly named
directory behind, never a tree that looks complete.

Completeness. Python's tarfile ends quietly at a truncated or garbled header, and zstd's stream
reader ends quietly at a cut frame, so neither alone tells a truncated archive from a short
one. A restore succeeds only when the tar stream ended with its end-of-archive block, the
compressed stream decoded to its very end (zstd and gzip check their checksums there), and,
when the manifest is known, the tar stream is exactly its `totals.tar_bytes` long.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import stat
import tarfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Protocol, cast

from botocore.exceptions import BotoCoreError, ClientError

from instance_agent.readahead import ReadAhead
from instance_agent.restore_stream import Counted, Info, Tar, decompressed, failures
from instance_agent.restore_stream import check_key as check_key
from instance_agent.restore_tree import COPY, Parts, Staged
from instance_agent.restore_tree import RestoreError as RestoreError
from instance_agent.restore_tree import UnsafeArchive as UnsafeArchive
from instance_agent.restore_tree import Written as Written
from instance_agent.restore_tree import check_destination as check_destination
from instance_agent.restore_tree import check_link as check_link
from instance_agent.restore_tree import member_parts as member_parts
from instance_agent.restore_tree import staged as staged
from instance_agent.restore_tree import tree_path as tree_path
from instance_agent.restore_write import Job, Writer
from instance_agent.s3read import S3Reader, s3_failure

_SETID = 0o6000


WrittenFiles = dict[bytes, Written]  # by path in the tree, b"var/log/syslog"


@dataclass
class RestoreReport:
    files: int = 0
    dirs: int = 0
    links: int = 0
    bytes: int = 0
    tar_bytes: int = 0
    excluded: int = 0  # members left out by --include/--exclude
    # Kept only when asked (`digests`): each regular file's Written, by its path in the tree
    # as verify names it.
    written: WrittenFiles | None = None


# Which members to extract: a Selection, or any test of the member name.
Select = Callable[[str], bool]


@dataclass(frozen=True)
class Selection:
    """Which archive members to restore (and to verify).

    A member is selected when it or one of its parent directories matches an include glob
    (or no include is given), and neither it nor a parent matches an exclude glob. Globs are
    matched against the member name as stored, without a leading '/', with fnmatch rules:
    `*` also matches '/'."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.include or self.exclude)

    def __call__(self, name: str) -> bool:
        parts = [p for p in name.split("/") if p]
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]

        def hit(patterns: tuple[str, ...]) -> bool:
            return any(fnmatch.fnmatchcase(c, p.strip("/")) for p in patterns for c in prefixes)

        return (not self.include or hit(self.include)) and not hit(self.exclude)


# --- extraction ---------------------------------------------------------------------------


def extract(
    stream: IO[bytes],
    dest: str,
    *,
    allow_setuid: bool = False,
    select: Select | None = None,
    expected_tar_bytes: int | None = None,
    digests: bool = False,
) -> RestoreReport:
    """Extract the tar `stream` into `dest` (new or empty), all or nothing (module docstring).
    With `digests`, the report says what was written into each file (`Written`)."""
    with staged(dest) as staging:
        extractor = Extractor(staging, allow_setuid=allow_setuid, digests=digests)
        try:
            extractor.add(stream, select=select, expected_tar_bytes=expected_tar_bytes)
            extractor.finish()
        finally:
            extractor.close()
    set_dir_modes(os.path.dirname(staging), extractor.dir_modes)
    return extractor.report


def set_dir_modes(root: str, dir_modes: list[tuple[Parts, int]]) -> None:
    """Last, and deepest first: a read-only directory could not have taken its members, and
    renaming a directory into DEST needs write permission on it."""
    tree = Staged(root)
    try:
        for parts, mode in sorted(dir_modes, key=lambda d: len(d[0]), reverse=True):
            with contextlib.suppress(OSError):  # replaced meanwhile: not ours to chmod
                fd = tree.open_dir(parts, create=False)
                try:
                    os.fchmod(fd, mode)
                finally:
                    os.close(fd)
    finally:
        tree.close()


class Members(Protocol):
    """Which members of a stream are written where, when not all of them are written as
    they are named (restore_held.Held: what a segment holds for the tree)."""

    label: str  # what every error of the stream names first: "segment s3://bucket/key"

    def member(self, run: Extraction, member: tarfile.TarInfo) -> None: ...
    def done(self, into: Extractor) -> None: ...


class Extractor:
    """Tar streams extracted one after another into one staged tree (`root`, new): one
    archive (`extract`), or a final archive and the segments it names (assemble.py), each
    member written straight to its place in the tree. `finish` when every stream is in."""

    def __init__(self, root: str, *, allow_setuid: bool = False, digests: bool = False) -> None:
        self.report = RestoreReport(written={} if digests else None)
        self.allow_setuid = allow_setuid
        self.tree = Staged(root)
        # File data is written in a thread of its own (restore_write.py), one for all streams.
        self.writer = Writer()
        self.dir_modes: list[tuple[Parts, int]] = []
        self.hard_links: list[tuple[bytes, bytes]] = []  # (link, its file), by tree path

    def add(
        self,
        stream: IO[bytes],
        *,
        select: Select | None = None,
        expected_tar_bytes: int | None = None,
        held: Members | None = None,
    ) -> None:
        """Extract the tar `stream`: all of it (`select`ed members), or what `held` says."""
        try:
            with failures():
                tar_bytes = _extract_stream(self, stream, select, held)
                if held is not None:
                    held.done(self)
            if expected_tar_bytes is not None and tar_bytes != expected_tar_bytes:
                raise RestoreError(
                    f"archive is truncated or corrupt: its tar stream is "
                    f"{tar_bytes:,} bytes, the manifest says "
                    f"{expected_tar_bytes:,}"
                )
        except (RestoreError, UnsafeArchive) as err:
            if held is None:
                raise
            raise type(err)(f"{held.label}: {err}") from None
        self.report.tar_bytes += tar_bytes

    def finish(self) -> None:
        """Every file's data written, then the symlinks made (checked against every link of
        every stream); the directories' modes are left to `set_dir_modes`."""
        with failures():
            self.writer.finish()
            self.tree.make_links()
        written = self.report.written
        if written is not None:  # hard links: another name of a file written before
            for link, target in self.hard_links:
                if target in written:
                    written[link] = written[target]

    def close(self) -> None:
        self.writer.close()  # before the descriptors it writes to are gone
        self.tree.close()


@dataclass
class Extraction:
    """One stream's extraction state, shared by the functions below."""

    tar: tarfile.TarFile
    source: Counted
    into: Extractor
    links: dict[Parts, str] = field(default_factory=dict)  # a Members stream's: checked only


def _extract_stream(into: Extractor, stream: IO[bytes], select: Select | None, held: Members | None) -> int:
    """The tar bytes of `stream`, every member extracted (module docstring: Completeness)."""
    # The download and the decompression run ahead in a thread of their own, while this one
    # parses and creates files, and a third writes their data (readahead.py,
    # restore_write.py): the pipeline `s5cmd cat | zstd -d | tar -x` overlaps them the same
    # way, one process each.
    ahead = ReadAhead(stream.read)
    counted = Counted(ahead)
    try:
        with Tar.open(
            fileobj=cast(IO[bytes], counted),
            mode="r:",
            tarinfo=Info,
            errorlevel=2,
            encoding="utf-8",
            errors="surrogateescape",
        ) as tar:
            assert isinstance(tar, Tar)
            run = Extraction(tar, counted, into)
            while (member := tar.next()) is not None:
                # Stream mode keeps every member in a list; nothing here needs them again.
                tar.members.clear()  # type: ignore[attr-defined]
                if select and not select(member.name):
                    into.report.excluded += 1
                    continue
                if held is None:
                    _extract_one(run, member)
                else:
                    held.member(run, member)
            if not tar.ended_cleanly:
                raise RestoreError(
                    "archive is truncated or corrupt: the tar stream has no end-of-archive marker"
                )
        # The rest is zero padding; decoding it to the end is what checks the compressed
        # stream's own checksum, and tells a cut frame from a complete one.
        while counted.read(COPY):
            pass
    finally:
        ahead.close()
    return counted.count


def _extract_one(run: Extraction, member: tarfile.TarInfo) -> None:
    into = run.into
    tree, report = into.tree, into.report
    name = member.name.rstrip("/")
    parts = member_parts(name)
    if member.isdir():
        os.close(tree.open_dir(parts, create=True))  # made, or found a directory (not a link)
        # Setgid and sticky mean something on a directory (group inheritance, /tmp-style
        # deletion); setuid means nothing there and is dropped.
        into.dir_modes.append((parts, member.mode & 0o3777))
        report.dirs += 1
    elif member.issym():
        tree.check_link(parts, member.linkname)  # early, for a clear error; again at the end
        if parts in tree.links:
            raise UnsafeArchive(f"refusing symlink {name!r}: the archive holds it twice")
        tree.links[parts] = member.linkname
        report.links += 1
    elif member.islnk():
        _hard_link(tree, name, parts, member.linkname)
        into.hard_links.append((tree_path(parts), tree_path(member_parts(member.linkname.rstrip("/")))))
        report.links += 1
    elif member.isreg():
        write_file(run, member, parts, file_mode(run, member, name))
    else:
        refuse_kind(member, name)


def both_error(parts: Parts) -> RestoreError:
    """A path the final archive and a segment both hold: a forged or mixed-up backup."""
    return RestoreError(f"{'/'.join(parts)!r} is both in the archive and in a segment")


def file_mode(run: Extraction, member: tarfile.TarInfo, name: str) -> int:
    if member.mode & _SETID and not run.into.allow_setuid:
        raise UnsafeArchive(
            f"refusing {name!r}: setuid/setgid file (mode "
            f"{member.mode & 0o7777:04o}); pass --allow-setuid to restore it"
        )
    return member.mode & (0o6777 if run.into.allow_setuid else 0o777)


def refuse_kind(member: tarfile.TarInfo, name: str) -> None:
    kind = (
        "FIFO"
        if member.isfifo()
        else "device node"
        if member.isdev()
        else f"member of tar type {member.type!r}"
    )
    raise UnsafeArchive(f"refusing {kind} {name!r}: restore writes only files, directories and links")


def _hard_link(tree: Staged, name: str, parts: Parts, linkname: str) -> None:
    refused = UnsafeArchive(
        f"refusing hard link {name!r} -> {linkname!r}: its target is not a file restored before it"
    )
    source = member_parts(linkname.rstrip("/"))
    if source in tree.links:
        raise refused
    try:
        src_dir = tree.open_dir(source[:-1], create=False)
    except (FileNotFoundError, UnsafeArchive):
        raise refused from None
    try:
        try:
            st = os.stat(source[-1], dir_fd=src_dir, follow_symlinks=False)
        except FileNotFoundError:
            raise refused from None
        if not stat.S_ISREG(st.st_mode):
            raise refused
        os.link(
            source[-1], parts[-1], src_dir_fd=src_dir, dst_dir_fd=tree.parent(parts), follow_symlinks=False
        )
    finally:
        os.close(src_dir)


def write_file(
    run: Extraction,
    member: tarfile.TarInfo,
    parts: Parts,
    mode: int,
    *,
    replace: bool = True,
    count: bool = True,
) -> None:
    """`member`'s data into the tree's file `parts`; unless `replace`, that file must be new.
    Counted in the report unless not `count` (restore_held.py counts a segment's files)."""
    into = run.into
    report, writer = into.report, into.writer
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(parts[-1], flags | os.O_EXCL, 0o600, dir_fd=into.tree.parent(parts))
    except FileExistsError:
        if not replace:
            raise both_error(parts) from None
        # The archive holds it twice (or links it): the last one wins, as with tar, once the
        # writes queued for the first have landed, which would otherwise follow the truncation.
        writer.sync()
        fd = os.open(parts[-1], flags | os.O_TRUNC, 0o600, dir_fd=into.tree.parent(parts))
    # The digest of the bytes as they go into the file: `restore --verify` then need not
    # read them back (verify.py).
    digest = hashlib.sha256() if report.written is not None else None
    then = None
    if report.written is not None:
        written, key = report.written, tree_path(parts)

        def then(sha256: str, ino: int) -> None:  # in the writer's thread, once it is done
            written[key] = Written(sha256, ino)

    if member.sparse is None:
        # Straight from the stream's chunks into the file: tarfile's own reader would copy
        # each piece twice more on the way.
        run.source.seek(member.offset_data)
        got = run.source.hand_over(writer, Job(fd, digest=digest), member.size, (mode, member.mtime, then))
        if got != member.size:
            raise RestoreError("archive is truncated or corrupt: unexpected end of data")
        # On past the data's padding to the next header, which tarfile would otherwise reach
        # by a step back and a one-byte read.
        run.source.seek(run.tar.offset)
    else:  # a GNU sparse member (never ours): tarfile maps its holes
        src = run.tar.extractfile(member)
        if src is None:  # pragma: no cover - isreg() members always have data
            os.close(fd)
            raise RestoreError(f"no data for {member.name!r}")
        job = Job(fd, digest=digest)
        while chunk := src.read(COPY):
            job.pieces.append(memoryview(chunk))
            writer.submit(job, len(chunk))
            job = Job(fd, digest=digest)
        job.done = (mode, member.mtime, then)
        writer.submit(job, 0)
    if count:
        report.bytes += member.size
        report.files += 1


# --- from S3 ------------------------------------------------------------------------------


@contextlib.contextmanager
def fetched(
    s3: S3Reader, bucket: str, key: str, extra: Mapping[str, str] | None = None
) -> Iterator[IO[bytes]]:
    """The tar stream of s3://bucket/key, decompressed by the key's extension."""
    check_key(key)
    try:
        body = s3.get_object(Bucket=bucket, Key=key, **(extra or {}))["Body"]
    except (ClientError, BotoCoreError) as err:
        raise s3_failure(err, f"s3://{bucket}/{key}") from None
    try:
        yield decompressed(body, key)
    finally:
        with contextlib.suppress(Exception):
            body.close()


def restore_s3(
    s3: S3Reader,
    bucket: str,
    key: str,
    dest: str,
    *,
    allow_setuid: bool = False,
    select: Select | None = None,
    expected_tar_bytes: int | None = None,
    extra: Mapping[str, str] | None = None,
    digests: bool = False,
) -> RestoreReport:
    """Stream s3://bucket/key down, decompress and extract it into `dest`."""
    check_key(key)  # both fail before anything is fetched
    check_destination(dest)
    with fetched(s3, bucket, key, extra) as stream:
        return extract(
            stream,
            dest,
            allow_setuid=allow_setuid,
            select=select,
            expected_tar_bytes=expected_tar_bytes,
            digests=digests,
        )
