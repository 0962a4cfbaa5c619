"""Files in the state and runtime directories, opened so that nobody else can redirect them.

The agent runs as root. If another user owns (or may write) the state directory, they can
plant `termination-….json.tmp -> /etc/shadow` and root truncates it, or `….lock -> /x` and
root creates a file wherever they like. So, like sshd's StrictModes:

- a directory is used only when it is owned by the agent's effective user and is not
  writable by group or others, and every directory above it is owned by root or by that
  user and is not writable by group or others unless sticky, like /tmp (`usable`);
  otherwise the caller falls back with a warning. A parent somebody else may write lets
  them rename our directory away and put their own in its place between two runs;
- every file in it is opened relative to the directory's descriptor with O_NOFOLLOW, so a
  symlink in its place fails (ELOOP) instead of being followed, and created with O_EXCL where
  it is new;
- a record is replaced atomically: written to a fresh temp file (O_EXCL), fsynced, renamed
  over the old one. rename() replaces a planted symlink itself, never its target.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterable

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


class Untrusted(OSError):
    """The directory is not ours alone; `strerror` says why."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(errno.EPERM, reason, path)


def usable(path: str, *, mode: int = 0o700) -> None:
    """Create `path` (with `mode`) if absent, then raise Untrusted unless it is a directory
    owned by the effective user with no group or other write permission, below parents that
    only root or that user may change (module docstring)."""
    os.makedirs(path, mode=mode, exist_ok=True)
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise Untrusted(path, "not a directory")
    if st.st_uid != os.geteuid():
        raise Untrusted(path, f"owned by uid {st.st_uid}, not by the agent's uid {os.geteuid()}")
    if st.st_mode & 0o022:
        raise Untrusted(path, f"writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})")
    check_parents(path)


def check_parents(path: str) -> None:
    """Raise Untrusted unless every directory above `path` is owned by root or the effective
    user and is not writable by group or others unless sticky (also used for the config file)."""
    # The parents both as written and as resolved: a symlink on the way is only as safe as
    # the directory holding it, and its target's parents are the ones the kernel walks.
    for parent in sorted(_parents(os.path.abspath(path)) | _parents(os.path.realpath(path))):
        _check_parent(path, parent)


def _parents(path: str) -> set[str]:
    """'/a/b/c' -> {'/', '/a', '/a/b'}."""
    out = set()
    while (up := os.path.dirname(path)) != path:
        out.add(up)
        path = up
    return out


def _check_parent(path: str, parent: str) -> None:
    st = os.stat(parent)
    if st.st_uid not in (0, os.geteuid()):
        raise Untrusted(path, f"its parent {parent} is owned by uid {st.st_uid}, not by root or the agent")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise Untrusted(
            path,
            f"its parent {parent} is writable by group or others without the sticky bit "
            f"(mode {stat.S_IMODE(st.st_mode):04o})",
        )


def _dir_fd(path: str) -> int:
    return os.open(path, _DIR_FLAGS)


def open_nofollow(path: str, name: str, flags: int, mode: int = 0o600) -> int:
    """os.open(`name`, flags | O_NOFOLLOW) relative to directory `path`; `name` has no '/'."""
    dfd = _dir_fd(path)
    try:
        return os.open(name, flags | _NOFOLLOW, mode, dir_fd=dfd)
    finally:
        os.close(dfd)


def create_exclusive(path: str, name: str, flags: int = os.O_RDWR, mode: int = 0o600) -> int:
    """Create `name` in `path`, failing (EEXIST) if anything, a symlink included, is there."""
    return open_nofollow(path, name, flags | os.O_CREAT | os.O_EXCL, mode)


def open_or_create(path: str, name: str, mode: int = 0o600) -> int:
    """An existing regular file opened O_RDWR, else a new one created O_EXCL (a lock file)."""
    try:
        fd = create_exclusive(path, name, os.O_RDWR, mode)
    except FileExistsError:
        fd = open_nofollow(path, name, os.O_RDWR)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", os.path.join(path, name))
    return fd


def read(path: str, name: str) -> bytes:
    """The whole of regular file `name` in `path`, never through a symlink."""
    fd = open_nofollow(path, name, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", os.path.join(path, name))
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def write_atomic(path: str, name: str, data: bytes | Iterable[bytes], mode: int = 0o600) -> None:
    """Replace `name` in `path` with `data` (bytes, or pieces written one after another, so
    a large file need not be built in memory first): a fresh O_EXCL temp file, fsync, rename."""
    tmp = f"{name}.{os.getpid()}.tmp"
    dfd = _dir_fd(path)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dfd)  # a stale one of a killed run (or a planted link)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, mode, dir_fd=dfd)
        try:
            try:
                for piece in (data,) if isinstance(data, bytes) else data:
                    view = memoryview(piece)
                    while view:
                        view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)  # a full disk must not keep a half-written temp
            raise
    finally:
        os.close(dfd)
