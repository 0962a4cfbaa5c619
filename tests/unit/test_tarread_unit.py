"""tarread.plain reads a plain POSIX header exactly as tarfile's frombuf reads it, and declines
every other block: it may never accept a block tarfile would refuse, or read one differently."""

from __future__ import annotations

import tarfile

import pytest

from instance_agent import tarheader, tarread

ENC, ERR = "utf-8", "surrogateescape"
LONG = "var/log/" + "d" * 90 + "/" + "f" * 90 + ".log"  # over 100: split into prefix + name
SLOTS = ("name", "mode", "uid", "gid", "size", "mtime", "chksum", "type", "linkname", "uname", "gname")
SLOTS += ("devmajor", "devminor", "pax_headers", "sparse")


def fields(info: tarfile.TarInfo) -> dict[str, object]:
    return {slot: getattr(info, slot) for slot in SLOTS}


def member(name: str, kind: bytes = tarfile.REGTYPE, **attrs: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = 4096 if kind == tarfile.REGTYPE else 0
    info.mode, info.mtime, info.uname, info.gname = 0o640, 1_700_000_000, "app", "adm"
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


def first_block(info: tarfile.TarInfo, fmt: int) -> bytes:
    return info.tobuf(fmt, ENC, ERR)[: tarheader.BLOCK]


PLAIN = [
    member("var/log/app.log"),
    member("var/log/app.log", uid=1000, gid=1000, mode=0o4755),
    member("var/log/", tarfile.DIRTYPE, mode=0o2775),
    member("var/log/current", tarfile.SYMTYPE, linkname="app.log"),
    member("var/log/again.log", tarfile.LNKTYPE, linkname="var/log/app.log"),
    member(LONG),
    member(LONG.rsplit("/", 1)[0] + "/", tarfile.DIRTYPE),
    member("x", size=8**11 - 1, mtime=0, uid=8**7 - 1, gid=8**7 - 1, uname="", gname=""),
]


@pytest.mark.parametrize("info", PLAIN, ids=lambda i: f"{i.type!r}:{i.name[:20]}")
def test_a_plain_ustar_header_is_read_as_tarfile_reads_it(info: tarfile.TarInfo) -> None:
    buf = first_block(info, tarfile.USTAR_FORMAT)
    got = tarread.plain(tarfile.TarInfo, buf, ENC, ERR)
    assert got is not None, "a plain header must take the fast path"
    assert fields(got) == fields(tarfile.TarInfo.frombuf(buf, ENC, ERR))


def test_our_own_encoder_s_headers_take_the_fast_path() -> None:
    buf = tarheader.encode(
        b"var/log/app.log", typeflag=tarheader.REGTYPE, size=12, mode=0o644, mtime=1_700_000_000,
        uid=0, gid=0, uname=b"root", gname=b"root",
    )  # fmt: skip
    got = tarread.plain(tarfile.TarInfo, buf, ENC, ERR)
    assert got is not None
    assert fields(got) == fields(tarfile.TarInfo.frombuf(buf, ENC, ERR))


@pytest.mark.parametrize(
    ("info", "fmt"),
    [
        (member("var/log/app.log"), tarfile.GNU_FORMAT),  # GNU magic
        (member("var/log/app.log", size=8**11), tarfile.GNU_FORMAT),  # a base-256 size
        (member("v" * 200), tarfile.GNU_FORMAT),  # a GNU long-name header first
        (member("journal-é.log"), tarfile.PAX_FORMAT),  # a pax header first
        (member("fifo", tarfile.FIFOTYPE), tarfile.USTAR_FORMAT),
        (member("dev", tarfile.CHRTYPE), tarfile.USTAR_FORMAT),
    ],
    ids=["gnu", "base256", "gnu-longname", "pax", "fifo", "device"],
)
def test_anything_but_a_plain_posix_header_is_declined(info: tarfile.TarInfo, fmt: int) -> None:
    assert tarread.plain(tarfile.TarInfo, first_block(info, fmt), ENC, ERR) is None


def test_a_name_is_decoded_with_the_encoding_asked_for_even_when_its_owner_was_read_before() -> None:
    buf = first_block(member("var/log/app.log", uname="jos\u00e9"), tarfile.USTAR_FORMAT)
    for encoding in ("utf-8", "latin-1", "utf-8"):
        got = tarread.plain(tarfile.TarInfo, buf, encoding, ERR)
        assert got is not None
        assert fields(got) == fields(tarfile.TarInfo.frombuf(buf, encoding, ERR))


def test_the_end_of_archive_block_and_short_blocks_are_declined() -> None:
    assert tarread.plain(tarfile.TarInfo, bytes(512), ENC, ERR) is None
    assert tarread.plain(tarfile.TarInfo, first_block(PLAIN[0], tarfile.USTAR_FORMAT)[:511], ENC, ERR) is None


def test_a_header_only_the_signed_checksum_matches_is_left_to_tarfile() -> None:
    buf = bytearray(first_block(member("var/log/app.log"), tarfile.USTAR_FORMAT))
    buf[20] = 0xE9  # a byte above 127 in the name: the signed and unsigned sums differ
    signed = 256 + sum(b - 256 if b > 127 else b for i, b in enumerate(buf) if not 148 <= i < 156)
    buf[148:156] = b"%06o\0 " % signed
    assert tarread.plain(tarfile.TarInfo, bytes(buf), ENC, ERR) is None
    assert tarfile.TarInfo.frombuf(bytes(buf), ENC, ERR).name.startswith("var/log/app")


# 0x1C: whitespace to str.strip (tarfile's), not to bytes.strip; 0x5F: "_", which int() takes.
@pytest.mark.parametrize("value", [0x00, 0x1C, 0x20, 0x37, 0x38, 0x5F, 0x80, 0xFF])
def test_no_changed_byte_is_accepted_where_tarfile_refuses_it_or_read_otherwise(value: int) -> None:
    """Every position of a plain header, set to `value` (with and without its checksum
    mended): the fast path declines it, or agrees with tarfile field by field."""
    original = first_block(PLAIN[3], tarfile.USTAR_FORMAT)
    taken = 0
    for pos in range(tarheader.BLOCK):
        for mend in (False, True):
            buf = bytearray(original)
            buf[pos] = value
            if mend and not 148 <= pos < 156:
                buf[148:156] = b"%06o\0 " % (256 + sum(buf[:148]) + sum(buf[156:]))
            block = bytes(buf)
            got = tarread.plain(tarfile.TarInfo, block, ENC, ERR)
            try:
                want = fields(tarfile.TarInfo.frombuf(block, ENC, ERR))
            except tarfile.HeaderError:
                assert got is None, f"byte {pos} = {value:#x}: tarfile refuses it, the fast path took it"
                continue
            if got is not None:
                assert fields(got) == want, f"byte {pos} = {value:#x}: read differently"
                taken += 1
    assert taken > 0  # the comparison above ran on blocks the fast path did take
