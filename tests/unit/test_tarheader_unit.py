"""The in-place header packer gives the very block the general encoder gives, and declines
(writing nothing) every member that needs a pax header."""

from __future__ import annotations

import tarfile

import pytest

from instance_agent import tarheader

LONG = b"var/log/" + b"d" * 90 + b"/" + b"f" * 90 + b".log"  # over 100: split into prefix + name


@pytest.mark.parametrize(
    ("name", "typeflag", "size", "mtime", "uid", "gid"),
    [
        (b"var/log/app.log", tarheader.REGTYPE, 4096, 1_700_000_000, 0, 0),
        (b"var/log/", tarheader.DIRTYPE, 0, 1_700_000_000, 1000, 1000),
        (LONG, tarheader.REGTYPE, 1, 0, 65534, 65534),
        (b"x", tarheader.REGTYPE, 8**11 - 1, 8**11 - 1, 8**7 - 1, 8**7 - 1),
    ],
)
def test_encode_into_packs_the_block_encode_gives(
    name: bytes, typeflag: bytes, size: int, mtime: int, uid: int, gid: int
) -> None:
    expected = tarheader.encode(
        name,
        typeflag=typeflag,
        size=size,
        mode=0o640,
        mtime=mtime,
        uid=uid,
        gid=gid,
        uname=b"app",
        gname=b"adm",
    )
    buf = bytearray(b"\xff" * 2048)
    owner = tarheader.owner_fields(0o640, uid, gid, b"app", b"adm")
    assert owner is not None
    assert tarheader.encode_into(buf, 700, name, typeflag, size, mtime, owner)
    assert bytes(buf[700:1212]) == expected and len(expected) == tarheader.BLOCK
    assert buf[:700] == b"\xff" * 700 and buf[1212:] == b"\xff" * 836  # nothing else touched
    info = tarfile.TarInfo.frombuf(expected, "utf-8", "strict")
    assert (info.size, info.mtime, info.uid, info.uname) == (size, mtime, uid, "app")


@pytest.mark.parametrize(
    ("name", "size", "mtime", "uid"),
    [
        ("vär/lög".encode(), 1, 1, 0),  # not ASCII: a pax path record
        (b"d" * 160 + b"/" + b"f" * 101, 1, 1, 0),  # no split fits ustar
        (b"big", 8**11, 1, 0),  # size past 11 octal digits
        (b"old", 1, -1, 0),  # mtime before 1970
        (b"uid", 1, 1, 8**7),  # uid past 7 octal digits
    ],
)
def test_encode_into_declines_what_needs_pax(name: bytes, size: int, mtime: int, uid: int) -> None:
    buf = bytearray(1024)
    owner = tarheader.owner_fields(0o644, uid, 0, b"", b"")
    assert owner is None or not tarheader.encode_into(buf, 0, name, tarheader.REGTYPE, size, mtime, owner)
    assert (owner is None) == (uid > 8**7 - 1)
    assert buf == bytearray(1024)
    assert len(tarheader.encode(name, typeflag=tarheader.REGTYPE, size=size, mtime=mtime, uid=uid)) > 512
