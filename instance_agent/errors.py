"""One error hierarchy for the whole agent; each class carries the exit code the CLI returns.

Adapters translate library errors (botocore's ClientError, requests' exceptions, OSError)
into these, so the core and the CLI never see a vendor exception.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class AgentError(Exception):
    """Base of every error the agent raises on purpose. `str(err)` is the one-line message,
    for people; `code` is AWS's error code when an AWS answer caused it ("" otherwise), for
    code: callers decide on the code or the type, never on the text."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str = "", *, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class ConfigError(AgentError):
    """Bad flags, env or config file. Nothing has been done yet."""

    exit_code = EXIT_USAGE


class IdentityError(AgentError):
    """IMDS is unreachable (or refuses us) and no --instance-id/--region was given."""

    exit_code = EXIT_USAGE


class IMDSError(AgentError):
    """An IMDS request failed after its retries."""


class BackupError(AgentError):
    """The archive could not be produced or uploaded."""


class UploadError(BackupError):
    """S3 refused or failed the multipart upload."""


class ObjectExists(UploadError):
    """A create-only write found an object at its key (S3 answered 412 PreconditionFailed):
    an earlier run wrote it, and it is never overwritten."""


class ArchiveTooLarge(BackupError):
    """The archive outgrew --max-archive-size (10,000 parts of the chosen sizes)."""


class LifecycleError(AgentError):
    """An Auto Scaling call failed. `retryable` says whether trying again can help:
    throttling, 5xx and connection errors can; AccessDenied and other refusals cannot."""

    def __init__(self, message: str, *, retryable: bool = False, code: str = "") -> None:
        super().__init__(message, code=code)
        self.retryable = retryable


class NoActiveLifecycleAction(LifecycleError):
    """AWS refused a heartbeat or a completion with `ValidationError`: the ids name no live
    action (lifecycle.ACTION_CALLS says why the code alone tells it).

    Before Terminating:Wait is confirmed this means "too early"; after, "expired or done".
    """


class NotifyError(AgentError):
    """SNS publish failed. Never fatal: it is logged and recorded in the result."""


class LockTimeout(AgentError):
    """Another run held the termination lock for longer than we were willing to wait."""


class Cancelled(BackupError):
    """The caller asked the pipeline to stop (a signal, or the watcher's --stop-grace ran
    out)."""


class WaitTimeout(LifecycleError):
    """Auto Scaling did not put the instance into a wait state within --wait-timeout."""


class InstallError(AgentError):
    """install-service could not write the unit or config, or systemctl failed."""
