"""The system test's metadata service: the tests' IMDSv2 stub, plus what cloud-init reads.

cloud-init's Ec2 datasource reads the versioned tree (`/2021-03-23/meta-data/…`,
`/…/user-data`) and, outside AWS (its DMI check does not say Amazon), without a token: it
asks for one only when it believes it is on AWS. Those reads are answered here and counted
in `cloudinit_reads`. Every other path is the stub's, with its IMDSv2 rules: a token-less
read of `/latest/…` (what the agent and the user data use) is refused and counted in
`tokenless_reads`, which must stay 0.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from instance_agent.local.imds import IMDSStub, _Reply

VERSIONED = re.compile(r"^/(\d{4}-\d{2}-\d{2})(/.*)?$")


class CloudInitIMDS(IMDSStub):
    def __init__(self, *, user_data: str, **kw: Any) -> None:
        super().__init__(**kw)
        self.user_data = user_data
        self.cloudinit_reads = 0
        self.user_data_reads = 0

    def _get(self, path: str, headers: Callable[[str], str | None]) -> _Reply:
        match = VERSIONED.match(path)
        if path != "/" and match is None:
            return super()._get(path, headers)
        with self._lock:
            self.cloudinit_reads += 1
        rest = (match.group(2) or "") if match else ""
        if path == "/":
            return _Reply(200, "2021-03-23\nlatest")
        if rest.rstrip("/") == "/user-data":
            with self._lock:
                self.user_data_reads += 1
            return _Reply(200, self.user_data, content_type="application/octet-stream")
        if rest.rstrip("/") in ("", "/meta-data"):
            return _Reply(200, "instance-id\nlocal-hostname\nhostname\nlocal-ipv4\nplacement/")
        if rest.rstrip("/") == "/meta-data/placement":
            return _Reply(200, "availability-zone\nregion")
        key = rest.removeprefix("/meta-data/").rstrip("/")
        if key in ("local-hostname", "hostname"):
            return _Reply(200, "ip-10-213-0-2.ec2.internal")
        if key == "local-ipv4":
            return _Reply(200, "10.213.0.2")
        return self._metadata(key)
