"""The sender's side of a state hand-off: `handoff_path` as one archive of its own.

The termination job calls `send` after the drain gate and the pre-commands (the
application has stopped writing its state) and before the full backup (so the state is out
as early as possible). It is the backup pipeline itself (backup.archive_and_upload: tar,
zstd, create-only multipart upload, manifest) on a narrowed config: the hand-off paths as
the only sources, under handoff.TEMPLATE, with a sha256 of every file in the manifest (the
receiver checks each restored file against it), no journal and no shipping (a receiver
must find every byte in this one object).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from typing import Any

from instance_agent import handoff, keys, listing, s3args
from instance_agent.backup import archive_and_upload, key_values
from instance_agent.clients import Clients
from instance_agent.config import Config
from instance_agent.errors import AgentError
from instance_agent.identity import Identity
from instance_agent.logs import fields
from instance_agent.result import Result


class HandoffError(AgentError):
    """The hand-off archive did not reach S3 whole: the job fails (--on-failure)."""


log = logging.getLogger(__name__)


def handoff_config(cfg: Config) -> Config:
    """The config the hand-off archive is written with."""
    return dataclasses.replace(
        cfg,
        source=cfg.handoff_path,
        key_template=handoff.TEMPLATE,
        journal=False,
        ship=False,
        hash="sha256",
        max_duration=None,  # a hand-off cut short would move half a state: all or failed
        storage_class=None,  # read back within minutes: never an archive tier
    )


def send(
    cfg: Config,
    ident: Identity,
    clients: Clients,
    *,
    group: str | None,
    clock: Callable[[], float],
    cancel: threading.Event | None,
) -> Result:
    """Write the hand-off; its result (key, manifest_key, files). Raises HandoffError."""
    out = Result(instance_id=ident.instance_id, bucket=cfg.bucket, group=group)
    hcfg = handoff_config(cfg)
    prefix = keys.listing_prefix(hcfg.key_template, key_values(hcfg, ident, group))
    earlier = _earlier(clients.s3, cfg, prefix)
    if earlier:
        # A run killed after its hand-off (the lock then lets the next run do the job
        # again): a second hand-off of the same state would be adopted, and replayed, twice.
        log.info("hand-off already written by an earlier run", extra=fields(key=earlier))
        out.key, out.manifest_key = earlier, earlier + listing.MANIFEST_SUFFIX
        return out
    log.info("hand-off started", extra=fields(paths=list(cfg.handoff_path)))
    try:
        archive_and_upload(
            hcfg,
            ident,
            clients,
            out,
            group=group,
            started=clock(),
            clock=clock,
            progress_interval=30.0,
            cancel=cancel,
        )
    except AgentError as err:
        raise HandoffError(f"hand-off failed: {err}") from None
    if out.warnings:
        # A file the archive could not read is missing from the state the peer gets:
        # that is not a hand-off, however much else arrived.
        raise HandoffError(
            f"hand-off failed: {out.warnings} path(s) could not be archived whole (see the "
            f"manifest s3://{cfg.bucket}/{out.manifest_key})"
        )
    log.info("hand-off written", extra=fields(key=out.key, files=out.files, bytes=out.bytes_read))
    return out


def _earlier(s3: Any, cfg: Config, prefix: str) -> str | None:
    """The newest complete hand-off (archive and manifest) under this instance's prefix."""
    try:
        listed = {
            str(o["Key"])
            for o in listing.iter_objects(s3, cfg.bucket or "", prefix, extra=s3args.owner_args(cfg))
        }
    except AgentError as err:
        # Cannot tell (no s3:ListBucket): write a new one; a receiver adopts each once.
        log.warning("cannot look for an earlier hand-off", extra=fields(error=str(err)))
        return None
    done = sorted(k for k in listed if listing.is_archive(k) and k + listing.MANIFEST_SUFFIX in listed)
    return done[-1] if done else None
