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


def lower_priority() -> list[str]:
    """Nice 19 and best-effort I/O level 7 for the calling thread (Linux: per thread).
    Threads it starts (the upload worker) inherit both. Returns what could not be set, each
    with its reason: the installed unit's SystemCallFilter denies @resources, setpriority
    and ioprio_set among them (kept for its exposure rating), so under systemd the thread
    keeps the unit's Nice=10 and IOSchedulingPriority=7."""
    tid = threading.get_native_id()
    failed: list[str] = []
    try:
        os.setpriority(os.PRIO_PROCESS, tid, 19)
    except OSError as err:
        failed.append(f"nice 19: {err.strerror}")
    number = _IOPRIO_SYSCALL.get(platform.machine())
    if number is not None:
        with contextlib.suppress(OSError, AttributeError):
            level = (_IOPRIO_CLASS_BE << _IOPRIO_CLASS_SHIFT) | 7
            if ctypes.CDLL(None, use_errno=True).syscall(number, _IOPRIO_WHO_PROCESS, tid, level) != 0:
                failed.append(f"I/O priority: {os.strerror(ctypes.get_errno())}")
    return failed


def release_memory() -> None:
    """Hand the heap freed by a burst of work (a full scan, a backlog shipped) back to the
    kernel: glibc keeps freed memory in its arenas (one per thread that allocated), and an
    idle watcher would go on holding the peak of its first start (Linux: malloc_trim(3))."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)
