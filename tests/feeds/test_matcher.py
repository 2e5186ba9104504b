"""Tests of feeds.matcher: IP containment, domain suffix rule, exact URLs, allowlists."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from feeds.indicator import Indicator, IndicatorType, Provenance
from feeds.matcher import FeedRules, Match, Matcher
from feeds.normalise import format_network, normalise_domain

T = IndicatorType


def _ind(value: str, feed: str = "bad", **prov: object) -> Indicator:
    if "://" in value:
        itype = T.URL
    else:
        try:
            ipaddress.ip_network(value)
        except ValueError:
            itype = T.DOMAIN
        else:
            itype = T.CIDR if "/" in value else T.IP
    return Indicator(itype, value, Provenance(feed, **prov))  # type: ignore[arg-type]


def _matcher(*feeds: tuple[FeedRules, list[Indicator]]) -> Matcher:
    return Matcher.build(feeds)


def test_ip_longest_prefix_first_with_metadata() -> None:
    """An address matches its exact entry and every covering network, longest first."""
    m = _matcher(
        (
            FeedRules("bad"),
            [
                _ind("1.2.0.0/16", reference="SBL1"),
                _ind("1.2.3.4", confidence=90),
                _ind("1.2.3.0/24"),
            ],
        )
    )
    got = m.match_ip("1.2.3.4")
    assert [(x.indicator, x.why) for x in got] == [
        ("1.2.3.4", "exact"),
        ("1.2.3.0/24", "in network"),
        ("1.2.0.0/16", "in network"),
    ]
    assert got[0].confidence == 90 and got[2].reference == "SBL1"
    assert got[0].ecs_type == "ipv4-addr" and got[1].indicator_type is T.CIDR
    assert m.match_ip("1.3.0.0") == ()


def test_ipv6_and_mapped_addresses() -> None:
    """IPv6 networks match; an IPv4-mapped address is looked up as IPv4."""
    m = _matcher((FeedRules("bad"), [_ind("2a06:e480::/29"), _ind("5.6.7.8")]))
    assert m.match_ip("2a06:e480::1")[0].ecs_type == "ipv6-addr"
    assert m.match_ip("::ffff:5.6.7.8")[0].indicator == "5.6.7.8"
    assert m.match_ip(ipaddress.ip_address("5.6.7.8"))[0].matched == "5.6.7.8"


def test_bad_lookup_input_is_a_miss() -> None:
    """Lookups never raise: garbage is simply not listed."""
    m = _matcher((FeedRules("bad"), [_ind("1.2.3.4"), _ind("evil.example"), _ind("http://a.b/")]))
    assert m.match_ip("not-an-ip") == () and m.match_ip("01.2.3.4") == ()
    assert m.match_domain("bad name..") == () and m.match_url("::nope") == ()


def test_domain_suffix_rule_and_exact_only_feeds() -> None:
    """A listed domain covers subdomains unless its feed says subdomains: false."""
    m = _matcher(
        (FeedRules("c2"), [_ind("evil.example", feed="c2")]),
        (FeedRules("hosts", subdomains=False), [_ind("ads.example", feed="hosts")]),
    )
    sub = m.match_domain("a.b.EVIL.example.")
    assert [(x.feed, x.indicator, x.matched, x.why) for x in sub] == [
        ("c2", "evil.example", "a.b.evil.example", "parent domain")
    ]
    assert m.match_domain("ads.example")[0].why == "exact"
    assert m.match_domain("x.ads.example") == ()
    assert m.match_domain("notevil.example") == ()


def test_idn_lookup_matches_punycode_entry() -> None:
    """A Unicode host name finds the A-label entry."""
    m = _matcher((FeedRules("bad"), [_ind("xn--bcher-kva.example")]))
    assert m.match_domain("www.bücher.example")[0].indicator == "xn--bcher-kva.example"


def test_same_indicator_from_two_feeds_is_one_entry_with_both() -> None:
    """The same value in two feeds yields one match per feed."""
    m = _matcher(
        (FeedRules("a"), [_ind("evil.example", feed="a")]),
        (FeedRules("b"), [_ind("evil.example", feed="b")]),
    )
    assert m.counts["domain"] == 1
    assert sorted(x.feed for x in m.match_domain("evil.example")) == ["a", "b"]


def test_url_exact_only_never_widens_to_host() -> None:
    """A URL indicator matches the canonical URL only, never other paths on the host."""
    m = _matcher((FeedRules("urls"), [_ind("https://www.dropbox.com/scl/fi/x?dl=1")]))
    assert m.match_url("HTTPS://www.Dropbox.com:443/scl/fi/x?dl=1")[0].why == "exact URL"
    assert m.match_url("https://www.dropbox.com/") == ()
    assert m.match_domain("www.dropbox.com") == ()


def test_allowlists_suppress_matches() -> None:
    """Values covered by an allowlist feed yield no match, for each kind."""
    m = _matcher(
        (
            FeedRules("bad"),
            [_ind("8.8.8.0/24"), _ind("evil.example"), _ind("http://evil.example/a")],
        ),
        (
            FeedRules("ok", allowlist=True),
            [_ind("8.8.8.8", feed="ok"), _ind("good.evil.example", feed="ok")],
        ),
    )
    assert m.match_ip("8.8.8.8") == () and m.match_ip("8.8.8.9") != ()
    assert m.match_domain("x.good.evil.example") == ()
    assert m.match_domain("other.evil.example") != ()
    assert m.ip_allowlisted("8.8.8.8") and m.domain_allowlisted("good.evil.example")
    assert m.match_url("http://evil.example/a") != ()


def test_match_dispatches_on_kind() -> None:
    """match() looks up URLs, IPs and domains by what the value looks like."""
    m = _matcher(
        (FeedRules("bad"), [_ind("1.2.3.4"), _ind("evil.example"), _ind("http://u.example/")])
    )
    assert m.match("1.2.3.4") and m.match("a.evil.example") and m.match("http://u.example")
    assert Matcher.empty().match("1.2.3.4") == ()


_nets = st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(8, 32)), min_size=1, max_size=30)


@settings(max_examples=60, deadline=None)
@given(_nets, st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=30))
def test_ip_matching_equals_brute_force(nets: list[tuple[int, int]], probes: list[int]) -> None:
    """match_ip agrees with plain containment over every listed network."""
    networks = {ipaddress.IPv4Network((addr, plen), strict=False) for addr, plen in nets}
    m = _matcher((FeedRules("bad"), [_ind(format_network(n)) for n in networks]))
    listed_addrs = [int(n.network_address) for n in networks]
    for probe in probes + listed_addrs:
        addr = ipaddress.IPv4Address(probe)
        expected = {format_network(n) for n in networks if addr in n}
        assert {x.indicator for x in m.match_ip(str(addr))} == expected


_label = st.from_regex(r"[a-z0-9]{1,6}", fullmatch=True)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(_label, min_size=1, max_size=3), min_size=1, max_size=10),
    st.lists(_label, min_size=0, max_size=3),
)
def test_domain_suffix_rule_equals_brute_force(listed: list[list[str]], prefix: list[str]) -> None:
    """A name matches exactly the listed names equal to it or a parent of it."""
    names = {".".join([*labels, "example"]) for labels in listed}
    m = _matcher((FeedRules("bad"), [_ind(n) for n in names]))
    for base in names:
        query = ".".join([*prefix, base])
        expected = {n for n in names if query == n or query.endswith("." + n)}
        assert {x.indicator for x in m.match_domain(query)} == expected


# -- domains: the lookup against a reference of the documented rules -----------------------

# Few labels, so listed names nest and overlap a lot; odd spellings (empty labels, leading or
# trailing dots) too, as build_raw takes whatever it is given.
_dlabel = st.sampled_from(["a", "b", "co", "uk", "xn--bcher-kva", "_x"])
_dname = st.one_of(
    st.lists(_dlabel, min_size=1, max_size=4).map(".".join),
    st.text(alphabet="ab.", max_size=7),
)
_dfeed = st.tuples(st.booleans(), st.frozensets(_dname, max_size=8))


def _covers(listed: str, name: str) -> bool:
    """The suffix rule: the name itself, or a parent at a label boundary.

    A one-label value (normalisation never lets one through) only ever matches itself.
    """
    return listed == name or ("." in listed and name.endswith("." + listed))


def _reference(
    blocks: list[tuple[bool, frozenset[str]]], allows: list[tuple[bool, frozenset[str]]], name: str
) -> list[tuple[str, str, str, str, int | None]]:
    """What a domain lookup must answer, by brute force over every listed value."""
    for subdomains, values in allows:
        # A one-label name is never allowlisted (as the matcher always did).
        if "." in name and any(v == name or (subdomains and _covers(v, name)) for v in values):
            return []
    found = [
        (len(v), n, f"b{n}", v, name, "exact" if v == name else "parent domain", n)
        for n, (subdomains, values) in enumerate(blocks)
        for v in values
        if v == name or (subdomains and _covers(v, name))
    ]
    # The name itself first, then the nearest parent; feeds in the order they were built.
    return [
        (feed, v, q, why, conf)
        for _, _, feed, v, q, why, conf in sorted(found, key=lambda x: (-x[0], x[1]))
    ]


def _domain_matcher(
    blocks: list[tuple[bool, frozenset[str]]], allows: list[tuple[bool, frozenset[str]]]
) -> Matcher:
    feeds: list[tuple[FeedRules, list[Indicator]]] = []
    for n, (subdomains, values) in enumerate(blocks):
        prov = Provenance(f"b{n}", confidence=n)
        rules = FeedRules(f"b{n}", subdomains=subdomains)
        feeds.append((rules, [Indicator(T.DOMAIN, v, prov) for v in sorted(values)]))
    for n, (subdomains, values) in enumerate(allows):
        prov = Provenance(f"ok{n}")
        rules = FeedRules(f"ok{n}", allowlist=True, subdomains=subdomains)
        feeds.append((rules, [Indicator(T.DOMAIN, v, prov) for v in sorted(values)]))
    return Matcher.build(feeds)


def _got(matches: tuple[Match, ...]) -> list[tuple[str, str, str, str, int | None]]:
    assert all(m.indicator_type is T.DOMAIN for m in matches)
    return [(m.feed, m.indicator, m.matched, m.why, m.confidence) for m in matches]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(_dfeed, min_size=1, max_size=3),
    st.lists(_dfeed, max_size=2),
    st.lists(_dname, max_size=6),
    st.lists(st.sampled_from(["a.", "b.", "co.", "x.a.", ".", ""]), max_size=3),
)
def test_domain_lookups_equal_reference(
    blocks: list[tuple[bool, frozenset[str]]],
    allows: list[tuple[bool, frozenset[str]]],
    others: list[str],
    prefixes: list[str],
) -> None:
    """Both entry points follow the rules: suffix, exact-only feeds, allowlists, order, metadata."""
    # Asked of listed names, names below them, their parents (the stems the walk adds among
    # them) and unrelated names.
    m = _domain_matcher(blocks, allows)
    listed = {v for _, values in blocks for v in values}
    assert m.counts["domain"] == len(listed)  # parents added for the walk are not counted
    names = {*listed, *others, *(v for _, values in allows for v in values)}
    names |= {p + n for n in list(names) for p in prefixes}
    names |= {n[n.find(".") + 1 :] for n in list(names)}  # parents and stems themselves
    for name in names:
        expected = _reference(blocks, allows, name)
        assert _got(m.match_canonical_domain(name)) == expected, name
        # The validating entry: any case, trailing dots.
        assert _got(m.match_domain(name.upper() + ".")) == _reference(
            blocks, allows, name.rstrip(".")
        ), name


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30))
def test_validating_domain_lookup_is_normalise_then_canonical(text: str) -> None:
    """match_domain(x) is match_canonical_domain of x's canonical spelling (or a miss)."""
    m = _matcher(
        (FeedRules("bad"), [_ind("evil.example"), _ind("xn--bcher-kva.example")]),
        (FeedRules("ok", allowlist=True), [_ind("ok.evil.example", feed="ok")]),
    )
    for value in (text, f"{text}.evil.example", f"{text}.bücher.example", f"{text}.EVIL.example."):
        try:
            key = normalise_domain(value)
        except ValueError:
            key = None
        got = m.match_domain(value)
        if key is not None:
            assert got == m.match_canonical_domain(key)
        else:
            assert isinstance(got, tuple)


