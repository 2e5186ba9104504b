"""Tests of feeds.parsers: every real sample parses, plus the edge cases FORMATS.md lists."""

from __future__ import annotations

import gzip
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from feeds.indicator import IndicatorType, Provenance
from feeds.options import ParseOptions
from feeds.parsers import (
    parse,
    parse_csv,
    parse_hosts,
    parse_json,
    parse_lines,
    parse_spamhaus,
)
from feeds.result import ParseResult

NOW = datetime(2026, 11, 24, tzinfo=UTC)

# sample -> (format, options, expected indicators, expected trailer count or None, truncated)
SAMPLES: dict[str, tuple[str, ParseOptions, int, int | None, bool]] = {
    "et_compromised-ips.txt": ("lines", ParseOptions(), 54, None, False),
    "et_emerging-Block-IPs.txt": ("lines", ParseOptions(), 71, None, False),
    "feodo_ipblocklist.csv": ("csv", ParseOptions(column="dst_ip"), 28, 28, False),
    "feodo_ipblocklist.json": (
        "json",
        ParseOptions(path="[*]", value_key="ip_address", first_seen_field="first_seen"),
        4,
        None,
        False,
    ),
    "feodo_ipblocklist_recommended.txt": ("lines", ParseOptions(), 244, 244, False),
    "firehol_level1_2015.netset": ("lines", ParseOptions(), 67, None, False),
    "misp_feed_digitalside_hashes.csv": (
        "csv",
        ParseOptions(column=1, header="none"),
        0,
        None,
        False,
    ),
    "misp_feed_infoblox/dad88707-beb8-4a14-94e2-5ffecf5a5f85.json": (
        "json",
        ParseOptions(path="Event.Attribute[*]", value_key="value"),
        6,
        None,
        False,
    ),
    "misp_feed_infoblox/24e799ca-aad8-4244-8005-90b3ceb44540.json": (
        "json",
        ParseOptions(path="Event.Attribute[*]", value_key="value"),
        9,
        None,
        False,
    ),
    "misp_feed_infoblox/manifest.json": (
        "json",
        ParseOptions(path="*.Attribute[*]"),
        0,
        None,
        False,
    ),
    "openphish_feed.txt": ("lines", ParseOptions(), 43, None, False),
    "phishing_army_blocklist_extended.txt": ("lines", ParseOptions(), 36, None, False),
    "spamhaus_asndrop.jsonl": ("spamhaus", ParseOptions(), 0, 201, True),
    "spamhaus_drop.txt": ("spamhaus", ParseOptions(), 58, None, False),
    "spamhaus_drop_2015_intelmq.txt": ("spamhaus", ParseOptions(), 2, None, False),
    "spamhaus_drop_v4.jsonl": ("spamhaus", ParseOptions(), 50, 1670, True),
    "spamhaus_dropv6.txt": ("spamhaus", ParseOptions(), 78, None, False),
    "spamhaus_edrop_2018.txt": ("spamhaus", ParseOptions(), 36, None, False),
    "spamhaus_edrop_2024_merged_stub.txt": ("spamhaus", ParseOptions(), 0, None, False),
    "stevenblack_hosts_2017.txt": ("hosts", ParseOptions(), 32, None, False),
    "stix20_digitalside_misp2stix2_bundle.json": ("stix", ParseOptions(), 2, None, False),
    "stix21_oasis_examples_indicators_bundle.json": ("stix", ParseOptions(), 21, None, False),
    "taxii21_medallion_default_data.json": (
        "stix",
        ParseOptions(path="*.collections[*].objects"),
        1,
        None,
        False,
    ),
    "threatfox_export_csv_full_excerpt.csv": (
        "csv",
        ParseOptions(column="ioc_value"),
        5,
        1217668,
        True,
    ),
    "urlhaus_csv_recent.csv": ("csv", ParseOptions(column="url"), 10, None, False),
    "urlhaus_hostfile_2022_prefix-stripped.txt": ("hosts", ParseOptions(), 52, None, False),
    "urlhaus_text_crcrlf_headerless.txt": ("lines", ParseOptions(), 25, None, False),
}


def _parse_sample(samples: Path, name: str) -> ParseResult:
    fmt, options, *_ = SAMPLES[name]
    return parse(fmt, (samples / name).read_bytes(), options=options, now=NOW)


