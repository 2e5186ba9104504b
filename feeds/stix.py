"""STIX 2.0 / 2.1 indicators to feed indicators: pure, the caller passes ``now``.

Rules:

- Objects come from a bundle's ``objects``, a bare list of objects, a TAXII envelope, or wherever
  ``options.path`` points. Only ``type == "indicator"`` objects count; for one ``id`` the newest
  ``modified`` version wins.
- Dropped (counted in ``dropped``): ``revoked: true``; ``valid_from`` after ``now``;
  ``valid_until`` at or before ``now`` (unless ``options.ignore_valid_until``). A ``valid_until``
  not after ``valid_from`` is invalid (a real misp2stix2 quirk): noted and ignored, so such a feed
  is not silently emptied.
- 2.1 objects with a ``pattern_type`` other than ``stix`` are ignored.
- Patterns: one observation ``[...]`` or several joined by ``OR``. Inside, comparisons joined by
  ``OR``/``AND`` with parentheses; after expansion into alternatives, an alternative that is one
  ``=`` (or ``IN (...)``) comparison on ``ipv4-addr:value``, ``ipv6-addr:value`` (CIDR allowed),
  ``domain-name:value``, ``url:value`` or ``network-traffic:dst_ref.value`` yields an indicator;
  the pair ``network-traffic:dst_ref.type = ... AND network-traffic:dst_ref.value = ...`` reduces
  to its value. Anything else (``AND`` across objects, ``FOLLOWEDBY``, qualifiers, other
  operators, hashes) cannot be enforced by an egress gateway and is ignored, counted.
"""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import datetime
from typing import Any

import orjson

from feeds import jsonpath
from feeds.indicator import NO_PROVENANCE, IndicatorType, Provenance
from feeds.options import DEFAULT_OPTIONS, ParseOptions
from feeds.result import ParseResult, ResultBuilder, parse_timestamp

MAX_ALTERNATIVES = 1000

_TOKEN = re.compile(
    r"""\s*(?:
      (?P<ts>t'[^']*')
    | (?P<bin>[hb]'[^']*')
    | (?P<str>'(?:[^'\\]|\\.)*')
    | (?P<path>[a-z0-9\-]+:(?:[A-Za-z0-9_\-]+|'[^']*'|\.|\[(?:\*|\d+)\])+)
    | (?P<op>!=|<=|>=|=|<|>)
    | (?P<punct>[\[\]\(\),])
    | (?P<word>[A-Za-z_]+)
    | (?P<num>-?\d+(?:\.\d+)?)
    )""",
    re.VERBOSE,
)

_SUPPORTED: dict[str, IndicatorType | None] = {
    "ipv4-addr:value": IndicatorType.CIDR,
    "ipv6-addr:value": IndicatorType.CIDR,
    "domain-name:value": IndicatorType.DOMAIN,
    "url:value": IndicatorType.URL,
    "network-traffic:dst_ref.value": None,
}

Comparison = tuple[str, str, tuple[str, ...]]
Alternative = tuple[Comparison, ...]


class _Unsupported(Exception):
    """The pattern uses a construct this gateway cannot enforce."""


def tokenize(pattern: str) -> list[tuple[str, str]]:
    """Split a STIX pattern into (kind, text) tokens; raise ValueError on a stray character."""
    tokens: list[tuple[str, str]] = []
    pos = 0
    text = pattern.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.lastgroup is None:
            raise ValueError(f"invalid pattern at offset {pos}: {pattern[pos : pos + 20]!r}")
        kind = m.lastgroup
        value = m.group(kind)
        tokens.append((kind, value.upper() if kind == "word" else value))
        pos = m.end()
    return tokens


