"""The edge, admission apart from the app: request id, concurrency limit, body size limit, latency and status."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterable

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import Metrics
from service.schemas import ErrorBody

REQUEST_ID = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")


class Admission:
    """At most `limit` requests to `paths` in flight; the next one gets 503 + Retry-After at once, never a queue."""

    def __init__(self, limit: int, retry_after: int, paths: Iterable[str] = ()) -> None:
        self.limit = limit
        self.retry_after = retry_after
        self.paths = frozenset(paths)
        self.in_flight = 0


class Edge:
    """Pure ASGI middleware: request id (X-Request-ID in and out), concurrency limit, body size limit, latency and
    status metrics. Kept out of FastAPI's dependency machinery: it runs on every request."""

    def __init__(self, app: ASGIApp, metrics: Metrics, max_body: int, admission: Admission) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        route = self.metrics.route_label(scope.get("path", ""))
        status = {"code": 500}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        admitted = scope.get("path") in self.admission.paths
        if admitted and self.admission.in_flight >= self.admission.limit:
            self.metrics.rejected.labels("overloaded").inc()
            status["code"] = 503
            await self._refuse(scope, receive, send, request_id, 503, "overloaded",
                               f"more than {self.admission.limit} requests in flight; retry shortly",
                               {"Retry-After": str(self.admission.retry_after)})
            return
        self.admission.in_flight += admitted
        self.metrics.in_flight.inc()
        try:
            body = await self._read_body(receive, headers)
            if body is None:
                status["code"] = 413
                self.metrics.rejected.labels("body_too_large").inc()
                await self._refuse(scope, receive, send, request_id, 413, "body_too_large",
                                   f"body over {self.max_body} bytes", None, "body")
                return
            await self.app(scope, _replay(body, receive), send_with_id)
        finally:
            self.admission.in_flight -= admitted
            self.metrics.in_flight.dec()
            self.metrics.request_seconds.labels(route).observe(time.perf_counter() - start)
            self.metrics.requests.labels(route, str(status["code"])).inc()

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, request_id: str, status: int, code: str,
                      message: str, headers: dict[str, str] | None, field: str | None = None) -> None:
        body = ErrorBody(code=code, message=message, field=field, request_id=request_id).model_dump()
        await JSONResponse(body, status, {**(headers or {}), "x-request-id": request_id})(scope, receive, send)

    async def _read_body(self, receive: Receive, headers: dict[bytes, bytes]) -> bytes | None:
        """The whole body, or None once it exceeds the limit (checked on Content-Length first)."""
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body Edge already read, handed to the app as one message; later receives go to the client."""
    sent = {"done": False}

    async def replay() -> Message:
        if not sent["done"]:
            sent["done"] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
