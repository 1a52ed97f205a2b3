"""ASGI middleware around the whole app: request ids, the request-body bound and security headers.

Plain ASGI (not Starlette's BaseHTTPMiddleware), so the app still sees the client's disconnect on the
original `receive` (/generate cancels its job on it) and streamed answers pass through untouched.
"""

from __future__ import annotations

import json
import logging
import time

from gateway.request_ids import HEADER as REQUEST_ID_HEADER
from gateway.request_ids import accept as accept_request_id
from gateway.request_ids import current as current_request_id

# Answered on every response: no sniffing, no framing, no referrer, same-origin resources.
SECURITY_HEADERS = {
    b"x-content-type-options": b"nosniff",
    b"x-frame-options": b"DENY",
    b"referrer-policy": b"no-referrer",
    b"cross-origin-resource-policy": b"same-origin",
}
# Not on the interactive docs, whose page loads Swagger UI's script and styles from a CDN.
CONTENT_SECURITY_POLICY = b"default-src 'none'; frame-ancestors 'none'"
DOCS_PATHS = ("/docs", "/redoc")
access_log = logging.getLogger("gateway.access")


async def _answer(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class _HttpMiddleware:
    """Passes other scopes (the lifespan) through; subclasses handle HTTP requests in `handle`."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            await self.handle(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def handle(self, scope, receive, send) -> None:
        raise NotImplementedError


class RequestIdMiddleware(_HttpMiddleware):
    """Sets the request id (gateway.request_ids) while the request is handled, answers it in the
    header and logs one access line with it."""

    async def handle(self, scope, receive, send) -> None:
        header = REQUEST_ID_HEADER.lower().encode()
        request_id = accept_request_id(next((v.decode("latin-1") for k, v in scope["headers"] if k == header), None))
        scope.setdefault("state", {})["request_id"] = request_id
        token = current_request_id.set(request_id)
        start, status = time.perf_counter(), 0

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (header, request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            access_log.info("%s %s %d %.3f s", scope["method"], scope["path"], status, time.perf_counter() - start)
            current_request_id.reset(token)


class BodyLimitMiddleware(_HttpMiddleware):
    """Refuses request bodies over `limit` bytes with 413, before the app reads them: at once when
    Content-Length says so (the server has validated the header); a chunked body is read and dropped
    once over the limit, up to DRAIN_FACTOR times it, before the answer, so that a client still
    sending can read it. A body within the limit is handed to the app as it came. Paths under `exempt`
    bound their own bodies (an upload route streaming to disk)."""

    DRAIN_FACTOR = 4

    def __init__(self, app, limit: int, exempt: tuple[str, ...] = ()) -> None:
        super().__init__(app)
        self.limit = limit
        self.exempt = exempt
        self.too_large = f"body: larger than this gateway accepts ({limit} bytes)"

    async def handle(self, scope, receive, send) -> None:
        if scope["path"].startswith(self.exempt):
            await self.app(scope, receive, send)
            return
        declared = next((int(v) for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None:
            if declared > self.limit:
                await _answer(send, 413, self.too_large)
            else:
                await self.app(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more and size <= self.limit:
            message = await receive()
            more = message["type"] == "http.request" and message.get("more_body", False)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
        if size > self.limit:
            while more and size <= self.DRAIN_FACTOR * self.limit:  # uvicorn reads no more once answered
                message = await receive()
                more = message["type"] == "http.request" and message.get("more_body", False)
                size += len(message.get("body", b""))
            await _answer(send, 413, self.too_large)
            return
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed():
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)


class SecurityHeadersMiddleware(_HttpMiddleware):
    """Adds SECURITY_HEADERS (and, outside the docs, CONTENT_SECURITY_POLICY) to every answer."""

    async def handle(self, scope, receive, send) -> None:
        extra = dict(SECURITY_HEADERS)
        if not scope["path"].startswith(DOCS_PATHS):
            extra[b"content-security-policy"] = CONTENT_SECURITY_POLICY

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []), *((k, v) for k, v in extra.items() if k not in present)]
            await send(message)

        await self.app(scope, receive, send_with_headers)
