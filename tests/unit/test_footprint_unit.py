"""footprint.lower_priority: the calling thread, and only it, gets nice 19 and best-effort
I/O level 7, and it says what it could not set (under the installed unit's SystemCallFilter,
setpriority and ioprio_set are refused)."""

from __future__ import annotations

import ctypes
import os
import platform
import threading

import pytest

from instance_agent import footprint


def _ioprio(tid: int) -> int:
    number = {"x86_64": 252, "aarch64": 31}[platform.machine()]  # ioprio_get
    return int(ctypes.CDLL(None, use_errno=True).syscall(number, 1, tid))


@pytest.mark.skipif(platform.machine() not in ("x86_64", "aarch64"), reason="ioprio syscall numbers")
def test_the_calling_thread_gets_the_lowest_priority_and_no_other() -> None:
    seen: dict[str, object] = {}

    def lowered() -> None:
        tid = threading.get_native_id()
        seen["refused"] = footprint.lower_priority()
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, tid)
        seen["ioprio"] = _ioprio(tid)

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    thread = threading.Thread(target=lowered)
    thread.start()
    thread.join()
    assert seen == {"refused": [], "nice": 19, "ioprio": (2 << 13) | 7}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before
