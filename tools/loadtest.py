"""Open-loop load test of a lensserve server on loopback: ``make loadtest``.

1. Starts ``python -m service serve`` on a free port (or targets ``--url``).
2. Warms it up for ``--warmup-s`` seconds, then measures capacity:
   ``--probe-connections`` clients post back to back for ``--probe-s``
   seconds; capacity is the rate of 200 answers (requests/s).
3. Offers ``--overload`` times that rate for ``--duration-s`` seconds, open
   loop (a request leaves on schedule whether or not earlier ones finished),
   over at most ``--max-connections`` keep-alive connections: a bounded
   generator. A request that finds every connection busy is not sent and is
   counted as ``not_sent``.
4. Samples the resident memory (``/proc/<pid>/status``) of the server and of
   the server with its child processes (decode workers) every second.

It prints a JSON report: answers by status, goodput (200 answers per second,
and that over the probed capacity), refusals (503 answers per second), socket
errors, latency quantiles of the admitted (200) and refused (503) requests, and
RSS over time. Each
request is one FITS cutout posted raw, at the server's default MC samples.
It talks plain HTTP/1.1 over asyncio streams so that the generator, which
shares the machine with the server, stays cheap.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SAMPLE = REPO / "examples" / "cutouts" / "clean" / "00000.fits"
#: uvicorn closes a keep-alive connection idle for 5 s (``timeout_keep_alive``); like any
#: HTTP client, the generator does not reuse one idle for nearly that long.
MAX_IDLE_S = 3.0


@dataclass
class Tally:
    """What one phase of the test saw."""

    statuses: dict[int, int] = field(default_factory=dict)
    latencies_s: dict[int, list[float]] = field(default_factory=dict)
    socket_errors: dict[str, int] = field(default_factory=dict)
    not_sent: int = 0

    def record(self, status: int, latency_s: float) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        self.latencies_s.setdefault(status, []).append(latency_s)

    def summary(self) -> dict[str, object]:
        quantiles = {
            str(status): {
                f"p{q}": round(float(np.percentile(values, q)) * 1000, 1) for q in (50, 90, 99)
            }
            | {"max": round(max(values) * 1000, 1)}
            for status, values in sorted(self.latencies_s.items())
        }
        return {
            "answers_by_status": {str(k): v for k, v in sorted(self.statuses.items())},
            "socket_errors": self.socket_errors,
            "not_sent_all_connections_busy": self.not_sent,
            "latency_ms_by_status": quantiles,
        }


class Connection:
    """One keep-alive HTTP/1.1 connection that sends a prepared request and reads the answer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def exchange(self, request: bytes) -> tuple[int, bool]:
        """Send ``request``; return the status and whether the server keeps the connection."""
        self.writer.write(request)
        await self.writer.drain()
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("the server closed the connection without answering")
        status = int(status_line.split()[1])
        length, keep_alive = 0, True
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "connection" and value.strip().lower() == "close":
                keep_alive = False
        await self.reader.readexactly(length)
        return status, keep_alive

    def close(self) -> None:
        self.writer.close()


