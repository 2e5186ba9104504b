"""Splunk HTTP Event Collector sink (``/services/collector/event``).

A batch is the HEC event objects concatenated (`siem.formats.to_hec`), sent with
``Authorization: Splunk <token>``. With ``ack: true`` the sink sends a channel id and polls
``/services/collector/ack`` until the indexer confirms the batch (or ack_timeout passes,
and the batch is retried). 5xx, 429 and 401/403 (a token fixed later must not lose events)
are retried; other 4xx count as failed.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence

import aiohttp
import orjson

from siem.config import SplunkHecSinkSpec
from siem.formats import to_hec
from siem.secrets import read_secret
from siem.sinks import SendResult
from siem.sinks.webhook import MAX_ERROR_BODY, HttpRetryError, client_session
from siem.spool import Record

log = logging.getLogger(__name__)

EVENT_PATH = "/services/collector/event"
ACK_PATH = "/services/collector/ack"
ACK_POLL_INTERVAL = 0.5
RETRY_STATUSES = frozenset({401, 403, 429})


class SplunkHecSink:
    """Sends batches to a Splunk HEC endpoint."""

    def __init__(self, spec: SplunkHecSinkSpec, name: str) -> None:
        self.spec = spec
        self.name = name
        self.channel = str(uuid.uuid4())
        self._session: aiohttp.ClientSession | None = None
        self._token = ""  # read by start()
        base = spec.url.rstrip("/")
        self.event_url = base if base.endswith(EVENT_PATH) else base + EVENT_PATH
        self.ack_url = self.event_url[: -len(EVENT_PATH)] + ACK_PATH

    async def start(self) -> None:
        """Read the token (inline or its file) and open the HTTP session."""
        self._token = read_secret(self.spec.token, self.spec.token_file) or ""
        ca = str(self.spec.ca) if self.spec.ca else None
        self._session = client_session(self.spec.timeout, ca)

    def _headers(self) -> dict[str, str]:
        headers = {"Authorization": f"Splunk {self._token}"}
        if self.spec.ack:
            headers["X-Splunk-Request-Channel"] = self.channel
        return headers

    async def send(self, batch: Sequence[Record]) -> SendResult:
        """POST the batch (and wait for the indexer ack if configured)."""
        assert self._session is not None
        spec = self.spec
        body = b"\n".join(
            to_hec(
                orjson.loads(r.payload),
                index=spec.index,
                source=spec.source,
                sourcetype=spec.sourcetype,
            )
            for r in batch
        )
        async with self._session.post(self.event_url, data=body, headers=self._headers()) as resp:
            text = await resp.text(errors="replace")
            if resp.status >= 500 or resp.status in RETRY_STATUSES:
                raise HttpRetryError(resp.status, text)
            if resp.status >= 300:
                log.error(
                    "HEC %s rejected %d events: %s", self.name, len(batch), text[:MAX_ERROR_BODY]
                )
                return SendResult(failed=len(batch))
        if spec.ack:
            ack_id = orjson.loads(text).get("ackId")
            if ack_id is not None:
                await self._wait_ack(int(ack_id))
        return SendResult()

    async def _wait_ack(self, ack_id: int) -> None:
        assert self._session is not None
        deadline = time.monotonic() + self.spec.ack_timeout
        while time.monotonic() < deadline:
            async with self._session.post(
                self.ack_url, json={"acks": [ack_id]}, headers=self._headers()
            ) as resp:
                if resp.status >= 300:
                    raise HttpRetryError(resp.status, await resp.text(errors="replace"))
                acks = (await resp.json()).get("acks", {})
                if acks.get(str(ack_id)):
                    return
            await asyncio.sleep(ACK_POLL_INTERVAL)
        raise TimeoutError(f"HEC ack {ack_id} not confirmed in {self.spec.ack_timeout}s")

    async def aclose(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None
