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
import errno
import fnmatch
import gzip
import os
import shutil
import stat
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, cast

from botocore.exceptions import BotoCoreError, ClientError

from instance_agent.errors import AgentError, ConfigError
from instance_agent.fsdir import DIR_FLAGS, open_below
from instance_agent.listing import ARCHIVE_SUFFIXES, S3Reader, s3_failure
from instance_agent.readahead import ReadAhead

COPY = 1 << 20  # 1 MiB reads and writes
# tarfile's header errors, which typeshed leaves out (CPython has had them since 3.2).
_EOF_HEADER: type[Exception] = tarfile.EOFHeaderError  # type: ignore[attr-defined]
_TRUNCATED_HEADER: tuple[type[Exception], ...] = (
    tarfile.EmptyHeaderError,  # type: ignore[attr-defined]
    tarfile.TruncatedHeaderError,  # type: ignore[attr-defined]
)
_INVALID_HEADER: type[Exception] = tarfile.InvalidHeaderError  # type: ignore[attr-defined]
STAGING_PREFIX = ".instance-agent-partial-"
_SETID = 0o6000


class UnsafeArchive(AgentError):
    """The archive tries to write outside the destination, or holds what we never write."""


class RestoreError(AgentError):
    """The archive is truncated or corrupt, or the destination refused a write."""


@dataclass
class RestoreReport:
    files: int = 0
    dirs: int = 0
    links: int = 0
    bytes: int = 0
    tar_bytes: int = 0
    excluded: int = 0  # members left out by --include/--exclude


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


# --- streams ------------------------------------------------------------------------------


def decompressed(body: IO[bytes], key: str) -> IO[bytes]:
    """A readable stream of the tar inside `body`, by the key's extension."""
    if key.endswith(".zst"):
        import zstandard

        reader: IO[bytes] = zstandard.ZstdDecompressor().stream_reader(body, read_across_frames=True)
        return reader
    if key.endswith(".gz"):
        return cast(IO[bytes], gzip.GzipFile(fileobj=body, mode="rb"))
    check_key(key)
    return body


class _Counted:
    """The decompressed tar stream as tarfile reads it, counting its bytes, and turning every
    way the stream can break into one line.

    tarfile reads it as a file (mode "r:"), not through its stream mode, which gathers the
    stream 10 KiB at a time and copies what is left of its buffer on every header: here a
    header is a slice of the current chunk and file data goes from the chunk straight into
    the file (`copy_to`). Seeking goes forward only, skipping what tarfile does not need; the
    one step back tarfile takes (to the byte before the next header) stays in the chunk."""

    def __init__(self, inner: ReadAhead) -> None:
        self._inner = inner
        self._view = memoryview(b"")
        self._pos = 0  # in the current chunk
        self._base = 0  # stream offset of the current chunk
        self.count = 0  # bytes taken from the stream

    def _pull(self) -> bool:
        try:
            data = self._inner.read(COPY)
        except EOFError:
            raise RestoreError("archive is truncated: the compressed stream ends early") from None
        except zlib.error as err:
            raise RestoreError(f"archive is corrupt: {err}") from None
        except (BotoCoreError, ClientError) as err:
            raise RestoreError(f"download failed: {err}") from None
        except OSError as err:  # gzip.BadGzipFile, and connection errors from the body
            raise RestoreError(f"archive is corrupt or the download failed: {err}") from None
        except Exception as err:
            if type(err).__name__ == "ZstdError":  # zstandard's errors have no public base
                raise RestoreError(f"archive is corrupt: {err}") from None
            raise
        if not data:
            return False
        self._base += len(self._view)
        self._view, self._pos = memoryview(data), 0
        self.count += len(data)
        return True

    def _pieces(self, size: int) -> Iterator[memoryview]:
        """Up to `size` bytes as slices of the chunks, consumed as they are yielded."""
        while size > 0:
            if self._pos == len(self._view) and not self._pull():
                return
            n = min(size, len(self._view) - self._pos)
            piece = self._view[self._pos : self._pos + n]
            self._pos += n
            size -= n
            yield piece

    def read(self, size: int = COPY) -> bytes:
        pieces = list(self._pieces(size))
        return bytes(pieces[0]) if len(pieces) == 1 else b"".join(pieces)

    def copy_to(self, fd: int, size: int) -> int:
        """Write the next `size` bytes of the stream into `fd`; how many there were."""
        done = 0
        for piece in self._pieces(size):
            done += len(piece)
            while piece:
                piece = piece[os.write(fd, piece) :]
        return done

    def tell(self) -> int:
        return self._base + self._pos

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_SET or offset < self._base:
            raise RestoreError("archive is corrupt: its tar stream asks to be read backwards")
        while offset > self._base + len(self._view):
            self._pos = len(self._view)
            if not self._pull():
                return self.tell()  # the end: the next read says the data is missing
        self._pos = offset - self._base
        return offset