class _PatternParser:
    def __init__(self, tokens: list[tuple[str, str]]) -> None:
        self.tokens = tokens
        self.pos = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        tok = self.peek()
        if tok is None:
            raise ValueError("unexpected end of pattern")
        self.pos += 1
        return tok

    def expect(self, text: str) -> None:
        tok = self.take()
        if tok[1] != text:
            raise ValueError(f"expected {text!r}, got {tok[1]!r}")

    def pattern(self) -> list[Alternative]:
        alts = self.observations()
        if self.peek() is not None:
            raise _Unsupported(f"unsupported construct {self.peek()!r}")
        return alts

    def observations(self) -> list[Alternative]:
        alts = self.observation()
        while (tok := self.peek()) is not None and tok[0] == "word":
            if tok[1] != "OR":
                raise _Unsupported(f"{tok[1]} between observations")
            self.take()
            alts = alts + self.observation()
        return alts

    def observation(self) -> list[Alternative]:
        tok = self.take()
        if tok[1] == "(":
            alts = self.observations()
            self.expect(")")
        elif tok[1] == "[":
            alts = self.comparisons()
            self.expect("]")
        else:
            raise ValueError(f"expected '[' or '(', got {tok[1]!r}")
        nxt = self.peek()
        if nxt is not None and nxt[1] in ("WITHIN", "REPEATS", "START"):
            raise _Unsupported(f"qualifier {nxt[1]}")
        return alts

    def comparisons(self) -> list[Alternative]:
        alts = self.conjunction()
        while (tok := self.peek()) is not None and tok[1] == "OR":
            self.take()
            alts = alts + self.conjunction()
        return alts

    def conjunction(self) -> list[Alternative]:
        alts = self.atom()
        while (tok := self.peek()) is not None and tok[1] == "AND":
            self.take()
            right = self.atom()
            alts = [a + b for a in alts for b in right]
            if len(alts) > MAX_ALTERNATIVES:
                raise _Unsupported("pattern expands into too many alternatives")
        return alts

    def atom(self) -> list[Alternative]:
        tok = self.take()
        if tok[1] == "(":
            alts = self.comparisons()
            self.expect(")")
            return alts
        if tok[0] != "path":
            raise ValueError(f"expected an object path, got {tok[1]!r}")
        path = tok[1]
        op = self.take()
        negated = False
        if op[1] == "NOT":
            negated = True
            op = self.take()
        if op[1] == "IN":
            self.expect("(")
            values: list[str] = []
            while True:
                values.append(self.value())
                sep = self.take()
                if sep[1] == ")":
                    break
                if sep[1] != ",":
                    raise ValueError(f"expected ',' or ')', got {sep[1]!r}")
            name = "NOT IN" if negated else "IN"
            return [((path, name, tuple(values)),)]
        value = self.value()
        name = ("NOT " if negated else "") + op[1]
        return [((path, name, (value,)),)]

    def value(self) -> str:
        kind, text = self.take()
        if kind == "str":
            return text[1:-1].replace("\\'", "'").replace("\\\\", "\\")
        if kind in ("num", "word", "ts", "bin"):
            return text
        raise ValueError(f"expected a value, got {text!r}")


def extract_values(pattern: str) -> tuple[list[tuple[str, IndicatorType | None]], int]:
    """Indicator values (with a kind hint) in a pattern, and how many alternatives were skipped.

    Raises ValueError for a syntax error; a construct that cannot be enforced is skipped.
    """
    try:
        alternatives = _PatternParser(tokenize(pattern)).pattern()
    except _Unsupported:
        return [], 1
    out: list[tuple[str, IndicatorType | None]] = []
    skipped = 0
    for alt in alternatives:
        value = _reduce(alt)
        if value is None:
            skipped += 1
        else:
            out.extend(value)
    return out, skipped


def _reduce(alt: Alternative) -> list[tuple[str, IndicatorType | None]] | None:
    if len(alt) == 1:
        path, op, values = alt[0]
        if path in _SUPPORTED and op in ("=", "IN"):
            return [(v, _SUPPORTED[path]) for v in values]
        return None
    # network-traffic:dst_ref.type = 'ipv4-addr' AND network-traffic:dst_ref.value = 'x'
    values_found: list[str] = []
    for path, op, values in alt:
        if path == "network-traffic:dst_ref.value" and op == "=":
            values_found.extend(values)
        elif not (path == "network-traffic:dst_ref.type" and op == "="):
            return None
    if len(values_found) != 1:
        return None
    return [(values_found[0], None)]


