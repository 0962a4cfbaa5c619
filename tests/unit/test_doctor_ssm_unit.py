"""doctor's SSM agent check: required only where the push path (Run Command) is configured.

A Debian image ships no SSM agent and a watcher-only deployment needs none; a failed check
there made `doctor --launch` ABANDON every launch (found by the system test, issue 23).
"""

from __future__ import annotations

from typing import Any

import pytest

from instance_agent import doctor
from instance_agent.config import Config
from instance_agent.doctor_check import Context, Facts
from instance_agent.doctor_checks_host import check_ssm_agent
from instance_agent.imds import DEFAULT_ENDPOINT


def ssm_check(*, push_path: bool, active: bool) -> tuple[doctor.Check, list[doctor.Check]]:
    def systemctl(args: list[str]) -> tuple[int, str]:
        assert args[0] == "is-active"
        return (0, "active\ninactive") if active else (3, "inactive\ninactive")

    def no_clients(region: str) -> Any:
        raise AssertionError("the SSM check calls no AWS API")

    ctx = Context(
        Config.defaults(bucket="my-backups", push_path=push_path),
        no_clients,
        systemctl=systemctl,
        booted=lambda: True,
    )
    check = check_ssm_agent(ctx, Facts(imds_endpoint=DEFAULT_ENDPOINT, imds_ok=True))  # on an instance
    return check, [check]


def test_no_ssm_agent_on_a_watcher_only_instance_is_a_warning_that_passes_doctor() -> None:
    check, checks = ssm_check(push_path=False, active=False)

    assert check.result == doctor.WARN
    assert "only the watcher backs this instance up" in check.message
    assert not doctor.failed(checks)  # doctor --launch completes CONTINUE
    out = doctor.render(checks, symbols=False)
    assert out.startswith("[warn] ssm agent") and out.endswith("nothing is broken\n")


def test_no_ssm_agent_where_the_push_path_is_configured_fails() -> None:
    check, checks = ssm_check(push_path=True, active=False)

    assert check.result == doctor.FAIL and "push_path" in check.message
    assert doctor.failed(checks)


@pytest.mark.parametrize("push_path", [False, True])
def test_an_active_ssm_agent_passes_either_way(push_path: bool) -> None:
    check, _ = ssm_check(push_path=push_path, active=True)
    assert check.result == doctor.OK
