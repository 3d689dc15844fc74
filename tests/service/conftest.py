"""Fixtures shared by the suites that talk to a real ``lensserve serve`` process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
CLEAN_SAMPLES = sorted((REPO.parent / "shared" / "samples" / "clean").glob("*.fits"))


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def live_server() -> Iterator[str]:
    """A real ``python -m service serve`` on the CPU; yields its base URL once ready."""
    port = free_port()
    env = {**os.environ, "LENSSERVE_DEVICE": "cpu", "LENSSERVE_LOG_LEVEL": "warning"}
    command = [sys.executable, "-m", "service", "serve", "--port", str(port), "--no-access-log"]
    process = subprocess.Popen(
        [*command, "--models-dir", str(REPO / "models")],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90.0
        while True:
            if process.poll() is not None:
                output = process.stdout.read().decode() if process.stdout else ""
                pytest.fail(f"lensserve serve exited with {process.returncode}:\n{output}")
            try:
                if httpx.get(f"{url}/health/ready", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("lensserve serve did not become ready within 90 s")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
