"""``lensserve bench``: throughput of the shipped models, in-process and over HTTP, in one run.

Rows (all on the same cutouts, on the machine it runs on):

(a) in-process onnxruntime, classifier + regressor, batch of ``batch_size``: the floor;
(b) in-process full answer from the same ready, preprocessed batch as (a): every model
    call with ``num_samples`` MC passes, the summaries, the result objects and the JSON;
    (b)/(a) is what the 100-sample distribution costs next to the point estimates;
(b') in-process FITS to JSON: (b) plus decoding and preprocessing the ``batch_size``
    FITS files, the in-process version of what the HTTP rows do; the path ratios
    (c)/(b') and (d)/(b') use it, so decoding is on both sides;
(c) HTTP: multipart requests of ``batch_size`` files to a real ``lensserve serve``;
(d) HTTP: single-cutout requests at several concurrencies, with latency percentiles;
(e) what a user would do without lensserve: the ``.keras`` models called with
    ``model.predict`` once per cutout (needs the ``bench`` extra; TensorFlow is
    imported only by :mod:`service.bench.keras_baseline`, only when this row runs);
(f) HTTP: the whole cutouts folder in one request, one client;
(g) HTTP flood: single-cutout requests from ``flood_connections`` clients that never
    back off (each sends its next request as soon as it has an answer, 503 or not):
    goodput (cutouts answered with 200 per second), refusals (503s per second), socket
    errors, and the p99 latency of the admitted (200) requests;
(h) in-process ``explain=true``: (b) plus the occlusion maps of every cutout
    (:mod:`service.core.explain`); (b)/(h) is what an explanation costs (target <= 10).

The server runs with the default settings (only the files per request and the MC
samples are set), so (d@max) and (g) show what admission does to a new user's server.

(a), (b), (h), (c) and the most concurrent (d) alternate in rounds (``rounds``) against one
server that idles while the in-process rows run, so their ratios compare the same minutes
of a machine whose speed drifts; the other rows run once each, after an untimed warm-up.

The HTTP load comes from ``wrk`` (C, epoll, one thread) so the client spends
little of the server's CPU; its CPU time is measured and reported. Its script counts
the answers by status; the latency percentiles are over every answer, except the p99
of the 200s: wrk keeps one latency distribution, and since a refusal is answered
before its body is read, faster than any admitted request, the slowest 1% of the
200s are the slowest ``n_200 / 100`` answers of all, wrk's percentile
``100 - n_200 / n``. (A refusal slower than that p99 would make it an overestimate.)
"""

from __future__ import annotations

import io
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from astropy.io import fits

from service.contract.cards import CLASSIFIER_NAME, REGRESSOR_NAME
from service.core.cpu import available_cores
from service.core.inference import PreparedCutout, predict_chunk, prepare_cutout
from service.core.runtime import Device, OnnxModelRuntime
from service.fits.raw import DEFAULT_LIMITS
from service.schemas import PredictResponse, encode_result
from service.settings import Settings

#: wrk's script: POST one fixed body, count the answers by status; print the figures as
#: one JSON line when done (module docstring: the p99 of the 200s).
_WRK_SCRIPT = r"""
wrk.method = "POST"
local f = assert(io.open(os.getenv("LENSSERVE_BENCH_BODY"), "rb"))
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = os.getenv("LENSSERVE_BENCH_CONTENT_TYPE")
local threads = {}
function setup(thread)
  table.insert(threads, thread)
end
function init(args)
  ok, refused, other = 0, 0, 0
end
function response(status, headers, body)
  if status == 200 then
    ok = ok + 1
  elseif status == 503 then
    refused = refused + 1
  else
    other = other + 1
  end
end
done = function(summary, latency, requests)
  local n = {ok = 0, refused = 0, other = 0}
  for _, thread in ipairs(threads) do
    for key in pairs(n) do
      n[key] = n[key] + thread:get(key)
    end
  end
  local e = summary.errors
  local ok_quantile = 100 - n.ok / math.max(summary.requests, 1)
  io.write(string.format(
    'WRK_JSON {"requests": %d, "ok": %d, "refused": %d, "other": %d, '
    .. '"socket_errors": %d, "duration_us": %d, "p50_us": %d, "p95_us": %d, '
    .. '"p99_us": %d, "p99_ok_us": %d}\n',
    summary.requests, n.ok, n.refused, n.other, e.connect + e.read + e.write + e.timeout,
    summary.duration, latency:percentile(50), latency:percentile(95),
    latency:percentile(99), latency:percentile(ok_quantile)))
end
"""
_BOUNDARY = "lensservebenchboundary"

