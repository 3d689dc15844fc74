"""A client for survey pipelines: FITS files in, typed predictions out, nothing lost.

``LensClient`` (threads) and ``AsyncLensClient`` (asyncio) send files to
``POST /v1/predict`` in multipart batches, several batches at once, and retry
a batch with exponential backoff when the service answers 503 or 429 or cannot
be reached, waiting at least what ``Retry-After`` asks. Every input path gets
exactly one :class:`LensPrediction`: the models' answer, or the error that
stopped the file (a bad file, a refused batch, retries exhausted). An object
sent as one file per band (a :class:`~service.fits.band_files.BandGroup`, from
:func:`~service.fits.band_files.group_band_files`) goes in a request of its
own, in the multipart fields named after its bands, and gets one prediction
whose ``path`` is the group's name.

The module needs only httpx: no FastAPI, onnxruntime or astropy.

Example
-------
>>> with LensClient("http://127.0.0.1:8000") as client:  # doctest: +SKIP
...     for prediction in client.iter_predict(paths):
...         print(prediction.path, prediction.lens_probability)
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx

from service.fits.band_files import BandGroup

logger = logging.getLogger("lensserve.client")

PREDICT_PATH = "/v1/predict"
#: Answers worth retrying: the service is loading, overloaded or rate limiting.
RETRY_STATUSES = frozenset({429, 502, 503, 504})
#: Error codes the client gives files it could not get an answer for.
UNREADABLE_FILE = "unreadable_file"
UNAVAILABLE = "service_unavailable"
BAD_RESPONSE = "bad_response"
#: Error code of an object whose band files are incomplete (the service's code for it).
BAND_MISMATCH = "band_mismatch"


@dataclass(frozen=True)
class ErrorInfo:
    """Why a file has no prediction: a stable ``code`` and a message for a person."""

    code: str
    message: str


@dataclass(frozen=True)
class LensParameters:
    """Point estimates of the singular isothermal ellipsoid.

    ``theta_E``, ``center_x`` and ``center_y`` are in arcsec (the centre is
    the offset from the cutout centre; x grows with column, y with row);
    ``e1`` and ``e2`` are dimensionless.
    """

    theta_E: float
    e1: float
    e2: float
    center_x: float
    center_y: float


@dataclass(frozen=True)
class EinsteinRadius:
    """MC-dropout predictive distribution of theta_E (all in arcsec).

    ``quantiles`` is keyed by level as the API writes it: ``"0.025"``,
    ``"0.16"``, ``"0.5"``, ``"0.84"``, ``"0.975"``.
    """

    mean: float
    std: float
    aleatoric_std: float
    epistemic_std: float
    quantiles: Mapping[str, float]
    samples: tuple[float, ...] | None = None


@dataclass(frozen=True)
class LensPrediction:
    """The answer for one input file; ``error`` is set exactly when the rest is None."""

    path: str
    """The input path as given to the client."""
    filename: str
    """The name the file was sent under (its base name)."""
    lens_probability: float | None = None
    parameters: LensParameters | None = None
    einstein_radius: EinsteinRadius | None = None
    ra_deg: float | None = None
    dec_deg: float | None = None
    warnings: tuple[str, ...] = ()
    error: ErrorInfo | None = None

    @property
    def ok(self) -> bool:
        """Whether the models answered for this file."""
        return self.error is None


@dataclass
class ClientStats:
    """Counters of one client, for logs and tests."""

    requests: int = 0
    retries: int = 0
    retry_statuses: list[int | str] = field(default_factory=list)
    """Why each retry happened: the HTTP status, or the connection error's class name."""


# --------------------------------------------------------------------------- shared pieces


def parse_retry_after(value: str | None, *, now_s: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - (time.time() if now_s is None else now_s), 0.0)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, never shorter than the server's Retry-After.

    Parameters
    ----------
    max_retries : int
        Retries per batch after the first attempt (count).
    backoff_s : float
        Ceiling of the first wait (seconds); doubled on every retry.
    max_backoff_s : float
        Cap on one wait (seconds), Retry-After included.
    """

    max_retries: int = 8
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0

    def delay_s(self, attempt: int, retry_after_s: float | None) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based)."""
        # Full jitter keeps many pipeline workers from retrying in lockstep.
        backoff = random.uniform(0.0, min(self.backoff_s * 2**attempt, self.max_backoff_s))
        if retry_after_s is not None:
            backoff = max(backoff, retry_after_s)
        return min(backoff, self.max_backoff_s)


#: What the clients predict: a path (one whole object per file) or one object's band files.
Item = str | BandGroup


