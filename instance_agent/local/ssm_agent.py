"""The SSM agent of the stand-in's managed instances: it runs the commands sent to them.

A test `attach()`es an agent to an instance id: a function that runs a shell script the
way that instance would (its environment, its agent.toml) and returns (exit code, stdout,
stderr). When SendCommand accepts a command for that instance (local.ssm), its agent, in
a thread of its own as the real one picks the command up on its own schedule, renders the
document as the SSM agent does (defaults filled in, `{{ Name }}` replaced literally: every
value already passed its allowedPattern at SendCommand) and runs it; the invocation then
reads Success or Failed, with the outputs. An instance without an agent keeps its
invocations InProgress until a test calls local.ssm.finish(), as before.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

Runner = Callable[[str, int], "tuple[int, str, str]"]
Finish = Callable[[str, int, str, str], None]  # instance id, exit code, stdout, stderr

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z0-9]+)\s*\}\}")
_lock = threading.Lock()
_agents: dict[str, Runner] = {}
_running: list[threading.Thread] = []


def attach(instance_id: str, runner: Runner) -> None:
    """From now on, commands sent to `instance_id` run through `runner`."""
    with _lock:
        _agents[instance_id] = runner


def detach(instance_id: str) -> None:
    with _lock:
        _agents.pop(instance_id, None)


def render(document: Mapping[str, Any], parameters: Mapping[str, Sequence[str]]) -> tuple[str, int]:
    """The script and timeout the SSM agent runs for a one-step aws:runShellScript document."""
    values = {
        name: (parameters[name][0] if parameters.get(name) else str(spec.get("default", "")))
        for name, spec in (document.get("parameters") or {}).items()
    }
    [step] = document["mainSteps"]

    def substitute(text: str) -> str:
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)

    script = "\n".join(substitute(str(line)) for line in step["inputs"]["runCommand"]) + "\n"
    return script, int(substitute(str(step["inputs"].get("timeoutSeconds", "3600"))))


def dispatch(
    document: Mapping[str, Any],
    command_id: str,
    parameters: Mapping[str, Sequence[str]],
    instance_ids: Sequence[str],
    finish: Finish,
) -> None:
    """Start the attached agents of `instance_ids` on an accepted command."""
    with _lock:
        runners = [(i, _agents[i]) for i in instance_ids if i in _agents]
        script, timeout = render(document, parameters) if runners else ("", 0)
        for instance_id, runner in runners:
            thread = threading.Thread(
                target=_run,
                args=(runner, script, timeout, instance_id, finish),
                name=f"ssm-agent-{instance_id}-{command_id[:8]}",
                daemon=True,
            )
            _running.append(thread)
            thread.start()


def wait_idle(timeout: float) -> bool:
    """Wait until every command started so far has ended; whether they all did in time."""
    with _lock:
        threads = list(_running)
    for thread in threads:
        thread.join(timeout)
    with _lock:
        _running[:] = [t for t in _running if t.is_alive()]
        return not _running


def _run(runner: Runner, script: str, timeout: int, instance_id: str, finish: Finish) -> None:
    try:
        code, out, err = runner(script, timeout)
    except Exception as exc:  # the agent reports every failure as Failed, as SSM's does
        code, out, err = 1, "", f"the agent could not run the script: {exc}"
    finish(instance_id, code, out, err)
