"""The SeaweedFS fixture's clean-up must never take a live server's socket.

weed 4.x names its gRPC unix sockets in /tmp after its ports. Once one weed stops, its ports
are free; under pytest-xdist another worker's weed may already use one of them, with a live
socket at the very name the first one would clean up. Removing it cut that weed off from its
own master ("dial unix /tmp/seaweedfs-master-grpc-N.sock: no such file") for the rest of the run.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.seaweed import remove_dead_sockets


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # A unix socket path must stay under 108 bytes: pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="weed-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_stopped_weeds_dead_sockets_go_and_a_live_one_of_the_same_port_stays(short_dir: Path) -> None:
    live_path = short_dir / "seaweedfs-master-grpc-41000.sock"
    dead_path = short_dir / "seaweedfs-s3-grpc-41001.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(live_path))
        live.listen()
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dead.bind(str(dead_path))
        dead.close()  # the file stays behind, as a killed weed leaves it
        removed = remove_dead_sockets(short_dir, [41000, 41001, 41002])
        assert removed == [dead_path]
        assert live_path.is_socket() and not dead_path.exists()