FLOOR_ROW = "(a) in-process cls+reg"
FULL_ROW = "(b) in-process full answer"
FITS_TO_JSON_ROW = "(b') in-process FITS->JSON"
EXPLAIN_ROW = "(h) in-process explain"


@dataclass(frozen=True)
class BenchConfig:
    """What ``lensserve bench`` measures, and for how long."""

    models_dir: Path
    cutouts_dir: Path | None = None
    """FITS cutouts to send (a folder); None synthesises ``batch_size`` noise cubes."""
    device: Device = "cpu"
    batch_size: int = 64
    """Cutouts per in-process batch and per multipart request (cutouts)."""
    num_samples: int = 100
    """MC-dropout passes per cutout (samples)."""
    concurrencies: tuple[int, ...] = (1, 8, 64)
    """Concurrent single-cutout clients for row (d) (connections)."""
    duration_s: float = 10.0
    """How long each row runs (seconds)."""
    rounds: int = 3
    """Alternating rounds of (a), (b), (c) and (d@max), each row ``duration_s`` long in each
    (count).
    Rounds are not shorter than a row: wrk does not count the requests still in flight
    when it stops, which would bias short runs of 64-file requests low."""
    warmup_s: float = 2.0
    """Load sent before each HTTP row and not counted, as the in-process rows call once
    before timing (seconds; 0 skips it, wrk rounds up to whole seconds)."""
    keras_cutouts: int = 20
    """Cutouts sent through the Keras baseline (e); 0 skips it (cutouts)."""
    flood_connections: int = 256
    """Clients of row (g), which never back off; 0 skips it (connections)."""


@dataclass(frozen=True)
class BenchRow:
    """One line of the table."""

    name: str
    cutouts_per_s: float
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    note: str = ""
    refused_per_s: float = 0.0
    """Answers refused with 503 per second (requests/s); HTTP rows only."""
    socket_errors: int = 0
    """Connect, read, write and timeout errors wrk saw (count); row (g) only, the other
    rows fail on any."""


@dataclass
class BenchReport:
    """Every row plus where they were measured."""

    rows: list[BenchRow] = field(default_factory=list)
    provider: str = ""
    cores: int = 0
    model_instances: int = 1
    """Batches run at once, in-process as in the server (count)."""
    intra_op_threads: int = 0
    """onnxruntime threads per operator of each batch (count)."""
    server_peak_rss_mib: float | None = None
    server_steady_rss_mib: float | None = None
    server_tree_peak_rss_mib: float | None = None
    """Server plus its decode worker processes: the sum of each one's peak (MiB)."""
    server_tree_steady_pss_mib: float | None = None
    """Server plus its decode worker processes: proportional set size, summed (MiB)."""
    client_cpu_fraction: float | None = None
    """wrk's CPU time over the wall time of the HTTP rows (cores)."""
    max_queue_wait_s: float | None = None
    """The server's admission deadline, the bound on row (g)'s p99 less 1 s (seconds)."""

    def rate(self, prefix: str) -> float | None:
        """Cutouts/s of the first row whose name starts with ``prefix``."""
        return next((r.cutouts_per_s for r in self.rows if r.name.startswith(prefix)), None)