def _objects(document: Any, options: ParseOptions) -> list[Any]:
    if options.path:
        selected = jsonpath.select(document, options.path)
        objects: list[Any] = []
        for node in selected:
            if isinstance(node, list):
                objects.extend(node)
            elif isinstance(node, dict) and isinstance(node.get("objects"), list):
                objects.extend(node["objects"])
            else:
                objects.append(node)
        return objects
    if isinstance(document, list):
        return document
    if isinstance(document, dict):
        if isinstance(document.get("objects"), list):
            return list(document["objects"])
        if document.get("type") == "indicator":
            return [document]
        return []
    raise ValueError("a STIX document is a JSON object or array")


def _latest_versions(objects: list[Any]) -> list[dict[str, Any]]:
    latest: dict[str, tuple[datetime | None, dict[str, Any]]] = {}
    anonymous: list[dict[str, Any]] = []
    for obj in objects:
        if not isinstance(obj, dict) or obj.get("type") != "indicator":
            continue
        oid = obj.get("id")
        if not isinstance(oid, str):
            anonymous.append(obj)
            continue
        modified = parse_timestamp(obj.get("modified"))
        old = latest.get(oid)
        if old is None or (modified is not None and (old[0] is None or modified > old[0])):
            latest[oid] = (modified, obj)
    return anonymous + [obj for _, obj in latest.values()]


def parse_stix(
    data: bytes,
    *,
    now: datetime,
    options: ParseOptions = DEFAULT_OPTIONS,
    provenance: Provenance = NO_PROVENANCE,
    blocklist: bool = True,
) -> ParseResult:
    """Parse STIX 2.x indicators valid at ``now`` (an aware datetime)."""
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise ValueError(f"invalid JSON: {e}") from None
    builder = ResultBuilder(provenance, blocklist=blocklist, max_samples=options.max_samples)
    for number, obj in enumerate(_latest_versions(_objects(document, options)), start=1):
        builder.records += 1
        _one_indicator(obj, number, now, builder, provenance, options)
    return builder.result()


def _one_indicator(
    obj: dict[str, Any],
    number: int,
    now: datetime,
    builder: ResultBuilder,
    provenance: Provenance,
    options: ParseOptions,
) -> None:
    if obj.get("revoked") is True:
        builder.drop("revoked")
        return
    if obj.get("pattern_type", "stix") != "stix":
        builder.ignored += 1
        return
    pattern = obj.get("pattern")
    if not isinstance(pattern, str):
        builder.reject(number, str(obj.get("id")), "indicator without a pattern")
        return
    valid_from = parse_timestamp(obj.get("valid_from"))
    valid_until = parse_timestamp(obj.get("valid_until"))
    if valid_from is not None and valid_from > now:
        builder.drop("not-yet-valid")
        return
    if valid_until is not None and not options.ignore_valid_until:
        if valid_from is not None and valid_until <= valid_from:
            builder.note("valid_until-not-after-valid_from")
        elif valid_until <= now:
            builder.drop("expired")
            return
    try:
        values, skipped = extract_values(pattern)
    except ValueError as e:
        builder.reject(number, pattern, f"pattern: {e}")
        return
    if skipped:
        builder.note("unsupported-pattern-terms", skipped)
    if not values:
        builder.ignored += 1
        return
    prov = _provenance(obj, provenance, valid_from)
    for value, hint in values:
        builder.add(value, number, prov, only=hint)


def _provenance(obj: dict[str, Any], base: Provenance, valid_from: datetime | None) -> Provenance:
    tags: list[str] = []
    for key in ("indicator_types", "labels"):
        items = obj.get(key)
        if isinstance(items, list):
            tags.extend(str(t) for t in items if str(t) not in tags)
    confidence = obj.get("confidence")
    return replace(
        base,
        confidence=confidence if isinstance(confidence, int) else base.confidence,
        first_seen=valid_from or base.first_seen,
        reference=obj.get("id") if isinstance(obj.get("id"), str) else base.reference,
        tags=base.tags + tuple(t for t in tags if t not in base.tags),
    )
