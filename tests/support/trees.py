"""Build source trees with the oddities a real /var/log has, and compare restores to them."""

from __future__ import annotations

import os
import random
import socket
import stat
from pathlib import Path

LOG_LINE = (
    '{ip} - - [26/Nov/2026:09:{m:02d}:{s:02d} +0000] "GET /api/v1/items/{n} HTTP/1.1" {code} {size} '
    '"-" "Mozilla/5.0 (X11; Linux x86_64)"\n'
)


def text_log(path: Path, size: int, seed: int) -> None:
    """A compressible access log of about `size` bytes, deterministic for a seed."""
    rng = random.Random(seed)
    lines = [
        LOG_LINE.format(
            ip=f"10.0.{rng.randrange(256)}.{rng.randrange(256)}",
            m=rng.randrange(60),
            s=rng.randrange(60),
            n=rng.randrange(10**6),
            code=rng.choice((200, 200, 404, 500)),
            size=rng.randrange(10**5),
        ).encode()
        for _ in range(4096)
    ]
    block = b"".join(lines)
    with open(path, "wb") as fh:
        written = 0
        while written < size:
            chunk = block[: size - written]
            fh.write(chunk)
            written += len(chunk)


def build_odd_tree(root: Path, *, text_bytes: int, random_bytes: int) -> dict[str, list[bytes]]:
    """The tree of the success-path acceptance test. Returns the paths (relative, bytes) that
    the archive must skip, by reason."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "nested" / "deeper" / "deepest").mkdir(parents=True)
    (root / "nested" / "deeper" / "deepest" / "app.log").write_bytes(b"nested line\n" * 100)
    (root / "empty-dir").mkdir()
    (root / "zero-bytes.log").write_bytes(b"")
    (root / "café-ünïcødé.log").write_text("non-ascii name\n", encoding="utf-8")
    os.mkdir(os.fsencode(root) + b"/latin1-\xe9-dir")
    with open(os.fsencode(root) + b"/latin1-\xe9-dir/non-utf8-\xff\xfe.log", "wb") as fh:
        fh.write(b"bytes that are not utf-8 in the name\n")
    long_name = "L" * 196 + ".log"  # 200 bytes, near the 255-byte NAME_MAX
    (root / "nested" / long_name).write_bytes(b"long name\n")
    text_log(root / "access.log", text_bytes, seed=1)
    (root / "rotated").mkdir()
    (root / "rotated" / "random.bin").write_bytes(random.Random(2).randbytes(random_bytes))
    os.symlink("access.log", root / "current.log")
    os.symlink("/nonexistent/target", root / "dangling-link")
    os.mkfifo(root / "a-fifo")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(root / "a-socket"))
    sock.close()
    secret = root / "mode-000.log"
    secret.write_bytes(b"nobody may read this\n")
    secret.chmod(0)
    return {
        "fifo": [b"a-fifo"],
        "socket": [b"a-socket"],
        "unreadable": [b"mode-000.log"],
    }


def walk(root: Path) -> dict[bytes, tuple[str, bytes | None]]:
    """{relative path: (type, content or link target)} for files, links and dirs."""
    out: dict[bytes, tuple[str, bytes | None]] = {}
    base = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, base)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", None)
            elif stat.S_ISREG(st.st_mode):
                try:
                    out[rel] = ("file", Path(os.fsdecode(full)).read_bytes())
                except PermissionError:
                    out[rel] = ("unreadable", None)
            else:
                out[rel] = ("special", None)
    return out