def test_every_sample_file_is_covered(samples: Path) -> None:
    """Each sample file in the shared folder has an entry in the table above."""
    files = {
        str(p.relative_to(samples)) for p in samples.rglob("*") if p.is_file() and p.suffix != ".md"
    }
    assert files <= set(SAMPLES), sorted(files - set(SAMPLES))


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_sample_parses(samples: Path, name: str) -> None:
    """Every real sample parses to the expected count, trailer and truncation verdict."""
    _, _, count, expected, truncated = SAMPLES[name]
    result = _parse_sample(samples, name)
    assert len(result.indicators) == count
    assert result.expected == expected
    assert result.truncated is truncated


def test_firehol_bogons_and_et_private_ip_are_dropped(samples: Path) -> None:
    """Blocklists never load 0.0.0.0/8, 10.0.0.0/8 or 192.168.1.101; the drops are counted."""
    firehol = _parse_sample(samples, "firehol_level1_2015.netset")
    values = {i.value for i in firehol.indicators}
    assert "10.0.0.0/8" not in values and "0.0.0.0/8" not in values
    assert firehol.dropped == {"private": 1, "unspecified": 1}
    et = _parse_sample(samples, "et_emerging-Block-IPs.txt")
    assert "192.168.1.101" not in {i.value for i in et.indicators}
    assert et.dropped == {"private": 1}


def test_allowlist_parse_keeps_private_ranges(samples: Path) -> None:
    """The private-range rule applies to blocklists only."""
    data = (samples / "firehol_level1_2015.netset").read_bytes()
    result = parse_lines(data, blocklist=False)
    assert "10.0.0.0/8" in {i.value for i in result.indicators}


def test_urlhaus_tags_stay_one_field(samples: Path) -> None:
    """Quoted comma lists are one CSV field: tags split into a tuple, the URL column is right."""
    data = (samples / "urlhaus_csv_recent.csv").read_bytes()
    result = parse_csv(
        data, options=ParseOptions(column="url", tags_field="tags", reference_field="urlhaus_link")
    )
    first = result.indicators[0]
    assert first.value == "http://182.126.120.150:58801/i"
    assert first.provenance.tags == ("32-bit", "elf", "mips", "Mozi")
    assert first.provenance.reference == "https://urlhaus.abuse.ch/url/3786237/"


def test_threatfox_comma_space_rows_and_ports(samples: Path) -> None:
    """ThreatFox rows split on ', ' into 14 fields; ip:port keeps the IP; metadata is read."""
    data = (samples / "threatfox_export_csv_full_excerpt.csv").read_bytes()
    result = parse_csv(
        data,
        options=ParseOptions(
            column="ioc_value", confidence_field="confidence_level", first_seen_field=1
        ),
    )
    values = [i.value for i in result.indicators]
    assert values[:2] == ["http://rocheholding.top/rudolph/five/fre.php", "8.134.12.90"]
    assert result.notes["port-ignored"] == 4
    assert result.indicators[1].provenance.confidence == 100
    assert result.indicators[0].provenance.first_seen == datetime(
        2024, 7, 16, 6, 45, 19, tzinfo=UTC
    )


def test_feodo_csv_by_column_number_skips_header_row(samples: Path) -> None:
    """Column 2 (1-based) is dst_ip; the unprefixed header row is not counted as rejected."""
    data = (samples / "feodo_ipblocklist.csv").read_bytes()
    result = parse_csv(data, options=ParseOptions(column=2))
    assert len(result.indicators) == 28 and result.rejected == 0
    assert result.indicators[0].value == "192.9.135.73"


def test_crcrlf_file_yields_25_urls(samples: Path) -> None:
    """CR CR LF line endings neither add nor corrupt entries."""
    result = _parse_sample(samples, "urlhaus_text_crcrlf_headerless.txt")
    assert len(result.indicators) == 25
    assert all("\r" not in i.value for i in result.indicators)


def test_hosts_skips_preamble_and_keeps_ip_like_names(samples: Path) -> None:
    """localhost entries, zone-id lines and commented entries are skipped; 2o7 names kept."""
    result = _parse_sample(samples, "stevenblack_hosts_2017.txt")
    values = {i.value for i in result.indicators}
    assert "192.168.112.2o7.net" in values and "lb.usemaxserver.de" in values
    assert not values & {"localhost", "local", "broadcasthost", "tracking.applift.com"}
    assert all(i.type is IndicatorType.DOMAIN for i in result.indicators)


