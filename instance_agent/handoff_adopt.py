"""The receiver's side of a state hand-off: `instance-agent adopt KEY`, exactly once.

    read the claims ─► decide (handoff.decide) ─► write the claim (create-only)
        ─► check the manifest ─► restore + verify into a staging dir ─► inbox/<source>
        ─► handoff_command (timeout) ─► write KEY.adopted (create-only) ─► SNS report

Only the receiver whose create-only claim S3 accepted goes past the claim. Everything it
restores goes through restore.py's safe extractor into a staging directory inside the
inbox, and is compared with the manifest (every file's sha256: the sender writes them)
before it moves to `inbox/<source>`: an altered or truncated archive, or a manifest naming
a path outside the tree, leaves nothing under the inbox and is never marked adopted.

A failing handoff_command leaves the hand-off claimed but not adopted, with a create-only
KEY.failed.<generation> marker: the next claimant after the lease tries once more
(handoff.MAX_FAILURES), then it is given up and reported.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol, cast

from botocore.exceptions import BotoCoreError, ClientError

from instance_agent import (
    awserror,
    handoff,
    hooks,
    listing,
    manifest_check,
    metrics,
    notify,
    restore,
    s3args,
    status,
    verify,
)
from instance_agent.clients import Clients
from instance_agent.config import Config
from instance_agent.errors import AgentError, ConfigError, NotifyError
from instance_agent.identity import Identity
from instance_agent.logs import fields
from instance_agent.s3upload import CREATE_ONLY, extra_for

log = logging.getLogger(__name__)

# S3 answers a create-only write that met an existing object with 412, and one that raced
# another in-flight conditional write of the same key with 409 (conditional-writes.html,
# module docstring of handoff.py; docs/aws-behaviour.md, "S3"). Either way this receiver did
# not write the claim.
_LOST_RACE = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


def lease_margin(lease: float) -> float:
    """What must be left of a claim's lease when handoff_command would end: room for the
    adopted marker's PutObject, and for clocks a little apart."""
    return min(30.0, lease / 10)


class HandoffRefused(AgentError):
    """The hand-off is unsafe (altered, truncated, paths outside the inbox), its command
    failed, or it was given up: never adopted by this run."""


class _Lost(Exception):
    """A create-only write of ours met another's object."""


