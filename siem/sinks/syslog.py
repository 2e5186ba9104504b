"""Syslog sink: RFC 5424 messages over UDP (RFC 5426), TCP (RFC 6587 octet counting) or TLS
(RFC 5425), with a JSON, CEF or LEEF body. RELP transports live in `siem.sinks.relp`.

Before each batch the sink checks whether the receiver closed the connection (EOF) and
reconnects; a failed connect or write raises, and the exporter retries the batch with
backoff. Plain TCP syslog has no application acknowledgement, so a batch that the
receiver's kernel acknowledged but the receiver never read (it stopped or crashed) is lost,
and a batch resent after an error can be duplicated: use RELP where that matters.
UDP is fire-and-forget; messages longer than max_message_bytes are truncated.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import ssl
import termios
import time
from collections.abc import Sequence

import orjson

from siem.config import RELP_TRANSPORTS, SyslogSinkSpec
from siem.formats import frame_octet_count, to_rfc5424
from siem.sinks import SendResult
from siem.spool import Record

ACK_POLL_MIN = 0.0005
ACK_POLL_MAX = 0.05


def split_address(address: str) -> tuple[str, int]:
    """Split "host:port" or "[v6]:port" into host and port."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def rfc5424_message(spec: SyslogSinkSpec, record: Record) -> bytes:
    """The RFC 5424 message for one record, as the spec formats it."""
    return to_rfc5424(
        orjson.loads(record.payload),
        spec.format,
        app_name=spec.app_name,
        hostname=spec.hostname,
        facility=spec.facility_code,
        sd_id=spec.sd_id,
        json_body=record.payload,
    )


def tls_context(spec: SyslogSinkSpec) -> ssl.SSLContext:
    """Client TLS context: CA file (or system CAs), optional client certificate."""
    ctx = ssl.create_default_context(cafile=str(spec.ca) if spec.ca else None)
    if spec.cert is not None and spec.key is not None:
        ctx.load_cert_chain(str(spec.cert), str(spec.key))
    return ctx


class SyslogSink:
    """Sends each event as one RFC 5424 message."""

    def __init__(self, spec: SyslogSinkSpec, name: str) -> None:
        if spec.transport in RELP_TRANSPORTS:
            raise ValueError("RELP transports are served by siem.sinks.relp.RelpSink")
        self.spec = spec
        self.name = name
        self.host, self.port = split_address(spec.address)
        self._ssl: ssl.SSLContext | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self.connects = 0

    async def start(self) -> None:
        """Load TLS material; the connection opens on the first send."""
        if self.spec.transport == "tls":
            self._ssl = tls_context(self.spec)

    def to_message(self, record: Record) -> bytes:
        """The RFC 5424 message for one record."""
        return rfc5424_message(self.spec, record)

    async def _connect(self) -> None:
        await self._disconnect()
        loop = asyncio.get_running_loop()
        if self.spec.transport == "udp":
            transport, _ = await loop.create_datagram_endpoint(
                asyncio.DatagramProtocol, remote_addr=(self.host, self.port)
            )
            self._udp = transport
        else:
            server_hostname = (self.spec.server_name or self.host) if self._ssl else None
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
            # that arrives as the awaited call completes, and the exporter's aclose would hang.
            async with asyncio.timeout(self.spec.timeout):
                self._reader, self._writer = await asyncio.open_connection(
                    self.host, self.port, ssl=self._ssl, server_hostname=server_hostname
                )
        self.connects += 1

    async def _disconnect(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
                async with asyncio.timeout(self.spec.timeout):
                    await writer.wait_closed()

    def _unacked_bytes(self) -> int:
        assert self._writer is not None
        buffered = self._writer.transport.get_write_buffer_size()
        sock: socket.socket | None = self._writer.get_extra_info("socket")
        if sock is None:
            return buffered
        try:
            outq = int.from_bytes(fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4), "little")
        except OSError:
            return buffered
        return buffered + outq

    async def _wait_acked(self) -> None:
        # A receiver that already closed answers new data with RST, never with an ACK: waiting
        # until the kernel's send queue is empty turns "written into a dead connection" into an
        # error (and a retry) instead of silent loss.
        deadline = time.monotonic() + self.spec.timeout
        delay = ACK_POLL_MIN
        while self._unacked_bytes():
            if not self._alive():
                raise ConnectionError("syslog receiver closed the connection before acknowledging")
            if time.monotonic() > deadline:
                raise TimeoutError("syslog receiver did not acknowledge in time")
            await asyncio.sleep(delay)
            delay = min(delay * 2, ACK_POLL_MAX)

    def _alive(self) -> bool:
        if self.spec.transport == "udp":
            return self._udp is not None and not self._udp.is_closing()
        return (
            self._writer is not None
            and self._reader is not None
            and not self._writer.is_closing()
            and not self._reader.at_eof()
            and self._reader.exception() is None
        )

    async def send(self, batch: Sequence[Record]) -> SendResult:
        """Send the batch; raises (and drops the connection) if the receiver is unreachable."""
        messages = [self.to_message(r) for r in batch]
        if not self._alive():
            await self._connect()
        if self._udp is not None:
            limit = self.spec.max_message_bytes
            for message in messages:
                self._udp.sendto(message[:limit])
            return SendResult()
        assert self._writer is not None
        try:
            self._writer.write(b"".join(frame_octet_count(m) for m in messages))
            async with asyncio.timeout(self.spec.timeout):
                await self._writer.drain()
            await self._wait_acked()
        except BaseException:
            await self._disconnect()
            raise
        return SendResult()

    async def aclose(self) -> None:
        """Close the connection."""
        await self._disconnect()