def test_phishing_army_punycode_and_underscore(samples: Path) -> None:
    """Punycode TLDs and underscores in labels are accepted as they are."""
    values = {
        i.value for i in _parse_sample(samples, "phishing_army_blocklist_extended.txt").indicators
    }
    assert {"icloud-id.xn--q9jyb4c", "geoff_mulligan.falconshar.com"} <= values


def test_spamhaus_reference_is_sbl_id(samples: Path) -> None:
    """The inline '; SBLnnn' comment becomes the indicator's reference."""
    result = _parse_sample(samples, "spamhaus_drop.txt")
    assert result.indicators[0].value == "1.10.16.0/20"
    assert result.indicators[0].provenance.reference == "SBL256894"


def test_lines_autodetects_kinds_and_inline_comments() -> None:
    """IP, CIDR, domain and URL are told apart; '#' and ';' comments, inline or not, skipped."""
    body = (
        b"# header\n; other\n1.2.3.4 # a host\n5.6.7.0/24;x\nEvil.Example.\n"
        b"http://x.com/a#frag\n\n8.8.8.8:53\n"
    )
    result = parse_lines(body)
    got = [(i.type, i.value) for i in result.indicators]
    assert got == [
        (IndicatorType.IP, "1.2.3.4"),
        (IndicatorType.CIDR, "5.6.7.0/24"),
        (IndicatorType.DOMAIN, "evil.example"),
        (IndicatorType.URL, "http://x.com/a"),
        (IndicatorType.IP, "8.8.8.8"),
    ]
    assert result.records == 5 and result.rejected == 0


def test_lines_rejects_and_samples_bad_values() -> None:
    """Malformed values are counted with line numbers; the rest still load."""
    body = b"1.2.3.4\n09.193.105.79\nnot a value\nco.uk\nok.example\n"
    result = parse_lines(body)
    assert [i.value for i in result.indicators] == ["1.2.3.4", "ok.example"]
    assert result.rejected == 2
    assert [s.line for s in result.samples] == [2, 3]
    assert result.dropped == {"public-suffix": 1}


def test_wildcard_domains_become_suffix_entries() -> None:
    """'*.example.com' is the domain example.com (the suffix rule covers the names below)."""
    result = parse_lines(b"*.evil.example\n*.com\n")
    assert [i.value for i in result.indicators] == ["evil.example"]
    assert result.notes["wildcard"] == 2 and result.rejected == 1


def test_duplicates_are_one_entry() -> None:
    """The same value twice (after normalisation) is one indicator, counted as a duplicate."""
    result = parse_lines(b"a.example.com\nA.EXAMPLE.COM.\n")
    assert len(result.indicators) == 1 and result.notes["duplicate"] == 1


def test_trailer_mismatch_reports_truncation() -> None:
    """A '# END N entries' trailer with a different count marks the parse truncated."""
    ok = parse_lines(b"1.2.3.4\n5.6.7.8\n# END 2 entries")
    cut = parse_lines(b"1.2.3.4\n# END 2 entries")
    assert not ok.truncated and cut.truncated and cut.expected == 2


def test_provenance_is_shared_between_plain_rows() -> None:
    """Rows without metadata share the caller's provenance object (memory)."""
    prov = Provenance("f", confidence=50)
    result = parse_lines(b"1.2.3.4\n5.6.7.8\n", provenance=prov)
    assert all(i.provenance is prov for i in result.indicators)


@pytest.mark.parametrize(
    "body",
    [bytes(range(256)) * 4, gzip.compress(b"1.2.3.4\n"), b"1.2.3.4\x00\n"],
)
@pytest.mark.parametrize("fmt", ["lines", "hosts", "csv", "spamhaus"])
def test_binary_garbage_raises_value_error(body: bytes, fmt: str) -> None:
    """Binary bodies (garbage, undecoded gzip, NULs) raise ValueError, never half-load."""
    with pytest.raises(ValueError):
        parse(fmt, body)


@pytest.mark.parametrize("fmt", ["json", "stix"])
def test_invalid_json_raises_value_error(fmt: str) -> None:
    """A JSON format with a body that is not JSON raises ValueError."""
    with pytest.raises(ValueError, match="invalid JSON"):
        parse(fmt, b"<html><body>502</body></html>", now=NOW)


