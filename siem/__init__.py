"""siem: durable export of ECS events to SIEMs, and firewall blocklist formats.

Modules, one job each:

* `siem.config`: pydantic models for ``spool:`` and ``sinks:`` (embedded by the gateway).
* `siem.exporter`: `Exporter` (``submit`` / ``start`` / ``flush`` / ``aclose``).
* `siem.spool`: the on-disk spool; its docstring is the format specification.
* `siem.formats`: pure ECS -> JSON line / RFC 5424 / CEF / LEEF / HEC / bulk functions.
* `siem.relp`: pure RELP client core (frames, incremental parser, offers, session).
* `siem.sinks`: file, stdout, syslog (UDP, TCP, TLS; RELP in `siem.sinks.relp`),
  elasticsearch, splunk_hec, webhook.
* `siem.firewall`: EDL and nftables set renderers.

`siem` never imports `egressgw` or `feeds`.
"""
