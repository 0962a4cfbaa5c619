"""`instance-agent install-service`: the systemd unit and /etc/instance-agent/agent.toml.

It renders systemd/instance-agent.service and writes the config file from the flags, then
runs `systemctl daemon-reload` and `enable --now`. `--root DIR` writes under another root,
as `systemctl --root` does (an image being baked), `--no-start` leaves systemctl alone (CI,
where PID 1 is not systemd, and AMI bakes, which must not start the agent) and enables the
unit with the same symlink `systemctl enable` makes. A second run with the same flags
changes nothing: files are written only when their content differs.

Without schema flags an existing agent.toml is kept as it is: re-running install-service
on an instance that has a config only refreshes the unit.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from instance_agent import config, schema
from instance_agent.configkey import Option
from instance_agent.errors import ConfigError, InstallError

UNIT_NAME = "instance-agent.service"
UNIT_DIR = "/etc/systemd/system"
WANTED_BY = "multi-user.target"
TEMPLATE_NAME = "instance-agent.service"
# The oneshot launch gate, run on every boot (launch_gate.py says why); enabled, not
# started: on the first boot the user data runs the same gate itself.
LAUNCH_UNIT_NAME = "instance-agent-launch.service"
# After --stop-grace the agent aborts the upload and reports (bounded by botocore's 60 s
# read timeout), then completes the hook within --complete-timeout.
STOP_MARGIN = 60.0
DEFAULT_WATCHDOG_SEC = 30


def template_text(name: str = TEMPLATE_NAME) -> str:
    """A unit template: next to the package in a checkout (or an editable install), or
    where a wheel's data files land (`<prefix>/share/instance-agent/`)."""
    here = Path(__file__).resolve().parent
    candidates = [
        here / name,
        here.parent / "systemd" / name,
        Path(sys.prefix) / "share" / "instance-agent" / name,
    ]
    for path in candidates:
        if path.is_file():
            return path.read_text(encoding="utf-8")
    raise InstallError("unit template not found; looked in " + ", ".join(str(p) for p in candidates))


def default_exec_start() -> list[str]:
    """The installed entry point: `instance-agent` beside this interpreter (a venv's bin),
    else this interpreter running the package. Not resolved: a venv's python is a symlink
    out of the venv."""
    beside = Path(os.path.abspath(sys.executable)).parent / "instance-agent"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    return [os.path.abspath(sys.executable), "-m", "instance_agent"]