def test_bom_is_stripped() -> None:
    """A UTF-8 BOM does not end up in the first value."""
    assert parse_lines(b"\xef\xbb\xbf1.2.3.4\n").indicators[0].value == "1.2.3.4"


def test_csv_header_options() -> None:
    """header: row / comment / none each find the named or numbered column."""
    assert [
        i.value
        for i in parse_csv(
            b"ip,x\n1.2.3.4,a\n", options=ParseOptions(column="ip", header="row")
        ).indicators
    ] == ["1.2.3.4"]
    assert (
        len(
            parse_csv(
                b"# ip,x\n1.2.3.4,a\n", options=ParseOptions(column="ip", header="comment")
            ).indicators
        )
        == 1
    )
    assert (
        len(parse_csv(b"1.2.3.4\n", options=ParseOptions(column=1, header="none")).indicators) == 1
    )
    with pytest.raises(ValueError, match="no column 'nope'"):
        parse_csv(b"ip,x\n1.2.3.4,a\n", options=ParseOptions(column="nope", header="row"))


def test_json_path_selects_strings_and_rejects_non_strings() -> None:
    """A path selecting strings yields them; numbers are rejected, not crashing the parse."""
    body = b'{"data": {"items": [{"v": "1.2.3.4"}, {"v": 5}, {"v": "bad value"}]}}'
    result = parse_json(body, options=ParseOptions(path="data.items[*].v"))
    assert [i.value for i in result.indicators] == ["1.2.3.4"]
    assert result.rejected == 2


def test_hosts_multiple_names_and_non_sinkhole_lines() -> None:
    """Several names per line all count; a line mapping to a real address is not a block."""
    result = parse_hosts(b"0.0.0.0 a.example b.example # c\n10.1.2.3 intranet.example\n")
    assert [i.value for i in result.indicators] == ["a.example", "b.example"]
    assert result.notes["non-sinkhole-line"] == 1


def test_spamhaus_jsonl_metadata_count() -> None:
    """The metadata record's 'records' is checked against the entries read."""
    body = b'{"cidr":"1.10.16.0/20","sblid":"SBL1"}\n{"type":"metadata","records":1}\n'
    result = parse_spamhaus(body)
    assert not result.truncated and result.indicators[0].provenance.reference == "SBL1"


def test_unknown_format_and_stix_without_now() -> None:
    """Unknown formats and a stix parse without a clock value are errors."""
    with pytest.raises(ValueError, match="unknown format"):
        parse("yaml", b"")
    with pytest.raises(ValueError, match="now"):
        parse("stix", b"{}")


_fuzz_text = st.text(
    alphabet=st.sampled_from([*"0123456789abcdefx.:/#;, \t\n\r\"'[]{}*%@-_", "ü", "é"]),
    max_size=300,
)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["lines", "hosts", "csv", "json", "spamhaus", "stix"]), _fuzz_text)
def test_parser_contract_on_fuzzed_text(fmt: str, text: str) -> None:
    """Any body either parses to a consistent result or raises ValueError, nothing else."""
    try:
        result = parse(fmt, text.encode(), now=NOW)
    except ValueError:
        return
    assert result.rejected <= max(result.records, result.rejected)
    assert len(result.samples) <= result.rejected
    assert len({i.value for i in result.indicators}) == len(result.indicators)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_parser_contract_on_random_bytes(body: bytes) -> None:
    """Random bytes never crash a parser: a result or ValueError."""
    for fmt in ("lines", "hosts", "csv", "json", "spamhaus", "stix"):
        try:
            result = parse(fmt, body, now=NOW)
        except ValueError:
            continue
        assert isinstance(result, ParseResult)


def test_row_tags_follow_feed_labels() -> None:
    """A row's own tags are added after the feed's labels, not instead of them."""
    body = b'ip,tags\n1.2.3.4,"a,b"\n5.6.7.8,None\n'
    base = Provenance("f", tags=("label",))
    result = parse_csv(body, options=ParseOptions(column="ip", tags_field="tags"), provenance=base)
    assert result.indicators[0].provenance.tags == ("label", "a", "b")
    assert result.indicators[1].provenance is base
