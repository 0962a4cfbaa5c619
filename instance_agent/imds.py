"""IMDSv2 client: a lazily cached session token, refreshed on 401; no IMDSv1 fallback.

- 404 means "nothing there (yet)" and is returned as None, not raised.
- 403 means IMDS is disabled or the request is refused: fail fast, retrying will not help.
- Connection errors and 5xx/429 are retried with exponential backoff until a deadline on the
  monotonic clock.
- The token is never logged, and requests ignores proxy variables (trust_env=False), since
  the link-local address must never go through HTTPS_PROXY.
- The endpoint is chosen as botocore chooses it: `AWS_EC2_METADATA_SERVICE_ENDPOINT` if set,
  else by `AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE` (`IPv4`, the default, or `IPv6` for
  `http://[fd00:ec2::254]`, the address of IMDS on IPv6-only Nitro subnets); see
  the AWS SDK for Java's Ec2MetadataEndpointProvider reference, which documents the same rule:
  https://docs.amazonaws.cn/sdk-for-java/latest/reference/software/amazon/awssdk/imds/internal/Ec2MetadataEndpointProvider.html
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from instance_agent.errors import ConfigError, IMDSError

if TYPE_CHECKING:
    # Imported where a session is opened: a run whose config names the instance and region
    # reads no IMDS, and requests (with charset_normalizer and idna) costs it ~30 ms of CPU.
    import requests

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "http://169.254.169.254"
IPV6_ENDPOINT = "http://[fd00:ec2::254]"
ENDPOINT_ENV = "AWS_EC2_METADATA_SERVICE_ENDPOINT"  # botocore's variable; we honour the same
MODE_ENV = "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE"  # botocore's too: IPv4 or IPv6
# Token TTL and 401 (docs/aws-behaviour.md, "Instance metadata (IMDS)").
TOKEN_TTL = 21600  # the maximum AWS allows; a 401 refreshes it sooner if needed
TOKEN_HEADER = "X-aws-ec2-metadata-token"  # noqa: S105 - a header name, not a secret
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
# 1 s to connect, 2 s to answer: IMDS is link-local and answers in milliseconds when healthy.
REQUEST_TIMEOUT = (1.0, 2.0)


class IMDSRefused(IMDSError):
    """403: IMDS disabled, or our request is not allowed. Not retried."""


@dataclass(frozen=True)
class ProbeAnswer:
    """What one token request, and one read with its token, answered (`IMDS.probe`)."""

    token_status: int
    read_status: int | None  # None: no token was issued, so nothing was read


def default_endpoint(env: Mapping[str, str]) -> str:
    """The endpoint botocore would use: an explicit one wins over the mode."""
    explicit = env.get(ENDPOINT_ENV, "").strip()
    if explicit:
        return explicit
    mode = env.get(MODE_ENV, "").strip().lower()
    if mode in ("", "ipv4"):
        return DEFAULT_ENDPOINT
    if mode == "ipv6":
        return IPV6_ENDPOINT
    # botocore refuses other values too (InvalidIMDSEndpointModeError).
    raise ConfigError(f"{MODE_ENV} must be IPv4 or IPv6, not {env[MODE_ENV]!r}")


class IMDS:
    def __init__(
        self,
        endpoint: str | None = None,
        *,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        import requests

        self.endpoint = (endpoint or default_endpoint(os.environ)).rstrip("/")
        self._session = session or requests.Session()
        self._session.trust_env = False
        self._clock = clock
        self._sleep = sleep
        self._token: str | None = None
        self._lock = threading.Lock()

    # -- token --------------------------------------------------------------------------
    def _put_token(self, ttl: int) -> requests.Response:
        return self._session.put(
            f"{self.endpoint}/latest/api/token", headers={TTL_HEADER: str(ttl)}, timeout=REQUEST_TIMEOUT
        )

    def _fetch_token(self) -> str:
        resp = self._put_token(TOKEN_TTL)
        if resp.status_code == 200 and resp.text:
            return resp.text
        if resp.status_code == 403:
            raise IMDSRefused("IMDS refused the token request (403): IMDS is disabled or blocked")
        raise IMDSError(f"IMDS token request failed: HTTP {resp.status_code}")

    def _token_value(self, refresh: bool = False) -> str:
        with self._lock:
            if self._token is None or refresh:
                self._token = self._fetch_token()
            return self._token

    def probe(self, *, ttl: int = 60, path: str = "instance-id") -> ProbeAnswer:
        """One token request (for a token of `ttl` seconds, used once) and, when IMDS issues a
        token, one read of `path` with it: no retry, nothing cached, and requests' exceptions
        raised as they are, because `doctor` tells the failures apart by them (a response hop
        limit too low for this process shows as a connection whose answer never arrives)."""
        resp = self._put_token(ttl)
        token = resp.text if resp.status_code == 200 else ""
        if not token:
            return ProbeAnswer(resp.status_code, None)
        read = self._session.get(
            f"{self.endpoint}/latest/meta-data/{path}", headers={TOKEN_HEADER: token}, timeout=REQUEST_TIMEOUT
        )
        return ProbeAnswer(resp.status_code, read.status_code)

    # -- reads --------------------------------------------------------------------------
    def _get_once(self, path: str) -> requests.Response:
        url = f"{self.endpoint}/latest/meta-data/{path}"
        resp = self._session.get(url, headers={TOKEN_HEADER: self._token_value()}, timeout=REQUEST_TIMEOUT)
        if resp.status_code == 401:
            # Expired or revoked: one fresh token, one retry (never a token-less read).
            resp = self._session.get(
                url, headers={TOKEN_HEADER: self._token_value(refresh=True)}, timeout=REQUEST_TIMEOUT
            )
        return resp

    def get(self, path: str, *, timeout: float = 10.0) -> str | None:
        """Text at /latest/meta-data/<path>, None on 404. Retries until `timeout` seconds."""
        import requests

        deadline = self._clock() + timeout
        delay = 0.1
        last = "no attempt"
        while True:
            try:
                resp = self._get_once(path)
            except IMDSRefused:
                raise
            except IMDSError as err:
                last = str(err)
            except requests.RequestException as err:
                last = f"{type(err).__name__}"
            else:
                if resp.status_code == 200:
                    return resp.text
                if resp.status_code == 404:
                    return None
                if resp.status_code == 403:
                    raise IMDSRefused(f"IMDS refused {path} (403)")
                last = f"HTTP {resp.status_code}"
            if self._clock() + delay > deadline:
                raise IMDSError(f"IMDS {path}: {last} (gave up after {timeout:g} s)")
            log.debug("imds retry", extra={"fields": {"path": path, "error": last}})
            self._sleep(delay)
            delay = min(delay * 2, 2.0)

    def instance_id(self, timeout: float = 10.0) -> str:
        value = self.get("instance-id", timeout=timeout)
        if not value:
            raise IMDSError("IMDS has no instance-id")
        return value.strip()

    def region(self, timeout: float = 10.0) -> str:
        value = self.get("placement/region", timeout=timeout)
        if not value:
            raise IMDSError("IMDS has no placement/region")
        return value.strip()

    def close(self) -> None:
        self._session.close()