def item_key(item: Item | Path) -> str:
    """The path of a file, or the name of a group: the ``path`` of its prediction."""
    return item.name if isinstance(item, BandGroup) else str(item)


def _unique_items(paths: Iterable[str | Path | BandGroup]) -> list[Item]:
    """Paths as strings and band groups, each key once (the first wins)."""
    items: dict[str, Item] = {}
    for path in paths:
        item = path if isinstance(path, BandGroup) else str(path)
        items.setdefault(item_key(item), item)
    return list(items.values())


def batched(paths: Sequence[Item], size: int) -> list[list[Item]]:
    """Consecutive slices of ``paths`` with at most ``size`` items each; a band group is
    a request, and so a slice, of its own."""
    batches: list[list[Item]] = []
    for item in paths:
        if isinstance(item, BandGroup):
            batches.append([item])
        elif batches and len(batches[-1]) < size and not isinstance(batches[-1][0], BandGroup):
            batches[-1].append(item)
        else:
            batches.append([item])
    return batches


def _read_group(
    group: BandGroup,
) -> tuple[list[tuple[str, tuple[str, bytes, str]]], list[str], list[LensPrediction]]:
    """The multipart parts of one object's band files, or its failed prediction."""
    if group.problem is not None:
        error = ErrorInfo(BAND_MISMATCH, group.problem)
        return [], [], [LensPrediction(path=group.name, filename=group.name, error=error)]
    parts: list[tuple[str, tuple[str, bytes, str]]] = []
    for band, path in group.files:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            error = ErrorInfo(UNREADABLE_FILE, f"{path!r} cannot be read: {exc.strerror or exc}")
            return [], [], [LensPrediction(path=group.name, filename=group.name, error=error)]
        parts.append((band, (Path(path).name, data, "application/fits")))
    return parts, [group.name], []


def _read_files(
    paths: Sequence[Item],
) -> tuple[list[tuple[str, tuple[str, bytes, str]]], list[str], list[LensPrediction]]:
    """Multipart parts of the readable files, their paths, and a prediction per unreadable one."""
    if len(paths) == 1 and isinstance(paths[0], BandGroup):
        return _read_group(paths[0])
    parts: list[tuple[str, tuple[str, bytes, str]]] = []
    sent: list[str] = []
    failed: list[LensPrediction] = []
    for path in map(str, paths):
        name = Path(path).name
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            error = ErrorInfo(UNREADABLE_FILE, f"{path!r} cannot be read: {exc.strerror or exc}")
            failed.append(LensPrediction(path=path, filename=name, error=error))
            continue
        parts.append(("files", (name, data, "application/fits")))
        sent.append(path)
    return parts, sent, failed


def _decode_prediction(path: str, result: Mapping[str, Any]) -> LensPrediction:
    """A typed prediction from one ``results`` item of the API."""
    name = str(result.get("filename") or Path(path).name)
    if result.get("error"):
        error = result["error"]
        return LensPrediction(
            path=path, filename=name, error=ErrorInfo(str(error["code"]), str(error["message"]))
        )
    radius = result["einstein_radius"]
    wcs = result.get("wcs") or {}
    samples = radius.get("samples")
    return LensPrediction(
        path=path,
        filename=name,
        lens_probability=float(result["lens_probability"]),
        parameters=LensParameters(**{k: float(v) for k, v in result["parameters"].items()}),
        einstein_radius=EinsteinRadius(
            mean=float(radius["mean"]),
            std=float(radius["std"]),
            aleatoric_std=float(radius["aleatoric_std"]),
            epistemic_std=float(radius["epistemic_std"]),
            quantiles={str(k): float(v) for k, v in radius["quantiles"].items()},
            samples=None if samples is None else tuple(float(s) for s in samples),
        ),
        ra_deg=None if wcs.get("ra") is None else float(wcs["ra"]),
        dec_deg=None if wcs.get("dec") is None else float(wcs["dec"]),
        warnings=tuple(str(w) for w in result.get("warnings") or ()),
    )


def _error_of(response: httpx.Response) -> ErrorInfo:
    """The ``{"error": {"code", "message"}}`` of an error answer, or a description of it."""
    try:
        error = response.json()["error"]
        return ErrorInfo(str(error["code"]), str(error["message"]))
    except (ValueError, KeyError, TypeError):
        return ErrorInfo(f"http_{response.status_code}", response.text[:500] or "no body")


def _failed(paths: Sequence[str], error: ErrorInfo) -> list[LensPrediction]:
    """The same error for every path."""
    return [LensPrediction(path=p, filename=Path(p).name, error=error) for p in paths]


