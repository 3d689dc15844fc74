"""Fixtures shared by the suites that talk to a real ``lensserve serve`` process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
CLEAN_SAMPLES = sorted((REPO / "examples" / "cutouts" / "clean").glob("*.fits"))


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


#: How long a launched server may take to load and warm up its models (seconds).
SERVER_START_TIMEOUT_S = 90.0


@dataclass
class ServerProcess:
    """A ``python -m service serve`` child process and where it listens."""

    process: subprocess.Popen[bytes]
    url: str
    port: int
    log_path: Path

    def log(self) -> str:
        """Everything the server wrote to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """Kill the server and everything it started (decode fork server and workers).

        The server leads its own process group, so one signal reaches the children that
        killing the server alone would leave behind.
        """
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # the group is gone already
        self.process.wait()


def wait_until_ready(server: ServerProcess, timeout_s: float = SERVER_START_TIMEOUT_S) -> None:
    """Poll ``/health/ready`` until 200; fail with the server's log if it exits or never is."""
    deadline = time.monotonic() + timeout_s
    while True:
        if server.process.poll() is not None:
            pytest.fail(f"lensserve serve exited with {server.process.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/health/ready", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"lensserve serve was not ready within {timeout_s} s:\n{server.log()}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def launch_server(tmp_path_factory) -> Iterator[Callable[..., ServerProcess]]:
    """A factory of ready servers: ``launch_server(LENSSERVE_X="1")``; all killed at the end."""
    started: list[ServerProcess] = []

    def launch(**env: str) -> ServerProcess:
        port = free_port()
        log_path = tmp_path_factory.mktemp("server") / "server.log"
        environment = {
            **{k: v for k, v in os.environ.items() if not k.startswith("LENSSERVE_")},
            "LENSSERVE_DEVICE": "cpu",
            "LENSSERVE_LOG_LEVEL": "info",
            # Admission refuses work past 2 s of expected wait; a test machine that is busy
            # elsewhere would then get 503s in tests that are not about admission (those set it).
            "LENSSERVE_MAX_QUEUE_WAIT_S": "60",
            **env,
        }
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "service",
                    "serve",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--models-dir",
                    str(REPO / "models"),
                ],
                cwd=REPO,
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, for stop()
            )
        server = ServerProcess(process, f"http://127.0.0.1:{port}", port, log_path)
        started.append(server)
        wait_until_ready(server)
        return server

    yield launch
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def live_server(launch_server: Callable[..., ServerProcess]) -> str:
    """A real ``python -m service serve`` on the CPU; its base URL once ready."""
    return launch_server(LENSSERVE_LOG_LEVEL="warning").url
