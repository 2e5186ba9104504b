"""Webhook sink: HTTP POST of a JSON-lines batch (``application/x-ndjson``).

2xx: delivered. 5xx, 429, timeouts and connection errors: the whole batch is retried with
backoff. Other 4xx: the receiver rejects the batch for good; it is counted as failed and
logged with the response (never retried, since it would fail forever and block the sink).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence

import aiohttp

from siem.config import WebhookSinkSpec
from siem.sinks import SendResult
from siem.spool import Record

log = logging.getLogger(__name__)

MAX_ERROR_BODY = 512


class HttpRetryError(Exception):
    """A retryable HTTP answer (5xx or 429)."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:MAX_ERROR_BODY]}")
        self.status = status


def client_session(timeout: float, ca: str | None) -> aiohttp.ClientSession:
    """An aiohttp session with a total timeout and an optional CA file."""
    connector = aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=ca) if ca else True)
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout), connector=connector)


class WebhookSink:
    """POSTs batches of JSON lines."""

    def __init__(self, spec: WebhookSinkSpec, name: str) -> None:
        self.spec = spec
        self.name = name
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Open the HTTP session."""
        ca = str(self.spec.ca) if self.spec.ca else None
        self._session = client_session(self.spec.timeout, ca)

    async def send(self, batch: Sequence[Record]) -> SendResult:
        """POST the batch; raise on retryable failures."""
        assert self._session is not None
        body = b"".join(r.payload + b"\n" for r in batch)
        headers = {"Content-Type": "application/x-ndjson", **self.spec.headers}
        async with self._session.post(self.spec.url, data=body, headers=headers) as resp:
            if 200 <= resp.status < 300:
                return SendResult()
            text = await resp.text(errors="replace")
            if resp.status >= 500 or resp.status == 429:
                raise HttpRetryError(resp.status, text)
            log.error(
                "webhook %s rejected %d events: HTTP %d %s",
                self.name,
                len(batch),
                resp.status,
                text[:MAX_ERROR_BODY],
            )
            return SendResult(failed=len(batch))

    async def aclose(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None
