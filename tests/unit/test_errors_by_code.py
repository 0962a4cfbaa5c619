"""Errors carry AWS's code, and a create-only conflict is a type of its own: callers decide
on those, never on the message text (which AWS may reword, and which we scrub)."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeAutoScaling, FakeClock, client_error

from instance_agent import lifecycle, s3upload
from instance_agent.clients import Clients
from instance_agent.config import Config
from instance_agent.doctor_check import OK, Context, Facts
from instance_agent.doctor_checks_lifecycle import check_lifecycle_permission
from instance_agent.errors import LifecycleError, NoActiveLifecycleAction, ObjectExists, UploadError


class _RefusingS3:
    """The one call put_small makes, answering with a fixed AWS error."""

    def __init__(self, code: str, message: str, status: int) -> None:
        self.err = client_error(code, message, status)

    def put_object(self, **kwargs: Any) -> dict[str, Any]:
        raise self.err


def test_a_create_only_conflict_is_object_exists_whatever_its_message() -> None:
    # SeaweedFS and S3 word the 412 differently; some proxies send no message at all.
    s3 = _RefusingS3("PreconditionFailed", "", 412)
    with pytest.raises(ObjectExists) as caught:
        s3upload.put_small(s3, "b", "k.manifest.json", b"{}")  # type: ignore[arg-type]
    assert caught.value.code == "PreconditionFailed"


def test_any_other_refusal_is_a_plain_upload_error_with_its_code() -> None:
    s3 = _RefusingS3("AccessDenied", "the object already exists?  (a misleading text)", 403)
    with pytest.raises(UploadError) as caught:
        s3upload.put_small(s3, "b", "k.manifest.json", b"{}")  # type: ignore[arg-type]
    assert not isinstance(caught.value, ObjectExists)
    assert caught.value.code == "AccessDenied"


def test_auto_scaling_errors_carry_their_code() -> None:
    err = lifecycle.translate(
        client_error("AccessDeniedException", "not authorized"), "DescribeLifecycleHooks"
    )
    assert err.code == "AccessDeniedException"
    assert not err.retryable


# AWS's refusal of an action that is not live, in other words than the documented "No active
# Lifecycle Action found with …": the agent must read the code, not the sentence.
REWORDED = "Lifecycle action for instance i-0123456789abcdef0 is no longer pending"
TARGET = lifecycle.HookTarget("web", "drain", 300, "i-0123456789abcdef0")


def _lifecycle(asg: FakeAutoScaling) -> lifecycle.Lifecycle:
    clock = FakeClock()
    return lifecycle.Lifecycle(asg, TARGET, clock=clock, sleep=clock.sleep)  # type: ignore[arg-type]


def test_a_heartbeat_refused_with_validation_error_means_no_live_action_whatever_its_text() -> None:
    asg = FakeAutoScaling(
        errors={"RecordLifecycleActionHeartbeat": [client_error("ValidationError", REWORDED)]}
    )
    assert _lifecycle(asg).probe(deadline=2000.0) is False  # not live: no error, no retry
    assert asg.count("RecordLifecycleActionHeartbeat") == 1


def test_a_completion_refused_after_heartbeats_is_final_whatever_its_text() -> None:
    asg = FakeAutoScaling(errors={"CompleteLifecycleAction": [client_error("ValidationError", "")]})
    life = _lifecycle(asg)
    assert life.probe(deadline=2000.0) is True
    error = life.complete("CONTINUE", timeout=60.0)
    assert error is not None and "ValidationError" in error
    assert life.gone.is_set()  # the action ended elsewhere: the job does not wait for it
    assert asg.count("CompleteLifecycleAction") == 1


def test_a_validation_error_of_a_lookup_is_not_a_missing_action() -> None:
    # DescribeLifecycleHooks of a group that does not exist: a refusal, not "no action yet".
    err = lifecycle.translate(
        client_error("ValidationError", "No active Lifecycle Action (a misleading text)"),
        "DescribeLifecycleHooks",
    )
    assert isinstance(err, LifecycleError) and not isinstance(err, NoActiveLifecycleAction)
    assert err.code == "ValidationError" and not err.retryable


def test_doctor_reads_a_reworded_no_action_answer_as_the_permission_granted() -> None:
    asg = FakeAutoScaling(
        errors={"RecordLifecycleActionHeartbeat": [client_error("ValidationError", REWORDED)]}
    )
    clients = Clients(s3=None, autoscaling=asg)  # type: ignore[arg-type]
    ctx = Context(Config.defaults(bucket="my-backups"), lambda region: clients)
    check = check_lifecycle_permission(ctx, Facts(region="us-east-1", target=TARGET, state="InService"))
    assert check.result == OK, check.message
    assert check.message.startswith("RecordLifecycleActionHeartbeat is allowed")


# --- and it stays so: no module compares an error's text ------------------------------------

ROOT = Path(__file__).resolve().parents[2]


def _is_message(node: ast.expr, errors: set[str], texts: set[str]) -> bool:
    """Is `node` an error's text: str(err), err.args, message_of(err), a ["Message"] or
    .get("Message") of a botocore answer, a call on one of those (scrub(msg)), or a name
    bound to one?"""
    if isinstance(node, ast.Name):
        return node.id in texts
    if isinstance(node, ast.Subscript):
        key = node.slice
        if isinstance(key, ast.Constant) and key.value == "Message":
            return True
        return _is_message(node.value, errors, texts)
    if isinstance(node, ast.Attribute):
        return node.attr == "args" and isinstance(node.value, ast.Name) and node.value.id in errors
    if isinstance(node, ast.Call):
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        if name == "message_of":
            return True
        if name == "get" and node.args and isinstance(node.args[0], ast.Constant):
            return node.args[0].value == "Message"
        if name == "str" and len(node.args) == 1 and isinstance(node.args[0], ast.Name):
            return node.args[0].id in errors
        return any(_is_message(arg, errors, texts) for arg in node.args)
    return False


def _scopes(tree: ast.AST) -> list[tuple[ast.AST, set[str]]]:
    """Each `except … as err` body, and each function taking an error (`err: Exception`),
    with the names that hold the error there."""
    found: list[tuple[ast.AST, set[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ExceptHandler) and node.name:
            found.append((node, {node.name}))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            errors = {
                a.arg
                for a in node.args.args + node.args.kwonlyargs
                if a.annotation is not None and re.search(r"Error|Exception", ast.unparse(a.annotation))
            }
            if errors:
                found.append((node, errors))
    return found


def text_decisions(source: str) -> list[int]:
    """Lines that test an error's text: `in`, `==` or .startswith/.endswith/.find on it
    (building a message from it is fine)."""
    found: set[int] = set()
    for scope, errors in _scopes(ast.parse(source)):
        texts: set[str] = set()
        for node in ast.walk(scope):
            if isinstance(node, ast.Assign) and _is_message(node.value, errors, texts):
                texts |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        for node in ast.walk(scope):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                if any(isinstance(op, (ast.In, ast.NotIn, ast.Eq, ast.NotEq)) for op in node.ops) and any(
                    _is_message(side, errors, texts) for side in sides
                ):
                    found.add(node.lineno)
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("startswith", "endswith", "find", "index", "count")
                and _is_message(node.func.value, errors, texts)
            ):
                found.add(node.lineno)
    return sorted(found)


def test_the_text_check_sees_each_form() -> None:
    source = """
try:
    pass
except ClientError as err:
    msg = str(err.response.get("Error", {}).get("Message", ""))
    if code == "ValidationError" and msg.startswith("No active"):
        pass
    if "exists" in str(err):
        pass
    if err.args[0] == "gone":
        pass
    if awserror.message_of(err).endswith("."):
        pass
    raise Wrapped(f"call failed: {err}")  # a message built from it: fine
def translate(err: Exception, call: str) -> LifecycleError:
    msg = scrub(awserror.message_of(err), token)
    if msg.startswith("No active"):
        return NoActiveLifecycleAction(msg)
    return LifecycleError(f"{call}: {msg}")
"""
    assert text_decisions(source) == [6, 8, 10, 12, 17]


def test_no_module_decides_on_an_errors_text() -> None:
    found = {
        str(path.relative_to(ROOT)): lines
        for package in ("instance_agent", "lambda_trigger")
        for path in sorted((ROOT / package).rglob("*.py"))
        if (lines := text_decisions(path.read_text()))
    }
    assert found == {}
