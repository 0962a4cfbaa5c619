"""doctor's checks of this host: the SSM agent and the systemd unit (on EC2 only), and what
the watcher's status file says of shipping and of a retained instance."""

from __future__ import annotations

import os
import shutil

from instance_agent import status
from instance_agent.doctor_check import FAIL, OK, SKIP, WARN, Check, Context, Facts
from instance_agent.install_service import UNIT_NAME

SSM_UNITS = ("amazon-ssm-agent.service", "snap.amazon-ssm-agent.amazon-ssm-agent.service")
SSM_COMM = "amazon-ssm-agen"  # /proc/*/comm keeps 15 characters
# Complete files waiting longer than this mean shipping is not keeping up with the logs.
SHIP_BEHIND_AFTER = 600.0


def process_running(comm: str) -> int | None:
    """The pid of a process named `comm`, from /proc (a host without systemd)."""
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as fh:
                if fh.read().strip() == comm:
                    return int(pid)
        except OSError:
            continue
    return None


def check_ssm_agent(ctx: Context, facts: Facts) -> Check:
    # Only Run Command (the push path) needs the SSM agent; a watcher-only instance (a
    # Debian image ships no SSM agent) must not be ABANDONed at launch for lacking one.
    name = "ssm agent"
    if not facts.on_ec2:
        return Check(name, SKIP, facts.not_ec2())
    booted = ctx.booted()
    if booted:
        _, out = ctx.systemctl(["is-active", *SSM_UNITS])
        if "active" in out.split():
            return Check(name, OK, "amazon-ssm-agent is active: the push path can reach this instance")
    else:
        pid = process_running(SSM_COMM)
        if pid:
            return Check(name, OK, f"amazon-ssm-agent runs (pid {pid}; no systemd)")
    missing = "amazon-ssm-agent is not active" if booted else "no amazon-ssm-agent process"
    if ctx.cfg.push_path:
        return Check(
            name,
            FAIL,
            f"{missing}, and push_path says Run Command backs this instance up: the push "
            "path cannot reach it (the watcher still works)",
            "install and start it (sudo systemctl enable --now amazon-ssm-agent), or set "
            "push_path = false where only the watcher backs up",
        )
    return Check(
        name,
        WARN,
        f"{missing}: only the watcher backs this instance up (push_path is off, and "
        "only Run Command needs the SSM agent)",
        "none needed; with the push path, install amazon-ssm-agent and set push_path = true",
    )


def check_systemd_unit(ctx: Context, facts: Facts) -> Check:
    name = "systemd unit"
    if not facts.on_ec2:
        return Check(name, SKIP, facts.not_ec2())
    if not ctx.booted():
        return Check(
            name,
            SKIP,
            "PID 1 is not systemd (a container?): the watcher runs as a service only under systemd",
        )
    if not shutil.which("systemctl"):
        return Check(name, SKIP, "systemctl is not installed")
    _, enabled = ctx.systemctl(["is-enabled", UNIT_NAME])
    _, active = ctx.systemctl(["is-active", UNIT_NAME])
    if enabled == "enabled" and active == "active":
        return Check(name, OK, f"{UNIT_NAME} is enabled and active")
    if enabled in ("", "not-found") or "No such file" in enabled:
        return Check(
            name,
            FAIL,
            f"{UNIT_NAME} is not installed: nothing watches for termination on this instance",
            "sudo instance-agent install-service",
        )
    return Check(
        name,
        FAIL,
        f"{UNIT_NAME} is {enabled or 'not enabled'} and {active or 'not active'}",
        f"sudo systemctl enable --now {UNIT_NAME}; journalctl -u {UNIT_NAME} says why it stopped",
    )


