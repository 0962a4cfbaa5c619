"""Operator sub-commands: `list`, `restore`, `verify`, `doctor`, `status`.

Wiring only, as in cli.py: flags to config, logging, clients (from wiring.py); the work is in
listing.py, restore.py, verify.py, doctor.py and status.py. `list`, `restore` and `verify`
have a module each (list_cli.py, restore_cli.py, verify_cli.py); what they share is in
ops_common.py. `doctor` and `status` are here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from instance_agent import config, list_cli, logs, restore_cli, verify_cli, wiring
from instance_agent.errors import ConfigError
from instance_agent.ops_common import OPS, add_common, add_parser, emit, load

EXAMPLES_DOCTOR = """\
examples:
  sudo instance-agent doctor
  instance-agent doctor --config /etc/instance-agent/agent.toml --publish-test
  instance-agent doctor --json | jq '.checks[] | select(.result == "fail")'

One line per check: ✓ works, ✗ broken (followed by its fix), – skipped (with the reason).
Checks: config, compression, imds (IMDSv2 and hop limit), identity, lifecycle hook (group,
hook, heartbeat timeout), lifecycle permission, bucket, s3 permissions (a multipart upload
created and aborted under the prefix: nothing is stored), topic, ssm agent, systemd unit.
It uses the same options as `backup`, so it checks exactly what a backup would use.
exit codes: 0 nothing is ✗, 1 something is ✗, 2 usage error.
"""

EXAMPLES_STATUS = """\
examples:
  instance-agent status
  instance-agent status --json
  instance-agent status --runtime-dir /run/instance-agent --state-dir /var/lib/instance-agent

Shows what the watcher wrote to its status file (watch-status.json in the runtime directory,
else the state directory): last poll, last IMDS state, last backup; and the newest
exactly-once record, whichever trigger path made it.
exit codes: 0 the watcher is running, 1 it is not (no status file, its process is gone, or
it has not updated the file for two minutes), 2 usage error.
"""


def register(sub: Any) -> None:
    """Add the operator sub-commands to the CLI's sub-parser collection."""
    list_cli.register(sub)
    restore_cli.register(sub)
    verify_cli.register(sub)

    d = add_parser(sub, "doctor", EXAMPLES_DOCTOR, "check everything a backup will need, here and now")
    wiring.add_config_option(d)
    d.add_argument("--json", action="store_true", help="print the checks as JSON (flag only; default off)")
    d.add_argument(
        "--publish-test",
        action="store_true",
        help="publish one test message to "
        "the topic, the only way to prove it exists with the instance role (flag "
        "only; default: publish nothing)",
    )
    d.add_argument(
        "--launch",
        action="store_true",
        help="the launching hook's gate (the user "
        "data runs it before CONTINUE): skip the checks that need a terminating "
        "action (flag only; default off)",
    )
    wiring.add_schema_options(d, config.BACKUP)
    d.set_defaults(func=cmd_doctor)

    s = add_parser(sub, "status", EXAMPLES_STATUS, "what the watcher is doing, and whether it runs")
    add_common(s, "state_dir", "runtime_dir")
    s.add_argument("--json", action="store_true", help="print the status as JSON (flag only; default off)")
    s.set_defaults(func=cmd_status)


def cmd_doctor(args: argparse.Namespace) -> int:
    from instance_agent import doctor

    problem = None
    try:
        cfg = wiring.load(args, OPS)
    except ConfigError as err:
        cfg, problem = config.Config.defaults(), str(err)
    logs.setup(cfg.log_level if problem is None else "info")
    checks = doctor.run(
        cfg, problem, wiring.make_probe_clients, publish_test=args.publish_test, launch=args.launch
    )
    if args.json:
        emit(json.dumps({"ok": not doctor.failed(checks), "checks": [c.to_json() for c in checks]}) + "\n")
    else:
        encoding = sys.stdout.encoding or "ascii"
        try:
            "✓✗–".encode(encoding)
            symbols = True
        except (UnicodeEncodeError, LookupError):
            symbols = False
        emit(doctor.render(checks, symbols=symbols))
    return 1 if doctor.failed(checks) else 0


def cmd_status(args: argparse.Namespace) -> int:
    from instance_agent import status

    cfg = load(args)
    dirs = (cfg.runtime_dir, cfg.state_dir)
    now = time.time()
    found = status.find_status(dirs)
    path, doc = found if found else (None, None)
    private = [d for d in dirs if os.path.isdir(d) and not os.access(d, os.R_OK | os.X_OK)]
    if doc is not None:
        verdict = status.assess(doc, now)
    elif private:
        # The daemon's directories are root's: say so, rather than "not running".
        verdict = status.Assessment(
            False,
            f"unknown: cannot read {' or '.join(private)} "
            "(permission denied); run `sudo instance-agent status`",
        )
    else:
        verdict = status.Assessment(
            False,
            f"not running: no {status.STATUS_FILE} in "
            f"{' or '.join(dirs)} (is it installed? systemctl status "
            "instance-agent)",
        )
    record = status.latest_record(dirs)
    if args.json:
        emit(
            json.dumps(
                {
                    "running": verdict.running,
                    "reason": verdict.reason,
                    "status_file": path,
                    "status": doc,
                    "termination_record": record,
                    "shipping": status.shipping_block(doc),
                    "last_adoption": status.last_adoption(dirs),
                }
            )
            + "\n"
        )
    else:
        emit(status.render(path, doc, verdict, record, now, status.last_adoption(dirs)))
    if not verdict.running:
        raise status.WatcherNotRunning(f"the watcher is {verdict.reason}")
    return 0
