"""The restore's destination, reached only through descriptors: DEST new or empty, the
staging directory inside it (`staged`, all or nothing), member names as components, and
directories, links and files placed in the staged tree (`Staged`) never through a
symlink (restore.py's docstring says why each refusal is there)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

from instance_agent.errors import AgentError, ConfigError
from instance_agent.fsdir import DIR_FLAGS, open_below

COPY = 1 << 20  # 1 MiB reads and writes
STAGING_PREFIX = ".instance-agent-partial-"


class UnsafeArchive(AgentError):
    """The archive tries to write outside the destination, or holds what we never write."""


class RestoreError(AgentError):
    """The archive is truncated or corrupt, or the destination refused a write."""


Parts = tuple[str, ...]


@dataclass(frozen=True)
class Written:
    """What restore wrote into one regular file: the SHA-256 of those bytes, taken as they
    passed through on their way to the file, and the file's inode (so that `restore --verify`
    can tell the very file it wrote from one put at its path since)."""

    sha256: str
    ino: int


def tree_path(parts: Parts) -> bytes:
    """A member's path in the tree as verify names it: b"var/log/syslog"."""
    return os.fsencode("/".join(parts))


def member_parts(name: str) -> Parts:
    """The member name as components; UnsafeArchive for absolute names and '..'."""
    parts = tuple(name.split("/"))
    if name.startswith("/") or ".." in parts:
        raise UnsafeArchive(f"refusing member {name!r}: absolute or contains '..'")
    if "" in parts or "." in parts:  # rare ("a//b", "./a"): most names need no second pass
        parts = tuple(p for p in parts if p not in ("", "."))
    if not parts:
        raise UnsafeArchive(f"refusing member {name!r}: names no path")
    return parts


class Staged:
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
        check_link(self.links, parts, target)

    def make_links(self) -> None:
        for parts, target in self.links.items():
            self.check_link(parts, target)  # against every link of the archive, now known
        for parts, target in self.links.items():
            os.symlink(target, parts[-1], dir_fd=self.parent(parts))


def check_link(links: dict[Parts, str], parts: Parts, target: str) -> None:
    """UnsafeArchive unless `target`, read from the link's directory, stays inside the
    tree and passes through none of the other `links` (only its last component may be one)."""
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
        if i < len(steps) - 1 and tuple(where) in links:
            raise UnsafeArchive(
                f"refusing symlink {name!r} -> {target!r}: its target "
                f"passes through the symlink {'/'.join(where)!r}"
            )


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
