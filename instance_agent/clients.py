"""The AWS clients a job works through, as one bundle of our small client Protocols.

Only the CLI (wiring.py) builds real clients; tests pass fakes of the same Protocols. The
Protocols are named for the type checker only: naming the bundle must not load botocore or
the adapters, so that `--help` and flag parsing stay fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from instance_agent.lifecycle import AutoScalingClient
    from instance_agent.metrics import CloudWatchClient
    from instance_agent.notify import SNSClient
    from instance_agent.s3upload import S3Client


@dataclass
class Clients:
    s3: S3Client
    sns: SNSClient | None = None
    autoscaling: AutoScalingClient | None = None
    cloudwatch: CloudWatchClient | None = None  # None with --no-metrics