class _Tar(tarfile.TarFile):
    ended_cleanly = False  # set when the stream ended at an end-of-archive block


class _Info(tarfile.TarInfo):
    """Header parsing that says why a tar stream ended, where tarfile would just stop."""

    @classmethod
    def fromtarfile(cls, tf: tarfile.TarFile) -> _Info:
        try:
            return super().fromtarfile(tf)
        except _EOF_HEADER:
            if isinstance(tf, _Tar):
                tf.ended_cleanly = True
            raise
        except _TRUNCATED_HEADER:
            raise RestoreError("archive is truncated: it ends before its end-of-archive marker") from None
        except _INVALID_HEADER as err:
            raise RestoreError(f"archive is corrupt: a tar header is invalid ({err})") from None


# --- paths --------------------------------------------------------------------------------

Parts = tuple[str, ...]


def _parts(name: str) -> Parts:
    """The member name as components; UnsafeArchive for absolute names and '..'."""
    if name.startswith("/") or ".." in name.split("/"):
        raise UnsafeArchive(f"refusing member {name!r}: absolute or contains '..'")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if not parts:
        raise UnsafeArchive(f"refusing member {name!r}: names no path")
    return parts


class _Staged:
    """The staging directory, reached only through descriptors (module docstring)."""

    def __init__(self, root: str) -> None:
        self.fd = os.open(root, DIR_FLAGS)
        self._cached: tuple[Parts, int] | None = None  # the last member's directory
        self.links: dict[Parts, str] = {}  # symlinks to create last: path -> target

    def close(self) -> None:
        self._drop_cache()
        os.close(self.fd)

    def _drop_cache(self) -> None:
        if self._cached is not None:
            os.close(self._cached[1])
            self._cached = None

    def open_dir(self, parts: Parts, *, create: bool) -> int:
        """A new descriptor of staged directory `parts`, never through a symlink."""
        for i in range(len(parts)):
            if parts[: i + 1] in self.links:
                raise UnsafeArchive(
                    f"refusing {'/'.join(parts)!r}: it passes through the "
                    f"symlink {'/'.join(parts[: i + 1])!r}"
                )
        try:
            return open_below(self.fd, parts, create=create)
        except OSError as err:
            if err.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UnsafeArchive(
                    f"refusing {'/'.join(parts)!r}: {err.filename!r} is not a directory"
                ) from None
            raise

    def parent(self, parts: Parts) -> int:
        """The descriptor of the directory holding `parts` (owned by this object: do not
        close it). Consecutive members mostly share a directory, so the last one is kept."""
        where = parts[:-1]
        if self._cached is None or self._cached[0] != where:
            fd = self.open_dir(where, create=True)
            self._drop_cache()
            self._cached = (where, fd)
        return self._cached[1]

    def check_link(self, parts: Parts, target: str) -> None:
        """UnsafeArchive unless `target`, read from the link's directory, stays inside the
        tree and passes through no other link (only its last component may be one)."""
        name = "/".join(parts)
        if target.startswith("/"):
            raise UnsafeArchive(
                f"refusing symlink {name!r} -> {target!r}: absolute, so it "
                f"points outside the destination (leave it out with --exclude "
                f"{name!r})"
            )
        where = list(parts[:-1])
        steps = [p for p in target.split("/") if p not in ("", ".")]
        for i, step in enumerate(steps):
            if step == "..":
                if not where:
                    raise UnsafeArchive(
                        f"refusing symlink {name!r} -> {target!r}: points "
                        f"outside the destination (leave it out with --exclude "
                        f"{name!r})"
                    )
                where.pop()
                continue
            where.append(step)
            if i < len(steps) - 1 and tuple(where) in self.links:
                raise UnsafeArchive(
                    f"refusing symlink {name!r} -> {target!r}: its target "
                    f"passes through the symlink {'/'.join(where)!r}"
                )

    def make_links(self) -> None:
        for parts, target in self.links.items():
            self.check_link(parts, target)  # against every link of the archive, now known
        for parts, target in self.links.items():
            os.symlink(target, parts[-1], dir_fd=self.parent(parts))


def check_destination(dest: str) -> bool:
    """True when DEST exists (then it is an empty directory). ConfigError otherwise: nothing
    has been done then."""
    if not os.path.lexists(dest):
        return False
    if not os.path.isdir(dest):
        raise ConfigError(f"destination {dest} exists and is not a directory")
    if os.listdir(dest):
        raise ConfigError(
            f"destination {dest} is not empty: restore writes only into a new "
            "or empty directory, so that a failed restore leaves nothing behind"
        )
    return True


