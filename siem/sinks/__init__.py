"""Sinks: where spooled events go. Each sink takes batches of records and delivers them.

Contract for `Sink.send(batch)`:

* return `SendResult()` when every record is delivered;
* return `SendResult(retry=[...])` for records worth another attempt (the exporter backs off
  and sends exactly those again) and `failed=n` for records given up for good (dead-lettered
  or rejected; counted, never silently);
* raise any exception when the whole batch should be retried (connection lost, 503, ...).

Sinks never block one another: the exporter runs one delivery task per sink.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from siem.config import (
    RELP_TRANSPORTS,
    ElasticsearchSinkSpec,
    FileSinkSpec,
    SinkSpec,
    SplunkHecSinkSpec,
    StdoutSinkSpec,
    SyslogSinkSpec,
    WebhookSinkSpec,
)
from siem.spool import Record


@dataclass
class SendResult:
    """Outcome of one send: records to retry, and how many failed for good."""

    retry: Sequence[Record] = field(default_factory=list)
    failed: int = 0


class Sink(Protocol):
    """What the exporter needs from a sink."""

    name: str

    async def start(self) -> None:
        """Prepare (connect lazily if possible; never fail hard on an unreachable receiver)."""

    async def send(self, batch: Sequence[Record]) -> SendResult:
        """Deliver a batch (see the module docstring)."""

    async def aclose(self) -> None:
        """Release connections and files."""


def build_sink(spec: SinkSpec, name: str, *, state_dir: Path) -> Sink:
    """Create the sink for a spec; state_dir holds sink files such as dead letters."""
    if isinstance(spec, FileSinkSpec):
        from siem.sinks.file import FileSink

        return FileSink(spec, name)
    if isinstance(spec, StdoutSinkSpec):
        from siem.sinks.stdout import StdoutSink

        return StdoutSink(spec, name)
    if isinstance(spec, SyslogSinkSpec) and spec.transport in RELP_TRANSPORTS:
        from siem.sinks.relp import RelpSink

        return RelpSink(spec, name)
    if isinstance(spec, SyslogSinkSpec):
        from siem.sinks.syslog import SyslogSink

        return SyslogSink(spec, name)
    if isinstance(spec, ElasticsearchSinkSpec):
        from siem.sinks.elasticsearch import ElasticsearchSink

        dead = spec.dead_letter or state_dir / f"{name}.dead-letter.jsonl"
        return ElasticsearchSink(spec, name, dead_letter=dead)
    if isinstance(spec, SplunkHecSinkSpec):
        from siem.sinks.splunk_hec import SplunkHecSink

        return SplunkHecSink(spec, name)
    if isinstance(spec, WebhookSinkSpec):
        from siem.sinks.webhook import WebhookSink

        return WebhookSink(spec, name)
    raise ValueError(f"unknown sink type {spec!r}")
