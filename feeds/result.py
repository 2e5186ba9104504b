"""What a parse produces, and the one place values are classified, normalised and filtered.

Every parser feeds raw values to a ``ResultBuilder``; it decides, in this order:

1. ignored: values that are well-formed but not something an egress gateway matches (file hashes,
   AS numbers): counted in ``ignored``, not an error;
2. rejected: malformed values (counted, with the first few kept as samples with line numbers);
3. dropped by hygiene, counted per reason in ``dropped``: public suffixes (always), special
   networks (private, loopback...) from blocklists only;
4. duplicates (same type and value) keep the first occurrence, counted in ``notes``.

A trailer count (``# END N entries``, Spamhaus metadata ``records``) is compared with ``records``,
the number of data rows read: a mismatch means the body was cut (``truncated``).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from feeds.indicator import NO_PROVENANCE, IndicatorSet, IndicatorType, Provenance, type_code
from feeds.normalise import (
    format_network,
    ipv4_special,
    ipv4_to_int,
    is_public_suffix,
    normalise_domain,
    normalise_url,
    parse_network,
    special_range,
)
from feeds.options import DEFAULT_MAX_SAMPLES

MAX_SAMPLE_TEXT = 200

# Enum members as module constants: attribute access on the enum class costs ~200 ns per row.
_IP = IndicatorType.IP
_CIDR = IndicatorType.CIDR
_DOMAIN = IndicatorType.DOMAIN
_URL = IndicatorType.URL
_CODES = {t: type_code(t) for t in IndicatorType}

_HASH = re.compile(r"[0-9a-fA-F]{32}\Z|[0-9a-fA-F]{40}\Z|[0-9a-fA-F]{64}\Z|[0-9a-fA-F]{128}\Z")
_HASH_LENGTHS = frozenset({32, 40, 64, 128})
_ASN = re.compile(r"(?i)AS\d+\Z")
_IPV4_PORT = re.compile(r"(\d{1,3}(?:\.\d{1,3}){3}):\d{1,5}\Z")
_IPV6_PORT = re.compile(r"\[([0-9A-Fa-f:.]+)\]:\d{1,5}\Z")
_IPV4ISH = re.compile(r"[0-9./]+\Z")


@dataclass(frozen=True, slots=True)
class RejectedLine:
    """A sample of a rejected value: where it was (line in text, record in JSON) and why."""

    line: int
    text: str
    reason: str


@dataclass(frozen=True, slots=True)
class ParseResult:
    """Indicators from one feed body plus the report of what was left out."""

    indicators: IndicatorSet
    records: int = 0
    rejected: int = 0
    samples: tuple[RejectedLine, ...] = ()
    ignored: int = 0
    dropped: Mapping[str, int] = field(default_factory=dict)
    notes: Mapping[str, int] = field(default_factory=dict)
    expected: int | None = None

    @property
    def truncated(self) -> bool:
        """True when a trailer announced a different number of records than were read."""
        return self.expected is not None and self.expected != self.records


class ResultBuilder:
    """Accumulates the values of one parse; not thread-safe, one per parse."""

    def __init__(
        self,
        provenance: Provenance = NO_PROVENANCE,
        *,
        blocklist: bool = True,
        max_samples: int = DEFAULT_MAX_SAMPLES,
    ) -> None:
        self.provenance = provenance
        self.blocklist = blocklist
        self.max_samples = max_samples
        self.records = 0
        self.rejected = 0
        self.ignored = 0
        self.expected: int | None = None
        self._samples: list[RejectedLine] = []
        self._dropped: Counter[str] = Counter()
        self._notes: Counter[str] = Counter()
        # Parallel columns, not Indicator objects: a million rows stay cheap to hold and to
        # garbage-collect. _seen maps a normalised value to its row.
        self._values: list[str] = []
        self._types = bytearray()
        self._overrides: dict[int, Provenance] = {}
        self._seen: dict[str, int] = {}

    def reject(self, line: int, text: str, reason: str) -> None:
        """Count a malformed value and keep it as a sample if there is room."""
        self.rejected += 1
        if len(self._samples) < self.max_samples:
            self._samples.append(RejectedLine(line, text[:MAX_SAMPLE_TEXT], reason))

    def note(self, what: str, n: int = 1) -> None:
        """Count something worth reporting that is not an error."""
        self._notes[what] += n

    def drop(self, reason: str) -> None:
        """Count a value left out by a rule (hygiene, expiry, revocation)."""
        self._dropped[reason] += 1

    def add(
        self,
        text: str,
        line: int,
        provenance: Provenance | None = None,
        only: IndicatorType | None = None,
    ) -> bool:
        """Classify and add one raw value (True if it is an indicator); ``only`` restricts it."""
        value = text.strip()
        if not value:
            self.reject(line, text, "empty value")
            return False
        if (len(value) in _HASH_LENGTHS and _HASH.match(value)) or (
            value[:2] in ("AS", "as") and _ASN.match(value)
        ):
            self.ignored += 1
            return False
        try:
            fast = (
                self._host_ipv4(value)
                if only is not _DOMAIN and len(value) <= 15 and value[0].isdigit()
                else None
            )
            itype, norm = fast or self._classify(value, only)
        except ValueError as e:
            self.reject(line, text, str(e))
            return False
        if itype is None:
            return False
        # The normalised text alone identifies the value: an IP has no '/', a network has,
        # a URL has '://', and a domain never ends in a numeric label.
        if norm in self._seen:
            self._notes["duplicate"] += 1
            return True
        row = len(self._values)
        self._seen[norm] = row
        self._values.append(norm)
        self._types.append(_CODES[itype])
        if provenance is not None and provenance is not self.provenance:
            self._overrides[row] = provenance
        return True

    def _classify(self, value: str, only: IndicatorType | None) -> tuple[IndicatorType | None, str]:
        if "://" in value:
            if only is not None and only is not _URL:
                raise ValueError(f"expected a {only.value}, got a URL")
            return _URL, normalise_url(value)
        if only is not _DOMAIN:
            m = _IPV4_PORT.match(value) or _IPV6_PORT.match(value)
            if m is not None:
                self._notes["port-ignored"] += 1
                return self._classify_ip(m.group(1))
            if ":" in value or _IPV4ISH.match(value):
                return self._classify_ip(value)
        if only in (_IP, _CIDR):
            raise ValueError(f"expected an IP address or network, got {value!r}")
        if "/" in value or "@" in value or ":" in value:
            raise ValueError(f"not a domain, IP or URL: {value!r}")
        if value.startswith("*."):
            # "*.example.com" means the names below example.com: the suffix rule covers them.
            self._notes["wildcard"] += 1
            value = value[2:]
        name = normalise_domain(value)
        if is_public_suffix(name):
            self._dropped["public-suffix"] += 1
            return None, name
        return _DOMAIN, name

    def _host_ipv4(self, value: str) -> tuple[IndicatorType | None, str] | None:
        """The common case of a large list, a bare dotted-quad IPv4 address; else None."""
        try:
            n = ipv4_to_int(value)
        except (OSError, ValueError):  # ValueError: embedded NUL
            return None
        if self.blocklist:
            reason = ipv4_special(n)
            if reason is not None:
                self._dropped[reason] += 1
                return None, value
        return _IP, value

    def _classify_ip(self, value: str) -> tuple[IndicatorType | None, str]:
        if "/" not in value and ":" not in value:
            fast = self._host_ipv4(value)
            if fast is not None:
                return fast
        net, masked = parse_network(value)
        if masked:
            self._notes["host-bits-masked"] += 1
        if self.blocklist:
            reason = special_range(net)
            if reason is not None:
                self._dropped[reason] += 1
                return None, value
        itype = _IP if net.prefixlen == net.max_prefixlen else _CIDR
        return itype, format_network(net)

    def result(self) -> ParseResult:
        """The finished, immutable result."""
        return ParseResult(
            indicators=IndicatorSet.from_parts(
                self._values, self._types, self.provenance, self._overrides
            ),
            records=self.records,
            rejected=self.rejected,
            samples=tuple(self._samples),
            ignored=self.ignored,
            dropped=dict(self._dropped),
            notes=dict(self._notes),
            expected=self.expected,
        )


def parse_timestamp(text: object) -> datetime | None:
    """A feed timestamp (ISO 8601, ``YYYY-MM-DD HH:MM:SS``, epoch seconds) as UTC, else None."""
    if isinstance(text, bool) or text is None:
        return None
    if isinstance(text, int | float):
        try:
            return datetime.fromtimestamp(text, UTC)
        except (OverflowError, OSError, ValueError):
            return None
    if not isinstance(text, str):
        return None
    value = text.strip()
    if not value or value == "None":
        return None
    if value.endswith("Z"):
        value = value[:-1] + "+00:00"
    try:
        ts = datetime.fromisoformat(value)
    except ValueError:
        return None
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
