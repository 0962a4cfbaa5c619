"""Errors carry AWS's code, and a create-only conflict is a type of its own: callers decide
on those, never on the message text (which AWS may reword, and which we scrub)."""

from __future__ import annotations

from typing import Any

import pytest
from fakes import client_error

from instance_agent import lifecycle, s3upload
from instance_agent.errors import ObjectExists, UploadError


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