def load_cutout_bytes(config: BenchConfig) -> list[bytes]:
    """``batch_size`` FITS files, cycling through ``cutouts_dir`` or synthesised."""
    if config.cutouts_dir is not None:
        files = sorted(config.cutouts_dir.glob("*.fits"))
        if not files:
            raise FileNotFoundError(f"no *.fits files in {config.cutouts_dir}")
        return [files[i % len(files)].read_bytes() for i in range(config.batch_size)]
    rng = np.random.default_rng(0)
    out = []
    for _ in range(config.batch_size):
        buffer = io.BytesIO()
        fits.PrimaryHDU(rng.normal(10.0, 1.0, (3, 64, 64)).astype(np.float32)).writeto(buffer)
        out.append(buffer.getvalue())
    return out


#: Files in row (f)'s request without a cutouts folder: as many as the sample cutouts.
FOLDER_REQUEST_FILES = 12


def load_folder_request(config: BenchConfig, cycled: Sequence[bytes]) -> list[bytes]:
    """Row (f)'s request: every file of ``cutouts_dir`` once, else the first synthesised ones."""
    if config.cutouts_dir is not None:
        return [path.read_bytes() for path in sorted(config.cutouts_dir.glob("*.fits"))]
    return list(cycled[:FOLDER_REQUEST_FILES])


def _prepare(runtime: OnnxModelRuntime, files: Sequence[bytes]) -> list[PreparedCutout]:
    """Decode and preprocess ``files`` on this thread."""
    return [
        prepare_cutout(data, filename=f"{i}.fits", models=runtime.models, limits=DEFAULT_LIMITS)
        for i, data in enumerate(files)
    ]


def _rate(
    call: Callable[[], object], *, cutouts_per_call: int, duration_s: float, callers: int = 1
) -> float:
    """Cutouts/s of ``call`` run back to back by ``callers`` threads for ``duration_s``.

    Each thread calls once before the timed window (warm caches) and at least twice in it;
    ``callers`` is the server's ``model_instances``, so in-process rows run batches the
    way the server does.
    """
    with ThreadPoolExecutor(max_workers=callers) as pool:
        list(pool.map(lambda _: call(), range(callers)))
        started = time.perf_counter()

        def loop(_: int) -> int:
            calls = 0
            while calls < 2 or time.perf_counter() - started < duration_s:
                call()
                calls += 1
            return calls

        calls = sum(pool.map(loop, range(callers)))
    return calls * cutouts_per_call / (time.perf_counter() - started)


def measure_floor(
    runtime: OnnxModelRuntime, images: np.ndarray, duration_s: float, *, callers: int = 1
) -> float:
    """(a): classifier + regressor on one batch, no decoding, no MC (cutouts/s)."""

    def call() -> None:
        runtime.run_model(CLASSIFIER_NAME, {"image": images})
        runtime.run_model(REGRESSOR_NAME, {"image": images})

    return _rate(call, cutouts_per_call=len(images), duration_s=duration_s, callers=callers)


def _answer_json(
    runtime: OnnxModelRuntime,
    prepared: Sequence[PreparedCutout],
    samples: int,
    *,
    explain: bool = False,
) -> str:
    """Everything after preprocessing: the model calls, summaries, results and the JSON."""
    outcomes = predict_chunk(runtime, prepared, num_samples=samples, explain=explain)
    return PredictResponse(
        model_versions=runtime.models.versions,
        results=[
            encode_result(o, filename=c.filename) for o, c in zip(outcomes, prepared, strict=True)
        ],
    ).model_dump_json()


def measure_full_answer(
    runtime: OnnxModelRuntime,
    prepared: Sequence[PreparedCutout],
    *,
    num_samples: int,
    duration_s: float,
    callers: int = 1,
    explain: bool = False,
) -> float:
    """(b): the full answer for one ready, preprocessed batch, in-process (cutouts/s);
    (h) with ``explain``: the same answer with each cutout's occlusion maps."""
    return _rate(
        lambda: _answer_json(runtime, prepared, num_samples, explain=explain),
        cutouts_per_call=len(prepared),
        duration_s=duration_s,
        callers=callers,
    )


