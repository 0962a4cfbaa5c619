"""packaging/ssm-document.yaml: every parameter admits real values and refuses injections,
under the search semantics of both Go (the SSM agent's check) and Java; and what SSM
renders by literal substitution reaches `instance-agent` as exactly the intended argv.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.events import EVENTS_DIR

from instance_agent import schema
from instance_agent.local.ssm import compile_pattern
from lambda_trigger.handler import SAFE_NAME

DOCUMENT = Path(__file__).resolve().parents[1] / "packaging" / "ssm-document.yaml"
SEMANTICS = ("go", "java")
PARAMETERS = ("LifecycleActionToken", "LifecycleHookName", "AutoScalingGroupName", "executionTimeout")
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z0-9]+)\s*\}\}")


def load_document() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(DOCUMENT.read_text())
    return doc


def pattern(name: str) -> str:
    return str(load_document()["parameters"][name]["allowedPattern"])


def admitted(name: str, value: str, semantics: str) -> bool:
    return compile_pattern(pattern(name), semantics).search(value) is not None


def shared_values() -> dict[str, set[str]]:
    """Token, hook and group values from AWS's sample events."""
    found: dict[str, set[str]] = {
        "LifecycleActionToken": set(),
        "LifecycleHookName": set(),
        "AutoScalingGroupName": set(),
    }
    for path in sorted(EVENTS_DIR.glob("asg-*.json")):
        data = json.loads(path.read_text())
        for source in (data, data.get("detail") or {}):
            for key in found:
                if isinstance(source.get(key), str):
                    found[key].add(source[key])
            if isinstance(source.get("RequestId"), str):
                found["LifecycleActionToken"].add(source["RequestId"])  # also a UUID
    return found


SHARED = shared_values()
REALISTIC: dict[str, list[str]] = {
    "LifecycleActionToken": [
        *sorted(SHARED["LifecycleActionToken"]),
        # Fixed, not drawn at import: test ids must be the same in every pytest-xdist worker.
        "3f2b8c1e-9d4a-4e7b-a5c6-0b1d2e3f4a5b",
        "893D597B-FA3C-48DA-9833-451E5C253779",
        "00000000-0000-0000-0000-000000000000",
    ],
    "LifecycleHookName": [
        *sorted(SHARED["LifecycleHookName"]),
        "instance-agent-backup",
        "backup_before_terminate",
        "Hook1",
        "a",
        "ops/backup-hook",
        "h" * 255,
    ],
    "AutoScalingGroupName": [
        *sorted(SHARED["AutoScalingGroupName"]),
        "",
        "mystack-group",
        "eks-ng-1a2b3c4d-5e6f-7a8b-9c0d-1e2f3a4b5c6d",
        "web_tier_blue",
        "g" * 255,
    ],
    "executionTimeout": [
        "1",
        "30",
        "60",
        "600",
        "3600",
        "7200",
        "86400",
        "100000",
        "169999",
        "171999",
        "172799",
        "172800",
    ],
}

# Each is refused for every parameter: shell metacharacters, quoting, line breaks (a
# trailing one too, which Java's `$` would let through), globs, option-looking values,
# blanks, expansions, and non-ASCII look-alikes.
INJECTIONS = [
    "{v};reboot",
    "{v}; reboot",
    "$(reboot)",
    "{v}$(id)",
    "`reboot`",
    "{v}`id`",
    "{v}\nreboot",
    "{v}\n",
    "{v}\r\n",
    "{v}\r",
    "\n{v}",
    "{v}\u2028",
    "{v}\x85",
    "{v}\x00",
    "'{v}'",
    "{v}'",
    '"{v}"',
    '{v}"',
    "{v}&&reboot",
    "{v}||reboot",
    "{v}|sh",
    "{v}&",
    "*",
    "{v}*",
    "{v}?",
    "[{v}]",
    "{{a,b}}",
    "-{v}",
    "--help",
    "{v} x",
    " {v}",
    "{v} ",
    "{v}\tx",
    "{v}>/etc/passwd",
    "{v}<x",
    "~root",
    "$HOME",
    "${{IFS}}",
    "{v}#",
    "\\{v}",
    "!{v}",
    "{v}\uff1b",
    "",
]


