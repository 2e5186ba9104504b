"""The indicator model: what a feed says is bad (or, for allowlists, good).

Rules:

- An indicator is a type (``ip``, ``cidr``, ``domain``, ``url``) and a *normalised* value (see
  ``feeds.normalise``): two spellings of the same thing compare equal once normalised.
- Provenance says where it came from (feed, confidence, severity, first seen, reference, tags).
  Parsers share one provenance object between every row that carries no metadata of its own, so a
  million-line list costs one provenance, not a million.
- Everything here is frozen and slotted: indicators are values, shared freely between threads.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import overload


class IndicatorType(enum.StrEnum):
    """The kinds of value the gateway can match."""

    IP = "ip"
    CIDR = "cidr"
    DOMAIN = "domain"
    URL = "url"

    @property
    def ecs_type(self) -> str:
        """The ECS ``threat.indicator.type`` for this kind (IPv4 unless told otherwise)."""
        return _ECS_TYPES[self]


_ECS_TYPES = {
    IndicatorType.IP: "ipv4-addr",
    IndicatorType.CIDR: "ipv4-addr",
    IndicatorType.DOMAIN: "domain-name",
    IndicatorType.URL: "url",
}


def ecs_indicator_type(itype: IndicatorType, value: str) -> str:
    """The ECS ``threat.indicator.type`` of a value (``ipv6-addr`` for IPv6 addresses and nets)."""
    if itype in (IndicatorType.IP, IndicatorType.CIDR) and ":" in value:
        return "ipv6-addr"
    return itype.ecs_type


@dataclass(frozen=True, slots=True)
class Provenance:
    """Where an indicator comes from and how much to trust it."""

    feed: str = ""
    confidence: int | None = None
    severity: str | None = None
    first_seen: datetime | None = None
    reference: str | None = None
    tags: tuple[str, ...] = field(default=())


NO_PROVENANCE = Provenance()


@dataclass(frozen=True, slots=True)
class Indicator:
    """One normalised value from one feed."""

    type: IndicatorType
    value: str
    provenance: Provenance = NO_PROVENANCE

    @property
    def key(self) -> tuple[IndicatorType, str]:
        """The identity of the value, independent of its provenance."""
        return (self.type, self.value)


_TYPE_CODES = {t: n for n, t in enumerate(IndicatorType)}
_CODE_TYPES = tuple(IndicatorType)


class IndicatorSet(Sequence[Indicator]):
    """One feed's indicators stored compactly: values, one byte of type each, shared provenance.

    A million ``Indicator`` objects cost ~100 MB and keep the garbage collector busy; this keeps
    the value strings (shared with the matcher's keys for domains and URLs), a byte per type and
    only the provenances that differ from the feed default. Items are built on access.
    """

    __slots__ = ("_default", "_overrides", "_types", "_values")

    def __init__(self, indicators: Iterable[Indicator] = (), default: Provenance = NO_PROVENANCE):
        values: list[str] = []
        types = bytearray()
        overrides: dict[int, Provenance] = {}
        for n, ind in enumerate(indicators):
            values.append(ind.value)
            types.append(_TYPE_CODES[ind.type])
            if ind.provenance is not default:
                overrides[n] = ind.provenance
        self._values: tuple[str, ...] = tuple(values)
        self._types = bytes(types)
        self._default = default
        self._overrides = overrides

    @classmethod
    def from_parts(
        cls,
        values: Sequence[str],
        types: bytes | bytearray,
        default: Provenance,
        overrides: dict[int, Provenance],
    ) -> IndicatorSet:
        """Assemble from parallel values and type codes (``type_code``) plus provenances."""
        if len(values) != len(types):
            raise ValueError("values and types differ in length")
        new = cls.__new__(cls)
        new._values = tuple(values)
        new._types = bytes(types)
        new._default = default
        new._overrides = overrides
        return new

    def __len__(self) -> int:
        return len(self._values)

    @overload
    def __getitem__(self, index: int) -> Indicator: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Indicator]: ...

    def __getitem__(self, index: int | slice) -> Indicator | Sequence[Indicator]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self._values)
        return Indicator(
            _CODE_TYPES[self._types[index]],
            self._values[index],
            self._overrides.get(index, self._default),
        )

    def __iter__(self) -> Iterator[Indicator]:
        for itype, value, prov in self.triples():
            yield Indicator(itype, value, prov)

    def __repr__(self) -> str:
        return f"IndicatorSet({len(self)} indicators)"

    def triples(self) -> Iterator[tuple[IndicatorType, str, Provenance]]:
        """(type, value, provenance) of every indicator, without building Indicator objects."""
        overrides = self._overrides
        default = self._default
        types = _CODE_TYPES
        if not overrides:
            for code, value in zip(self._types, self._values, strict=True):
                yield types[code], value, default
            return
        for n, (code, value) in enumerate(zip(self._types, self._values, strict=True)):
            yield types[code], value, overrides.get(n, default)

    def keys(self) -> set[tuple[IndicatorType, str]]:
        """The (type, value) identities, for computing what an update added and removed."""
        types = _CODE_TYPES
        return {(types[c], v) for c, v in zip(self._types, self._values, strict=True)}


def type_code(itype: IndicatorType) -> int:
    """The one-byte code of an indicator type inside an IndicatorSet."""
    return _TYPE_CODES[itype]


EMPTY_SET = IndicatorSet(())