def measure_fits_to_json(
    runtime: OnnxModelRuntime,
    files: Sequence[bytes],
    *,
    num_samples: int,
    duration_s: float,
    callers: int = 1,
) -> float:
    """(b'): FITS bytes to JSON answer in-process, a batch per call (cutouts/s).

    Each caller decodes its batch on its own thread, then answers it: decoding is mostly
    Python under the GIL, and a pool per batch measured slower than a loop (191 vs 144 ms
    for 64 files on 2 cores).
    """
    return _rate(
        lambda: _answer_json(runtime, _prepare(runtime, files), num_samples),
        cutouts_per_call=len(files),
        duration_s=duration_s,
        callers=callers,
    )


def multipart_body(files: Sequence[bytes]) -> bytes:
    """A ``multipart/form-data`` body with each file under the ``files`` field."""
    parts = []
    for i, data in enumerate(files):
        head = (
            f'--{_BOUNDARY}\r\nContent-Disposition: form-data; name="files"; '
            f'filename="{i}.fits"\r\nContent-Type: application/fits\r\n\r\n'
        )
        parts.append(head.encode() + data + b"\r\n")
    return b"".join(parts) + f"--{_BOUNDARY}--\r\n".encode()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Server:
    """A ``lensserve serve`` child process on a free port, with its RSS sampled."""

    def __init__(self, config: BenchConfig) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "LENSSERVE_DEVICE": config.device,
            "LENSSERVE_MODELS_DIR": str(config.models_dir.resolve()),
            "LENSSERVE_DEFAULT_SAMPLES": str(config.num_samples),
            "LENSSERVE_MAX_FILES": str(max(config.batch_size, 256)),
            "LENSSERVE_LOG_LEVEL": "warning",
        }
        command = [sys.executable, "-m", "service", "serve", "--port", str(self.port)]
        self.process = subprocess.Popen([*command, "--no-access-log"], env=env)
        self.rss_samples_mib: list[float] = []
        self.tree_pss_samples_mib: list[float] = []
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample_rss, daemon=True)

    def _tree_pids(self) -> list[int]:
        """The server and its descendants (decode worker processes, their fork server)."""
        pids, index = [self.process.pid], 0
        while index < len(pids):
            for task in Path(f"/proc/{pids[index]}/task").glob("*"):
                try:
                    pids += [int(c) for c in (task / "children").read_text().split()]
                except OSError:
                    continue
            index += 1
        return pids

    def _status_mib(
        self, key: str, pid: int | None = None, *, file: str = "status"
    ) -> float | None:
        try:
            text = Path(f"/proc/{pid or self.process.pid}/{file}").read_text()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # the kernel reports kB
        return None

    def _tree_mib(self, key: str, *, file: str = "status") -> float:
        return sum(self._status_mib(key, pid, file=file) or 0.0 for pid in self._tree_pids())

    def _sample_rss(self) -> None:
        # Once a second: reading smaps_rollup walks the server's page tables, and at 5 Hz
        # the sampler took 0.04 cores from the server it measures.
        while not self._stop.wait(1.0):
            rss = self._status_mib("VmRSS")
            if rss is not None:
                self.rss_samples_mib.append(rss)
                # PSS, not RSS: the forked workers share pages with their fork server.
                self.tree_pss_samples_mib.append(self._tree_mib("Pss", file="smaps_rollup"))

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"lensserve serve exited with {self.process.returncode}")
            try:
                if httpx.get(f"{self.url}/health/ready", timeout=1.0).status_code == 200:
                    self._sampler.start()
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"lensserve serve was not ready within {timeout_s} s")

    def peak_rss_mib(self) -> float | None:
        return self._status_mib("VmHWM")

    def tree_peak_rss_mib(self) -> float:
        """Sum of each process's own peak: an upper bound on the tree's peak at one time."""
        return self._tree_mib("VmHWM")

    def stop(self) -> None:
        self._stop.set()
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def run_wrk(
    url: str,
    body: bytes,
    *,
    connections: int,
    duration_s: float,
    workdir: Path,
    strict: bool = True,
) -> dict[str, float]:
    """POST ``body`` with ``connections`` keep-alive clients for ``duration_s``; wrk's figures.

    With ``strict``, any socket error or answer other than 200 or 503 fails the run;
    without, they are only counted (row (g)).
    """
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("the HTTP rows need wrk on PATH (Debian/Ubuntu: apt-get install wrk)")
    body_path = workdir / f"body-{len(body)}.bin"
    body_path.write_bytes(body)
    script = workdir / "post.lua"
    script.write_text(_WRK_SCRIPT)
    env = {
        **os.environ,
        "LENSSERVE_BENCH_BODY": str(body_path),
        "LENSSERVE_BENCH_CONTENT_TYPE": f"multipart/form-data; boundary={_BOUNDARY}",
    }
    seconds = max(int(round(duration_s)), 1)
    command = [
        wrk,
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "60s",
        "-s",
        str(script),
    ]
    completed = subprocess.run([*command, url], env=env, capture_output=True, text=True, check=True)
    line = next((ln for ln in completed.stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no figures:\n{completed.stdout}\n{completed.stderr}")
    figures: dict[str, float] = json.loads(line.removeprefix("WRK_JSON "))
    if strict and (figures["socket_errors"] or figures["other"]):
        raise RuntimeError(
            f"wrk saw {figures['socket_errors']:.0f} socket errors and {figures['other']:.0f} "
            f"answers other than 200 or 503:\n{completed.stdout}"
        )
    return figures


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _steady(samples_mib: list[float]) -> float | None:
    """The median of the second half, once every row's buffers have been touched (MiB)."""
    return float(np.median(samples_mib[len(samples_mib) // 2 :])) if samples_mib else None


class _HttpRunner:
    """wrk runs against one server, with the client's CPU time and wall time summed."""

    def __init__(self, server: _Server, config: BenchConfig, workdir: Path) -> None:
        self.url = f"{server.url}/v1/predict?samples={config.num_samples}"
        self.config = config
        self.workdir = workdir
        self.wall_s = 0.0
        # wrk is the only child that exits during the run, so RUSAGE_CHILDREN counts wrk alone.
        self._cpu_before_s = _children_cpu_s()

    def run(
        self, body: bytes, *, connections: int, duration_s: float, strict: bool = True
    ) -> dict[str, float]:
        figures = run_wrk(
            self.url,
            body,
            connections=connections,
            duration_s=duration_s,
            workdir=self.workdir,
            strict=strict,
        )
        self.wall_s += figures["duration_us"] / 1e6
        return figures

    def warm_up(self, body: bytes, *, connections: int) -> None:
        """Untimed load before a row, as the in-process rows call once before timing."""
        if self.config.warmup_s > 0:
            self.run(body, connections=connections, duration_s=self.config.warmup_s)

    def client_cpu_fraction(self) -> float:
        """wrk's CPU time over the wall time of its runs (cores)."""
        return (_children_cpu_s() - self._cpu_before_s) / max(self.wall_s, 1e-9)


def http_row(
    name: str, rounds: Sequence[dict[str, float]], *, per_request: int, connections: int
) -> BenchRow:
    """One HTTP row from one or more wrk runs: their cutouts answered with 200 over their
    time; latency percentiles are the median of the runs' (exact for one run)."""
    seconds = sum(f["duration_us"] for f in rounds) / 1e6
    answered = sum(f["ok"] for f in rounds)
    refused = sum(f["refused"] for f in rounds)
    note = f"{per_request} file(s)/request, {connections} client(s)"
    if refused:
        note += f", {refused:.0f} refused (503)"
    if len(rounds) > 1:
        note += f", {len(rounds)} rounds"
    return BenchRow(
        name=name,
        cutouts_per_s=answered * per_request / seconds,
        p50_ms=float(np.median([f["p50_us"] for f in rounds])) / 1e3,
        p95_ms=float(np.median([f["p95_us"] for f in rounds])) / 1e3,
        p99_ms=float(np.median([f["p99_us"] for f in rounds])) / 1e3,
        note=note,
        refused_per_s=refused / seconds,
    )


def flood_row(figures: dict[str, float], *, connections: int) -> BenchRow:
    """Row (g) from one wrk run: goodput, refusals, socket errors and the p99 of the 200s.

    Its p50 and p95 columns stay empty: over every answer they would mostly time the
    refusals.
    """
    seconds = figures["duration_us"] / 1e6
    note = (
        f"{connections} clients never back off; p99 of the 200s; "
        f"{figures['refused'] / seconds:.0f} refused/s"
    )
    if figures["other"]:
        note += f", {figures['other']:.0f} other answers"
    if figures["socket_errors"]:
        note += f", {figures['socket_errors']:.0f} socket errors"
    return BenchRow(
        name=f"(g) HTTP flood @{connections}",
        cutouts_per_s=figures["ok"] / seconds,
        p99_ms=figures["p99_ok_us"] / 1e3 if figures["ok"] else None,
        note=note,
        refused_per_s=figures["refused"] / seconds,
        socket_errors=int(figures["socket_errors"] + figures["other"]),
    )


def measure_flood(config: BenchConfig, files: Sequence[bytes], http: _HttpRunner) -> BenchRow:
    """(g): single-cutout requests from ``flood_connections`` clients that never back off."""
    figures = http.run(
        multipart_body(files[:1]),
        connections=config.flood_connections,
        duration_s=config.duration_s,
        strict=False,
    )
    return flood_row(figures, connections=config.flood_connections)


def measure_interleaved(
    config: BenchConfig,
    runtime: OnnxModelRuntime,
    files: Sequence[bytes],
    http: _HttpRunner,
    *,
    callers: int,
) -> tuple[float, float, float, BenchRow, BenchRow]:
    """(a), (b), (h), (c) and (d) at the highest concurrency in ``config.rounds`` alternating
    rounds: the cutouts/s of (a), (b) and (h), and the rows of (c) and (d).

    A shared VM's speed drifts by ±10% within minutes; alternating the rows makes (b)/(a),
    (c)/(b) and (d)/(b) compare the same minutes. The server idles while the in-process
    rows run.
    """
    prepared = _prepare(runtime, files)
    images = np.stack([c.image for c in prepared])
    body, single_body = multipart_body(files), multipart_body(files[:1])
    clients = max(config.concurrencies)
    floors, fulls, explained, batches, singles = [], [], [], [], []
    http.warm_up(body, connections=2)
    http.warm_up(single_body, connections=clients)
    for _ in range(config.rounds):
        floors.append(measure_floor(runtime, images, config.duration_s, callers=callers))
        fulls.append(
            measure_full_answer(
                runtime,
                prepared,
                num_samples=config.num_samples,
                duration_s=config.duration_s,
                callers=callers,
            )
        )
        explained.append(
            measure_full_answer(
                runtime,
                prepared,
                num_samples=config.num_samples,
                duration_s=config.duration_s,
                callers=callers,
                explain=True,
            )
        )
        batches.append(http.run(body, connections=2, duration_s=config.duration_s))
        singles.append(http.run(single_body, connections=clients, duration_s=config.duration_s))
    batch_row = http_row("(c) HTTP multipart", batches, per_request=len(files), connections=2)
    name = f"(d) HTTP single @{clients}"
    single_row = http_row(name, singles, per_request=1, connections=clients)
    rates = (float(np.mean(floors)), float(np.mean(fulls)), float(np.mean(explained)))
    return (*rates, batch_row, single_row)


def measure_http(
    config: BenchConfig,
    files: Sequence[bytes],
    http: _HttpRunner,
    folder_files: Sequence[bytes] = (),
) -> list[BenchRow]:
    """(d) at each concurrency below the highest (that one runs in the rounds) and (f),
    each after its warm-up.

    (f) is a person's request: the whole cutouts folder in one multipart POST, one
    client, so its p50 is the time to answer those files with their distributions.
    """
    lower = sorted(set(config.concurrencies) - {max(config.concurrencies)})
    runs = [(f"(d) HTTP single @{c}", files[:1], c) for c in lower]
    if folder_files:
        runs.append(("(f) HTTP one request", folder_files, 1))
    rows = []
    for name, sent, connections in runs:
        body = multipart_body(sent)
        http.warm_up(body, connections=connections)
        figures = http.run(body, connections=connections, duration_s=config.duration_s)
        rows.append(http_row(name, [figures], per_request=len(sent), connections=connections))
    return rows


def _record_server(report: BenchReport, server: _Server, http: _HttpRunner) -> None:
    report.client_cpu_fraction = http.client_cpu_fraction()
    report.server_peak_rss_mib = server.peak_rss_mib()
    report.server_tree_peak_rss_mib = server.tree_peak_rss_mib()
    report.server_steady_rss_mib = _steady(server.rss_samples_mib)
    report.server_tree_steady_pss_mib = _steady(server.tree_pss_samples_mib)


def run_bench(
    config: BenchConfig, *, progress: Callable[[str], None] = lambda _: None
) -> BenchReport:
    """Measure every row: (a), (b), (c) and (d@max) alternate in rounds, the others run once.

    The in-process rows run the server's ``model_instances`` batches at once with its
    ``intra_op_threads`` (both from the ``LENSSERVE_*`` environment the server also reads).
    """
    settings = Settings()
    callers = settings.resolved_model_instances
    runtime = OnnxModelRuntime(
        config.models_dir,
        device=config.device,
        intra_op_threads=settings.resolved_intra_op_threads,
        warmup_batch_sizes=(config.batch_size,),
        warmup_samples=config.num_samples,
    )
    runtime.load()
    report = BenchReport(
        provider=runtime.provider,
        cores=available_cores(),
        model_instances=callers,
        intra_op_threads=runtime.intra_op_threads,
        max_queue_wait_s=settings.max_queue_wait_s,
    )
    files = load_cutout_bytes(config)
    server = _Server(config)
    try:
        server.wait_ready()
        with tempfile.TemporaryDirectory(prefix="lensserve-bench-") as tmp:
            http = _HttpRunner(server, config, Path(tmp))
            progress(f"(a), (b), (h), (c), (d@max) in {config.rounds} alternating rounds")
            floor, full, explain, batch_row, single_row = measure_interleaved(
                config, runtime, files, http, callers=callers
            )
            rounds = f"{config.rounds} rounds"
            note = f"batch {len(files)} x{callers}, ready batch, {rounds}"
            report.rows.append(BenchRow(FLOOR_ROW, floor, note=note))
            note = f"batch {len(files)} x{callers}, {config.num_samples} MC samples, {rounds}"
            report.rows.append(BenchRow(FULL_ROW, full, note=note))
            report.rows.append(BenchRow(EXPLAIN_ROW, explain, note=f"{note}, occlusion maps"))
            progress("(b') in-process FITS to JSON")
            fits_to_json = measure_fits_to_json(
                runtime,
                files,
                num_samples=config.num_samples,
                duration_s=config.duration_s,
                callers=callers,
            )
            note = f"batch {len(files)} x{callers}, {config.num_samples} MC samples, FITS decoded"
            report.rows.append(BenchRow(FITS_TO_JSON_ROW, fits_to_json, note=note))
            report.rows.append(batch_row)
            progress("(d), (f) HTTP")
            others = measure_http(config, files, http, load_folder_request(config, files))
            report.rows += [r for r in others if r.name.startswith("(d)")] + [single_row]
            report.rows += [r for r in others if not r.name.startswith("(d)")]
            if config.flood_connections > 0:
                progress(f"(g) HTTP flood @{config.flood_connections}")
                report.rows.append(measure_flood(config, files, http))
            _record_server(report, server, http)
    finally:
        server.stop()
        runtime.close()
    if config.keras_cutouts > 0:
        progress("(e) Keras model.predict per cutout")
        from service.bench.keras_baseline import measure_keras_per_cutout

        rate = measure_keras_per_cutout(config.models_dir, files[: config.keras_cutouts])
        report.rows.append(BenchRow("(e) Keras predict/cutout", rate, note="1 cutout per call"))
    return report


def _ratio(numerator: float | None, denominator: float | None) -> str:
    return "-" if not numerator or not denominator else f"{numerator / denominator:.2f}"


def _last_rate(report: BenchReport, prefix: str) -> float | None:
    """Cutouts/s of the last row starting with ``prefix`` (the most concurrent (d))."""
    rates = [r.cutouts_per_s for r in report.rows if r.name.startswith(prefix)]
    return rates[-1] if rates else None


def format_report(report: BenchReport) -> str:
    """The table and the target ratios, as printed by ``lensserve bench``."""
    floor = report.rate("(a)")
    header = (
        f"{'row':<26} {'cutouts/s':>10} {'/(a)':>6} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}  note"
    )
    lines = [header, "-" * len(header)]
    for row in report.rows:
        ms = [
            f"{v:8.1f}" if v is not None else f"{'-':>8}"
            for v in (row.p50_ms, row.p95_ms, row.p99_ms)
        ]
        lines.append(
            f"{row.name:<26} {row.cutouts_per_s:10.1f} {_ratio(row.cutouts_per_s, floor):>6} "
            f"{' '.join(ms)}  {row.note}"
        )
    full, explain, fits_to_json, batch, single, keras = (
        report.rate("(b)"),
        report.rate("(h)"),
        report.rate("(b')"),
        report.rate("(c)"),
        _last_rate(report, "(d)"),
        report.rate("(e)"),
    )
    lines += [
        "",
        f"(b)/(a) = {_ratio(full, floor)} (target >= 0.5; both from a ready batch)",
        f"(c)/(b') = {_ratio(batch, fits_to_json)} (target >= 0.8; both decode FITS)",
        f"(d@max)/(b') = {_ratio(single, fits_to_json)} (target >= 0.6; both decode FITS)",
        f"(c)/(e) = {_ratio(batch, keras)} (target >= 20)",
        f"(b)/(h) = {_ratio(full, explain)} (target <= 10: explain=true's cost over the answer's)",
        f"for reference: (b')/(a) = {_ratio(fits_to_json, floor)}, "
        f"(c)/(b) = {_ratio(batch, full)}, (d@max)/(b) = {_ratio(single, full)} "
        "(FITS decode on one side only)",
        *_admission_lines(report, single),
        f"provider {report.provider}; {report.cores} cores; {report.model_instances} model "
        f"instance(s) x {report.intra_op_threads} operator thread(s), in-process and server",
    ]
    if report.server_peak_rss_mib is not None:
        lines.append(
            f"server RSS: peak {report.server_peak_rss_mib:.0f} MiB, steady "
            f"{report.server_steady_rss_mib or 0:.0f} MiB (target <= 1024; with (g) <= 1536)"
        )
    if report.server_tree_steady_pss_mib is not None:
        lines.append(
            "server + decode worker processes: steady PSS "
            f"{report.server_tree_steady_pss_mib:.0f} MiB, sum of peak RSS "
            f"{report.server_tree_peak_rss_mib or 0:.0f} MiB"
        )
    if report.client_cpu_fraction is not None:
        lines.append(f"load generator (wrk) CPU: {report.client_cpu_fraction:.2f} cores")
    return "\n".join(lines)


def _admission_lines(report: BenchReport, single: float | None) -> list[str]:
    """The targets of admission: no refusal at (d@max); (g)'s goodput, errors and p99."""
    singles = [r for r in report.rows if r.name.startswith("(d)")]
    lines = []
    if singles:
        lines.append(f"(d@max) refused {singles[-1].refused_per_s:.1f}/s (target 0)")
    flood = next((r for r in report.rows if r.name.startswith("(g)")), None)
    if flood is not None:
        bound_ms = (report.max_queue_wait_s or 0.0) * 1e3 + 1e3
        p99 = "-" if flood.p99_ms is None else f"{flood.p99_ms:.0f}"
        lines.append(
            f"(g)/(d@max) = {_ratio(flood.cutouts_per_s, single)} (target >= 0.8); (g) "
            f"refused {flood.refused_per_s:.0f}/s, socket errors and other answers "
            f"{flood.socket_errors} (target 0), p99 of the 200s {p99} ms (target <= "
            f"{bound_ms:.0f}, the queue-wait deadline + 1 s)"
        )
    return lines