def injections(name: str) -> list[str]:
    base = REALISTIC[name][1] if name != "AutoScalingGroupName" else "my-asg"
    values = [template.format(v=base) for template in INJECTIONS]
    if name == "AutoScalingGroupName":
        values.remove("")  # the optional group's default: admitted on purpose
    return values


# -- the patterns ----------------------------------------------------------------------------


def test_the_emulation_knows_where_go_and_java_differ() -> None:
    """`$` admits a trailing newline in Java but not in Go; `\\z` admits it in neither."""
    assert compile_pattern("^a$", "java").search("a\n")
    assert compile_pattern("^a$", "java").search("a\r\n")
    assert not compile_pattern("^a$", "go").search("a\n")
    for semantics in SEMANTICS:
        assert not compile_pattern(r"^a\z", semantics).search("a\n")
        assert compile_pattern(r"^a\z", semantics).search("a")
        assert not compile_pattern(r"^[0-9]\z", semantics).search("\u0663")  # ASCII classes
    with pytest.raises(ValueError, match="look-arounds"):
        compile_pattern(r"^a(?!b)", "go")
    with pytest.raises(ValueError, match="not supported by Go"):
        compile_pattern(r"^a\Z", "go")


@pytest.mark.parametrize("name", PARAMETERS)
def test_pattern_is_anchored_without_dollar_or_lookaround(name: str) -> None:
    text = pattern(name)
    assert text.startswith("^") and text.endswith(r"\z"), text
    assert "$" not in text
    assert not re.search(r"\(\?<?[=!]", text)
    assert not re.search(r"\\[dwsDWS]", text), "shorthand classes differ between engines"
    depth = 0
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        assert not (char == "|" and depth == 0), "a top-level | would split the anchors"


@pytest.mark.parametrize("semantics", SEMANTICS)
@pytest.mark.parametrize("name", PARAMETERS)
def test_realistic_values_match(name: str, semantics: str) -> None:
    refused = [v for v in REALISTIC[name] if not admitted(name, v, semantics)]
    assert refused == []


def test_shared_samples_feed_the_realistic_values() -> None:
    assert "87654321-4321-4321-4321-210987654321" in REALISTIC["LifecycleActionToken"]
    assert "my-lifecycle-hook" in REALISTIC["LifecycleHookName"]
    assert {"my-asg", "lifecycle-test", "my-auto-scaling-group"} <= set(REALISTIC["AutoScalingGroupName"])


@pytest.mark.parametrize("semantics", SEMANTICS)
@pytest.mark.parametrize("name", PARAMETERS)
def test_injection_attempts_are_refused(name: str, semantics: str) -> None:
    attempts = injections(name)
    assert len(attempts) >= 15
    slipped = [v for v in attempts if admitted(name, v, semantics)]
    assert slipped == []


@pytest.mark.parametrize("semantics", SEMANTICS)
def test_execution_timeout_admits_exactly_ssms_range(semantics: str) -> None:
    regex = compile_pattern(pattern("executionTimeout"), semantics)
    admitted_numbers = [n for n in range(0, 200_001) if regex.search(str(n))]
    assert admitted_numbers == list(range(1, 172_801))
    for text in ("01", "1e3", "0x10", "+5", "-1", "3600.0", "١٢"):
        assert not regex.search(text), text


@pytest.mark.parametrize("name", ["LifecycleHookName", "AutoScalingGroupName"])
def test_names_the_document_admits_are_what_the_trigger_sends(name: str) -> None:
    """The handler leaves out a group (and refuses a hook) exactly when the document would
    refuse it, so SendCommand never fails on a name."""
    corpus = REALISTIC[name] + injections(name) + ["-", "/x", "_", "a-", "a/", "x" * 256]
    for value in corpus:
        document_says = admitted(name, value, "go") and value != ""
        assert document_says == bool(SAFE_NAME.fullmatch(value)), repr(value)


