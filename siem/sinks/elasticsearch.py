"""Elasticsearch sink: `create` operations into a data stream through the official async client.

* Installs the index template (``siem/assets/es-index-template.json``, ECS mappings) if it
  is missing, before the first bulk request.
* Every document gets ``_id`` = `siem.formats.bulk_id` (``event.id``), and ``create`` fails
  with 409 for an existing ``_id``: a retried batch never duplicates.
* A 409 is proof of delivery only once the stored document is known to be the same event: the
  sink fetches the documents of all the 409s of a response with one ``_mget`` and compares
  their parsed ``_source`` with the parsed event sent (`holds`: every field sent is stored with
  the same value; an ingest pipeline may have added others). The same: a duplicate. A
  different event under the same ``_id`` (a collision): logged with both events' ids and
  created again under `derived_id` (``<_id>-<content hash>``), itself create-only, so a retry
  of it is again exactly-once (a 409 there means the same content is stored). Not found, or an
  error for that document, or the ``_mget`` failing: those events are retried. Credentials
  without read access (401/403 to ``_mget``) cannot check: 409 then counts as delivered,
  unverified, with a warning.
* Per item: 2xx delivered; 409 as above; 429 and 5xx retried (only those items, with backoff,
  logged); other statuses (400 mapping errors, ...) go to the dead-letter file with the reason.
* A request answered 413 (too large) is split in halves until it fits; a single document
  that is still too large is dead-lettered.
* A whole request failing (connection refused, 503, 429, timeout) raises: the exporter
  retries the batch with backoff. The client's own retries are off so that the exporter's
  backoff is the only one.
* Counters on the sink: ``duplicates``, ``collisions`` and ``unverified`` 409s.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, cast

import orjson
from elasticsearch import ApiError, AsyncElasticsearch, TransportError

from siem.config import ElasticsearchSinkSpec
from siem.formats import MAX_ID_BYTES, bulk_id, to_bulk_actions
from siem.secrets import read_secret
from siem.sinks import SendResult
from siem.spool import Record

log = logging.getLogger(__name__)

TEMPLATE_ASSET = "es-index-template.json"
TEMPLATE_PRIORITY = 200
TOO_LARGE = 413
CONFLICT = 409
NO_READ_ACCESS = (401, 403)
# Hex digits of the content hash in a derived _id: 64 bits, so two different events that share
# an _id also share a derived one only by a 1-in-2^64 chance.
DERIVED_HASH_CHARS = 16


def index_template(data_stream: str) -> dict[str, Any]:
    """The index template body for a data stream (pattern: the stream's type-dataset-*)."""
    text = resources.files("siem.assets").joinpath(TEMPLATE_ASSET).read_text()
    body: dict[str, Any] = json.loads(text)
    prefix = data_stream.rsplit("-", 1)[0]
    body["index_patterns"] = [f"{prefix}-*"]
    body["priority"] = TEMPLATE_PRIORITY
    return body


def classify_item(item: dict[str, Any]) -> str:
    """'ok', 'conflict' (409: check what is stored), 'retry' or 'dead' for one _bulk item."""
    result: dict[str, Any] = item.get("create") or next(iter(item.values()), {})
    status = int(result.get("status", 0))
    if 200 <= status < 300:
        return "ok"
    if status == CONFLICT:
        return "conflict"
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


def derived_id(doc_id: str, event: dict[str, Any]) -> str:
    """The _id for an event whose own _id holds a different event: the _id plus a content hash."""
    digest = hashlib.sha256(orjson.dumps(event, option=orjson.OPT_SORT_KEYS)).hexdigest()
    derived = f"{doc_id}-{digest[:DERIVED_HASH_CHARS]}"
    return derived if len(derived.encode()) <= MAX_ID_BYTES else digest


def holds(stored: Any, sent: Any) -> bool:
    """Whether a stored document is the event sent: every field sent is there, same value.

    Fields only the stored side has are allowed: an ingest pipeline may add some (GeoIP,
    ``event.ingested``) to what was sent.
    """
    if isinstance(sent, dict):
        return isinstance(stored, dict) and all(
            key in stored and holds(stored[key], value) for key, value in sent.items()
        )
    return bool(stored == sent)


def event_id(event: Any) -> str | None:
    """``event.id`` of a document, if it has one (for log lines)."""
    inner = event.get("event") if isinstance(event, dict) else None
    value = inner.get("id") if isinstance(inner, dict) else None
    return str(value) if value is not None else None


class ElasticsearchSink:
    """Writes batches to a data stream with _bulk create operations."""

    def __init__(self, spec: ElasticsearchSinkSpec, name: str, *, dead_letter: Path) -> None:
        self.spec = spec
        self.name = name
        self.dead_letter = dead_letter
        self.client: AsyncElasticsearch | None = None
        self._template_ready = not spec.install_template
        self._can_read = True  # False after _mget was refused: 409s can no longer be checked
        self.duplicates = 0  # 409s whose stored document is the event sent
        self.collisions = 0  # events stored under a derived _id: theirs held another event
        self.unverified = 0  # 409s counted as delivered without a check (no read access)

    async def start(self) -> None:
        """Create the client (connections open lazily)."""
        spec = self.spec
        kwargs: dict[str, Any] = {
            "request_timeout": spec.timeout,
            "max_retries": 0,
            "retry_on_timeout": False,
        }
        api_key = read_secret(spec.api_key, spec.api_key_file)
        if api_key is not None:
            kwargs["api_key"] = api_key
        password = read_secret(spec.password, spec.password_file)
        if spec.username is not None and password is not None:
            kwargs["basic_auth"] = (spec.username, password)
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
        conflicts: list[tuple[Record, dict[str, Any], dict[str, Any]]] = []
        for record, event, item in zip(batch, events, items, strict=True):
            verdict = classify_item(item)
            if verdict == "retry":
                if not retry:
                    self._log_retry(event, item, sum(classify_item(i) == "retry" for i in items))
                retry.append(record)
            elif verdict == "dead":
                status, reason = item_reason(item)
                dead.append(self._dead_line(event, status, reason))
            elif verdict == "conflict":
                conflicts.append((record, event, _item_result(item)))
        if conflicts:
            # Before any dead letter is written: if this raises, the exporter sends the whole
            # batch again and every item comes out the same way once more.
            more_retry, more_dead = await self._settle_conflicts(conflicts)
            retry.extend(more_retry)
            dead.extend(more_dead)
        if dead:
            log.error(
                "elasticsearch %s: %d events rejected, see %s",
                self.name,
                len(dead),
                self.dead_letter,
            )
            await asyncio.to_thread(self._write_dead, dead)
        return SendResult(retry=retry, failed=len(dead))

    async def _settle_conflicts(
        self, conflicts: list[tuple[Record, dict[str, Any], dict[str, Any]]]
    ) -> tuple[list[Record], list[bytes]]:
        # 409s: fetch what each _id holds (one _mget) and compare it with the event sent.
        assert self.client is not None
        if not self._can_read:
            self.unverified += len(conflicts)
            return [], []
        wanted = [
            {"_index": result.get("_index") or self.spec.data_stream, "_id": _sent_id(r, e, result)}
            for r, e, result in conflicts
        ]
        try:
            resp = await self.client.mget(docs=wanted)
        except (ApiError, TransportError) as exc:
            status = exc.meta.status if isinstance(exc, ApiError) else None
            if status in NO_READ_ACCESS:
                self._can_read = False
                self.unverified += len(conflicts)
                log.warning(
                    "elasticsearch %s: _mget refused (%s): cannot check that a 409 holds the "
                    "event sent; counting 409s as delivered from now on (grant read access)",
                    self.name,
                    status,
                )
                return [], []
            log.warning(
                "elasticsearch %s: _mget for %d conflicting events failed (%s); retrying them",
                self.name,
                len(conflicts),
                exc,
            )
            return [r for r, _, _ in conflicts], []
        docs: list[dict[str, Any]] = resp.body.get("docs", [])
        if len(docs) != len(conflicts):
            raise RuntimeError(f"_mget answered {len(docs)} docs for {len(conflicts)} ids")
        retry: list[Record] = []
        collided: list[tuple[Record, dict[str, Any], str]] = []
        for (record, event, _), want, doc in zip(conflicts, wanted, docs, strict=True):
            index, doc_id = want["_index"], want["_id"]
            if "error" in doc or not doc.get("found"):
                # Gone since the 409 (deleted) or unreadable now: sending it again settles it.
                log.warning(
                    "elasticsearch %s: %s/%s answered 409, then %s; retrying event %s",
                    self.name,
                    index,
                    doc_id,
                    doc.get("error") or "not found",
                    event_id(event),
                )
                retry.append(record)
            elif "_source" not in doc:
                self.unverified += 1  # _source disabled in the mapping: nothing to compare
            elif holds(doc["_source"], event):
                self.duplicates += 1
            else:
                log.error(
                    "elasticsearch %s: _id collision in %s: %s holds event.id %s, not the "
                    "event.id %s sent; storing the new event as %s",
                    self.name,
                    index,
                    doc_id,
                    event_id(doc["_source"]),
                    event_id(event),
                    derived_id(doc_id, event),
                )
                collided.append((record, event, doc_id))
        if not collided:
            return retry, []
        more_retry, dead = await self._create_derived(collided)
        return [*retry, *more_retry], dead

    async def _create_derived(
        self, collided: list[tuple[Record, dict[str, Any], str]]
    ) -> tuple[list[Record], list[bytes]]:
        # Create each colliding event under its derived _id. That _id hashes the content, so a
        # 409 there means this same event is stored already (an earlier attempt): delivered.
        assert self.client is not None
        lines: list[bytes] = []
        for record, event, doc_id in collided:
            action = {"create": {"_index": self.spec.data_stream, "_id": derived_id(doc_id, event)}}
            lines.append(orjson.dumps(action))
            lines.append(record.payload.rstrip(b"\n"))
        try:
            resp = await self.client.bulk(operations=cast(Sequence[Any], lines))
        except (ApiError, TransportError) as exc:
            log.warning(
                "elasticsearch %s: storing %d colliding events failed (%s); retrying them",
                self.name,
                len(collided),
                exc,
            )
            return [r for r, _, _ in collided], []
        items: list[dict[str, Any]] = resp.body.get("items", [])
        if len(items) != len(collided):
            raise RuntimeError(f"_bulk answered {len(items)} items for {len(collided)} operations")
        retry: list[Record] = []
        dead: list[bytes] = []
        for (record, event, _), item in zip(collided, items, strict=True):
            verdict = classify_item(item)
            if verdict == "ok":
                self.collisions += 1
            elif verdict == "conflict":
                self.duplicates += 1
            elif verdict == "retry":
                if not retry:
                    self._log_retry(event, item, sum(classify_item(i) == "retry" for i in items))
                retry.append(record)
            else:
                status, reason = item_reason(item)
                dead.append(self._dead_line(event, status, reason))
        return retry, dead

    def _log_retry(self, event: dict[str, Any], item: dict[str, Any], count: int) -> None:
        # One line per response, naming the first such item: a 429 storm answers every item.
        status, reason = item_reason(item)
        log.warning(
            "elasticsearch %s: %d events answered 429/5xx, retrying them; first: event %s, %d %s",
            self.name,
            count,
            event_id(event),
            status,
            reason,
        )

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


def _item_result(item: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = item.get("create") or next(iter(item.values()), {})
    return result


def _sent_id(record: Record, event: dict[str, Any], result: dict[str, Any]) -> str:
    # The _id the item answered for; the one we computed if the answer left it out.
    return str(result.get("_id") or bulk_id(event, record.payload))
