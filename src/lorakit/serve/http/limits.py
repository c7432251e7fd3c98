"""Limits that keep one client from hurting the others: the size of a request body (413), and the number
of generation requests in flight, queued and running (429 with Retry-After beyond it)."""
from __future__ import annotations

import threading

from lorakit.serve.http.auth import send_json
from lorakit.serve.http.errors import APIError, error_body


class BodyLimitMiddleware:
    """ASGI middleware that reads a request's body before the app does, answering 413 past `max_bytes`.

    Both a declared Content-Length and the bytes actually sent (chunked bodies have no length) count. The
    app then receives the body in one piece, and the client's disconnect as usual after it.
    """

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending the whole body
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._too_large(send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send) -> None:
        message = (f"the request body is over the server's limit of {self.max_bytes} bytes; send a shorter "
                   "prompt (or start the server with a larger --max-body-bytes).")
        await send_json(send, 413, error_body(413, message, code="request_too_large"), {"connection": "close"})


class ConcurrencyGate:
    """Counts the generation requests in flight (each of a request's `n` choices counts as one).

    Args:
        limit: the most in flight at once; more are refused with 429.
        retry_after_s: the Retry-After the refusal carries.
    """

    def __init__(self, limit: int, retry_after_s: int = 1) -> None:
        self.limit, self.retry_after_s = limit, retry_after_s
        self.in_flight = 0
        self.refused = 0
        self._lock = threading.Lock()

    def acquire(self, count: int = 1) -> None:
        """Take `count` places.

        Raises:
            APIError: 429 when they would exceed the limit.
        """
        with self._lock:
            if self.in_flight + count > self.limit:
                self.refused += 1
                raise APIError(429, f"the server is at its limit of {self.limit} requests in flight; retry after "
                                    f"{self.retry_after_s} s.", code="rate_limit_exceeded",
                               headers={"Retry-After": str(self.retry_after_s)})
            self.in_flight += count

    def release(self, count: int = 1) -> None:
        with self._lock:
            self.in_flight -= count
