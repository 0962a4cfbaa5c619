"""The shipping ledger's file, `ship-ledger.jsonl`: its format, its lines, how it is opened.

It is append-only, so recording a segment costs one line whatever the ledger's size (a full
rewrite per segment made shipping many small files take hours):

- the first line names the format and the instance; each later line is one shipped segment
  (its key, sizes and files) or a list of files forgotten (gone from the sources);
- a line is appended with one write() and fsync'd only after the segment and its manifest
  are in S3; a torn last line (a watcher killed mid-write) is ignored when read, and its
  files are shipped again, which S3's create-only write turns into a record only;
- the shipper compacts it when it starts, and while running once it holds many more lines
  than live records (`needs_compaction`; statedir.write_atomic: old or new, never half);
- like every file of the state directory it is opened with O_NOFOLLOW, and created O_EXCL.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
from collections.abc import Generator
from typing import Any

from instance_agent import statedir
from instance_agent.logs import fields

# Its log lines name the logger they always have: the ledger's (shipstate).
log = logging.getLogger("instance_agent.shipstate")

LEDGER_FILE = "ship-ledger.jsonl"
FORMAT = 3


def header(instance_id: str) -> bytes:
    return line({"format": FORMAT, "instance_id": instance_id})


def open_append(state_dir: str, head: bytes) -> int:
    """The ledger opened for appending, created with `head` as its first line if absent."""
    flags = os.O_RDWR | os.O_APPEND
    try:
        fd = statedir.create_exclusive(state_dir, LEDGER_FILE, flags)
    except FileExistsError:
        fd = statedir.open_nofollow(state_dir, LEDGER_FILE, flags)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "not a regular file", LEDGER_FILE)
            # A torn last line (killed mid-append) is ended first, or the next line
            # would be glued to it and lost with it.
            if st.st_size and os.pread(fd, 1, st.st_size - 1) != b"\n":
                os.write(fd, b"\n")
        except OSError:
            os.close(fd)
            raise
        return fd
    try:
        os.write(fd, head)
    except OSError:
        os.close(fd)
        raise
    return fd


def read_lines(state_dir: str) -> Generator[bytes, None, None]:
    """The ledger's lines, read a piece at a time, never through a symlink."""
    fd = statedir.open_nofollow(state_dir, LEDGER_FILE, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb", buffering=2**20) as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", LEDGER_FILE)
        for line in fh:
            yield line.rstrip(b"\n")


def line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def warn_write(err: OSError) -> None:
    log.warning(
        "cannot write the shipping ledger",
        extra=fields(error=err.strerror or errno.errorcode.get(err.errno or 0, str(err))),
    )
