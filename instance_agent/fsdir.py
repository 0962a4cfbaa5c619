"""Reaching a directory one component at a time through descriptors, never through a
symlink: the shipper opening a file below its source root, and restore writing below its
staging directory, both rely on it so a directory swapped for a link mid-way cannot
redirect them."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_below(fd: int, parts: Sequence[str | bytes], *, create: bool = False) -> int:
    """A new descriptor of directory `parts` below directory `fd` (which stays open), each
    component opened with O_NOFOLLOW (ELOOP or ENOTDIR when one is not a directory), made
    first (0700) when `create`. An OSError names the path, from `parts[0]`, that failed."""
    cur = os.dup(fd)
    try:
        for i, part in enumerate(parts):
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o700, dir_fd=cur)
            try:
                nxt = os.open(part, DIR_FLAGS, dir_fd=cur)
            except OSError as err:
                err.filename = "/".join(os.fsdecode(p) for p in parts[: i + 1])
                raise
            os.close(cur)
            cur = nxt
    except BaseException:
        os.close(cur)
        raise
    return cur