def _decode_response(paths: Sequence[str], response: httpx.Response) -> list[LensPrediction]:
    """One prediction per path from a final (non-retried) answer to a batch."""
    if response.status_code != 200:
        # A refused request (e.g. the single file of a batch is not FITS) fails all its files.
        error = _error_of(response)
        return _failed(paths, error)
    try:
        results = response.json()["results"]
        if len(results) != len(paths):
            raise ValueError(f"{len(results)} results for {len(paths)} files")
        return [_decode_prediction(p, r) for p, r in zip(paths, results, strict=True)]
    except (ValueError, KeyError, TypeError) as exc:
        error = ErrorInfo(BAD_RESPONSE, f"the service's answer cannot be read: {exc}")
        return _failed(paths, error)


def _gave_up(paths: Sequence[str], reason: str) -> list[LensPrediction]:
    return _failed(paths, ErrorInfo(UNAVAILABLE, f"no answer after retries: {reason}"))


@dataclass(frozen=True)
class _Options:
    url: str
    files_per_request: int
    concurrency: int
    retry: RetryPolicy
    timeout_s: float
    params: dict[str, str]


def _options(
    url: str,
    *,
    files_per_request: int,
    concurrency: int,
    retry: RetryPolicy | None,
    timeout_s: float,
    samples: int | None,
    seed: int | None,
    include_samples: bool,
) -> _Options:
    if files_per_request < 1 or concurrency < 1:
        raise ValueError(
            f"files_per_request and concurrency must be at least 1, got "
            f"{files_per_request} and {concurrency}"
        )
    params = {"include_samples": str(include_samples).lower()}
    if samples is not None:
        params["samples"] = str(samples)
    if seed is not None:
        params["seed"] = str(seed)
    return _Options(
        url=url.rstrip("/"),
        files_per_request=files_per_request,
        concurrency=concurrency,
        retry=retry or RetryPolicy(),
        timeout_s=timeout_s,
        params=params,
    )


# --------------------------------------------------------------------------- sync client