def adopt(
    cfg: Config,
    ident: Identity,
    clients: Clients,
    key: str,
    *,
    role: str = "running",
    now: Callable[[], float] = time.time,
    cancel: threading.Event | None = None,
) -> dict[str, Any]:
    """Adopt hand-off `key` if this receiver wins it; the result (`status` is adopted,
    already-adopted or claimed-elsewhere). Raises HandoffRefused or ConfigError."""
    try:
        source = handoff.source_of(key)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if not handoff.may_receive(cfg.handoff_to, role):
        raise ConfigError(f"handoff_to = {cfg.handoff_to}: a {role} instance does not adopt hand-offs")
    if source == ident.instance_id:
        raise ConfigError(f"{key} is this instance's own hand-off")
    s3, bucket = clients.s3, cfg.bucket or ""
    out: dict[str, Any] = {"key": key, "source": source, "adopter": ident.instance_id}
    dest = os.path.join(cfg.inbox(), source)
    # Before the claim: a receiver that could not restore must not hold the hand-off for a
    # lease (an earlier attempt of this instance whose command failed left its tree here).
    restore.check_destination(dest)
    verdict = handoff.decide(*_state(s3, bucket, key, cfg), now=now())
    if verdict.action == handoff.DONE:
        return {**out, "status": "already-adopted"}
    if verdict.action == handoff.HELD:
        assert verdict.holder is not None
        return {
            **out,
            "status": "claimed-elsewhere",
            "holder": verdict.holder.instance_id,
            "expires_in_s": round(verdict.expires_in, 1),
        }
    if verdict.action == handoff.GIVE_UP:
        raise HandoffRefused(f"{key}: handoff_command failed {handoff.MAX_FAILURES} times; given up")
    # Read and check the manifest before claiming: a hand-off whose sender died before its
    # manifest, or whose manifest is unsafe, is never held for a lease.
    manifest = _checked_manifest(s3, bucket, key, source, cfg)
    generation = verdict.generation
    claimed_at = now()
    claim = {"instance_id": ident.instance_id, "generation": generation, "claimed_at": claimed_at}
    try:
        _put_create_only(
            s3, bucket, handoff.claim_key(key, generation), {**claim, "lease_s": cfg.handoff_lease}, cfg
        )
    except _Lost:
        return {**out, "status": "claimed-elsewhere"}
    log.info("hand-off claimed", extra=fields(key=key, generation=generation))
    out["generation"] = generation
    if _adopted(s3, bucket, key, cfg):
        # The holder of the lease before ours finished just as it ran out.
        return {**out, "status": "already-adopted"}
    out.update(_restore(s3, bucket, key, manifest, dest, cfg))
    if cfg.handoff_command:
        if now() + cfg.handoff_timeout + lease_margin(cfg.handoff_lease) > claimed_at + cfg.handoff_lease:
            # Another receiver may claim the next generation before the command could end.
            raise HandoffRefused(
                f"{key}: too little of the claim's lease is left to run handoff_command; restored "
                f"into {dest}, not adopted"
            )
        if _adopted(s3, bucket, key, cfg):
            return {**out, "status": "already-adopted"}
        record = hooks.run(
            cfg.handoff_command,
            "handoff",
            timeout=cfg.handoff_timeout,
            env={
                "INSTANCE_AGENT_HANDOFF_INBOX": dest,
                "INSTANCE_AGENT_HANDOFF_SOURCE": source,
                "INSTANCE_AGENT_HANDOFF_KEY": key,
            },
            cancel=cancel,
        )
        out["command"] = record.as_dict()
        if not record.ok:
            with _suppress_lost():
                _put_create_only(
                    s3, bucket, handoff.failed_key(key, generation), {**claim, "error": record.error}, cfg
                )
            raise HandoffRefused(
                f"{key}: handoff_command failed ({record.error or f'exit {record.exit_code}'}); "
                "left claimed, not adopted"
            )
    try:
        _put_create_only(s3, bucket, handoff.adopted_key(key), {**claim, "adopted_at": now()}, cfg)
    except _Lost:
        raise HandoffRefused(f"{key}: another receiver marked it adopted first") from None
    log.info("hand-off adopted", extra=fields(key=key, source=source, dest=dest))
    status.write_adoption(cfg.state_dir, out)
    metrics.publish_one(clients.cloudwatch, handoff.group_of(key), metrics.HANDOFFS_ADOPTED, 1, "Count")
    return {**out, "status": "adopted"}


def at_launch(
    cfg: Config,
    ident: Identity,
    clients: Clients,
    group: str,
    *,
    now: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any] | None:
    """The launch gate's adoption: one claimable hand-off of `group`, oldest first, from one
    listing of its handoff/ prefix. With handoff_wait, while nothing is claimable and an
    instance of the group is still in Terminating:Wait (a sender that may not have written
    its hand-off yet), it lists again every WAIT_POLL seconds until handoff_wait is over.
    Never raises: a hand-off that cannot be adopted here (unsafe, its command failed) is
    reported and stays for another receiver, and the new instance still goes in service.
    The result, or None when there was nothing to adopt."""
    if not cfg.handoff_path or not handoff.may_receive(cfg.handoff_to, "launching"):
        return None
    deadline = now() + cfg.handoff_wait
    while True:
        listed = list_group(cfg, clients, group)
        if listed is None:
            return None
        result = adopt_first(cfg, ident, clients, listed, role="launching", now=now())
        left = deadline - now()
        if result is not None or left <= 0 or not _senders_waiting(clients, group, ident.instance_id):
            return result
        log.info(
            "waiting for a hand-off from a terminating instance",
            extra=fields(group=group, left_s=round(left, 1)),
        )
        sleep(min(WAIT_POLL, left))


WAIT_POLL = 2.0  # seconds between listings while the launch gate waits (handoff_wait)


def list_group(cfg: Config, clients: Clients, group: str) -> dict[str, float] | None:
    """One listing of the group's handoff/ prefix (key -> LastModified), None (logged) when
    S3 refused it."""
    prefix = handoff.group_prefix(cfg.prefix, group)
    try:
        return {
            str(o["Key"]): o["LastModified"].timestamp()
            for o in listing.iter_objects(clients.s3, cfg.bucket or "", prefix, extra=s3args.owner_args(cfg))
        }
    except AgentError as err:
        log.error("cannot look for hand-offs", extra=fields(prefix=prefix, error=str(err)))
        return None


