"""Writing restored files' bytes in a thread of its own, so that parsing the tar stream and
creating the files (the restore's thread) overlaps the kernel's copy of their data.

Profiled on a 1 GiB restore, the thread that parsed headers, created files and wrote their
data was busy the whole time, a third of it inside write() copying into the page cache, while
the read-ahead thread (download and zstd, readahead.py) waited on it half the time; `tar -x`
in the shell pipeline has a core of its own for that. Here the restore's thread opens each
file (through restore_tree, never through a symlink) and hands the descriptor with the file's
pieces of the stream to this thread, which writes them, hashes them on their way when asked
(restore.Written: what `restore --verify` compares), sets the mode and time, and closes it.

Small files (SMALL) are written in the restore's thread itself. Each system call releases
the GIL, and a thread that returns from one while another holds it waits to be woken: with
both threads making five calls a file, 36,000 small files took 1.0-1.07 s to extract into
tmpfs (the restore's thread spent most of it inside os.open, waiting for the GIL back), and
0.72-0.79 s when those files were written where they were opened; GNU tar takes 0.45 s.

The other jobs go in batches (about a MiB, or a few dozen files) through a bounded queue: the
per-file cost stays small and memory stays bounded (the pieces are slices of the read-ahead's
chunks, held until written). The first error stops the writing; every descriptor handed over
is still closed, and the error is raised again, the same object, in the restore's thread at
its next hand-over or at `finish`.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

BATCH_BYTES = 1 << 20
BATCH_FILES = 64
DEPTH = 4  # batches waiting
# A file this small is written in the restore's thread (`write_here`): its write() takes less
# than the two hand-overs of the GIL that a job in this thread costs (see the docstring).
SMALL = 64 << 10


class Hash(Protocol):
    """hashlib's objects, as far as this module uses them."""

    def update(self, data: bytes | memoryview, /) -> None: ...
    def hexdigest(self) -> str: ...


# A file's last job: the mode and mtime to set, then `then(digest hex, inode)` when hashed.
Done = tuple[int, float, Callable[[str, int], None] | None]


@dataclass
class Job:
    """Pieces of one file's data; the last job of a file has `done` set."""

    fd: int
    pieces: list[memoryview] = field(default_factory=list)
    digest: Hash | None = None
    done: Done | None = None


class Writer:
    """The thread that writes; `submit` each Job in a file's order, then `finish`."""

    def __init__(self, depth: int = DEPTH) -> None:
        self._queue: queue.Queue[list[Job] | None] = queue.Queue(maxsize=depth)
        self._batch: list[Job] = []
        self._bytes = 0
        self._files = 0
        self._partial: int | None = None  # a file whose last job is not handed over yet
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="restore-writer", daemon=True)
        self._thread.start()

    def submit(self, job: Job, size: int) -> None:
        """Hand `job` (`size` bytes of pieces) over; from here on the thread owns its fd."""
        self._batch.append(job)
        self._partial = job.fd if job.done is None else None
        self._bytes += size
        self._files += job.done is not None
        if self._bytes >= BATCH_BYTES or self._files >= BATCH_FILES:
            self._flush()

    def _flush(self) -> None:
        if self._error is not None:
            raise self._error
        if self._batch:
            self._queue.put(self._batch)
            self._batch, self._bytes, self._files = [], 0, 0

    def write_here(self, job: Job, done: Done) -> None:
        """Write `job`, the whole of a small file, in the caller's thread, then do what
        `done` says and close it (module docstring). The batch waiting goes to the thread first: a batch
        then holds consecutive pieces of the stream, and so no more than a few of its chunks,
        where small files written here between its jobs would leave a chunk held by each."""
        try:
            self._flush()  # raises the thread's error, if it has one
            _data(job)
        except BaseException:
            os.close(job.fd)
            raise
        _finish(job, done)

    def sync(self) -> None:
        """Wait until everything handed over is written (and raise its error if any): before
        a file is opened again, which would truncate it under writes still queued."""
        self._flush()
        self._queue.join()
        if self._error is not None:
            raise self._error

    def finish(self) -> None:
        """Wait until everything handed over is written and closed; raise its error if any."""
        try:
            self._flush()
        finally:
            self.close()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Stop after what was handed over (written, or only closed after an error)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        for job in self._batch:  # never handed over: still ours to close
            _close(job)
        self._batch = []
        if self._partial is not None:  # the restore stopped in the middle of a file
            os.close(self._partial)
            self._partial = None

    def _run(self) -> None:
        while (batch := self._queue.get()) is not None:
            for job in batch:
                if self._error is not None:
                    _close(job)
                    continue
                try:
                    _write(job)
                except BaseException as err:  # raised again in the restore's thread
                    self._error = err
                    _close(job)
            self._queue.task_done()


def _write(job: Job) -> None:
    _data(job)
    if job.done is not None:
        _finish(job, job.done)


def _data(job: Job) -> None:
    for piece in job.pieces:
        if job.digest is not None:
            job.digest.update(piece)
        while piece:
            piece = piece[os.write(job.fd, piece) :]


def _finish(job: Job, done: Done) -> None:
    mode, mtime, then = done
    try:
        # After the data: writing to a file clears its setuid bit.
        os.fchmod(job.fd, mode)
        os.utime(job.fd, (mtime, mtime))
        if then is not None and job.digest is not None:
            then(job.digest.hexdigest(), os.fstat(job.fd).st_ino)
    finally:
        os.close(job.fd)


def _close(job: Job) -> None:
    if job.done is not None:
        os.close(job.fd)
