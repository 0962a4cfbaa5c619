"""SIGTERM and SIGINT as a cancel event, for the one-shot commands.

Nothing runs inside the signal handler: the C-level handler writes the signal number to a
wakeup pipe, and a small thread turns it into `cancel.set()`. Every stage of a run waits on
that event (lock, wait state, drain, archive, commands), so a stop ends the run through
its normal path: the upload aborted, the failure reported, a live action completed with
--on-failure, the one-line `--json` result printed. No exception is raised into whatever
code happened to be running, and no lock can be taken inside a handler.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType

from instance_agent.logs import fields

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def wakeup_only(signum: int, frame: FrameType | None) -> None:
    """A Python-level handler that does nothing: the C-level handler has already written
    the signal number to the wakeup fd, where the signal is really handled."""


def cancel_on_signals(cancel: threading.Event) -> None:
    """From now on SIGTERM/SIGINT set `cancel` (the first one logs; later ones are noted
    but change nothing: clean-up itself must not be cut short). Main thread only."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    for sig in STOP_SIGNALS:
        signal.signal(sig, wakeup_only)

    def watch() -> None:
        while True:
            try:
                data = os.read(read_fd, 64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum not in STOP_SIGNALS:
                    continue
                name = signal.Signals(signum).name
                if cancel.is_set():
                    log.warning("stop signal again: already stopping", extra=fields(signal=name))
                else:
                    log.warning("stop requested: ending the run", extra=fields(signal=name))
                    cancel.set()

    threading.Thread(target=watch, name="signals", daemon=True).start()
