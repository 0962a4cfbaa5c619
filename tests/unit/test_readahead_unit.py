"""The restore's read-ahead thread: the bytes come through whole and in order, the source's
error reaches the reader, and a reader that stops early leaves no thread behind."""

from __future__ import annotations

import io
import random
import threading

import pytest

from instance_agent.readahead import ReadAhead


def test_every_byte_comes_through_in_order_whatever_the_read_sizes() -> None:
    data = random.Random(3).randbytes(5 * 1024 * 1024 + 17)
    sizes = random.Random(4)
    with ReadAhead(io.BytesIO(data).read, chunk=65536, depth=2) as ahead:
        got = bytearray()
        while chunk := ahead.read(sizes.choice((1, 512, 10240, 1 << 20))):
            got += chunk
        assert ahead.read(512) == b""
    assert bytes(got) == data


def test_the_source_s_error_is_raised_to_the_reader_after_the_bytes_before_it() -> None:
    failure = ConnectionResetError("peer reset")
    calls = iter([b"a" * 10, b"b" * 10])

    def source(_: int) -> bytes:
        try:
            return next(calls)
        except StopIteration:
            raise failure from None

    with ReadAhead(source, chunk=10) as ahead:
        assert ahead.read(10) + ahead.read(10) == b"a" * 10 + b"b" * 10
        with pytest.raises(ConnectionResetError) as caught:
            ahead.read(10)
    assert caught.value is failure


def test_a_reader_that_stops_early_stops_the_thread() -> None:
    endless = io.BytesIO(b"x" * (64 << 20))
    ahead = ReadAhead(endless.read, chunk=4096, depth=2)
    assert ahead.read(100) == b"x" * 100
    ahead.close()  # the producer is blocked on a full queue
    assert [t for t in threading.enumerate() if t.name == "read-ahead"] == []
