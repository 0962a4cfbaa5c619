"""The hand-off trigger's flow for one complete hand-off: pick a receiver, send `adopt`.

S3 announces the hand-off's manifest (written last) on EventBridge; `events` turns it into
a `HandoffObject`. Then:

1. The sender's group: DescribeAutoScalingInstances of the instance named in the key (it
   is still in Terminating:Wait: it writes its full backup after the hand-off); once it is
   gone (a late event), the group the key names, if a group of that name exists.
2. The candidates: the group's instances that are InService, never the sender
   (DescribeAutoScalingGroups), whose SSM agent is Online (DescribeInstanceInformation).
3. SendCommand of the adopt document (HANDOFF_DOCUMENT_NAME) to one of them, with the key
   as its only parameter. The first choice is a hash of the key, so a repeated delivery
   asks the same instance; one that SSM refuses (InvalidInstanceId: it went offline in
   between) gives way to the next.

Delivery is at least once (docs/aws-behaviour.md, "S3"): two deliveries may tell two
receivers, and the claim protocol on S3 (instance_agent/handoff.py) lets exactly one
adopt. Nothing here waits for the adoption. With no candidate the hand-off stays unclaimed for the
receivers' own scan (handoff_scan_interval) or a launching instance, and the reason is
published to TOPIC_ARN.
"""

from __future__ import annotations

import hashlib
from typing import Any

from botocore.exceptions import ClientError

from lambda_trigger import events
from lambda_trigger.clients import error_code
from lambda_trigger.logs import fields, log
from lambda_trigger.report import report_result
from lambda_trigger.ssm_flow import DELIVERY_TIMEOUT, Run

IN_SERVICE = "InService"
COMMENT_PREFIX = "instance-agent handoff sha256:"  # + 8 hex digits of the key
MAX_IDS = 50  # instance ids per DescribeInstanceInformation filter and per SendCommand
MAX_TRIES = 3  # receivers tried when SSM refuses one


def comment_for(key: str) -> str:
    return COMMENT_PREFIX + hashlib.sha256(key.encode()).hexdigest()[:8]


def process(run: Run, item: events.HandoffObject) -> dict[str, Any]:
    """Send `adopt KEY` to one receiver; the result dict the handler returns."""
    base: dict[str, Any] = {"key": item.key, "source": item.source}
    document = run.settings.handoff_document
    if not document:
        log.info(
            "hand-off event ignored: HANDOFF_DOCUMENT_NAME is not set", extra=fields(**item.log_fields())
        )
        return {"status": "ignored", "reason": "HANDOFF_DOCUMENT_NAME is not set", **base}
    group = _group_of(run, item.source)
    members = _in_service(run, group or _named_group(item.key), item.source)
    if members is None:
        return _undelivered(run, item, None, "the sender is no longer in an Auto Scaling group")
    group, in_service = members
    base["group"] = group
    candidates = _online(run, in_service)
    if not candidates:
        return _undelivered(run, item, group, "no InService instance with an Online SSM agent")
    refused: list[str] = []
    for receiver in _ranked(candidates, item.key)[:MAX_TRIES]:
        try:
            resp = run.caller.call(
                "SendCommand",
                run.clients.ssm.send_command,
                DocumentName=document,
                InstanceIds=[receiver],
                Parameters={"HandoffKey": [item.key]},
                Comment=comment_for(item.key),
                TimeoutSeconds=DELIVERY_TIMEOUT,
            )
        except ClientError as err:
            if error_code(err) != "InvalidInstanceId":
                raise
            refused.append(receiver)
            continue
        command_id = str(resp["Command"]["CommandId"])
        log.info(
            "adopt command sent",
            extra=fields(command_id=command_id, receiver=receiver, document=document, **item.log_fields()),
        )
        return {"status": "sent", "command_id": command_id, "receiver": receiver, **base}
    return _undelivered(run, item, group, f"SSM refused every receiver tried ({', '.join(refused)})")


def _ranked(candidates: list[str], key: str) -> list[str]:
    """The candidates in order of preference: from a hash of the key, so that a repeated
    delivery picks the same receiver and different hand-offs spread over the group."""
    ordered = sorted(candidates)
    start = int(hashlib.sha256(key.encode()).hexdigest(), 16) % len(ordered)
    return ordered[start:] + ordered[:start]


def _group_of(run: Run, instance_id: str) -> str | None:
    resp = run.caller.call(
        "DescribeAutoScalingInstances",
        run.clients.autoscaling.describe_auto_scaling_instances,
        InstanceIds=[instance_id],
    )
    found = [i for i in resp.get("AutoScalingInstances", []) if i.get("InstanceId") == instance_id]
    return str(found[0]["AutoScalingGroupName"]) if found else None


def _named_group(key: str) -> str:
    """The group as the key names it: the segment before handoff/ (the agent writes the
    group's name there, made safe for a key, which leaves an ordinary name as it is)."""
    return key.split("/")[-4]


def _in_service(run: Run, group: str, sender: str) -> tuple[str, list[str]] | None:
    """The group (None when it does not exist) and its InService instances but the sender."""
    resp = run.caller.call(
        "DescribeAutoScalingGroups",
        run.clients.autoscaling.describe_auto_scaling_groups,
        AutoScalingGroupNames=[group],
    )
    found = [g for g in resp.get("AutoScalingGroups", []) if g.get("AutoScalingGroupName") == group]
    if not found:
        return None
    return group, [
        str(i["InstanceId"])
        for i in found[0].get("Instances", [])
        if i.get("LifecycleState") == IN_SERVICE and i.get("InstanceId") != sender
    ]


def _online(run: Run, instance_ids: list[str]) -> list[str]:
    """Those of `instance_ids` whose SSM agent is Online (PingStatus), paged and chunked."""
    online: list[str] = []
    for start in range(0, len(instance_ids), MAX_IDS):
        kwargs: dict[str, Any] = {
            "Filters": [
                {"Key": "InstanceIds", "Values": instance_ids[start : start + MAX_IDS]},
                {"Key": "PingStatus", "Values": ["Online"]},
            ]
        }
        while True:
            page = run.caller.call(
                "DescribeInstanceInformation", run.clients.ssm.describe_instance_information, **kwargs
            )
            online += [
                str(i["InstanceId"])
                for i in page.get("InstanceInformationList", [])
                if i.get("PingStatus") == "Online" and i.get("InstanceId") in instance_ids
            ]
            if not page.get("NextToken"):
                break
            kwargs["NextToken"] = page["NextToken"]
    return online


def _undelivered(run: Run, item: events.HandoffObject, group: str | None, reason: str) -> dict[str, Any]:
    result: dict[str, Any] = {
        "status": "undelivered",
        "reason": reason,
        "key": item.key,
        "source": item.source,
        "instance_id": item.source,
        "group": group,
    }
    log.warning(
        "hand-off not delivered; left for a receiver's scan", extra=fields(reason=reason, **item.log_fields())
    )
    subject = f"instance-agent: hand-off of {item.source} not delivered"
    report_result(run.caller, run.clients.sns, run.settings.topic_arn, subject, result)
    return result
