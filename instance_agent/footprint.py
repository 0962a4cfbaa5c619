"""A background thread's footprint: the lowest CPU and I/O priority, and freed heap given back."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import threading

# ioprio_set(2): IOPRIO_WHO_PROCESS with a thread id sets that thread's I/O priority;
# class 2 (best effort) level 7 is the lowest that still makes progress on a busy disk.
_IOPRIO_SYSCALL = {"x86_64": 251, "aarch64": 30}
_IOPRIO_WHO_PROCESS, _IOPRIO_CLASS_BE, _IOPRIO_CLASS_SHIFT = 1, 2, 13


def lower_priority() -> None:
    """Nice 19 and best-effort I/O level 7 for the calling thread (Linux: per thread).
    Threads it starts (the upload worker) inherit both."""
    tid = threading.get_native_id()
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, tid, 19)
    number = _IOPRIO_SYSCALL.get(platform.machine())
    if number is not None:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).syscall(
                number, _IOPRIO_WHO_PROCESS, tid, (_IOPRIO_CLASS_BE << _IOPRIO_CLASS_SHIFT) | 7
            )


def release_memory() -> None:
    """Hand the heap freed by a burst of work (a full scan, a backlog shipped) back to the
    kernel: glibc keeps freed memory in its arenas (one per thread that allocated), and an
    idle watcher would go on holding the peak of its first start (Linux: malloc_trim(3))."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)