class Pool:
    """At most ``max_connections`` connections; a request finding all busy is not sent."""

    def __init__(self, host: str, port: int, max_connections: int) -> None:
        self.host, self.port = host, port
        self.max_connections = max_connections
        self.idle: list[tuple[Connection, float]] = []
        self.opened = 0

    def _reusable(self) -> Connection | None:
        """The most recently used idle connection the server has not timed out."""
        while self.idle:
            connection, idle_since = self.idle.pop()
            if time.perf_counter() - idle_since < MAX_IDLE_S and not connection.reader.at_eof():
                return connection
            connection.close()
            self.opened -= 1
        return None

    async def _open(self, tally: Tally) -> Connection | None:
        """A new connection; None when all are busy (not sent) or connecting fails."""
        if self.opened >= self.max_connections:
            tally.not_sent += 1
            return None
        self.opened += 1
        try:
            return await Connection.open(self.host, self.port)
        except OSError as exc:
            self.opened -= 1
            name = type(exc).__name__
            tally.socket_errors[name] = tally.socket_errors.get(name, 0) + 1
            return None

    async def send(self, request: bytes, tally: Tally) -> None:
        connection = self._reusable() or await self._open(tally)
        if connection is None:
            return
        started = time.perf_counter()
        try:
            status, keep_alive = await connection.exchange(request)
        except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError) as exc:
            name = type(exc).__name__
            tally.socket_errors[name] = tally.socket_errors.get(name, 0) + 1
            connection.close()
            self.opened -= 1
            return
        tally.record(status, time.perf_counter() - started)
        if keep_alive:
            self.idle.append((connection, time.perf_counter()))
        else:
            connection.close()
            self.opened -= 1

    def close(self) -> None:
        for connection, _ in self.idle:
            connection.close()


def build_request(host: str, port: int, body: bytes) -> bytes:
    head = (
        f"POST /v1/predict HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/fits\r\nContent-Length: {len(body)}\r\n"
    )
    api_key = os.environ.get("LOADTEST_API_KEY")
    if api_key:
        head += f"X-API-Key: {api_key}\r\n"
    return head.encode() + b"\r\n" + body


async def closed_loop(pool: Pool, request: bytes, *, clients: int, duration_s: float) -> Tally:
    """``clients`` workers posting back to back: the server's capacity."""
    tally = Tally()
    deadline = time.perf_counter() + duration_s

    async def worker() -> None:
        while time.perf_counter() < deadline:
            await pool.send(request, tally)

    await asyncio.gather(*(worker() for _ in range(clients)))
    return tally


async def open_loop(pool: Pool, request: bytes, *, rate_per_s: float, duration_s: float) -> Tally:
    """Requests leave every ``1 / rate_per_s`` seconds for ``duration_s``, whatever happens."""
    tally = Tally()
    tasks: set[asyncio.Task[None]] = set()
    started = time.perf_counter()
    for index in range(int(rate_per_s * duration_s)):
        delay = started + index / rate_per_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(pool.send(request, tally))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    return tally


def rss_mib(pid: int) -> float:
    """Resident memory of process ``pid`` (MiB), from /proc; 0 once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def descendants(pid: int) -> list[int]:
    """Processes started by ``pid``, at any depth (the decode fork server and its workers)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


async def sample_rss(
    pid: int, samples: list[tuple[float, float, float]], stop: asyncio.Event
) -> None:
    """Every second: (time s, server RSS MiB, server plus its child processes' RSS MiB)."""
    started = time.perf_counter()
    while not stop.is_set():
        server = rss_mib(pid)
        total = server + sum(rss_mib(child) for child in descendants(pid))
        samples.append((round(time.perf_counter() - started, 1), round(server, 1), round(total, 1)))
        try:
            await asyncio.wait_for(stop.wait(), timeout=1.0)
        except TimeoutError:
            pass


def start_server(port: int) -> subprocess.Popen[bytes]:
    env = {"LENSSERVE_DEVICE": "cpu", "LENSSERVE_LOG_LEVEL": "warning", **os.environ}
    return subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--port", str(port), "--no-access-log"],
        cwd=REPO,
        env=env,
    )


