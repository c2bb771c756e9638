"""ASGI middleware in front of every route: the bearer token (when the server has one) and the body-size bound.

A request without ``Authorization: Bearer <token>`` gets 401, a wrong token 403 (compared in constant time);
a body over ``max_body`` bytes gets 413 after the body is drained (up to ``DRAIN_LIMIT``, so the client reads
the answer instead of a reset connection). Bodies within the bound are read once and replayed to the app, always
as ``application/json`` (the only body type of the API).

Example:
    >>> app = Guard(fastapi_app, token="s3cret", max_body=8 << 20)
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DRAIN_LIMIT = 64 << 20


async def send_error(send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """A JSON ``{"error": message}`` response."""
    body = json.dumps({"error": message}).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """Token check and body-size bound for an ASGI ``app`` (``token=None``: no token asked)."""

    def __init__(self, app: Callable, token: str | None, max_body: int) -> None:
        self.app, self.token, self.max_body = app, token, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        if self.token is not None:
            auth = headers.get("authorization", b"").decode("latin-1").strip()
            scheme, _, value = auth.partition(" ")
            if not auth:
                await send_error(send, 401, "missing token: send the header 'Authorization: Bearer <token>' with the "
                                 "token of the server's --token-file", [(b"www-authenticate", b"Bearer")])
                return
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), self.token.encode()):
                await send_error(send, 403, "wrong token: send 'Authorization: Bearer <token>' with the token of the "
                                 "server's --token-file")
                return
        length = headers.get("content-length")
        if length is not None and not length.isdigit():
            await send_error(send, 400, "the Content-Length header is not a number")
            return
        if length is not None and int(length) > self.max_body:
            await self._drain(receive)
            await self._too_large(send)
            return
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            more = message.get("more_body", False)
            if size > self.max_body:
                if more:
                    await self._drain(receive, size)
                await self._too_large(send)
                return
            chunks.append(chunk)
        body, replayed = b"".join(chunks), False
        # the API speaks JSON only: a body sent as a form (curl -d without -H) is read as the JSON it is
        scope = dict(scope, headers=[(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-type"]
                     + [(b"content-type", b"application/json")])

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send) -> None:
        await send_error(send, 413, f"request body larger than this server's limit of {self.max_body:,} bytes; send "
                         "fewer masks per request")

    @staticmethod
    async def _drain(receive: Receive, seen: int = 0) -> None:
        more = True
        while more and seen <= DRAIN_LIMIT:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            seen += len(message.get("body", b""))
            more = message.get("more_body", False)
