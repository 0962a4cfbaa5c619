"""sd_notify for `Type=notify` units, stdlib only: READY=1, STATUS=, WATCHDOG=1, STOPPING=1.

systemd passes the socket in `NOTIFY_SOCKET`: a filesystem path, or an abstract socket
written with a leading `@` that stands for the NUL byte of the real address. Without
`NOTIFY_SOCKET` (a terminal, a test, another init) every call is a no-op, so the daemon
never has to ask whether it runs under systemd.

Sending never raises: a lost notification must not take the agent down with it. systemd
notices a missing READY=1 or WATCHDOG=1 on its own (start timeout, watchdog timeout).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)

SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"
# Variables that belong to this process only; children (pre/post commands) must not see
# them, or they could speak for us (systemd ignores them with NotifyAccess=main, but a
# child run outside systemd with our environment would not be so lucky).
PRIVATE_ENV = (SOCKET_ENV, WATCHDOG_USEC_ENV, WATCHDOG_PID_ENV)


def socket_address(value: str | None) -> str | None:
    """The AF_UNIX address for a NOTIFY_SOCKET value; None when absent or unsupported."""
    if not value:
        return None
    if value.startswith("@"):
        # Abstract namespace: the kernel name starts with NUL; `@` is only its spelling.
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # e.g. vsock: addresses, which a VM guest agent has no use for


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings: half of WATCHDOG_USEC, as sd_watchdog_enabled(3)
    advises; None when the watchdog is off or meant for another process."""
    env = os.environ if env is None else env
    usec = env.get(WATCHDOG_USEC_ENV, "")
    pid = env.get(WATCHDOG_PID_ENV)
    if pid and pid.strip() != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2 / 1_000_000 if value > 0 else None


def child_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of the environment without the notify variables, for child processes."""
    env = os.environ if env is None else env
    return {k: v for k, v in env.items() if k not in PRIVATE_ENV}


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.address = socket_address(env.get(SOCKET_ENV))
        self._sock: socket.socket | None = None
        self._warned = False
        if self.address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *assignments: str) -> bool:
        """Send `KEY=value` lines in one datagram; True if it was sent."""
        if self._sock is None or self.address is None:
            return False
        try:
            self._sock.sendto("\n".join(assignments).encode(), self.address)
        except OSError as err:
            if not self._warned:  # once: a gone socket would otherwise log every poll
                log.warning("sd_notify failed", extra={"fields": {"error": str(err)}})
                self._warned = True
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *(["STATUS=" + _one_line(status)] if status else []))

    def status(self, text: str) -> bool:
        return self.notify("STATUS=" + _one_line(text))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *(["STATUS=" + _one_line(status)] if status else []))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(text: str) -> str:
    # A newline would start a new assignment in the datagram.
    return " ".join(text.split())
