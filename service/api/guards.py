"""ASGI middlewares that guard the API's working routes: keys, admission, deadline, disconnects.

They sit in front of the routes under the protected prefixes (``/v1`` and
``/v2``), whatever routes are registered there now or later, and leave every
other path (``/health/*``, ``/metrics``, ``/docs``, ``/openapi.json``, the demo
page and its assets) alone.

- :class:`ApiKeyMiddleware` lets a request through only with one of the
  configured keys, in ``Authorization: Bearer <key>`` or ``X-API-Key``,
  compared in constant time.
- :class:`WorkGuardMiddleware` admits POST requests by the work they bring
  (:class:`Admission`, below), gives each guarded request a deadline (408 while
  its body is still arriving, 503 after), and cancels a request whose client
  has gone away, so its work still queued for inference is dropped.

Admission in units of work
--------------------------
A POST request is admitted while the *expected wait* of the work already
admitted stays under ``max_queue_wait_s``: the cutouts of every admitted
request not yet answered (its body arriving, being decoded, queued or in a
running batch) times the measured service time per cutout. That time is the
whole pipeline's: busy wall time over cutouts answered, in windows of 0.5 s of
busy time (:class:`service.core.service_time.BusyTimeMeter`), because reading,
decoding, preparing and answering share the cores with inference. Until the
first window closes it is the batcher's run time per cutout divided by the
model instances (:attr:`service.core.inference.InferenceEngine.seconds_per_cutout`).
Otherwise it is refused with 503 ``overloaded`` and a ``Retry-After`` of that
wait, rounded up, at least 1 s (at most :data:`MAX_RETRY_AFTER_S`). Before the
first batch has been measured the wait counts as 0, and an empty server always
admits, however large the request.

A request's cutouts are unknown before its body is read, and the decision is
taken before, so that a refusal costs no body. (Checking again when the work
reaches the batcher would refuse requests already read and decoded: the
costliest refusal there is.) The body's ``Content-Length`` gives an estimate:
one cutout per :data:`TYPICAL_CUTOUT_BYTES` (a FITS file of a g, r, i 64x64
float32 cube with a one-block header: 54,720 bytes), at least 1; a body
without a length counts as 1. Once the route has read the body it corrects the
count to the files it holds (:meth:`AdmissionTicket.correct`, through the
ticket the middleware leaves in the scope under :data:`ADMISSION_TICKET_KEY`),
so compressed or integer files, smaller than the estimate, and chunked bodies
are counted right from then on.
A request is counted until its answer has been sent. The bytes of its body are
counted too, by ``Content-Length`` or, without one, as ``max_body_bytes``:
``max_body_bytes_in_flight`` bounds the memory bodies take, and
``max_requests`` the connections held; they are memory guards, not the
throughput limiter.

Refusals are cheap, so that goodput holds as clients multiply: taken before
the body is read, answered with a response rendered once per reason
and ``Retry-After`` value and then replayed byte for byte, counted with plain
integers and the ``on_refusal`` hook, and logged as one summary line at most
every :data:`REFUSAL_LOG_INTERVAL_S`; :class:`RefusalAccessLogFilter` keeps
them out of the access log.

Both middlewares speak plain ASGI and render refusals with the functions the
API layer hands them, so every error keeps the one JSON shape. They know
nothing of FastAPI.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import math
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from service.core.service_time import BusyTimeMeter
from service.errors import LensServeError, OverloadedError, RequestTimeoutError, UnauthorizedError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
#: Turns a service error met by the request ``scope`` into an ASGI response app.
RenderError = Callable[[LensServeError, Scope], ASGIApp]
#: Renders an admission refusal for the request ``scope`` with a ``Retry-After`` (seconds),
#: without counting it: the result is replayed for every later refusal of the same kind.
RenderRefusal = Callable[[OverloadedError, Scope, int], ASGIApp]

logger = logging.getLogger("lensserve.admission")

#: Path prefixes whose routes do the service's work and need a key when keys are set.
PROTECTED_PREFIXES = ("/v1", "/v2")
API_KEY_HEADER = b"x-api-key"


def route_path(scope: Scope) -> str:
    """The request path without the ``root_path`` a proxy mounted the app under."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root) :] or "/"
    return path


