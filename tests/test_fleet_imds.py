"""The IMDS endpoint is chosen as botocore chooses it: explicit endpoint, else the mode."""

from __future__ import annotations

import subprocess
import sys

import pytest

from instance_agent.errors import ConfigError
from instance_agent.imds import IMDS, default_endpoint


@pytest.mark.parametrize(
    ("env", "endpoint"),
    [
        ({}, "http://169.254.169.254"),
        ({"AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE": "IPv4"}, "http://169.254.169.254"),
        ({"AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE": "IPv6"}, "http://[fd00:ec2::254]"),
        ({"AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE": "ipv6"}, "http://[fd00:ec2::254]"),
        # An explicit endpoint wins over the mode, as in botocore.
        (
            {
                "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE": "IPv6",
                "AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://127.0.0.1:8111/",
            },
            "http://127.0.0.1:8111",
        ),
    ],
)
def test_endpoint_follows_botocores_variables(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], endpoint: str
) -> None:
    monkeypatch.delenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    imds = IMDS()
    try:
        assert imds.endpoint == endpoint
    finally:
        imds.close()


def test_unknown_mode_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="must be IPv4 or IPv6, not 'IPv5'"):
        default_endpoint({"AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE": "IPv5"})


def test_unknown_mode_on_the_command_line_is_one_line_and_exit_2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_EC2_METADATA_SERVICE_ENDPOINT")
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE", "IPv5")
    proc = subprocess.run(
        [sys.executable, "-m", "instance_agent", "backup", "--bucket", "my-backups"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines()[-1] == (
        "instance-agent: error: AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE must be IPv4 or IPv6, not 'IPv5'"
    )
