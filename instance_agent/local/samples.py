"""Generate a small, realistic /var/log-like tree for the demo (deterministic per seed)."""

from __future__ import annotations

import gzip
import json
import os
import random
from pathlib import Path

_PATHS = ("/", "/api/v1/orders", "/api/v1/items/42", "/health", "/static/app.js", "/login")
_AGENTS = ("Mozilla/5.0 (X11; Linux x86_64)", "curl/8.5.0", "ELB-HealthChecker/2.0")


def _nginx_line(rng: random.Random, i: int) -> str:
    return (
        f"10.0.{rng.randrange(256)}.{rng.randrange(256)} - - [26/Nov/2026:09:{i // 60 % 60:02d}:"
        f'{i % 60:02d} +0000] "GET {rng.choice(_PATHS)} HTTP/1.1" {rng.choice((200, 200, 304, 404))} '
        f'{rng.randrange(20000)} "-" "{rng.choice(_AGENTS)}"\n'
    )


def _app_line(rng: random.Random, i: int) -> str:
    return (
        json.dumps(
            {
                "ts": f"2026-11-26T09:{i // 60 % 60:02d}:{i % 60:02d}Z",
                "level": rng.choice(("info", "info", "warn", "error")),
                "msg": rng.choice(("order placed", "cache miss", "retrying upstream")),
                "order_id": rng.randrange(10**8),
                "latency_ms": rng.randrange(500),
            }
        )
        + "\n"
    )


def generate(root: Path, size_mib: int, seed: int = 7) -> Path:
    """About `size_mib` MiB of nginx, JSON app and syslog logs plus one rotated .gz file."""
    rng = random.Random(seed)  # noqa: S311 - sample logs, not secrets
    (root / "nginx").mkdir(parents=True, exist_ok=True)
    (root / "app").mkdir(exist_ok=True)
    target = size_mib * 2**20
    per_file = max(target // 3, 1)
    for path, line in (
        (root / "nginx" / "access.log", _nginx_line),
        (root / "app" / "app.json.log", _app_line),
        (
            root / "messages",
            lambda r, i: (
                f"Nov 26 09:00:{i % 60:02d} ip-10-0-0-1 systemd[1]: Started session {r.randrange(10**5)}.\n"
            ),
        ),
    ):
        with open(path, "w", encoding="utf-8") as fh:
            written, i = 0, 0
            while written < per_file:
                text = line(rng, i)
                fh.write(text)
                written += len(text)
                i += 1
    with gzip.open(root / "nginx" / "access.log.1.gz", "wb") as gz:
        gz.write(os.urandom(1) + b"".join(_nginx_line(rng, i).encode() for i in range(20000)))
    os.symlink("access.log", root / "nginx" / "current")
    return root