def check_shipping(ctx: Context, facts: Facts) -> Check:
    """Whether continuous shipping keeps up: complete files should not wait long."""
    if not ctx.cfg.ship:
        return Check(
            "shipping",
            SKIP,
            "off (--ship ships files as they complete, so a termination archives only what is new)",
        )
    found = status.find_status((ctx.cfg.runtime_dir, ctx.cfg.state_dir))
    doc = found[1] if found else None
    if doc is None or not isinstance(doc.get("shipping"), dict):
        return Check(
            "shipping",
            SKIP,
            "on, but no running watcher has reported shipping yet",
            "start the watcher: sudo systemctl start " + UNIT_NAME,
        )
    block, backlog = status.shipping_block(doc), doc.get("shipping_backlog") or {}
    since = backlog.get("behind_since")
    behind = ctx.now() - since if isinstance(since, (int, float)) else 0.0
    shipped = (
        f"{block['shipped_files']} files ({block['shipped_bytes'] / 2**20:.1f} MiB) "
        f"shipped; {block['pending_files']} not shipped yet "
        f"({block['pending_bytes'] / 2**20:.1f} MiB, live files included)"
    )
    if block["state"] == "restarting":
        return Check(
            "shipping",
            FAIL,
            f"stalled: the shipping thread is restarting after an error "
            f"({block['restarts']} restarts); {shipped}; last error: {block['last_error']}",
            f"journalctl -u {UNIT_NAME} shows the error; what is not shipped is archived at termination",
        )
    if behind > SHIP_BEHIND_AFTER:
        return Check(
            "shipping",
            FAIL,
            f"not keeping up: {backlog.get('due_files')} complete "
            f"files waiting for {behind / 60:.0f} min; {shipped}; last error: "
            f"{block['last_error']}",
            "check the last error (S3 access?), or raise "
            "--ship-bandwidth; what is not shipped is archived at termination",
        )
    error = f"; last error: {block['last_error']}" if block["last_error"] else ""
    scan = "; inotify unavailable, scanning the sources instead" if block["watch"] == "scan" else ""
    restarts = f"; restarted {block['restarts']} times" if block["restarts"] else ""
    return Check("shipping", OK, f"keeping up: {shipped}{scan}{restarts}{error}")


def check_retained(ctx: Context, facts: Facts) -> Check | None:
    """A retained instance (`*:Retained`, kept after its terminating action ended in
    ABANDON, https://docs.aws.amazon.com/autoscaling/ec2/userguide/instance-lifecycle-policy.html;
    docs/aws-behaviour.md, "Lifecycle hooks"):
    what it waits for. Said only when it is, or when the watcher's retries are on record."""
    found = status.find_status((ctx.cfg.runtime_dir, ctx.cfg.state_dir))
    kept = found[1].get("retained") if found else None
    kept = kept if isinstance(kept, dict) else None
    now = facts.state is not None and facts.state.endswith(":Retained")
    if not now and (kept is None or kept.get("event") == "retained_recovered"):
        return None
    let_go = (
        "to let it go without a backup: aws autoscaling terminate-instance-in-auto-scaling-group "
        f"--instance-id {facts.instance_id or '<id>'} --no-should-decrement-desired-capacity"
    )
    where = facts.state or "retained"
    if kept is None:
        return Check(
            "retained",
            FAIL,
            f"{where} after a failed backup, and no watcher is retrying it",
            f"sudo systemctl start {UNIT_NAME} (it retries), or run instance-agent backup; {let_go}",
        )
    done = f"{kept.get('attempts', 0)} backup retries, last error: {kept.get('last_error') or 'none'}"
    if kept.get("event") == "retained_gave_up":
        return Check(
            "retained",
            FAIL,
            f"{where}: the watcher gave up after {done}",
            f"fix the error, then run instance-agent backup; {let_go}",
        )
    return Check(
        "retained",
        FAIL,
        f"{where}: the watcher retries the backup ({done}); next retry in "
        f"{kept.get('next_retry_in_s') or 0:g} s, gives up in {kept.get('give_up_in_s') or 0:g} s",
        f"fix the last error (bucket policy, KMS key, network) and the next retry lands; {let_go}",
    )
