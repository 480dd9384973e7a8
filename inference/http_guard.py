"""What stands between the network and the server's routes.

- Guard (ASGI middleware): the Host header must name this machine when the server is bound to
  loopback (a DNS-rebinding page cannot talk to it), every /v1 route needs the API key when one
  is set (compared in constant time), and a POST body must be declared application/json (a plain
  HTML form or a no-CORS fetch on any web page cannot make one, so no page can make the server work).
- read_body: the body, refused at --max-body-bytes (413) before more is read, within --body-timeout.
- header_timeout_protocol: uvicorn's HTTP/1.1 protocol with a deadline for a request's headers,
  so connections that trickle them in (slowloris) are closed.

Every refusal is an OpenAI-style JSON error rendered as ASCII (ErrorResponse), so that no text a
client sent can make the answer unencodable.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import os
from pathlib import Path
from typing import Any

import h11
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from inference.chat_request import Limits, RequestError

API_KEY_ENV = "ETUDE_API_KEY"
LINGER_SECONDS = 1.0  # how long a refused body is read (and dropped) before the connection closes


class ErrorResponse(JSONResponse):
    """A JSON response with every non-ASCII character escaped (a lone surrogate included)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True).encode("ascii")


def refusal(error: RequestError, headers: dict | None = None) -> ErrorResponse:
    return ErrorResponse(error.body(), status_code=error.status, headers=headers)


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def resolve_api_key(key: str | None, key_file: str | None) -> str | None:
    """The key from --api-key, else --api-key-file (first line), else $ETUDE_API_KEY; None if none.
    The file and the variable keep the key out of the process list."""
    if key and key_file:
        raise ValueError("give --api-key or --api-key-file, not both")
    if key_file:
        try:
            lines = Path(key_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read the API key file {key_file}: {exc}") from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise ValueError(f"the API key file {key_file} is empty; put the key on its first line")
    key = key or os.environ.get(API_KEY_ENV) or None
    if key is not None and (not key.isprintable() or " " in key):
        raise ValueError("the API key must be printable text without spaces (it travels in an HTTP header)")
    return key


def _host_name(header: str) -> str:
    """The host of a Host header, without its port: "[::1]:8000" -> "::1", "localhost:80" -> "localhost"."""
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


class Guard:
    """ASGI middleware that refuses, before any route runs: a Host header that does not name this
    machine (only when `check_host`, i.e. bound to loopback), a /v1 request without the API key
    (when `api_key` is set), and a POST whose body is not declared application/json."""

    def __init__(self, app, api_key: str | None = None, check_host: bool = False):
        self.app, self.check_host = app, check_host
        self.key_digest = _digest(api_key) if api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            error = self.check(scope)
            if error is not None:
                headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
                await refusal(error, headers)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def check(self, scope) -> RequestError | None:
        headers = Headers(scope=scope)
        if self.check_host and not is_loopback(_host_name(headers.get("host", ""))):
            return RequestError("this server answers only requests addressed to this machine (Host "
                                "localhost, 127.0.0.1 or [::1]); it is bound to loopback", code="invalid_host")
        path = scope["path"]
        if self.key_digest and (path == "/v1" or path.startswith("/v1/")):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return RequestError("this server needs an API key: send the header Authorization: Bearer KEY "
                                    "(the openai client's api_key)", code="invalid_api_key", status=401)
            if not hmac.compare_digest(_digest(token.strip()), self.key_digest):
                return RequestError("incorrect API key provided", code="invalid_api_key", status=401)
        if scope["method"] == "POST":
            declared = headers.get("content-type", "").split(";")[0].strip().lower()
            if declared != "application/json":
                return RequestError(f"the body must be JSON sent with Content-Type: application/json, not "
                                    f"{json.dumps(declared[:60] or '(none)')}", code="unsupported_media_type",
                                    status=415)
        return None


async def read_body(request: Request, limits: Limits) -> bytes:
    """The request body, at most limits.max_body_bytes (413 as soon as the declared length or the
    bytes received pass it), received within limits.body_timeout seconds (408)."""
    declared = request.headers.get("content-length", "")
    body = bytearray()
    try:
        async with asyncio.timeout(limits.body_timeout):
            if declared.isdigit() and (len(declared) > 18 or int(declared) > limits.max_body_bytes):
                await _discard(request, limits)
            else:
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > limits.max_body_bytes:
                        await _discard(request, limits)
    except TimeoutError:
        raise RequestError(f"the request body did not arrive within {limits.body_timeout:g} s (--body-timeout)",
                           code="request_timeout", status=408) from None
    except ClientDisconnect:
        raise RequestError("the client closed the connection", code="client_closed", status=499) from None
    return bytes(body)


async def _discard(request: Request, limits: Limits, seconds: float = LINGER_SECONDS) -> None:
    """Read and drop what more the client sends, for up to `seconds`, then refuse with 413. A
    client that is still sending when the connection closes may get a reset instead of the 413;
    lingering a moment lets one that sends fast read it (nginx's lingering close)."""
    try:
        async with asyncio.timeout(seconds):
            while (message := await request.receive())["type"] == "http.request" and message.get("more_body"):
                pass
    except TimeoutError:
        pass
    raise RequestError(f"the request body is larger than this server takes ({limits.max_body_bytes}"
                       " bytes, --max-body-bytes)", code="request_too_large", status=413)


def header_timeout_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection (with a 408) whose request headers have not all
    arrived `seconds` after it opened or after its previous response ended."""

    class HeaderTimeoutProtocol(H11Protocol):
        deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._await_headers()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._await_headers()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.deadline is not None and self.conn.their_state is not h11.IDLE:  # the headers are in
                self.deadline.cancel()
                self.deadline = None

        def connection_lost(self, exc: Exception | None) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
            super().connection_lost(exc)

        def _await_headers(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
            self.deadline = self.loop.call_later(seconds, self._headers_late)

        def _headers_late(self) -> None:
            self.deadline = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                body = json.dumps(RequestError(f"the request headers did not arrive within {seconds:g} s "
                                               "(--header-timeout)", code="request_timeout").body()).encode()
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
                                     b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                self.transport.close()

    return HeaderTimeoutProtocol
