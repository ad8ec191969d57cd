"""What every HTTP request passes before the app sees it: an allowed Host header and a body size cap.

The Host check stops DNS rebinding: a web page on an attacker's domain that re-points its name to
127.0.0.1 reaches a keyless local server from the victim's browser, but its requests carry the
attacker's name in the Host header. An IP address in the header cannot come from rebinding.

The size cap is enforced before the body is read: a Content-Length over the cap is answered 413 at
once (and the connection closed, so the rest is never read), and a body without one (chunked) is
counted as it arrives and refused as soon as it passes the cap. The server then holds at most the cap
plus one network read of any request, whatever the client sends.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Collection

from starlette.exceptions import HTTPException

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def error_body(status: int, message: str, code: str, param: str | None = None) -> dict:
    """OpenAI's error format."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 429:
        kind = "rate_limit_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_allowed_hosts(bound_host: str) -> list[str]:
    """localhost, 127.0.0.1, ::1 and the bound host; for a wildcard bind (0.0.0.0, ::) also this
    machine's names, and any IP address (see `RequestGuard`): the server cannot know every address
    it is reached by, and an address in the Host header cannot be a rebinding attack."""
    hosts = [*LOOPBACK_HOSTS, bound_host]
    if bound_host in WILDCARD_HOSTS:
        hosts += [socket.gethostname(), socket.getfqdn(), "ip-address"]
    return [host.lower() for host in hosts if host]


def host_name(header: str) -> str:
    """The name in a Host header, without the port: `[::1]:8000` -> `::1`, `example.org:80` -> `example.org`."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body over {limit} bytes; this server accepts at most {limit} bytes "
                              "(`kdlm serve --max-body-mb`)")


class RequestGuard:
    """ASGI middleware: refuse a Host header not in `allowed_hosts` (400) and a body over `max_body_bytes` (413).

    Args:
        app: the ASGI app behind it.
        max_body_bytes: the largest request body accepted.
        allowed_hosts: names accepted in the Host header (port ignored); `*` accepts any, and
            `ip-address` accepts any IP address. None accepts any.
    """

    def __init__(self, app, *, max_body_bytes: int, allowed_hosts: Collection[str] | None):
        self.app, self.max_body_bytes = app, max_body_bytes
        self.allowed = None if allowed_hosts is None or "*" in allowed_hosts else {h.lower() for h in allowed_hosts}

    def _host_allowed(self, header: str) -> bool:
        name = host_name(header)
        return self.allowed is None or name in self.allowed or ("ip-address" in self.allowed and _is_ip(name))

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        host = headers.get("host", "")
        if not self._host_allowed(host):
            message = (f"Host header {host!r} is not allowed here; start the server with --allowed-hosts "
                       f"{host_name(host) or 'NAME'} to accept it")
            return await _refuse(send, 400, message, "host_not_allowed")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return await _refuse(send, 413, BodyTooLarge(self.max_body_bytes).detail, "request_too_large")
        await self._capped(scope, receive, send)

    async def _capped(self, scope, receive, send) -> None:
        received, started = 0, False

        async def capped_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        async def watched_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, capped_receive, watched_send)
        except BodyTooLarge as error:  # raised where the app does not turn it into an answer itself
            if not started:
                await _refuse(send, 413, error.detail, "request_too_large")


async def _refuse(send, status: int, message: str, code: str) -> None:
    body = json.dumps(error_body(status, message, code)).encode()
    # `connection: close`: the rest of a refused body is never read; the client sees the answer, then EOF.
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
