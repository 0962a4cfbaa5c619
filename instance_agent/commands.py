"""The pre- and post-commands of one termination job: their environment and records.

`hooks.py` runs one command, bounded and cancellable; this module decides which run when,
with what environment (`INSTANCE_AGENT_TRIGGER`, and after the backup its status, key and
bucket), and keeps their records for the result.
"""

from __future__ import annotations

import threading
from typing import Any

from instance_agent import hooks
from instance_agent.config import Config
from instance_agent.result import Result


class Commands:
    """The pre/post commands of one job, each bounded and cancellable."""

    def __init__(self, cfg: Config, trigger: str, cancel: threading.Event) -> None:
        self.cfg = cfg
        self.trigger = trigger
        self.cancel = cancel
        self.records: list[hooks.CommandRecord] = []

    def _env(self, result: Result | None) -> dict[str, str]:
        env = {"INSTANCE_AGENT_TRIGGER": self.trigger}
        if result is not None:
            for name, value in (("status", result.status), ("key", result.key), ("bucket", result.bucket)):
                if value is not None:
                    env[f"INSTANCE_AGENT_{name.upper()}"] = str(value)
        return env

    def pre(self) -> bool:
        """Run the pre-commands; True when all succeeded."""
        done = hooks.run_all(
            self.cfg.pre_command,
            "pre",
            timeout=self.cfg.command_timeout,
            env=self._env(None),
            cancel=self.cancel,
        )
        self.records.extend(done)
        return all(r.ok for r in done)

    def post(self, result: Result) -> None:
        self.records.extend(
            hooks.run_all(
                self.cfg.post_command,
                "post",
                timeout=self.cfg.command_timeout,
                env=self._env(result),
                cancel=self.cancel,
            )
        )

    def as_dicts(self) -> list[dict[str, Any]]:
        return [r.as_dict() for r in self.records]
