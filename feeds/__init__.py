"""Threat-feed ingestion and matching, a library of its own (it never imports ``egressgw``).

Modules, one concept each (import them qualified):

- ``feeds.spec``: ``FeedSpec``, the validated, frozen feed definition; ``parse_duration``.
- ``feeds.normalise``: canonical domains, IPs and URLs (``normalise_domain``...) and hygiene.
- ``feeds.parsers`` (+ ``feeds.stix``, ``feeds.jsonpath``): pure ``bytes -> ParseResult``.
- ``feeds.matcher``: ``Matcher``, the immutable index answering ``match_ip/domain/url``.
- ``feeds.acceptance``: whether an update may replace the last good data.
- ``feeds.fetch``, ``feeds.taxii``, ``feeds.state``: the I/O edges (HTTP, files, TAXII, disk).
- ``feeds.refresh``: ``FeedManager``, which ties it together and swaps the matcher.
- ``feeds.catalog``: ready definitions of well-known public feeds.
- ``feeds.cli``: the functions behind ``egressgw feeds update | check | lookup``.
"""
