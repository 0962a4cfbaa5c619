"""Stream an archive back out of S3 and extract it safely, with no temp file.

Extraction refuses, before writing anything for that member:
- absolute member names and names with a `..` component;
- symlinks and hard links whose target would resolve outside the destination;
- device nodes and FIFOs (a backup never contains them; a hostile archive might);
and strips setuid/setgid/sticky bits unless asked. Files are created with O_NOFOLLOW under
parents that are checked to resolve inside the destination, so a link planted by an earlier
member cannot redirect a later write.
"""

from __future__ import annotations

import gzip
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any, cast

from instance_agent.errors import AgentError

COPY = 1 << 20


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
    skipped: list[str] = field(default_factory=list)


def decompressed(body: IO[bytes], key: str) -> IO[bytes]:
    """A readable stream of the tar inside `body`, by the key's extension."""
    if key.endswith(".zst"):
        import zstandard

        reader: IO[bytes] = zstandard.ZstdDecompressor().stream_reader(body, read_across_frames=True)
        return reader
    if key.endswith(".gz"):
        return cast(IO[bytes], gzip.GzipFile(fileobj=body, mode="rb"))
    return body


def _inside(dest_real: str, path: str) -> bool:
    return path == dest_real or path.startswith(dest_real + os.sep)


def _member_path(dest_real: str, name: str) -> str:
    if name.startswith("/") or ".." in name.split("/"):
        raise UnsafeArchive(f"refusing member {name!r}: absolute or contains '..'")
    target = os.path.normpath(os.path.join(dest_real, name))
    if not _inside(dest_real, target):
        raise UnsafeArchive(f"refusing member {name!r}: outside the destination")
    parent = os.path.realpath(os.path.dirname(target))
    if not _inside(dest_real, parent):
        raise UnsafeArchive(f"refusing member {name!r}: its directory resolves outside the destination")
    return target


def extract(stream: IO[bytes], dest: str, *, allow_setuid: bool = False,
            include: Callable[[str], bool] | None = None) -> RestoreReport:
    os.makedirs(dest, exist_ok=True)
    dest_real = os.path.realpath(dest)
    report = RestoreReport()
    try:
        with tarfile.open(fileobj=stream, mode="r|", errorlevel=2) as tar:
            for member in tar:
                if include is not None and not include(member.name):
                    continue
                _extract_one(tar, member, dest_real, report, allow_setuid)
    except (tarfile.TarError, EOFError) as err:
        raise RestoreError(f"archive is truncated or corrupt: {err}") from None
    except OSError as err:
        raise RestoreError(f"restore failed: {err}") from None
    except Exception as err:
        # zstandard.ZstdError and gzip's BadGzipFile both mean a damaged stream.
        if type(err).__name__ in ("ZstdError", "BadGzipFile"):
            raise RestoreError(f"archive is corrupt: {err}") from None
        raise
    return report


def _extract_one(tar: tarfile.TarFile, member: tarfile.TarInfo, dest_real: str,
                 report: RestoreReport, allow_setuid: bool) -> None:
    path = _member_path(dest_real, member.name.rstrip("/"))
    mode = member.mode & (0o7777 if allow_setuid else 0o777)
    if member.isdir():
        os.makedirs(path, exist_ok=True)
        os.chmod(path, mode | 0o700)  # keep it writable for our own later members
        report.dirs += 1
    elif member.issym():
        link = member.linkname
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), link))
        if link.startswith("/") or not _inside(dest_real, resolved):
            raise UnsafeArchive(f"refusing symlink {member.name!r} -> {link!r}: points outside")
        os.symlink(link, path)
        report.links += 1
    elif member.islnk():
        source = _member_path(dest_real, member.linkname)
        os.link(source, path, follow_symlinks=False)
        report.links += 1
    elif member.isreg():
        _write_file(tar, member, path, mode, report)
    else:
        raise UnsafeArchive(f"refusing member {member.name!r}: device node or FIFO")


def _write_file(tar: tarfile.TarFile, member: tarfile.TarInfo, path: str, mode: int,
                report: RestoreReport) -> None:
    src = tar.extractfile(member)
    if src is None:  # pragma: no cover - isreg() members always have data
        raise RestoreError(f"no data for {member.name!r}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out:
        while chunk := src.read(COPY):
            out.write(chunk)
            report.bytes += len(chunk)
    os.chmod(path, mode)
    os.utime(path, (member.mtime, member.mtime))
    report.files += 1


def restore_s3(s3: Any, bucket: str, key: str, dest: str, **kw: Any) -> RestoreReport:
    body = s3.get_object(Bucket=bucket, Key=key)["Body"]
    return extract(decompressed(body, key), dest, **kw)