@pytest.mark.parametrize(
    ("name", "option"),
    [
        ("LifecycleActionToken", "lifecycle_token"),
        ("LifecycleHookName", "hook_name"),
        ("AutoScalingGroupName", "asg_name"),
    ],
)
def test_the_agent_accepts_whatever_the_document_admits(name: str, option: str) -> None:
    check = schema.OPTION_BY_NAME[option].check
    assert check is not None
    for value in REALISTIC[name]:
        if value:
            assert check(value) is None, (option, value)


# -- the document ----------------------------------------------------------------------------------


def test_document_shape() -> None:
    doc = load_document()
    assert doc["schemaVersion"] == "2.2"
    assert set(doc["parameters"]) == set(PARAMETERS)
    [step] = doc["mainSteps"]
    assert step["action"] == "aws:runShellScript"
    assert step["inputs"]["timeoutSeconds"] == "{{ executionTimeout }}"
    script = "\n".join(step["inputs"]["runCommand"])
    assert "instance-agent backup" in script
    # Not on the command line, where any local user reads it in /proc/PID/cmdline: the
    # environment, whose /proc/PID/environ only the process's owner (root) can read.
    assert "{{ LifecycleActionToken }}" not in script.split("exec ", 1)[1]
    assert "export INSTANCE_AGENT_LIFECYCLE_TOKEN='{{ LifecycleActionToken }}'" in script
    assert "--hook-name '{{ LifecycleHookName }}'" in script


def test_every_placeholder_is_a_constrained_parameter_and_defaults_are_admitted() -> None:
    doc = load_document()
    used = set(PLACEHOLDER.findall(json.dumps(doc["mainSteps"])))
    assert used == set(PARAMETERS)
    for name, spec in doc["parameters"].items():
        assert spec["type"] == "String" and spec.get("allowedPattern")
        if "default" in spec:
            for semantics in SEMANTICS:
                assert admitted(name, spec["default"], semantics), (name, spec["default"])
    required = {n for n, s in doc["parameters"].items() if "default" not in s}
    assert required == {"LifecycleActionToken", "LifecycleHookName"}


def render(values: dict[str, str]) -> str:
    """The script the SSM agent runs: defaults, then literal `{{ Name }}` substitution."""
    doc = load_document()
    params = {n: str(s.get("default", "")) for n, s in doc["parameters"].items()}
    params.update(values)
    lines = doc["mainSteps"][0]["inputs"]["runCommand"]
    return "\n".join(PLACEHOLDER.sub(lambda m: params[m.group(1)], line) for line in lines) + "\n"


EDGE_CASES = [
    ("87654321-4321-4321-4321-210987654321", "my-lifecycle-hook", "my-asg"),
    ("87654321-4321-4321-4321-210987654321", "my-lifecycle-hook", ""),
    ("6A225E71-192D-45B1-A7E7-C307F75A7C9A", "_", "_"),
    ("9964f493-af70-44d7-9cfa-39f3132b4b56", "a/-_", "a/-_/--"),
    ("c0d1e2f3-a4b5-4c6d-8e7f-90a1b2c3d4e5", "h" * 255, "g" * 255),
]


@pytest.mark.parametrize("shell", ["sh", "bash"])
@pytest.mark.parametrize(("token", "hook", "group"), EDGE_CASES)
def test_rendered_script_passes_exactly_the_parameters(
    tmp_path: Path, shell: str, token: str, hook: str, group: str
) -> None:
    if shutil.which(shell) is None:
        pytest.skip(f"no {shell}")
    for name, value in (
        ("LifecycleActionToken", token),
        ("LifecycleHookName", hook),
        ("AutoScalingGroupName", group),
    ):
        assert admitted(name, value, "go") and admitted(name, value, "java")
    # A stand-in `instance-agent` that prints the argv it was given.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "instance-agent"
    fake.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        "print(json.dumps([sys.argv[1:], os.environ.get('INSTANCE_AGENT_LIFECYCLE_TOKEN')]))\n"
    )
    fake.chmod(0o755)
    script = tmp_path / "_script.sh"
    script.write_text(
        render({"LifecycleActionToken": token, "LifecycleHookName": hook, "AutoScalingGroupName": group})
    )

    proc = subprocess.run(
        [shell, str(script)],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": f"{bindir}:/usr/bin:/bin"},
        cwd=tmp_path,
        check=False,
    )

    assert proc.returncode == 0, proc.stderr
    expected = ["backup", "--json", "--hook-name", hook]
    if group:
        expected += ["--asg-name", group]
    argv, token_from_env = json.loads(proc.stdout)
    assert argv == expected and token not in " ".join(argv)
    assert token_from_env == token


