"""A stand-in for Lambda's context object: what the handler reads from it."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field


@dataclass
class LambdaContext:
    """What the handler reads from Lambda's context object."""

    remaining_ms: int = 60_000
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms
