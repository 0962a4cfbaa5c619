"""CloudWatch metrics of one run: what a fleet operator graphs and alarms on.

`publish(cloudwatch, result)` turns the result object of a backup (the one `--json` prints
and SNS carries) into one PutMetricData call in namespace `InstanceAgent`, dimension
`AutoScalingGroupName`:

- `BackupSucceeded`, `BackupPartial`, `BackupFailed`: 1 for the run's status, 0 for the
  others, so that a sum over a period counts runs and a quiet group reads 0, not "no data";
- `LifecycleAbandoned`: 1 when the run completed its lifecycle action with ABANDON;
- `BackupDurationSeconds` and `BytesUploaded`;
- `HandoffsSent`: 1 on a run that wrote a state hand-off (only then: a group without
  hand-offs sends no such datum).

The state hand-off adds two of its own, one datum per call (`publish_one`):
`HandoffsAdopted` (1 per adoption, from the adopter, dimension the group as the key names
it) and `HandoffUnclaimedAgeSeconds` (the age of the oldest unclaimed hand-off of the
group, from a receiver's scan, sent only while there is one: a quiet fleet of 1,000 sends
nothing, and the template's alarm treats missing data as not breaching).

A `duplicate` run publishes nothing: the first run already counted that termination. A run
without a group (an instance outside any Auto Scaling group) publishes nothing either: the
alarm and dashboard are per group. One call: the six data fit in one request (even the
oldest limit was 20 per call), and requests are what CloudWatch bills.

A run that completes a lifecycle action publishes before completing it (`publish_bounded`,
at most `PUBLISH_BOUND` seconds): after CompleteLifecycleAction the group shuts the instance
down, and a metric sent afterwards is lost. A metric never changes a backup's outcome: any
failure is one warning in the log, and the exit code and SNS report stay what the backup
made them. IAM: PutMetricData has no resource-level permissions; the template scopes it
with the `cloudwatch:namespace` condition key instead (https://docs.aws.amazon.com/AmazonCloudWatch/latest/monitoring/iam-cw-condition-keys-namespace.html;
docs/aws-behaviour.md, "SNS, CloudWatch and Lambda").
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, Protocol

from instance_agent.logs import fields

log = logging.getLogger(__name__)

NAMESPACE = "InstanceAgent"
DIMENSION = "AutoScalingGroupName"
COUNTS = {"succeeded": "BackupSucceeded", "partial": "BackupPartial", "failed": "BackupFailed"}
ABANDONED = "LifecycleAbandoned"
DURATION = "BackupDurationSeconds"
BYTES = "BytesUploaded"
HANDOFFS_SENT = "HandoffsSent"
HANDOFFS_ADOPTED = "HandoffsAdopted"
UNCLAIMED_AGE = "HandoffUnclaimedAgeSeconds"
# The wall-clock bound a publish may hold up the lifecycle completion: metrics go out
# before CompleteLifecycleAction (after it the group shuts the instance down, and a
# metric still in flight is lost), but a hanging endpoint must not delay the completion.
PUBLISH_BOUND = 3.0


class CloudWatchClient(Protocol):
    """The one call this module makes (boto3's client satisfies it)."""

    def put_metric_data(self, **kwargs: Any) -> Mapping[str, Any]: ...


def metric_data(result: Mapping[str, Any], *, now: datetime | None = None) -> list[dict[str, Any]]:
    """The MetricData of one run; empty when the run is not to be counted (module docstring)."""
    status, group = result.get("status"), result.get("group")
    if status not in COUNTS or not group:
        return []
    timestamp = now or datetime.now(timezone.utc)
    dimensions = [{"Name": DIMENSION, "Value": str(group)}]

    def datum(name: str, value: float, unit: str) -> dict[str, Any]:
        return {
            "MetricName": name,
            "Dimensions": dimensions,
            "Timestamp": timestamp,
            "Value": float(value),
            "Unit": unit,
        }

    data = [datum(name, 1 if status == key else 0, "Count") for key, name in COUNTS.items()]
    data.append(datum(ABANDONED, 1 if result.get("lifecycle_result") == "ABANDON" else 0, "Count"))
    data.append(datum(DURATION, result.get("duration_s") or 0.0, "Seconds"))
    data.append(datum(BYTES, result.get("bytes_uploaded") or 0, "Bytes"))
    if result.get("handoff_key"):
        data.append(datum(HANDOFFS_SENT, 1, "Count"))
    return data


def publish(cloudwatch: CloudWatchClient | None, result: Mapping[str, Any]) -> bool:
    """Publish the run's metrics; True when they were sent. Never raises."""
    if cloudwatch is None:
        return False
    data = metric_data(result)
    if not data:
        log.debug(
            "no metrics for this run", extra=fields(status=result.get("status"), group=result.get("group"))
        )
        return False
    try:
        cloudwatch.put_metric_data(Namespace=NAMESPACE, MetricData=data)
    except Exception as err:  # any error at all: a metric must never change the outcome
        log.warning(
            "metrics not published", extra=fields(namespace=NAMESPACE, error=f"{type(err).__name__}: {err}")
        )
        return False
    log.info(
        "metrics published",
        extra=fields(namespace=NAMESPACE, group=result.get("group"), status=result.get("status")),
    )
    return True


def publish_bounded(
    cloudwatch: CloudWatchClient | None, result: Mapping[str, Any], bound: float = PUBLISH_BOUND
) -> bool:
    """`publish` in a daemon worker thread, waited on for at most `bound` seconds: True when
    the metrics were sent within it. A publish still running is left behind (it cannot
    change the outcome, and a daemon thread does not hold the process's exit)."""
    if cloudwatch is None:
        return False
    sent: list[bool] = []
    worker = threading.Thread(
        target=lambda: sent.append(publish(cloudwatch, result)), name="metrics", daemon=True
    )
    worker.start()
    worker.join(bound)
    if worker.is_alive():
        log.warning("metrics not published within the bound", extra=fields(bound_s=bound))
        return False
    return bool(sent and sent[0])


STALLED = "ShippingStalled"


def publish_shipping_stalled(cloudwatch: CloudWatchClient | None, group: str | None, stalled: bool) -> bool:
    """`ShippingStalled` (1 when the shipping thread is restarting after an error, 0 once it
    runs again), per group. Sent only on those transitions, so at most one call per restart
    of a backoff that is at least a second; never raises."""
    return publish_one(cloudwatch, group, STALLED, 1.0 if stalled else 0.0, "Count")


def publish_one(
    cloudwatch: CloudWatchClient | None, group: str | None, name: str, value: float, unit: str
) -> bool:
    """One datum of metric `name` for `group`; True when sent. Never raises: a metric must
    never stop shipping, an adoption or a scan."""
    if cloudwatch is None or not group:
        return False
    datum = {
        "MetricName": name,
        "Dimensions": [{"Name": DIMENSION, "Value": group}],
        "Timestamp": datetime.now(timezone.utc),
        "Value": float(value),
        "Unit": unit,
    }
    try:
        cloudwatch.put_metric_data(Namespace=NAMESPACE, MetricData=[datum])
    except Exception as err:  # any error at all: a metric never changes the outcome
        log.warning(
            "metrics not published", extra=fields(namespace=NAMESPACE, error=f"{type(err).__name__}: {err}")
        )
        return False
    return True