async def wait_ready(host: str, port: int, timeout_s: float = 120.0) -> None:
    request = f"GET /health/ready HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        try:
            connection = await Connection.open(host, port)
            status, _ = await connection.exchange(request)
            connection.close()
            if status == 200:
                return
        except OSError:
            pass
        await asyncio.sleep(0.2)
    raise SystemExit(f"the server at {host}:{port} was not ready within {timeout_s} s")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def run(args: argparse.Namespace) -> dict[str, object]:
    server = None
    if args.url:
        parts = urlsplit(args.url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
    else:
        host, port = "127.0.0.1", free_port()
        server = start_server(port)
    pid = args.pid or (server.pid if server else None)
    try:
        await wait_ready(host, port)
        request = build_request(host, port, args.sample.read_bytes())
        pool = Pool(host, port, args.max_connections)
        # Start the decode workers and fill the caches, so the probe measures a warm server.
        await closed_loop(pool, request, clients=args.probe_connections, duration_s=args.warmup_s)
        probe = await closed_loop(
            pool, request, clients=args.probe_connections, duration_s=args.probe_s
        )
        capacity = probe.statuses.get(200, 0) / args.probe_s
        rate = args.overload * capacity
        rss: list[tuple[float, float, float]] = []
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_rss(pid, rss, stop)) if pid else None
        load = await open_loop(pool, request, rate_per_s=rate, duration_s=args.duration_s)
        stop.set()
        if sampler is not None:
            await sampler
        pool.close()
    finally:
        if server is not None:
            server.terminate()
            server.wait(60)
    return {
        "probe": {
            "connections": args.probe_connections,
            "seconds": args.probe_s,
            "capacity_per_s": round(capacity, 1),
            **probe.summary(),
        },
        "load": {
            "offered_per_s": round(rate, 1),
            "seconds": args.duration_s,
            "max_connections": args.max_connections,
            **_goodput(load, seconds=args.duration_s, capacity_per_s=capacity),
            **load.summary(),
        },
        "rss_mib": _rss_summary(rss),
        "cpus": os.cpu_count(),
        "load_average_after": os.getloadavg(),
    }


def _goodput(tally: Tally, *, seconds: float, capacity_per_s: float) -> dict[str, float]:
    """Answers with 200 and with 503 per second of the phase; goodput over capacity."""
    goodput = tally.statuses.get(200, 0) / seconds
    return {
        "goodput_per_s": round(goodput, 1),
        "goodput_over_capacity": round(goodput / capacity_per_s, 2) if capacity_per_s else 0.0,
        "refused_per_s": round(tally.statuses.get(503, 0) / seconds, 1),
    }


def _rss_summary(samples: list[tuple[float, float, float]]) -> dict[str, object]:
    """Start, end, max and the slope over the second half, for the server and with children."""
    if not samples:
        return {}
    summary: dict[str, object] = {}
    second_half = samples[len(samples) // 2 :]
    for column, name in ((1, "server"), (2, "server_and_children")):
        values = [sample[column] for sample in samples]
        slope = (
            np.polyfit([s[0] for s in second_half], [s[column] for s in second_half], 1)[0] * 60
            if len(second_half) > 2
            else 0.0
        )
        summary[name] = {
            "start": values[0],
            "end": values[-1],
            "max": max(values),
            "second_half_slope_mib_per_min": round(float(slope), 2),
        }
    summary["samples_s_server_total"] = samples
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="target a running server instead of starting one")
    parser.add_argument("--pid", type=int, help="process whose RSS to sample (with --url)")
    parser.add_argument("--sample", type=Path, default=DEFAULT_SAMPLE, help="FITS file to post")
    parser.add_argument("--duration-s", type=float, default=60.0, help="overload phase (s)")
    parser.add_argument("--overload", type=float, default=2.0, help="offered rate / capacity")
    parser.add_argument("--warmup-s", type=float, default=5.0, help="unmeasured warm-up (s)")
    parser.add_argument("--probe-s", type=float, default=10.0, help="capacity probe (s)")
    parser.add_argument("--probe-connections", type=int, default=16, help="probe clients")
    parser.add_argument("--max-connections", type=int, default=256, help="generator bound")
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    return parser


def main() -> int:
    args = build_parser().parse_args()
    report = asyncio.run(run(args))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    load = report["load"]
    assert isinstance(load, dict)
    unexpected = set(load["answers_by_status"]) - {"200", "503"}
    return 1 if unexpected or load["socket_errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
