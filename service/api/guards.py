"""ASGI middlewares that guard the API's working routes: keys, admission, deadline, disconnects.

They sit in front of the routes under the protected prefixes (``/v1`` and
``/v2``), whatever routes are registered there now or later, and leave every
other path (``/health/*``, ``/metrics``, ``/docs``, ``/openapi.json``, the demo
page and its assets) alone.

- :class:`ApiKeyMiddleware` lets a request through only with one of the
  configured keys, in ``Authorization: Bearer <key>`` or ``X-API-Key``,
  compared in constant time.
- :class:`WorkGuardMiddleware` admits at most ``admission.limit`` POST requests
  at once (503 ``overloaded`` beyond, before the body is read), gives each
  guarded request a deadline (408 while its body is still arriving, 503
  after), and cancels a request whose client has gone away, so its work still
  queued for inference is dropped.

Both speak plain ASGI and render refusals with the ``render_error`` function
the API layer hands them, so every error keeps the one JSON shape. They know
nothing of FastAPI.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

from service.errors import LensServeError, OverloadedError, RequestTimeoutError, UnauthorizedError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
#: Turns a service error met by the request ``scope`` into an ASGI response app.
RenderError = Callable[[LensServeError, Scope], ASGIApp]

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


@dataclass
class Admission:
    """How many guarded POST requests are being handled, and how many may be (requests)."""

    limit: int
    active: int = 0


class WorkGuardMiddleware:
    """Admission limit, deadline and disconnect handling for the protected routes.

    Parameters
    ----------
    app : ASGI app
        The application behind it.
    admission : Admission
        Counts the POST requests under the prefixes being handled and holds
        the most allowed at once (requests); the API layer reports it.
    timeout_s : float
        Deadline of each guarded request, first byte to answer (seconds).
    render_error : callable
        Renders the refusals (overloaded, timed out) as responses.
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
        prefixes: Sequence[str] = PROTECTED_PREFIXES,
    ) -> None:
        self.app = app
        self._admission = admission
        self._timeout_s = timeout_s
        self._render_error = render_error
        self._prefixes = tuple(prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_protected(route_path(scope), self._prefixes):
            await self.app(scope, receive, send)
            return
        if scope.get("method") != "POST":
            await self._guarded(scope, receive, send)
            return
        admission = self._admission
        if admission.active >= admission.limit:
            error = OverloadedError(
                f"{admission.active} requests are being handled, the most at once; retry later"
            )
            await self._render_error(error, scope)(scope, receive, send)
            return
        admission.active += 1
        try:
            await self._guarded(scope, receive, send)
        finally:
            admission.active -= 1

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