def adopt_first(
    cfg: Config,
    ident: Identity,
    clients: Clients,
    listed: Mapping[str, float],
    *,
    role: str,
    now: float,
    min_age: float = 0.0,
) -> dict[str, Any] | None:
    """Adopt the oldest claimable hand-off of a listing (none of this instance's, none whose
    manifest is younger than `min_age`); reported on SNS. The result of the adoption or
    refusal, or None when nothing was adopted (nothing there, or each one held elsewhere)."""
    for key in handoff.unclaimed(listed, now, cfg.handoff_lease):
        if handoff.source_of(key) == ident.instance_id:
            continue
        if now - listed.get(key + listing.MANIFEST_SUFFIX, now) < min_age:
            continue
        try:
            result = adopt(cfg, ident, clients, key, role=role)
        except AgentError as err:
            log.error("hand-off not adopted", extra=fields(key=key, role=role, error=str(err)))
            refused = {"event": "handoff_refused", "status": "refused", "instance_id": ident.instance_id}
            report(cfg, clients, {**refused, "key": key, "adopter": ident.instance_id, "error": str(err)})
            return {**refused, "key": key, "error": str(err)}
        if result["status"] == "adopted":
            report(cfg, clients, {"event": "handoff_adopted", "instance_id": ident.instance_id, **result})
            return result
    return None


def _senders_waiting(clients: Clients, group: str, me: str) -> bool:
    """Whether another instance of `group` is in Terminating:Wait (DescribeAutoScalingGroups)."""
    if clients.autoscaling is None:
        return False
    try:
        # boto3's client has it; lifecycle.AutoScalingClient (the Protocol) names only the
        # calls of the termination job.
        groups = cast(_DescribesGroups, clients.autoscaling)
        resp = groups.describe_auto_scaling_groups(AutoScalingGroupNames=[group])
    except (ClientError, BotoCoreError) as err:
        log.warning("cannot tell whether a sender is terminating", extra=fields(error=str(err)))
        return False
    return any(
        i.get("LifecycleState") == TERMINATING_WAIT and i.get("InstanceId") != me
        for g in resp.get("AutoScalingGroups", [])
        for i in g.get("Instances", [])
    )


TERMINATING_WAIT = "Terminating:Wait"


class _DescribesGroups(Protocol):
    def describe_auto_scaling_groups(self, **kwargs: Any) -> Mapping[str, Any]: ...


def report(cfg: Config, clients: Clients, body: Mapping[str, Any]) -> None:
    """The SNS report of an adoption or a refusal (never fatal)."""
    if not cfg.topic_arn or clients.sns is None:
        return
    try:
        notify.publish(clients.sns, cfg.topic_arn, body)
    except NotifyError as err:
        log.error("report not published", extra=fields(error=str(err)))


def _state(s3: Any, bucket: str, key: str, cfg: Config) -> tuple[list[handoff.Claim], int, bool]:
    """Every claim (the newest one read), the failed generations, and whether adopted."""
    objects = list(listing.iter_objects(s3, bucket, key + ".", extra=s3args.owner_args(cfg)))
    adopted = any(str(o["Key"]) == handoff.adopted_key(key) for o in objects)
    failures = sum(1 for o in objects if handoff.generation_of(key, str(o["Key"]), handoff.FAILED))
    claims: list[handoff.Claim] = []
    for o in objects:
        generation = handoff.generation_of(key, str(o["Key"]))
        if generation is not None:
            # S3's own clock dates the claim: the claimant's body cannot stretch its lease.
            claims.append(handoff.Claim(generation, "", o["LastModified"].timestamp(), cfg.handoff_lease))
    if claims:
        newest = max(claims, key=lambda c: c.generation)
        body = _read_json(s3, bucket, handoff.claim_key(key, newest.generation), cfg)
        lease = body.get("lease_s")
        # The body may shorten the lease, never stretch it past ours: a peer's claim of
        # `"lease_s": Infinity` (json.loads takes it) held every hand-off it named for ever.
        own = cfg.handoff_lease
        if isinstance(lease, (int, float)) and not isinstance(lease, bool) and 0 < lease <= own:
            own = float(lease)
        claims[claims.index(newest)] = handoff.Claim(
            newest.generation, str(body.get("instance_id") or "?"), newest.claimed_at, own
        )
    return claims, failures, adopted


