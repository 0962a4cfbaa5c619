"""The next segment's files: complete files, oldest first, up to a byte and a file budget."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol, TypeVar

from instance_agent.segment import Target

# One segment packs complete files up to this many raw bytes or files, whichever comes
# first: big enough that per-object round trips (multipart create/complete, the manifest
# PUT, the ledger fsync) vanish beside compression and upload, small enough that a
# segment cut short by a termination wastes little.
SEGMENT_BYTES, SEGMENT_FILES = 64 * 2**20, 4096
# batch() picks from the oldest due files this many at most: a segment takes SEGMENT_FILES,
# and the rest leaves room for files skipped as over the byte budget.
CANDIDATES = 4 * SEGMENT_FILES


class Sized(Protocol):
    """What batch() needs of a file's lstat (os.stat_result has it)."""

    @property
    def st_size(self) -> int: ...

    @property
    def st_mtime_ns(self) -> int: ...


class Seen(NamedTuple):
    """A pending file's size and time: a few ints, not a whole os.stat_result, since a
    first start may hold a backlog of hundreds of thousands."""

    st_size: int
    st_mtime_ns: int


T = TypeVar("T", Target, bytes)


def _name(item: Target | bytes) -> bytes:
    return item.path if isinstance(item, Target) else item


def batch(
    due: Sequence[tuple[T, Sized]], max_bytes: int = SEGMENT_BYTES, max_files: int = SEGMENT_FILES
) -> list[T]:
    """The files of the next segment (targets, or their paths): oldest first (then by path,
    so a restarted watcher picks the same batch and its create-only key), as many as fit in
    `max_bytes` and `max_files`. A file larger than the budget goes alone, when it is the
    oldest."""
    order = sorted(due, key=lambda d: (d[1].st_mtime_ns, _name(d[0])))
    out, total = [order[0][0]], order[0][1].st_size
    if total >= max_bytes:
        return out
    for target, st in order[1:]:
        if len(out) >= max_files:
            break
        if total + st.st_size <= max_bytes:
            out.append(target)
            total += st.st_size
    return out