def is_protected(path: str, prefixes: Sequence[str] = PROTECTED_PREFIXES) -> bool:
    """Whether ``path`` is ``prefix`` itself or lies below it (``/v1/x``, not ``/v10``)."""
    return any(path == prefix or path.startswith(prefix + "/") for prefix in prefixes)


def _digest(key: bytes) -> bytes:
    # Comparing fixed-length digests keeps compare_digest from leaking a key's length.
    return hashlib.sha256(key).digest()


def presented_key(headers: Sequence[tuple[bytes, bytes]]) -> bytes | None:
    """The key a request carries: ``Authorization: Bearer <key>``, else ``X-API-Key``."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, credentials = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and credentials.strip():
                return credentials.strip()
    for name, value in headers:
        if name == API_KEY_HEADER and value.strip():
            return value.strip()
    return None


class ApiKeyMiddleware:
    """Refuse requests under the protected prefixes that lack a known API key (401).

    Parameters
    ----------
    app : ASGI app
        The application behind it.
    keys : sequence of str
        Accepted keys; empty turns the check off.
    render_error : callable
        Renders :class:`~service.errors.UnauthorizedError` as a response.
    prefixes : sequence of str
        Path prefixes that need a key.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: Sequence[str],
        render_error: RenderError,
        prefixes: Sequence[str] = PROTECTED_PREFIXES,
    ) -> None:
        self.app = app
        self._digests = tuple(_digest(key.encode()) for key in keys)
        self._render_error = render_error
        self._prefixes = tuple(prefixes)

    def _accepts(self, key: bytes | None) -> bool:
        if key is None:
            return False
        presented = _digest(key)
        # Every key is compared, so the time taken does not tell which one nearly matched.
        matches = [hmac.compare_digest(presented, known) for known in self._digests]
        return any(matches)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or not self._digests
            or not is_protected(route_path(scope), self._prefixes)
        ):
            await self.app(scope, receive, send)
            return
        key = presented_key(scope.get("headers", []))
        if self._accepts(key):
            await self.app(scope, receive, send)
            return
        # The message never repeats what was presented: it may be someone's secret.
        reason = "no API key" if key is None else "an API key the service does not know"
        error = UnauthorizedError(
            f"the request carries {reason}; send one as 'Authorization: Bearer <key>' or "
            "'X-API-Key: <key>'"
        )
        await self._render_error(error, scope)(scope, receive, send)


#: Bytes of one FITS file of the models' contract (bytes): one 2880-byte header block and
#: g, r, i 64x64 float32 pixels padded to whole 2880-byte blocks. The unit in which a body's
#: ``Content-Length`` estimates its cutouts before it is read.
TYPICAL_CUTOUT_BYTES: Final = 2880 + math.ceil(3 * 64 * 64 * 4 / 2880) * 2880

#: Shortest time between two log lines that sum up admission refusals (seconds).
REFUSAL_LOG_INTERVAL_S: Final = 10.0

#: Longest ``Retry-After`` a queue-wait refusal gives (seconds); it also bounds the
#: answers rendered, one per value.
MAX_RETRY_AFTER_S: Final = 3600

#: Key of an admitted request's :class:`AdmissionTicket` in its ASGI scope.
ADMISSION_TICKET_KEY: Final = "lensserve.admission_ticket"

#: Why a request was refused: the expected queue wait, body memory, or connections.
QUEUE_WAIT: Final = "queue_wait"
BODY_BYTES: Final = "body_bytes"
REQUESTS: Final = "requests"
REFUSAL_REASONS: Final = (QUEUE_WAIT, BODY_BYTES, REQUESTS)


@dataclass(frozen=True)
class Refusal:
    """Why :meth:`Admission.admit` refused a request, and when to come back."""

    reason: str
    """One of :data:`REFUSAL_REASONS`."""
    retry_after_s: int
    """Value of the ``Retry-After`` header (seconds)."""
    error: OverloadedError
    """The error the answer renders; one object per reason, its message constant."""


