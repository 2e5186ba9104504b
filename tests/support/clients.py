"""Clients for the proxy: real curl, and a raw socket for requests curl will not make.

`curl()` runs the curl program with `-x proxy` and `--interface` (the source
address decides the identity) and returns status, headers, body and the local
port it used (to find its flow's events). `RawConnection` sends hand-crafted
bytes and reads replies with the pure `parse_response`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

CURL_TIMEOUT = 10.0
RAW_TIMEOUT = 5.0
RECV_SIZE = 65536
REASON_HEADER = "x-egressgw-reason"
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


def curl_path() -> str | None:
    """Return the curl executable, or None when it is not installed."""
    return shutil.which("curl")


@dataclass(frozen=True)
class CurlResult:
    """What one curl run saw: final status, header blocks, body, and curl's own report."""

    status: int
    connect_status: int
    heads: list[tuple[str, dict[str, str]]]
    body: bytes
    exit_code: int
    error: str
    local_ip: str
    local_port: int
    stderr: str

    @property
    def headers(self) -> dict[str, str]:
        """Return the last response's headers (lowercased names)."""
        return self.heads[-1][1] if self.heads else {}

    @property
    def reason(self) -> str:
        """Return the gateway's X-Egressgw-Reason header of the last response, or ''."""
        return self.headers.get(REASON_HEADER, "")

    def json(self) -> Any:
        """Return the body decoded as JSON (the upstream echo)."""
        return json.loads(self.body)


def parse_header_blocks(raw: bytes) -> list[tuple[str, dict[str, str]]]:
    """Parse curl's `-D` dump into (status line, headers with lowercased names) per response."""
    blocks: list[tuple[str, dict[str, str]]] = []
    for chunk in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        lines = [ln.decode("latin-1") for ln in chunk.split(b"\n") if ln.strip()]
        if not lines or not lines[0].startswith("HTTP/"):
            continue
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        blocks.append((lines[0], headers))
    return blocks


def curl(
    url: str,
    *,
    proxy: str | None = None,
    interface: str | None = None,
    cacert: Path | None = None,
    method: str | None = None,
    headers: Mapping[str, str] | None = None,
    data: bytes | None = None,
    tunnel: bool = False,
    timeout: float = CURL_TIMEOUT,
    extra: Sequence[str] = (),
) -> CurlResult:
    """Run curl for `url` through `proxy` from source address `interface`; return what it saw.

    `tunnel` forces CONNECT even for http:// URLs; a body given as `data` is sent
    chunked when `headers` says `Transfer-Encoding: chunked`.
    """
    exe = curl_path()
    if exe is None:
        raise FileNotFoundError("curl is not installed (Debian package curl)")
    with tempfile.TemporaryDirectory(prefix="egw-curl-") as tmp:
        head_file, body_file = Path(tmp) / "head", Path(tmp) / "body"
        args = [exe, "-s", "-S", "--http1.1", "--max-time", str(timeout)]
        args += ["-D", str(head_file), "-o", str(body_file), "-w", "%{json}"]
        if proxy is not None:
            args += ["-x", proxy]
        if tunnel:
            args.append("-p")
        if interface is not None:
            args += ["--interface", interface]
        if cacert is not None:
            args += ["--cacert", str(cacert)]
        if method is not None:
            args += ["-X", method]
        for name, value in (headers or {}).items():
            args += ["-H", f"{name}: {value}"]
        if data is not None:
            args += ["--data-binary", "@-"]
        args += [*extra, url]
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        proc = subprocess.run(
            args, input=data, capture_output=True, timeout=timeout + 5, env=env, check=False
        )
        info: dict[str, Any] = json.loads(proc.stdout or b"{}")
        heads = parse_header_blocks(head_file.read_bytes() if head_file.exists() else b"")
        body = body_file.read_bytes() if body_file.exists() else b""
    code = int(info.get("http_code") or 0)
    connect = int(info.get("http_connect") or 0)
    # A refused CONNECT is the final answer; after an accepted one only the inner response counts.
    return CurlResult(
        status=code or (connect if connect != 200 else 0),
        connect_status=connect,
        heads=heads,
        body=body,
        exit_code=proc.returncode,
        error=str(info.get("errormsg") or ""),
        local_ip=str(info.get("local_ip") or ""),
        local_port=int(info.get("local_port") or 0),
        stderr=proc.stderr.decode(errors="replace"),
    )


@dataclass(frozen=True)
class RawResponse:
    """One parsed HTTP/1.x response."""

    version: str
    status: int
    phrase: str
    headers: dict[str, str]
    body: bytes
    raw: bytes = field(repr=False)

    @property
    def reason(self) -> str:
        """Return the gateway's X-Egressgw-Reason header, or ''."""
        return self.headers.get(REASON_HEADER, "")


