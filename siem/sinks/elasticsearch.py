"""Elasticsearch sink: `create` operations into a data stream through the official async client.

* Installs the index template (``siem/assets/es-index-template.json``, ECS mappings) if it
  is missing, before the first bulk request.
* Every document gets ``_id`` = `siem.formats.bulk_id` (``event.id``), and ``create`` fails
  with 409 for an existing ``_id``: a retried batch never duplicates; 409 counts as delivered.
* Per item: 2xx and 409 delivered; 429 and 5xx retried (only those items, with backoff);
  other statuses (400 mapping errors, ...) go to the dead-letter file with the reason.
* A request answered 413 (too large) is split in halves until it fits; a single document
  that is still too large is dead-lettered.
* A whole request failing (connection refused, 503, 429, timeout) raises: the exporter
  retries the batch with backoff. The client's own retries are off so that the exporter's
  backoff is the only one.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, cast

import orjson
from elasticsearch import ApiError, AsyncElasticsearch

from siem.config import ElasticsearchSinkSpec
from siem.formats import to_bulk_actions
from siem.sinks import SendResult
from siem.spool import Record

log = logging.getLogger(__name__)

TEMPLATE_ASSET = "es-index-template.json"
TEMPLATE_PRIORITY = 200
TOO_LARGE = 413


def index_template(data_stream: str) -> dict[str, Any]:
    """The index template body for a data stream (pattern: the stream's type-dataset-*)."""
    text = resources.files("siem.assets").joinpath(TEMPLATE_ASSET).read_text()
    body: dict[str, Any] = json.loads(text)
    prefix = data_stream.rsplit("-", 1)[0]
    body["index_patterns"] = [f"{prefix}-*"]
    body["priority"] = TEMPLATE_PRIORITY
    return body


def classify_item(item: dict[str, Any]) -> str:
    """'ok', 'retry' or 'dead' for one _bulk response item."""
    result: dict[str, Any] = item.get("create") or next(iter(item.values()), {})
    status = int(result.get("status", 0))
    if 200 <= status < 300 or status == 409:
        return "ok"
    if status == 429 or status >= 500:
        return "retry"
    return "dead"


def item_reason(item: dict[str, Any]) -> tuple[int, str]:
    """Status and 'type: reason' text of a failed _bulk item."""
    result: dict[str, Any] = item.get("create") or next(iter(item.values()), {})
    error = result.get("error") or {}
    if isinstance(error, dict):
        text = f"{error.get('type', 'error')}: {error.get('reason', '')}"
    else:
        text = str(error)
    return int(result.get("status", 0)), text


class ElasticsearchSink:
    """Writes batches to a data stream with _bulk create operations."""

    def __init__(self, spec: ElasticsearchSinkSpec, name: str, *, dead_letter: Path) -> None:
        self.spec = spec
        self.name = name
        self.dead_letter = dead_letter
        self.client: AsyncElasticsearch | None = None
        self._template_ready = not spec.install_template

    async def start(self) -> None:
        """Create the client (connections open lazily)."""
        spec = self.spec
        kwargs: dict[str, Any] = {
            "request_timeout": spec.timeout,
            "max_retries": 0,
            "retry_on_timeout": False,
        }
        if spec.api_key is not None:
            kwargs["api_key"] = spec.api_key.get_secret_value()
        if spec.username is not None and spec.password is not None:
            kwargs["basic_auth"] = (spec.username, spec.password.get_secret_value())
        if spec.ca is not None:
            kwargs["ca_certs"] = str(spec.ca)
        self.client = AsyncElasticsearch(spec.hosts, **kwargs)

    async def ensure_template(self) -> bool:
        """Install the index template unless it exists; returns whether it was installed."""
        assert self.client is not None
        name = self.spec.template_name
        exists = await self.client.indices.exists_index_template(name=name)
        if exists:
            return False
        await self.client.indices.put_index_template(
            name=name, **index_template(self.spec.data_stream)
        )
        log.info("elasticsearch %s: installed index template %s", self.name, name)
        return True

    async def send(self, batch: Sequence[Record]) -> SendResult:
        """Bulk-create the batch; see the module docstring for how results are handled."""
        assert self.client is not None
        if not self._template_ready:
            try:
                await self.ensure_template()
            except ApiError as exc:
                if exc.meta.status not in (401, 403):
                    raise
                # A writer-only API key may not manage templates: ES's built-in logs-*-*
                # template still makes a data stream, so write without ours.
                log.warning(
                    "elasticsearch %s: cannot install index template (%s); writing without it",
                    self.name,
                    exc.meta.status,
                )
            self._template_ready = True
        events = [orjson.loads(r.payload) for r in batch]
        lines = to_bulk_actions(events, self.spec.data_stream, [r.payload for r in batch])
        try:
            resp = await self.client.bulk(operations=cast(Sequence[Any], lines))
        except ApiError as exc:
            if exc.meta.status != TOO_LARGE:
                raise
            return await self._too_large(batch, events)
        items: list[dict[str, Any]] = resp.body.get("items", [])
        if len(items) != len(batch):
            raise RuntimeError(f"_bulk answered {len(items)} items for {len(batch)} operations")
        if not resp.body.get("errors"):
            return SendResult()
        retry: list[Record] = []
        dead: list[bytes] = []
        for record, event, item in zip(batch, events, items, strict=True):
            verdict = classify_item(item)
            if verdict == "retry":
                retry.append(record)
            elif verdict == "dead":
                status, reason = item_reason(item)
                dead.append(self._dead_line(event, status, reason))
        if dead:
            log.error(
                "elasticsearch %s: %d events rejected, see %s",
                self.name,
                len(dead),
                self.dead_letter,
            )
            await asyncio.to_thread(self._write_dead, dead)
        return SendResult(retry=retry, failed=len(dead))

    async def _too_large(self, batch: Sequence[Record], events: list[dict[str, Any]]) -> SendResult:
        # 413: the request is larger than http.max_content_length. Halve it until it fits; a
        # single document that is still too large can never be stored: dead-letter it.
        if len(batch) == 1:
            line = self._dead_line(events[0], TOO_LARGE, "request entity too large")
            await asyncio.to_thread(self._write_dead, [line])
            return SendResult(failed=1)
        half = len(batch) // 2
        first = await self.send(batch[:half])
        second = await self.send(batch[half:])
        return SendResult(retry=[*first.retry, *second.retry], failed=first.failed + second.failed)

    def _dead_line(self, event: dict[str, Any], status: int, reason: str) -> bytes:
        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        entry = {"@timestamp": now, "sink": self.name, "status": status, "reason": reason}
        return orjson.dumps({**entry, "event": event}) + b"\n"

    def _write_dead(self, lines: list[bytes]) -> None:
        self.dead_letter.parent.mkdir(parents=True, exist_ok=True)
        with self.dead_letter.open("ab") as fh:
            fh.write(b"".join(lines))

    async def aclose(self) -> None:
        """Close the client."""
        if self.client is not None:
            await self.client.close()
            self.client = None