def check_key(key: str) -> None:
    if not key.endswith(ARCHIVE_SUFFIXES):
        raise ConfigError(f"{key!r} is not an archive (.tar.zst, .tar.gz or .tar)")


def prepare_destination(dest: str) -> tuple[str, bool]:
    """DEST as a real path, created if absent; (path, whether we created it)."""
    path = os.path.abspath(dest)
    if check_destination(path):
        return os.path.realpath(path), False
    try:
        os.makedirs(path)
    except OSError as err:
        raise ConfigError(f"cannot create destination {dest}: {err.strerror}") from None
    return os.path.realpath(path), True


# --- extraction ---------------------------------------------------------------------------


@contextlib.contextmanager
def staged(dest: str, tree: str = "") -> Iterator[str]:
    """A fresh staging directory inside DEST (new or empty), all or nothing: on a clean exit
    the content of its `tree` subdirectory moves into DEST and the staging directory is
    removed; on any failure it is removed, and DEST too when this created it."""
    root, created = prepare_destination(dest)
    staging = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=root)
    try:
        yield staging
        done = os.path.join(staging, tree)
        for name in os.listdir(done):
            target = os.path.join(root, name)
            if os.path.lexists(target):
                raise RestoreError(f"{target} appeared during the restore; nothing was moved")
        for name in os.listdir(done):
            os.rename(os.path.join(done, name), os.path.join(root, name))
        shutil.rmtree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(root)
        raise


def extract(
    stream: IO[bytes],
    dest: str,
    *,
    allow_setuid: bool = False,
    select: Select | None = None,
    expected_tar_bytes: int | None = None,
) -> RestoreReport:
    """Extract the tar `stream` into `dest` (new or empty), all or nothing (module docstring)."""
    with staged(dest) as staging:
        report, dir_modes = _extract_into(stream, staging, allow_setuid, select)
        if expected_tar_bytes is not None and report.tar_bytes != expected_tar_bytes:
            raise RestoreError(
                f"archive is truncated or corrupt: its tar stream is "
                f"{report.tar_bytes:,} bytes, the manifest says "
                f"{expected_tar_bytes:,}"
            )
    root = os.path.dirname(staging)
    # Last, and deepest first: a read-only directory could not have taken its members, and
    # renaming a directory into DEST needs write permission on it.
    tree = _Staged(root)
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
    return report


def _extract_into(
    stream: IO[bytes], root: str, allow_setuid: bool, select: Select | None
) -> tuple[RestoreReport, list[tuple[Parts, int]]]:
    report = RestoreReport()
    dir_modes: list[tuple[Parts, int]] = []
    # The download and the decompression run ahead in a thread of their own, while this one
    # parses and writes (readahead.py): the pipeline `s5cmd cat | zstd -d | tar -x` overlaps
    # them the same way, one process each.
    ahead = ReadAhead(stream.read)
    counted = _Counted(ahead)
    tree = _Staged(root)
    try:
        with _Tar.open(
            fileobj=cast(IO[bytes], counted),
            mode="r:",
            tarinfo=_Info,
            errorlevel=2,
            encoding="utf-8",
            errors="surrogateescape",
        ) as tar:
            assert isinstance(tar, _Tar)
            while (member := tar.next()) is not None:
                # Stream mode keeps every member in a list; nothing here needs them again.
                tar.members.clear()  # type: ignore[attr-defined]
                if select and not select(member.name):
                    report.excluded += 1
                    continue
                _extract_one(tar, counted, member, tree, report, allow_setuid, dir_modes)
            if not tar.ended_cleanly:
                raise RestoreError(
                    "archive is truncated or corrupt: the tar stream has no end-of-archive marker"
                )
            tree.make_links()
        # The rest is zero padding; decoding it to the end is what checks the compressed
        # stream's own checksum, and tells a cut frame from a complete one.
        while counted.read(COPY):
            pass
    except tarfile.TarError as err:
        raise RestoreError(f"archive is truncated or corrupt: {err}") from None
    except EOFError:
        raise RestoreError("archive is truncated: the stream ends early") from None
    except OSError as err:
        where = f": {err.filename}" if err.filename else ""
        raise RestoreError(f"restore failed{where}: {err.strerror or err}") from None
    finally:
        tree.close()
        ahead.close()
    report.tar_bytes = counted.count
    return report, dir_modes


