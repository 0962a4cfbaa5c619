"""Deterministic /var/log-like corpus for benchmarks: `python benchmarks/corpus.py DIR --size 1GiB`.

Mix by bytes: 45 % nginx access logs, 30 % JSON app logs, 15 % syslog, 5 % rotated .gz files
(incompressible), 5 % many small files. The same seed and size give the same bytes, so
competitors in a comparison read identical trees. A marker file lets reruns reuse the tree.

`--small-files N` makes the other corpus instead: N files of 1–8 KiB of syslog lines (an
application's spool, or /var/log after months of rotations), 1,000 to a directory; 200,000
of them are about 880 MiB.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from instance_agent.configvalues import parse_size

MARKER = ".corpus.json"
_PATHS = [f"/api/v1/{w}/{n}" for w in ("orders", "items", "users", "carts") for n in range(50)]
_UAS = [
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36",
    "curl/8.5.0",
    "ELB-HealthChecker/2.0",
    "Go-http-client/1.1",
    "python-requests/2.32.3",
]
_MSGS = [
    "order placed",
    "cache miss",
    "retrying upstream",
    "payment authorised",
    "user login",
    "slow query",
    "connection reset by peer",
    "job finished",
]
_UNITS = ["systemd[1]", "sshd[812]", "kernel", "chronyd[455]", "amazon-ssm-agent[1022]", "dhclient[611]"]


def _writer(path: Path, target: int, make_line: object, rng: random.Random) -> int:
    assert callable(make_line)
    written = 0
    with open(path, "w", encoding="utf-8") as fh:
        batch: list[str] = []
        i = 0
        while written < target:
            line = make_line(rng, i)
            batch.append(line)
            written += len(line)
            i += 1
            if len(batch) >= 4096:
                fh.write("".join(batch))
                batch.clear()
        fh.write("".join(batch))
    return written


def _nginx(rng: random.Random, i: int) -> str:
    return (
        f"10.{rng.randrange(4)}.{rng.randrange(256)}.{rng.randrange(256)} - - "
        f"[26/Nov/2026:{i // 3600 % 24:02d}:{i // 60 % 60:02d}:{i % 60:02d} +0000] "
        f'"{rng.choice(("GET", "GET", "GET", "POST"))} {rng.choice(_PATHS)}?page={rng.randrange(100)} '
        f'HTTP/1.1" {rng.choice((200, 200, 200, 201, 304, 404, 500))} {rng.randrange(50000)} '
        f'"-" "{rng.choice(_UAS)}" rt={rng.random():.3f}\n'
    )


def _app(rng: random.Random, i: int) -> str:
    return (
        json.dumps(
            {
                "ts": f"2026-11-26T{i // 3600 % 24:02d}:{i // 60 % 60:02d}:{i % 60:02d}."
                f"{rng.randrange(1000):03d}Z",
                "level": rng.choice(("info", "info", "info", "warn", "error")),
                "msg": rng.choice(_MSGS),
                "trace_id": f"{rng.getrandbits(64):016x}",
                "order_id": rng.randrange(10**9),
                "latency_ms": rng.randrange(2000),
            }
        )
        + "\n"
    )


def _syslog(rng: random.Random, i: int) -> str:
    return (
        f"Nov 26 {i // 3600 % 24:02d}:{i // 60 % 60:02d}:{i % 60:02d} ip-10-0-1-17 "
        f"{rng.choice(_UNITS)}: {rng.choice(_MSGS)} id={rng.randrange(10**6)}\n"
    )


def generate(root: Path, size: int, seed: int = 1) -> Path:
    marker = root / MARKER
    want = {"size": size, "seed": seed, "version": 1}
    if marker.exists() and json.loads(marker.read_text()) == want:
        return root
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for d in ("nginx", "app", "rotated", "small"):
        (root / d).mkdir(exist_ok=True)
    _writer(root / "nginx" / "access.log", int(size * 0.45), _nginx, rng)
    _writer(root / "app" / "app.json.log", int(size * 0.30), _app, rng)
    _writer(root / "messages", int(size * 0.15), _syslog, rng)
    gz_total, n = int(size * 0.05), 0
    while gz_total > 0:
        chunk = min(gz_total, 8 * 2**20)
        # Rotated logs are already gzip-compressed: incompressible for the archiver.
        with gzip.open(root / "rotated" / f"access.log.{n + 1}.gz", "wb", compresslevel=1) as gz:
            gz.write(rng.randbytes(chunk))
        gz_total -= chunk
        n += 1
    small_total, n = int(size * 0.05), 0
    while small_total > 0:
        d = root / "small" / f"{n // 500:03d}"
        d.mkdir(exist_ok=True)
        body = "".join(_syslog(rng, n + k) for k in range(rng.randrange(5, 40)))
        (d / f"job-{n:06d}.log").write_text(body, encoding="utf-8")
        small_total -= len(body)
        n += 1
    marker.write_text(json.dumps(want))
    return root


def generate_small_files(root: Path, count: int = 200_000, seed: int = 1) -> Path:
    """`count` files of 1–8 KiB (uniform) of syslog text, 1,000 to a directory."""
    marker = root / MARKER
    want = {"small_files": count, "seed": seed, "version": 1}
    if marker.exists() and json.loads(marker.read_text()) == want:
        return root
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    line_no = 0
    for n in range(count):
        d = root / f"spool-{n // 1000:04d}"
        if n % 1000 == 0:
            d.mkdir(exist_ok=True)
        size, body = rng.randrange(1024, 8193), []
        while size > 0:
            body.append(_syslog(rng, line_no))
            size -= len(body[-1])
            line_no += 1
        text = "".join(body).encode()
        (d / f"msg-{n:07d}.log").write_bytes(text[: len(text) + size])
    marker.write_text(json.dumps(want))
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("dir", type=Path)
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--small-files", type=int, default=0, help="make the small-files corpus of N files")
    args = ap.parse_args()
    if args.small_files:
        generate_small_files(args.dir, args.small_files, args.seed)
    else:
        generate(args.dir, parse_size(args.size), args.seed)


if __name__ == "__main__":
    main()
