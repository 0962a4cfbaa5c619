"""Which instance this is: its id, its region and its host name."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Identity:
    instance_id: str
    region: str
    hostname: str = field(default_factory=socket.gethostname)