class AdmissionTicket:
    """What one admitted request holds in the :class:`Admission` until it is released."""

    __slots__ = ("_admission", "body_bytes", "cutouts", "released", "working")

    def __init__(self, admission: Admission, *, cutouts: int, body_bytes: int) -> None:
        self._admission = admission
        self.cutouts = cutouts
        """Cutouts counted for the request: the estimate, then the files read (cutouts)."""
        self.body_bytes = body_bytes
        """Body bytes counted for the request (bytes)."""
        self.released = False
        self.working = False
        """Whether the body has been read and the work is timed (:meth:`correct`)."""

    def correct(self, cutouts: int) -> None:
        """Count the request as ``cutouts`` (at least 1) from now on, once its body is read.

        The first call also starts the request's work on the service-time meter.
        """
        cutouts = max(cutouts, 1)
        if self.released:
            self.cutouts = cutouts
            return
        self._admission.cutouts += cutouts - self.cutouts
        self.cutouts = cutouts
        if not self.working:
            self.working = True
            self._admission.meter.started()

    def release(self) -> None:
        """Give back what the request held; later calls do nothing."""
        if self.released:
            return
        self.released = True
        admission = self._admission
        admission.active -= 1
        admission.cutouts -= self.cutouts
        admission.body_bytes -= self.body_bytes
        if self.working:
            admission.meter.finished(self.cutouts)


