"""What one configuration key is (`Option`), and the two commands that read keys.

A key's command-line flag, environment variable and TOML key all derive from its name; the
option table itself is schema.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ENV_PREFIX = "INSTANCE_AGENT_"

BACKUP = "backup"
WATCH = "watch"
BOTH = frozenset({BACKUP, WATCH})


@dataclass(frozen=True)
class Option:
    """One configuration key: its flag, env variable and TOML key all derive from `name`."""

    name: str
    kind: str  # str | int | float | bool | size | list | pathlist | choice
    default: Any
    help: str
    commands: frozenset[str] = BOTH
    choices: tuple[str, ...] = ()
    metavar: str | None = None
    check: Callable[[Any], str | None] | None = None
    negative_flag: bool = False  # bool options get --no-<name> as well

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()