class LensClient:
    """Synchronous client of ``POST /v1/predict``; batches run on a thread pool.

    Parameters
    ----------
    url : str
        Base URL of the service, e.g. ``http://127.0.0.1:8000``.
    files_per_request : int
        Files per multipart request (count); stay under the server's
        ``LENSSERVE_MAX_FILES`` and body limit.
    concurrency : int
        Requests in flight at once (count).
    retry : RetryPolicy or None
        Backoff for 503/429/connection errors; the default when None.
    timeout_s : float
        Timeout of one request (seconds).
    samples, seed, include_samples
        Passed to the API: MC-dropout samples per cutout (count), the seed
        of reproducible draws, and whether to return the draws (arcsec).
    transport : httpx.BaseTransport or None
        For tests and proxies; httpx's default when None.
    """

    def __init__(
        self,
        url: str,
        *,
        files_per_request: int = 16,
        concurrency: int = 4,
        retry: RetryPolicy | None = None,
        timeout_s: float = 120.0,
        samples: int | None = None,
        seed: int | None = None,
        include_samples: bool = False,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._options = _options(
            url,
            files_per_request=files_per_request,
            concurrency=concurrency,
            retry=retry,
            timeout_s=timeout_s,
            samples=samples,
            seed=seed,
            include_samples=include_samples,
        )
        self._http = httpx.Client(timeout=timeout_s, transport=transport)
        self._lock = threading.Lock()
        self.stats = ClientStats()

    def __enter__(self) -> LensClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def predict(self, paths: Iterable[str | Path | BandGroup]) -> list[LensPrediction]:
        """One prediction per path or band group, in the order given."""
        items = _unique_items(paths)
        order = {item_key(item): i for i, item in enumerate(items)}
        return sorted(self.iter_predict(items), key=lambda pred: order[pred.path])

    def iter_predict(self, paths: Iterable[str | Path | BandGroup]) -> Iterator[LensPrediction]:
        """Predictions as their batches finish (not in input order); one per path or group."""
        batches = batched(_unique_items(paths), self._options.files_per_request)
        with ThreadPoolExecutor(self._options.concurrency, "lensserve-client") as pool:
            pending: set[Future[list[LensPrediction]]] = set()
            queue = iter(batches)
            # Submit lazily so a huge input list does not hold every file in memory.
            for batch in queue:
                pending.add(pool.submit(self.predict_batch, batch))
                if len(pending) >= self._options.concurrency:
                    break
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield from future.result()
                    following = next(queue, None)
                    if following is not None:
                        pending.add(pool.submit(self.predict_batch, following))

    def predict_batch(self, paths: Sequence[Item]) -> list[LensPrediction]:
        """Send one multipart request for ``paths`` (retrying) and decode its answer."""
        parts, sent, failed = _read_files(paths)
        if not parts:
            return failed
        reason = ""
        retry_after_s: float | None = None
        for attempt in range(self._options.retry.max_retries + 1):
            if attempt:
                self._sleep_before_retry(attempt - 1, reason, retry_after_s)
            retry_after_s = None
            with self._lock:
                self.stats.requests += 1
            try:
                response = self._http.post(
                    self._options.url + PREDICT_PATH, params=self._options.params, files=parts
                )
            except httpx.TransportError as exc:
                reason = type(exc).__name__
                continue
            if response.status_code in RETRY_STATUSES:
                reason = str(response.status_code)
                retry_after_s = parse_retry_after(response.headers.get("retry-after"))
                continue
            return failed + _decode_response(sent, response)
        return failed + _gave_up(sent, reason)

    def _sleep_before_retry(self, attempt: int, reason: str, retry_after_s: float | None) -> None:
        delay_s = self._options.retry.delay_s(attempt, retry_after_s)
        with self._lock:
            self.stats.retries += 1
            self.stats.retry_statuses.append(int(reason) if reason.isdigit() else reason)
        logger.info("retrying a batch in %.2f s after %s", delay_s, reason)
        time.sleep(delay_s)


# --------------------------------------------------------------------------- async client


class AsyncLensClient:
    """Asynchronous client of ``POST /v1/predict``; the same parameters as :class:`LensClient`.

    ``transport`` is an ``httpx.AsyncBaseTransport``.
    """

    def __init__(
        self,
        url: str,
        *,
        files_per_request: int = 16,
        concurrency: int = 4,
        retry: RetryPolicy | None = None,
        timeout_s: float = 120.0,
        samples: int | None = None,
        seed: int | None = None,
        include_samples: bool = False,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._options = _options(
            url,
            files_per_request=files_per_request,
            concurrency=concurrency,
            retry=retry,
            timeout_s=timeout_s,
            samples=samples,
            seed=seed,
            include_samples=include_samples,
        )
        self._http = httpx.AsyncClient(timeout=timeout_s, transport=transport)
        self.stats = ClientStats()

    async def __aenter__(self) -> AsyncLensClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def predict(self, paths: Iterable[str | Path | BandGroup]) -> list[LensPrediction]:
        """One prediction per path or band group, in the order given."""
        items = _unique_items(paths)
        order = {item_key(item): i for i, item in enumerate(items)}
        found = [prediction async for prediction in self.iter_predict(items)]
        return sorted(found, key=lambda pred: order[pred.path])

    async def iter_predict(
        self, paths: Iterable[str | Path | BandGroup]
    ) -> AsyncIterator[LensPrediction]:
        """Predictions as their batches finish (not in input order); one per path or group."""
        queue = iter(batched(_unique_items(paths), self._options.files_per_request))
        pending: set[asyncio.Task[list[LensPrediction]]] = set()
        try:
            for batch in queue:
                pending.add(asyncio.create_task(self.predict_batch(batch)))
                if len(pending) >= self._options.concurrency:
                    break
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    for prediction in task.result():
                        yield prediction
                    following = next(queue, None)
                    if following is not None:
                        pending.add(asyncio.create_task(self.predict_batch(following)))
        finally:
            for task in pending:
                task.cancel()

    async def predict_batch(self, paths: Sequence[Item]) -> list[LensPrediction]:
        """Send one multipart request for ``paths`` (retrying) and decode its answer."""
        parts, sent, failed = await asyncio.to_thread(_read_files, paths)
        if not parts:
            return failed
        reason = ""
        retry_after_s: float | None = None
        for attempt in range(self._options.retry.max_retries + 1):
            if attempt:
                delay_s = self._options.retry.delay_s(attempt - 1, retry_after_s)
                self.stats.retries += 1
                self.stats.retry_statuses.append(int(reason) if reason.isdigit() else reason)
                logger.info("retrying a batch in %.2f s after %s", delay_s, reason)
                await asyncio.sleep(delay_s)
            retry_after_s = None
            self.stats.requests += 1
            try:
                response = await self._http.post(
                    self._options.url + PREDICT_PATH, params=self._options.params, files=parts
                )
            except httpx.TransportError as exc:
                reason = type(exc).__name__
                continue
            if response.status_code in RETRY_STATUSES:
                reason = str(response.status_code)
                retry_after_s = parse_retry_after(response.headers.get("retry-after"))
                continue
            return failed + _decode_response(sent, response)
        return failed + _gave_up(sent, reason)
