"""instance-agent: back up an EC2 instance before its Auto Scaling group terminates it."""

from __future__ import annotations

__version__ = "0.1.0"