def test_near_misses_under_listed_parents() -> None:
    """Names beside listed ones, and the parents the walk adds, never match."""
    m = _matcher(
        (FeedRules("bad"), [_ind("x.s3.amazonaws.com"), _ind("cdn3.shop.example")]),
        (FeedRules("hosts", subdomains=False), [_ind("a.b.example", feed="hosts")]),
    )
    for name in ("y.s3.amazonaws.com", "s3.amazonaws.com", "amazonaws.com", "www.shop.example"):
        assert m.match_canonical_domain(name) == () and m.match_domain(name) == ()
    for name in ("shop.example", "b.example", "c.a.b.example", "example"):
        assert m.match_canonical_domain(name) == ()
    got = m.match_canonical_domain("a.x.s3.amazonaws.com")
    assert [(x.indicator, x.why) for x in got] == [("x.s3.amazonaws.com", "parent domain")]
    assert m.match_canonical_domain("a.b.example")[0].why == "exact"
    assert m.counts["domain"] == 3


def test_large_index_uses_miss_filter_without_losing_hits() -> None:
    """Past the filter threshold, misses are filtered and every covered address still hits."""
    hosts = [_ind(f"20.{i // 256}.{i % 256}.7") for i in range(5000)]
    m = _matcher((FeedRules("bad"), [*hosts, _ind("30.1.0.0/16"), _ind("40.2.16.0/20")]))
    assert m._v4_filter is not None
    assert m.match_ip("20.3.5.7") and not m.match_ip("20.3.5.8")
    assert m.match_ip("30.1.255.254")[0].indicator == "30.1.0.0/16"
    assert m.match_ip("40.2.31.1") and not m.match_ip("40.2.32.1")
    assert not m.match_ip("30.2.0.0") and not m.match_ip("8.8.8.8")


_MIXED = _matcher(
    (FeedRules("bad"), [_ind("evil.example"), _ind("http://evil.example/"), _ind("1.2.3.4")]),
    (FeedRules("ok", allowlist=True), [_ind("ok.example", feed="ok"), _ind("5.5.5.5", feed="ok")]),
)


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet=st.sampled_from([*"0123456789abcdef.:/#?@[]%-_ xp", "ü", "\x00"]), max_size=40)
)
def test_lookups_never_raise(text: str) -> None:
    """Every lookup accepts any text and answers a tuple (garbage, NULs, half URLs)."""
    for value in (text, "http://" + text):
        assert isinstance(_MIXED.match(value), tuple)
        assert isinstance(_MIXED.match_ip(value), tuple)
        assert isinstance(_MIXED.match_domain(value), tuple)
        assert isinstance(_MIXED.match_canonical_domain(value), tuple)
        assert isinstance(_MIXED.match_url(value), tuple)
        assert _MIXED.url_allowlisted(value) in (True, False)