def _parse_chunked(buf: bytes) -> tuple[bytes, int] | None:
    """Return (body, bytes consumed) of a complete chunked body at the start of buf, or None."""
    body, pos = b"", 0
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(buf[pos:eol].split(b";")[0], 16)
        pos = eol + 2
        if size == 0:
            end = buf.find(b"\r\n\r\n", pos - 2)
            return (body, end + 4) if end >= 0 else None
        if len(buf) < pos + size + 2:
            return None
        body += buf[pos : pos + size]
        pos += size + 2


def parse_response(
    buf: bytes, *, eof: bool = False, head_only: bool = False
) -> tuple[RawResponse, int] | None:
    """Parse one response at the start of `buf`: (response, bytes used), or None if more is needed.

    A body without Content-Length or chunking runs to EOF. `head_only` is for
    replies that carry no body (to HEAD, or a 200 to CONNECT). Raises
    ValueError for bytes that are not an HTTP/1.x response.
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if eof and buf:
            raise ValueError(f"truncated response head: {buf[:80]!r}")
        return None
    lines = buf[:end].decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code, _, phrase = rest.partition(" ")
    if not version.startswith("HTTP/1.") or not code.isdigit():
        raise ValueError(f"not an HTTP/1.x status line: {lines[0]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise ValueError(f"bad header line: {line!r}")
        headers[name.strip().lower()] = value.strip()
    status, start = int(code), end + 4
    if head_only or status in (204, 304) or 100 <= status < 200:
        body, used = b"", start
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        parsed = _parse_chunked(buf[start:])
        if parsed is None:
            return None
        body, used = parsed[0], start + parsed[1]
    elif "content-length" in headers:
        length = int(headers["content-length"])
        if len(buf) < start + length:
            return None
        body, used = buf[start : start + length], start + length
    elif eof:
        body, used = buf[start:], len(buf)
    else:
        return None
    return RawResponse(version, status, phrase, headers, body, buf[:used]), used


class RawConnection:
    """A TCP connection to the proxy for hand-crafted bytes, from an optional source address."""

    def __init__(
        self, host: str, port: int, *, source: str | None = None, timeout: float = RAW_TIMEOUT
    ) -> None:
        self.timeout = timeout
        if source is None:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                # Like curl --interface: the port is picked at connect, sequentially per
                # destination, so source ports of one test run do not repeat by chance.
                self.sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                self.sock.settimeout(timeout)
                self.sock.bind((source, 0))
                self.sock.connect((host, port))
            except OSError:
                self.sock.close()
                raise
        self._buf = b""
        self.closed_by_peer = False

    @property
    def local_port(self) -> int:
        """Return this connection's source port (the flow's `source.port`)."""
        port: int = self.sock.getsockname()[1]
        return port

    def send(self, data: bytes) -> None:
        """Send all of `data`."""
        self.sock.sendall(data)

    def _recv_more(self, deadline: float) -> bool:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no complete response within {self.timeout}s: {self._buf[:200]!r}")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(RECV_SIZE)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.closed_by_peer = True
            return False
        self._buf += chunk
        return True

    def read_response(self, *, head_only: bool = False) -> RawResponse:
        """Read one full response; raise TimeoutError, or ConnectionError on EOF without one."""
        deadline = time.monotonic() + self.timeout
        while True:
            parsed = parse_response(self._buf, eof=self.closed_by_peer, head_only=head_only)
            if parsed is not None:
                resp, used = parsed
                self._buf = self._buf[used:]
                return resp
            if self.closed_by_peer:
                raise ConnectionError(f"closed without a response (got {self._buf[:200]!r})")
            self._recv_more(deadline)

    def request(self, data: bytes, *, head_only: bool = False) -> RawResponse:
        """Send `data` and read one response."""
        self.send(data)
        return self.read_response(head_only=head_only)

    def read_until_closed(self) -> bytes:
        """Read until the peer closes (or the timeout passes) and return everything unread."""
        deadline = time.monotonic() + self.timeout
        while self._recv_more(deadline):
            pass
        data, self._buf = self._buf, b""
        return data

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def raw_request(
    host: str,
    port: int,
    data: bytes,
    *,
    source: str | None = None,
    timeout: float = RAW_TIMEOUT,
) -> tuple[RawResponse, int]:
    """Send `data` on a fresh connection; return the first response and the local port used."""
    with RawConnection(host, port, source=source, timeout=timeout) as conn:
        return conn.request(data), conn.local_port