# -- the adopt document (packaging/ssm-adopt-document.yaml): the hand-off trigger's ----------

ADOPT = Path(__file__).resolve().parents[1] / "packaging" / "ssm-adopt-document.yaml"
HANDOFF_KEYS = [
    "web/handoff/i-0123456789abcdef0/20260131T120000Z.tar.zst",
    "backups/prod/web-asg_2/handoff/i-0abc1234/20260131T120000Z.tar.gz",
    "p=1/g.x/handoff/i-0123456789abcdef0/20260131T120000Z.tar",
]
BAD_HANDOFF_KEYS = [
    "",
    "handoff/i-0123456789abcdef0/20260131T120000Z.tar.zst",  # no group
    "../web/handoff/i-0123456789abcdef0/20260131T120000Z.tar.zst",
    "web/../handoff/i-0123456789abcdef0/20260131T120000Z.tar.zst",
    "-x/handoff/i-0123456789abcdef0/20260131T120000Z.tar.zst",
    "/web/handoff/i-0123456789abcdef0/20260131T120000Z.tar.zst",
    "web/handoff/i-0123456789abcdef0/20260131T120000Z.tar.zst\n",
    "web/handoff/i-0123456789abcdef0/20260131T120000Z.tar.zst\nreboot",
    "web/handoff/i-0123456789abcdef0/20260131T120000Z.tar.zst.manifest.json",
    "web/handoff/i-0123456789abcdef0/20260131T120000Z.tar.zst.claim.000001",
    "w'eb/handoff/i-0123456789abcdef0/20260131T120000Z.tar.zst",
    "w$(id)/handoff/i-0123456789abcdef0/20260131T120000Z.tar.zst",
    "w b/handoff/i-0123456789abcdef0/20260131T120000Z.tar.zst",
    "w+b/handoff/i-0123456789abcdef0/20260131T120000Z.tar.zst",
    "w%2Fb/handoff/i-0123456789abcdef0/20260131T120000Z.tar.zst",
    "web/handoff/i-XYZ/20260131T120000Z.tar.zst",
    "web/handoff/i-0123456789abcdef0/x/20260131T120000Z.tar.zst",
]


def adopt_document() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(ADOPT.read_text())
    return doc


@pytest.mark.parametrize("semantics", SEMANTICS)
def test_the_adopt_key_pattern_is_the_triggers_and_admits_only_hand_off_keys(semantics: str) -> None:
    from lambda_trigger.events import HANDOFF_KEY

    text = str(adopt_document()["parameters"]["HandoffKey"]["allowedPattern"])
    assert text.startswith("^") and text.endswith(r"\z") and "$" not in text
    regex = compile_pattern(text, semantics)
    for key in HANDOFF_KEYS + BAD_HANDOFF_KEYS:
        assert bool(regex.search(key)) == bool(HANDOFF_KEY.fullmatch(key)) == (key in HANDOFF_KEYS), key


def test_the_adopt_document_constrains_every_placeholder() -> None:
    doc = adopt_document()
    params = doc["parameters"]
    assert all("allowedPattern" in spec for spec in params.values())
    [step] = doc["mainSteps"]
    used = {m for line in step["inputs"]["runCommand"] for m in PLACEHOLDER.findall(line)}
    used |= set(PLACEHOLDER.findall(step["inputs"]["timeoutSeconds"]))
    assert used == set(params)
    assert step["inputs"]["runCommand"][-1] == "exec instance-agent adopt '{{ HandoffKey }}' --json"
