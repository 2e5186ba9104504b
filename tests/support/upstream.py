"""Echo upstream servers (HTTP and HTTPS) on chosen loopback addresses, in their own thread.

Every request, whatever its method or target, is answered 200 with a JSON body
that echoes what arrived: method, target, Host header, every header in order,
body length, the listener and whether it was TLS. Tests read that body (or
`Upstream.requests`, every echo recorded) to check what the gateway forwarded.

The servers run on an event loop of their own in a daemon thread, so tests
that block on a subprocess (curl) or on a socket never starve them.

Query parameters change the answer: `?status=N` answers N, `?delay=S` waits S
seconds first (for upstream timeouts), `?size=N` pads the body with N bytes,
`?chunked=1` sends it chunked, `?hop=1` adds hop-by-hop response headers.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Self

from aiohttp import web

from tests.support.service import Service

from .pki import TlsFiles

UPSTREAM_START_TIMEOUT = 10.0
UPSTREAM_STOP_TIMEOUT = 10.0
SHUTDOWN_GRACE = 1.0
MAX_DELAY = 30.0
MAX_PADDING = 64 * 1024 * 1024
CHUNK_SIZE = 16 * 1024
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Sent with ?hop=1: a proxy must drop them (and the header Connection names) before the client.
HOP_BY_HOP_RESPONSE_HEADERS = {
    "Connection": "keep-alive, X-Upstream-Hop",
    "X-Upstream-Hop": "secret",
    "Keep-Alive": "timeout=7",
    "X-Upstream-End": "kept",
}

Echo = dict[str, Any]


@dataclass(frozen=True)
class Listener:
    """One upstream listening address; `tls` makes it HTTPS with the test server certificate."""

    host: str
    port: int
    tls: bool = False

    @property
    def authority(self) -> str:
        """Return `host:port`."""
        return f"{self.host}:{self.port}"


def header_pairs(raw: Sequence[tuple[bytes, bytes]]) -> list[list[str]]:
    """Return raw header pairs as `[name, value]` strings, names as sent."""
    return [[k.decode("latin-1"), v.decode("latin-1")] for k, v in raw]


def header_value(echo: Echo, name: str) -> str | None:
    """Return the last value of header `name` (any case) in an echo, or None."""
    found: str | None = None
    for key, value in echo["headers"]:
        if key.lower() == name.lower():
            found = value
    return found


def header_names(echo: Echo) -> set[str]:
    """Return the lowercased names of every header an upstream received."""
    return {key.lower() for key, _ in echo["headers"]}


class Upstream(Service):
    """Context manager running echo servers on `listeners` until it exits."""

    def __init__(self, listeners: Sequence[Listener], tls: TlsFiles | None = None) -> None:
        if any(lst.tls for lst in listeners) and tls is None:
            raise ValueError("a TLS listener needs TlsFiles")
        self.listeners = list(listeners)
        self.tls = tls
        self.requests: list[Echo] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def requests_to(self, host: str, port: int | None = None) -> list[Echo]:
        """Return the echoes of requests that arrived at `host` (and `port` if given)."""
        with self._lock:
            seen = list(self.requests)
        return [
            e
            for e in seen
            if e["server_host"] == host and (port is None or e["server_port"] == port)
        ]

    def clear(self) -> None:
        """Forget the recorded requests."""
        with self._lock:
            self.requests.clear()

    def _ssl_context(self) -> ssl.SSLContext:
        assert self.tls is not None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.tls.server_cert, self.tls.server_key)
        return ctx

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        # The low-level server has no expect handler of its own: answer 100 before the body.
        if request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(CONTINUE)
        body = await request.read()
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        host, port = (sockname[0], sockname[1]) if sockname else ("", 0)
        echo: Echo = {
            "server_host": host,
            "server_port": port,
            "tls": request.secure,
            "method": request.method,
            "target": request.raw_path,
            "path": request.path,
            "http_version": f"{request.version.major}.{request.version.minor}",
            "host": request.headers.get("Host"),
            "headers": header_pairs(request.raw_headers),
            "body_length": len(body),
        }
        with self._lock:
            self.requests.append(echo)
        delay = min(float(request.query.get("delay", "0")), MAX_DELAY)
        if delay > 0:
            await asyncio.sleep(delay)
        status = int(request.query.get("status", "200"))
        padding = min(int(request.query.get("size", "0")), MAX_PADDING)
        payload = dict(echo, padding="x" * padding) if padding else echo
        body = json.dumps(payload).encode()
        headers = HOP_BY_HOP_RESPONSE_HEADERS if request.query.get("hop") else {}
        if not request.query.get("chunked"):
            return web.Response(
                status=status, body=body, content_type="application/json", headers=headers
            )
        response = web.StreamResponse(status=status, headers=headers)
        response.content_type = "application/json"
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(body), CHUNK_SIZE):
            await response.write(body[start : start + CHUNK_SIZE])
        await response.write_eof()
        return response

    async def _serve(self) -> None:
        server = web.Server(self._handle, access_log=None)
        runner = web.ServerRunner(server, shutdown_timeout=SHUTDOWN_GRACE)
        await runner.setup()
        try:
            for lst in self.listeners:
                site = web.TCPSite(
                    runner,
                    lst.host,
                    lst.port,
                    ssl_context=self._ssl_context() if lst.tls else None,
                    reuse_address=True,
                )
                await site.start()
            self._stop = asyncio.Event()
            self._ready.set()
            await self._stop.wait()
        finally:
            await runner.cleanup()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:
            # Kept for start() to re-raise in the test's thread; never escapes the thread.
            self._error = exc
        finally:
            self._ready.set()
            loop.close()

    def start(self) -> Self:
        """Start the servers; raise if any listener cannot bind."""
        self._thread = threading.Thread(target=self._run, name="upstream", daemon=True)
        self._thread.start()
        if not self._ready.wait(UPSTREAM_START_TIMEOUT):
            raise TimeoutError("upstream servers did not start")
        if self._error is not None:
            self._thread.join(UPSTREAM_STOP_TIMEOUT)
            raise RuntimeError(f"upstream servers failed to start: {self._error!r}")
        return self

    def stop(self) -> None:
        """Stop the servers and join their thread."""
        loop, stop, thread = self._loop, self._stop, self._thread
        if thread is None:
            return
        if loop is not None and stop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)
        thread.join(UPSTREAM_STOP_TIMEOUT)
        self._thread = None
