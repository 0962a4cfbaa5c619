"""One line for a botocore error, and what kind of failure it is.

Every adapter (S3, Auto Scaling, SNS, the operator commands) turns a botocore error into an
error of ours with a one-line text; this module is the one place that reads botocore's error
shape. The Lambda keeps its own copy on purpose: it is deployed without this package.
"""

from __future__ import annotations

from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

# Codes that say "try again later"; anything else AWS refuses (AccessDenied, ValidationError,
# …) is permanent: retrying cannot change the answer.
RETRYABLE_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "RequestThrottled",
        "SlowDown",
        "ServiceUnavailable",
        "InternalFailure",
        "InternalError",
        "ResourceContention",
        "RequestTimeout",
        "RequestTimeoutException",
    }
)
DENIED_CODES = frozenset(
    {
        "AccessDenied",
        "AccessDeniedException",
        "AuthorizationError",
        "UnauthorizedOperation",
        "403",
        "Forbidden",
    }
)


def code_of(err: Exception) -> str:
    """AWS's error code, or the exception's type name when there is none."""
    if isinstance(err, ClientError):
        return str(err.response.get("Error", {}).get("Code", ""))
    return type(err).__name__


def message_of(err: Exception) -> str:
    if isinstance(err, ClientError):
        return str(err.response.get("Error", {}).get("Message", ""))
    return str(err)


def status_of(err: Exception) -> int:
    """The HTTP status of an AWS answer; 0 when there was none (a connection error)."""
    if isinstance(err, ClientError):
        return int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    return 0


def describe(err: Exception) -> str:
    """`Code: Message`, or `TypeName: text` for errors with no AWS answer."""
    return f"{code_of(err)}: {message_of(err)}".rstrip(": ")


def retryable(err: Exception) -> bool:
    """Throttling, 5xx and connection errors: worth another try."""
    if isinstance(err, ClientError):
        return code_of(err) in RETRYABLE_CODES or status_of(err) >= 500
    return isinstance(err, (ConnectionError, HTTPClientError))


def denied(err: Exception) -> bool:
    return code_of(err) in DENIED_CODES