def _extract_one(
    tar: tarfile.TarFile,
    source: _Counted,
    member: tarfile.TarInfo,
    tree: _Staged,
    report: RestoreReport,
    allow_setuid: bool,
    dir_modes: list[tuple[Parts, int]],
) -> None:
    name = member.name.rstrip("/")
    parts = _parts(name)
    if member.isdir():
        os.close(tree.open_dir(parts, create=True))  # made, or found a directory (not a link)
        # Setgid and sticky mean something on a directory (group inheritance, /tmp-style
        # deletion); setuid means nothing there and is dropped.
        dir_modes.append((parts, member.mode & 0o3777))
        report.dirs += 1
    elif member.issym():
        tree.check_link(parts, member.linkname)  # early, for a clear error; again at the end
        if parts in tree.links:
            raise UnsafeArchive(f"refusing symlink {name!r}: the archive holds it twice")
        tree.links[parts] = member.linkname
        report.links += 1
    elif member.islnk():
        _hard_link(tree, name, parts, member.linkname)
        report.links += 1
    elif member.isreg():
        if member.mode & _SETID and not allow_setuid:
            raise UnsafeArchive(
                f"refusing {name!r}: setuid/setgid file (mode "
                f"{member.mode & 0o7777:04o}); pass --allow-setuid to restore it"
            )
        _write_file(
            tar, source, member, tree, parts, member.mode & (0o6777 if allow_setuid else 0o777), report
        )
    else:
        kind = (
            "FIFO"
            if member.isfifo()
            else "device node"
            if member.isdev()
            else f"member of tar type {member.type!r}"
        )
        raise UnsafeArchive(f"refusing {kind} {name!r}: restore writes only files, directories and links")


def _hard_link(tree: _Staged, name: str, parts: Parts, linkname: str) -> None:
    refused = UnsafeArchive(
        f"refusing hard link {name!r} -> {linkname!r}: its target is not a file restored before it"
    )
    source = _parts(linkname.rstrip("/"))
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


def _write_file(
    tar: tarfile.TarFile,
    source: _Counted,
    member: tarfile.TarInfo,
    tree: _Staged,
    parts: Parts,
    mode: int,
    report: RestoreReport,
) -> None:
    fd = os.open(
        parts[-1],
        os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
        dir_fd=tree.parent(parts),
    )
    try:
        if member.sparse is None:
            # Straight from the stream's chunks into the file: tarfile's own reader would
            # copy each piece twice more on the way.
            source.seek(member.offset_data)
            written = source.copy_to(fd, member.size)
            if written != member.size:
                raise RestoreError("archive is truncated or corrupt: unexpected end of data")
        else:  # a GNU sparse member (never ours): tarfile maps its holes
            src = tar.extractfile(member)
            if src is None:  # pragma: no cover - isreg() members always have data
                raise RestoreError(f"no data for {member.name!r}")
            while chunk := src.read(COPY):
                while chunk:
                    chunk = chunk[os.write(fd, chunk) :]
            written = member.size
        report.bytes += written
        # After the data: writing to a file clears its setuid bit.
        os.fchmod(fd, mode)
        os.utime(fd, (member.mtime, member.mtime))
    finally:
        os.close(fd)
    report.files += 1


# --- from S3 ------------------------------------------------------------------------------


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
) -> RestoreReport:
    """Stream s3://bucket/key down, decompress and extract it into `dest`."""
    check_key(key)  # both fail before anything is fetched
    check_destination(dest)
    try:
        body = s3.get_object(Bucket=bucket, Key=key, **(extra or {}))["Body"]
    except (ClientError, BotoCoreError) as err:
        raise s3_failure(err, f"s3://{bucket}/{key}") from None
    try:
        return extract(
            decompressed(body, key),
            dest,
            allow_setuid=allow_setuid,
            select=select,
            expected_tar_bytes=expected_tar_bytes,
        )
    finally:
        with contextlib.suppress(Exception):
            body.close()


class Placer:
    """Puts regular files at member names of the tree at `root` (its directories created as
    needed, none of them through a symlink): moved, or copied with their mode and time. Used
    to assemble continuous-shipping segments into one tree. One descriptor of the tree is
    kept for all of them, and the last file's directory with it: files of one segment mostly
    share directories, and reaching each from the root again was about 20 syscalls a file."""

    def __init__(self, root: str) -> None:
        self._tree = _Staged(root)

    def close(self) -> None:
        self._tree.close()

    def __enter__(self) -> Placer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def place(self, member: str, src: str, *, move: bool) -> None:
        parts = _parts(member.rstrip("/"))
        fd = self._tree.parent(parts)
        try:
            os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            pass
        else:
            raise RestoreError(f"{member!r} is both in the archive and in a segment")
        if move:
            os.rename(src, parts[-1], dst_dir_fd=fd)
            return
        st = os.stat(src)
        out = os.open(
            parts[-1],
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=fd,
        )
        with open(src, "rb") as fin, os.fdopen(out, "wb") as fout:
            shutil.copyfileobj(fin, fout, COPY)
            fout.flush()
            os.fchmod(out, stat.S_IMODE(st.st_mode))
            os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