def _unit_quote(word: str) -> str:
    # systemd splits ExecStart like a shell, and expands % specifiers and $VARIABLES.
    word = word.replace("%", "%%").replace("$", "$$")
    if word and all(c.isalnum() or c in "/._-+:=@," for c in word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


# Always allowed once ip_allow turns the firewall on: loopback, IMDS over IPv4 and IPv6
# (https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/instancedata-data-retrieval.html) and
# the Amazon DNS server's link-local addresses, which resolve the AWS endpoints' names
# (https://docs.aws.amazon.com/vpc/latest/userguide/AmazonDNS-concepts.html). In our words:
# docs/aws-behaviour.md, "Instance metadata (IMDS)" and "VPC DNS".
ALWAYS_ALLOWED = ("localhost", "169.254.169.254", "fd00:ec2::254", "169.254.169.253", "fd00:ec2::253")


def ip_address_policy(cfg: config.Config) -> str:
    """The unit's IPAddressDeny/Allow lines. The AWS endpoints' public addresses are not
    known when the unit is written, so the firewall is on only where ip_allow names the
    ranges they are reached at (a VPC's interface endpoints, the S3 prefix list)."""
    if not cfg.ip_allow:
        return "# ip_allow is empty: no IP firewall (install-service --ip-allow CIDR turns it on)"
    allowed = [*ALWAYS_ALLOWED, *(a for a in cfg.ip_allow if a not in ALWAYS_ALLOWED)]
    return "IPAddressDeny=any\nIPAddressAllow=" + " ".join(allowed)


def render_unit(
    template: str,
    cfg: config.Config,
    *,
    exec_start: Sequence[str],
    watchdog_sec: int,
    config_file: str = config.DEFAULT_CONFIG_FILE,
) -> str:
    stop = math.ceil(cfg.stop_grace + cfg.complete_timeout + STOP_MARGIN)
    extra_paths = [p for p in (cfg.state_dir,) if p != "/var/lib/instance-agent"]
    values = {
        "exec_start": " ".join(_unit_quote(w) for w in exec_start),
        "config_file": _unit_quote(config_file),
        "watchdog_sec": str(watchdog_sec),
        "timeout_stop_sec": str(stop),
        # A state dir outside StateDirectory= would be read-only under ProtectSystem=strict.
        "read_write_paths": "".join(f"ReadWritePaths=-{_unit_quote(p)}\n" for p in extra_paths),
        "ip_address_policy": ip_address_policy(cfg),
    }
    text = template
    for name, value in values.items():
        text = text.replace("{{" + name + "}}", value)
    if "{{" in text:
        raise InstallError("unit template has a placeholder this version does not fill")
    return text


# --- the config file -----------------------------------------------------------------------


def _toml_string(value: str) -> str:
    # JSON string escapes are valid TOML basic-string escapes; DEL is the one control
    # character JSON leaves raw and TOML refuses.
    return json.dumps(value).replace("\x7f", "\\u007f")


def _toml_value(opt: Option, value: Any) -> str:
    if opt.kind == "bool":
        return "true" if value else "false"
    if opt.kind in ("list", "pathlist"):
        return "[" + ", ".join(_toml_string(str(v)) for v in value) + "]"
    if opt.kind == "int":
        return str(int(value))
    if opt.kind == "float":
        return repr(float(value))
    return _toml_string(str(value))


def render_config(flags: Mapping[str, Any]) -> str:
    """agent.toml holding the given flags (None means not given), in schema order."""
    lines = [
        "# instance-agent configuration, written by `instance-agent install-service`.",
        "# Read by `instance-agent watch` and `instance-agent backup`; see `instance-agent watch --help`.",
        "",
    ]
    for opt in schema.OPTIONS:
        value = flags.get(opt.name)
        if value is None:
            continue
        try:
            lines.append(f"{opt.name} = {_toml_value(opt, value)}")
        except ValueError:
            raise ConfigError(f"{opt.flag}: invalid value {value!r}") from None
    return "\n".join(lines) + "\n"


def check_config(text: str) -> config.Config:
    """Load `text` exactly as the service will (no environment, no other file)."""
    with tempfile.NamedTemporaryFile("w", suffix=".toml", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        cfg = config.load({}, {}, config_file=fh.name, command=config.WATCH)
    return cfg


# --- the plan ------------------------------------------------------------------------------


@dataclass
class Change:
    path: Path
    content: str | None  # None: a symlink to `target`
    target: str | None = None
    mode: int = 0o644
    state: str = "unchanged"  # new | changed | unchanged


@dataclass
class Installer:
    root: Path
    flags: Mapping[str, Any]
    exec_start: list[str]
    watchdog_sec: int = DEFAULT_WATCHDOG_SEC
    start: bool = True
    dry_run: bool = False
    out: TextIO = field(default_factory=lambda: sys.stdout)

    def _under_root(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    def plan(self) -> list[Change]:
        config_path = self._under_root(config.DEFAULT_CONFIG_FILE)
        given = {k: v for k, v in self.flags.items() if v is not None}
        if given or not config_path.exists():
            toml = render_config(given)
        else:
            toml = config_path.read_text(encoding="utf-8")
        cfg = check_config(toml)
        unit = render_unit(template_text(), cfg, exec_start=self.exec_start, watchdog_sec=self.watchdog_sec)
        launch = render_unit(
            template_text(LAUNCH_UNIT_NAME), cfg, exec_start=self.exec_start, watchdog_sec=self.watchdog_sec
        )
        unit_path = f"{UNIT_DIR}/{UNIT_NAME}"
        launch_path = f"{UNIT_DIR}/{LAUNCH_UNIT_NAME}"
        changes = [
            Change(config_path, toml, mode=0o644),
            Change(self._under_root(unit_path), unit, mode=0o644),
            Change(self._under_root(launch_path), launch, mode=0o644),
        ]
        # The launch unit is enabled by symlink in every mode: `enable --now` would start it
        # mid-install, beside the user data's own run of the gate.
        wants = f"{UNIT_DIR}/{WANTED_BY}.wants"
        changes.append(Change(self._under_root(f"{wants}/{LAUNCH_UNIT_NAME}"), None, target=launch_path))
        if not self.start:
            # What `systemctl enable` would do: the [Install] WantedBy= symlink.
            changes.append(Change(self._under_root(f"{wants}/{UNIT_NAME}"), None, target=unit_path))
        for change in changes:
            change.state = _state(change)
        return changes

    def commands(self) -> list[list[str]]:
        if not self.start:
            return []
        if self.root != Path("/"):
            # Another root has no running manager to reload or start.
            return [["systemctl", f"--root={self.root}", "enable", UNIT_NAME]]
        return [["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", UNIT_NAME]]

    def run(self) -> int:
        changes = self.plan()
        verb = "would write" if self.dry_run else "wrote"
        for change in changes:
            shown = change.path if change.content is not None else f"{change.path} -> {change.target}"
            if change.state == "unchanged":
                self.out.write(f"unchanged  {shown}\n")
                continue
            if not self.dry_run:
                _apply(change)
            self.out.write(f"{verb} ({change.state})  {shown}\n")
        for cmd in self.commands():
            line = " ".join(shlex.quote(w) for w in cmd)
            if self.dry_run:
                self.out.write(f"would run  {line}\n")
                continue
            self.out.write(f"running  {line}\n")
            self.out.flush()
            try:
                subprocess.run(cmd, check=True)
            except (OSError, subprocess.CalledProcessError) as err:
                raise InstallError(f"{line} failed: {err}") from None
        if self.dry_run:
            for change in changes:
                if change.content is not None and change.state != "unchanged":
                    self.out.write(f"\n--- {change.path}\n{change.content}")
        return 0


def _state(change: Change) -> str:
    path = change.path
    if change.content is None:
        if path.is_symlink():
            return "unchanged" if os.readlink(path) == change.target else "changed"
        return "changed" if path.exists() else "new"
    try:
        current = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return "new"
    except OSError as err:
        raise InstallError(f"cannot read {path}: {err.strerror}") from None
    return "unchanged" if current == change.content else "changed"


def _apply(change: Change) -> None:
    path = change.path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if change.content is None:
            assert change.target is not None
            if path.is_symlink() or path.exists():
                path.unlink()
            path.symlink_to(change.target)
            return
        # Write beside it, then rename: a unit is never seen half-written.
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, change.mode)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(change.content)
        os.chmod(tmp, change.mode)
        os.replace(tmp, path)
    except OSError as err:
        raise InstallError(f"cannot write {path}: {err.strerror}") from None