class Admission:
    """Admits guarded POST requests by the work they bring (see the module docstring).

    Parameters
    ----------
    max_queue_wait_s : float
        Deadline on the expected wait of the admitted work (seconds).
    seconds_per_cutout : callable
        Returns the inference engine's measured time per cutout with every model
        instance busy, or None before any was measured (seconds per cutout): the
        estimate until :attr:`meter` has measured the whole pipeline.
    max_body_bytes_in_flight : int
        Most body bytes admitted at once (bytes).
    unknown_body_bytes : int
        Bytes counted for a body without ``Content-Length``, and the most
        counted for any body: the largest body the route reads (bytes).
    max_requests : int
        Most requests admitted at once (requests).
    retry_after_s : int
        ``Retry-After`` of the refusals for memory and connections (seconds).
    bytes_per_cutout : int
        Body bytes per cutout when estimating a request's cutouts (bytes).
    on_refusal : callable, optional
        Called with the reason of each refusal; it must be cheap (a counter).
    """

    def __init__(
        self,
        *,
        max_queue_wait_s: float,
        seconds_per_cutout: Callable[[], float | None],
        max_body_bytes_in_flight: int,
        unknown_body_bytes: int,
        max_requests: int,
        retry_after_s: int,
        bytes_per_cutout: int = TYPICAL_CUTOUT_BYTES,
        on_refusal: Callable[[str], None] | None = None,
    ) -> None:
        self.max_queue_wait_s = max_queue_wait_s
        self.max_body_bytes_in_flight = max_body_bytes_in_flight
        self.unknown_body_bytes = unknown_body_bytes
        self.max_requests = max_requests
        self.bytes_per_cutout = bytes_per_cutout
        self._seconds_per_cutout = seconds_per_cutout
        self._on_refusal = on_refusal
        self.meter = BusyTimeMeter()
        """Busy wall time per cutout answered, over the requests whose body was read."""
        self.active = 0
        """Requests admitted and not yet answered (requests)."""
        self.cutouts = 0
        """Cutouts of those requests, estimated or corrected (cutouts)."""
        self.body_bytes = 0
        """Body bytes counted for those requests (bytes)."""
        self.refused = dict.fromkeys(REFUSAL_REASONS, 0)
        """Refusals since the start, by reason (requests)."""
        self._refused_since_log = 0
        self._next_log_at = 0.0
        self._requests_refusal = Refusal(
            REQUESTS,
            retry_after_s,
            OverloadedError(
                f"{max_requests} requests are being handled, the most at once; retry later"
            ),
        )
        self._bytes_refusal = Refusal(
            BODY_BYTES,
            retry_after_s,
            OverloadedError(
                f"the request bodies being handled take up {max_body_bytes_in_flight} bytes, "
                "the most at once; retry later"
            ),
        )
        self._wait_error = OverloadedError(
            f"the work already admitted would keep this request waiting more than "
            f"{max_queue_wait_s:g} s; retry after the Retry-After delay"
        )
        self._wait_refusals: dict[int, Refusal] = {}

    def seconds_per_cutout(self) -> float | None:
        """Service time per cutout (seconds): the pipeline's measured busy time per cutout
        answered, or the engine's estimate before the first window; None before either."""
        measured = self.meter.seconds_per_cutout
        return measured if measured is not None else self._seconds_per_cutout()

    def expected_wait_s(self) -> float:
        """Time the admitted work needs at the measured service time (seconds)."""
        per_cutout_s = self.seconds_per_cutout()
        return 0.0 if per_cutout_s is None else self.cutouts * per_cutout_s

    def admit(self, content_length: int | None) -> AdmissionTicket | Refusal:
        """Admit a request whose body declares ``content_length`` bytes (None: unknown).

        Returns
        -------
        AdmissionTicket or Refusal
            The ticket to release once the request is answered, or why not.
        """
        if self.active >= self.max_requests:
            return self._refuse(self._requests_refusal)
        if content_length is None:
            body_bytes, cutouts = self.unknown_body_bytes, 1
        else:
            body_bytes = min(content_length, self.unknown_body_bytes)
            cutouts = max(body_bytes // self.bytes_per_cutout, 1)
        if self.active and self.body_bytes + body_bytes > self.max_body_bytes_in_flight:
            return self._refuse(self._bytes_refusal)
        wait_s = self.expected_wait_s()
        if wait_s >= self.max_queue_wait_s:
            retry_after_s = min(max(math.ceil(wait_s), 1), MAX_RETRY_AFTER_S)
            return self._refuse(self._wait_refusal(retry_after_s))
        self.active += 1
        self.cutouts += cutouts
        self.body_bytes += body_bytes
        return AdmissionTicket(self, cutouts=cutouts, body_bytes=body_bytes)

    def _wait_refusal(self, retry_after_s: int) -> Refusal:
        refusal = self._wait_refusals.get(retry_after_s)
        if refusal is None:
            # Few values occur: the wait stays near the deadline (at most MAX_RETRY_AFTER_S).
            refusal = Refusal(QUEUE_WAIT, retry_after_s, self._wait_error)
            self._wait_refusals[retry_after_s] = refusal
        return refusal

    def _refuse(self, refusal: Refusal) -> Refusal:
        self.refused[refusal.reason] += 1
        self._refused_since_log += 1
        if self._on_refusal is not None:
            self._on_refusal(refusal.reason)
        now = time.monotonic()
        if now >= self._next_log_at:
            self._log_summary(now)
        return refusal

    def _log_summary(self, now: float) -> None:
        logger.warning(
            "admission refused %d requests since the last summary (%s in all); %d requests, "
            "%d cutouts, %d body bytes admitted; expected wait %.2f s (deadline %g s)",
            self._refused_since_log,
            ", ".join(f"{reason} {count}" for reason, count in self.refused.items()),
            self.active,
            self.cutouts,
            self.body_bytes,
            self.expected_wait_s(),
            self.max_queue_wait_s,
        )
        self._refused_since_log = 0
        self._next_log_at = now + REFUSAL_LOG_INTERVAL_S


def content_length(headers: Sequence[tuple[bytes, bytes]]) -> int | None:
    """The ``Content-Length`` a request declares, or None when absent or not a number."""
    for name, value in headers:
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                return None
            return length if length >= 0 else None
    return None


class RefusalAccessLogFilter(logging.Filter):
    """Drops uvicorn's access-log lines of 503 answers to POSTs under the guarded prefixes.

    Under a flood those are most answers; they are counted in the metrics and summed up
    by :class:`Admission` instead of costing a log line each.
    """

    def __init__(self, prefixes: Sequence[str] = PROTECTED_PREFIXES) -> None:
        super().__init__()
        self._prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        # uvicorn's access record: (client address, method, path with query, HTTP version,
        # status code).
        args = record.args
        if not isinstance(args, tuple) or len(args) != 5:
            return True
        _, method, full_path, _, status = args
        if status != 503 or method != "POST" or not isinstance(full_path, str):
            return True
        return not is_protected(full_path.partition("?")[0], self._prefixes)


class WorkGuardMiddleware:
    """Admission by work, deadline and disconnect handling for the protected routes.

    Parameters
    ----------
    app : ASGI app
        The application behind it.
    admission : Admission
        Admits the POST requests under the prefixes and counts what they hold;
        the API layer reports it.
    timeout_s : float
        Deadline of each guarded request, first byte to answer (seconds).
    render_error : callable
        Renders the deadline's refusals (timed out, overloaded) as responses.
    render_refusal : callable
        Renders an admission refusal once; the middleware replays the result.
    refusal_delay_s : float
        How long a refusal waits before it is answered (seconds): it bounds the requests
        per second of clients that retry at once, whose reading and refusing would
        otherwise take the event loop from the admitted work.
    prefixes : sequence of str
        Path prefixes guarded.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        admission: Admission,
        timeout_s: float,
        render_error: RenderError,
        render_refusal: RenderRefusal,
        refusal_delay_s: float = 0.0,
        prefixes: Sequence[str] = PROTECTED_PREFIXES,
    ) -> None:
        self.app = app
        self._admission = admission
        self._timeout_s = timeout_s
        self._render_error = render_error
        self._render_refusal = render_refusal
        self._refusal_delay_s = refusal_delay_s
        self._prefixes = tuple(prefixes)
        self._refusal_answers: dict[tuple[Refusal, str], ASGIApp] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        prefix = self._prefix(route_path(scope))
        if prefix is None:
            await self.app(scope, receive, send)
            return
        if scope.get("method") != "POST":
            await self._guarded(scope, receive, send)
            return
        outcome = self._admission.admit(content_length(scope.get("headers", ())))
        if isinstance(outcome, Refusal):
            if self._refusal_delay_s > 0:
                await asyncio.sleep(self._refusal_delay_s)
            await self._refusal_answer(outcome, prefix, scope)(scope, receive, send)
            return
        scope[ADMISSION_TICKET_KEY] = outcome
        try:
            await self._guarded(scope, receive, send)
        finally:
            outcome.release()

    def _prefix(self, path: str) -> str | None:
        for prefix in self._prefixes:
            if path == prefix or path.startswith(prefix + "/"):
                return prefix
        return None

    def _refusal_answer(self, refusal: Refusal, prefix: str, scope: Scope) -> ASGIApp:
        """The answer to ``refusal`` under ``prefix``, rendered on first use, then replayed."""
        key = (refusal, prefix)
        answer = self._refusal_answers.get(key)
        if answer is None:
            answer = self._render_refusal(refusal.error, scope, refusal.retry_after_s)
            self._refusal_answers[key] = answer
        return answer

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app under the deadline, cancelling it if the client disconnects."""
        call = _GuardedCall(receive, send)
        app_task = asyncio.ensure_future(self.app(scope, call.receive, call.send))
        watcher = asyncio.ensure_future(call.watch_disconnect())
        timed_out = False
        try:
            async with asyncio.timeout(self._timeout_s):
                await asyncio.wait({app_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if call.response_complete:
                    # The server reports a finished response as a disconnect too; what the
                    # app does after its response (background tasks) may still run.
                    await asyncio.wait({app_task})
        except TimeoutError:
            timed_out = True
        finally:
            watcher.cancel()
            if not app_task.done():
                # Cancelling drops the request's cutouts still queued for inference.
                app_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            done = await asyncio.gather(app_task, return_exceptions=True)
        outcome = done[0]
        if isinstance(outcome, Exception) and not call.disconnected.is_set():
            raise outcome  # a client that went away mid-body needs no 500 (ClientDisconnect)
        if timed_out and not call.response_started and not call.disconnected.is_set():
            error = self._timeout_error(call.body_received)
            await self._render_error(error, scope)(scope, receive, send)

    def _timeout_error(self, body_received: bool) -> LensServeError:
        if not body_received:
            return RequestTimeoutError(
                f"the request body did not arrive within {self._timeout_s:g} s; send it faster "
                "or in smaller requests"
            )
        return OverloadedError(
            f"the request could not be answered within {self._timeout_s:g} s; retry later"
        )


class _GuardedCall:
    """The receive/send pair of one guarded request, watching its body and its client."""

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        self.body_received = False
        self.response_started = False
        self.response_complete = False
        self.disconnected = asyncio.Event()
        self._body_done = asyncio.Event()

    async def receive(self) -> Message:
        if self._body_done.is_set():
            # Past its body the app only ever learns of a disconnect; the watcher reads it.
            await self.disconnected.wait()
            return {"type": "http.disconnect"}
        message = await self._receive()
        if message["type"] == "http.disconnect":
            self.disconnected.set()
        elif not message.get("more_body", False):
            self.body_received = True
            self._body_done.set()
        return message

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.response_started = True
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.response_complete = True
        await self._send(message)

    async def watch_disconnect(self) -> None:
        """Return once the client has gone away after sending its whole body."""
        await self._body_done.wait()
        while True:
            # Once the body is in, the server's receive() returns only on a disconnect.
            message = await self._receive()
            if message["type"] == "http.disconnect":
                if not self.response_complete:
                    self.disconnected.set()
                return
