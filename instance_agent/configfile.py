"""Reading the config file, which holds the commands root runs before a backup, so that
nobody but root (or the agent's own user) can have written it, and so that a FIFO or a
device in its place fails at once instead of hanging or reading without end; then its TOML,
one flat table of keys the schema knows."""

from __future__ import annotations

import os
import stat
import sys
from typing import Any

from instance_agent import statedir
from instance_agent.errors import ConfigError
from instance_agent.schema import OPTION_BY_NAME

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

# A real config is a few KiB; this bounds what a wrong path (a log, a disk image) can cost.
MAX_BYTES = 1 << 20


class Refused(Exception):
    """The file is not one the agent may trust or read; the message says why."""


def read_trusted(path: str) -> bytes:
    """The bytes of the regular file `path`, after checking it like sshd's StrictModes: owned
    by root or the agent's effective user and writable by neither group nor others, with
    every directory above it (as written and as resolved) passing statedir's parent rule.
    OSError (FileNotFoundError...) passes through for the caller's own message."""
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        # fstat of what was opened, not stat of the name: the name may be swapped in between.
        st = os.fstat(fd)
        if _is_dev_null(st):
            # `--config /dev/null` is the usual way to say "no file"; it reads as empty.
            return b""
        if not stat.S_ISREG(st.st_mode):
            raise Refused("not a regular file")
        if st.st_uid not in (0, os.geteuid()):
            raise Refused(f"owned by uid {st.st_uid}, not by root or the agent's uid {os.geteuid()}")
        if st.st_mode & 0o022:
            raise Refused(f"writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})")
        try:
            statedir.check_parents(path)
        except statedir.Untrusted as err:
            raise Refused(err.strerror) from None
        data = _read_bounded(fd)
    finally:
        os.close(fd)
    return data


def _is_dev_null(st: os.stat_result) -> bool:
    try:
        null = os.stat(os.devnull)
    except OSError:
        return False
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == null.st_rdev


def _read_bounded(fd: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := os.read(fd, 1 << 16):
        size += len(chunk)
        if size > MAX_BYTES:  # it grew after fstat, or st_size lied (procfs)
            raise Refused(f"larger than {MAX_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def read_config(path: str) -> dict[str, Any]:
    """The file's keys and values, read through read_trusted and parsed as TOML: one flat
    table of keys the schema knows. ConfigError (exit 2) names the file and what is wrong."""
    try:
        data: dict[str, Any] = tomllib.loads(read_trusted(path).decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path}: not UTF-8 text") from None
    except Refused as err:
        raise ConfigError(f"config file {path}: {err}") from None
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except OSError as err:
        raise ConfigError(f"config file {path}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path}: invalid TOML: {err}") from None
    for key, value in data.items():
        if key not in OPTION_BY_NAME:
            raise ConfigError(f"config file {path}: unknown key {key!r}")
        if isinstance(value, dict):
            raise ConfigError(f"config file {path}: {key!r} must be a value, not a table")
    return data