def _checked_manifest(s3: Any, bucket: str, key: str, source: str, cfg: Config) -> dict[str, Any]:
    """The hand-off's manifest, whole, once it is known to name only paths inside the tree."""
    extra = s3args.owner_args(cfg)
    manifest = listing.read_manifest(s3, bucket, key + listing.MANIFEST_SUFFIX, extra)
    if manifest.get("instance_id") != source:
        raise HandoffRefused(f"{key}: the manifest is not {source}'s hand-off; nothing was restored")
    try:
        manifest_check.check(key, manifest)
        if any(isinstance(e, dict) and e.get("object") for e in manifest.get("entries") or []):
            raise manifest_check.UnsafeManifest("refusing the manifest: a hand-off names no other object")
    except manifest_check.UnsafeManifest as err:
        raise HandoffRefused(f"{key}: {err}; nothing was restored") from None
    return manifest


def _restore(
    s3: Any, bucket: str, key: str, manifest: Mapping[str, Any], dest: str, cfg: Config
) -> dict[str, Any]:
    """The archive into `dest` (new or empty), verified against its manifest; all or nothing."""
    extra = s3args.owner_args(cfg)
    totals = manifest.get("totals") if isinstance(manifest.get("totals"), dict) else {}
    tar_bytes = totals.get("tar_bytes") if isinstance(totals, dict) else None
    os.makedirs(cfg.inbox(), mode=0o700, exist_ok=True)
    try:
        with restore.staged(dest, "tree") as staging:
            tree = os.path.join(staging, "tree")
            done = restore.restore_s3(
                s3,
                bucket,
                key,
                tree,
                expected_tar_bytes=tar_bytes if isinstance(tar_bytes, int) else None,
                extra=extra,
            )
            checked = verify.compare(tree, manifest)
            if checked.differences:
                first = checked.differences[0].display()
                raise HandoffRefused(
                    f"{key}: {len(checked.differences)} file(s) differ from the manifest ({first})"
                )
    except (restore.RestoreError, restore.UnsafeArchive, manifest_check.UnsafeManifest) as err:
        raise HandoffRefused(f"{key}: {err}; nothing was restored") from None
    except HandoffRefused as err:
        raise HandoffRefused(f"{err}; nothing was restored") from None
    return {"dest": dest, "files": done.files, "bytes": done.bytes}


def _adopted(s3: Any, bucket: str, key: str, cfg: Config) -> bool:
    marker = handoff.adopted_key(key)
    return any(
        str(o["Key"]) == marker
        for o in listing.iter_objects(s3, bucket, marker, extra=s3args.owner_args(cfg))
    )


def _read_json(s3: Any, bucket: str, key: str, cfg: Config) -> dict[str, Any]:
    try:
        data = s3.get_object(Bucket=bucket, Key=key, **s3args.owner_args(cfg))["Body"].read()
        doc = json.loads(data)
    except (ClientError, BotoCoreError) as err:
        raise listing.s3_failure(err, f"s3://{bucket}/{key}") from None
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _put_create_only(s3: Any, bucket: str, key: str, body: Mapping[str, Any], cfg: Config) -> None:
    try:
        s3.put_object(
            Bucket=bucket,
            Key=key,
            Body=json.dumps(body, sort_keys=True).encode(),
            ContentType="application/json",
            **CREATE_ONLY,
            **extra_for(key, s3args.write_args(cfg)),
        )
    except ClientError as err:
        if awserror.code_of(err) in _LOST_RACE:
            raise _Lost() from None
        raise HandoffRefused(f"s3://{bucket}/{key}: PutObject failed: {awserror.describe(err)}") from None
    except BotoCoreError as err:
        raise HandoffRefused(f"s3://{bucket}/{key}: PutObject failed: {err}") from None


class _suppress_lost:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, value: object, tb: object) -> bool:
        return isinstance(value, _Lost)
