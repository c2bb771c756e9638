"""ASGI middleware in front of every route: the Host header (on a loopback-bound server), the bearer token (when
the server has one), the JSON content type of request bodies, the body-size bound, and the last word on errors.

* On a server bound to loopback, a request whose ``Host`` is not ``localhost``, ``127.x.x.x`` or ``[::1]`` (port
  optional) gets 421 Misdirected Request: a page of another site whose name was re-pointed at 127.0.0.1 (DNS
  rebinding) cannot reach the API. 421 is HTTP's status for a request sent to a server that does not answer for
  that authority, and it keeps 401/403 for the token.
* Without ``Authorization: Bearer <token>`` a token server answers 401, a wrong token 403 (constant time).
* A POST/PUT/PATCH must say ``Content-Type: application/json`` (else 415): a browser sends a cross-origin
  request without asking the server first (CORS preflight) only as text/plain or a form, so no other page can
  make a browser drive the API.
* A body over ``max_body`` bytes gets 413 after the body is drained (up to ``DRAIN_LIMIT``, so the client reads
  the answer instead of a reset connection); bodies within the bound are read once and replayed to the app.
* An exception that escapes the app is logged with its traceback and a request id, and the client gets 500 with
  that id only (no exception text).

Example:
    >>> app = Guard(fastapi_app, token="s3cret", max_body=8 << 20, loopback_hosts=True)  # doctest: +SKIP
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DRAIN_LIMIT = 64 << 20
JSON_TYPE = "application/json"
BODY_METHODS = ("POST", "PUT", "PATCH")
ERROR_ID = "layershap.error_id"  # scope key: set by the app's 500 handler once it has logged and answered
log = logging.getLogger("layershap.serve")


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1), as bound or named (no port).

    Example:
        >>> is_loopback("127.0.0.1"), is_loopback("::1"), is_loopback("0.0.0.0")
        (True, True, False)
    """
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def loopback_authority(value: str) -> bool:
    """True when a ``Host`` header names loopback: ``localhost``, ``127.x.x.x`` or ``[::1]``, with or without
    ``:port``.

    Example:
        >>> loopback_authority("localhost:8000"), loopback_authority("[::1]:80"), loopback_authority("evil.example")
        (True, True, False)
    """
    bracketed = value.startswith("[")
    if bracketed:  # an IPv6 address
        name, closed, rest = value[1:].partition("]")
        if not closed or rest[:1] not in ("", ":"):
            return False
        port = rest[1:]
    else:
        name, _, port = value.partition(":")
    if (port and not port.isdigit()) or (":" in name) != bracketed:
        return False
    return is_loopback(name)


def request_id() -> str:
    """A short random id that ties a 500 answer to its traceback in the server log."""
    return secrets.token_hex(6)


def internal_error_message(rid: str) -> str:
    return f"internal error (request id {rid}); the server logged the details under that id and keeps running"


async def send_error(send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """A JSON ``{"error": message}`` response."""
    body = json.dumps({"error": message}).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """Host, token, content-type and body-size checks for an ASGI ``app`` (``token=None``: no token asked;
    ``loopback_hosts``: answer only requests addressed to a loopback name)."""

    def __init__(self, app: Callable, token: str | None, max_body: int, loopback_hosts: bool = False) -> None:
        self.app, self.token, self.max_body, self.loopback_hosts = app, token, max_body, loopback_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        if self.loopback_hosts:
            host = headers.get("host", b"").decode("latin-1").strip()
            if not loopback_authority(host):
                await send_error(send, 421, f"this server is bound to loopback and answers only requests addressed "
                                 f"to localhost, 127.0.0.1 or [::1] (Host: {host[:100] or 'none'}); use "
                                 "http://127.0.0.1:PORT, or serve with --host and --token-file to be reached by "
                                 "another name")
                return
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
        if scope.get("method") not in BODY_METHODS:
            await self._run(scope, receive, send)
            return
        media = headers.get("content-type", b"").decode("latin-1").partition(";")[0].strip().lower()
        if media != JSON_TYPE:
            await self._drain(receive)
            await send_error(send, 415, f"send the request body as JSON with the header 'Content-Type: {JSON_TYPE}' "
                             f"(got {media[:100] or 'none'}; with curl: -H 'Content-Type: {JSON_TYPE}' -d '{{...}}')",
                             [(b"accept", JSON_TYPE.encode())])
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

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self._run(scope, replay, send)

    async def _run(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app on one request; an exception it lets out is logged (with a request id) and answered 500 once."""
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            if scope.get(ERROR_ID) is not None:  # the app's 500 handler logged it and answered
                return
            rid = request_id()
            log.error("internal error %s on %s %s", rid, scope.get("method"), scope.get("path"), exc_info=exc)
            if started:  # half an answer is out: let the server drop the connection
                raise
            await send_error(send, 500, internal_error_message(rid), [(b"x-request-id", rid.encode())])

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
