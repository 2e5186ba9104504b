"""Tests for the spool and sink configuration models."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, TypeAdapter, ValidationError
from ruamel.yaml import YAML

from siem.config import (
    ElasticsearchSinkSpec,
    SinkSpec,
    SpoolSpec,
    SyslogSinkSpec,
    parse_size,
    resolve_paths,
    sink_names,
)

CONTRACT = Path(__file__).resolve().parents[1] / "integration" / "contract" / "egressgw-siem.yaml"
SINKS = TypeAdapter(list[SinkSpec])


class GatewayLike(BaseModel):
    """How the gateway embeds the models (errors must carry key paths)."""

    spool: SpoolSpec | None = None
    sinks: list[SinkSpec] = []


@pytest.mark.parametrize(
    ("text", "value"),
    [
        (1024, 1024),
        ("512", 512),
        ("64KiB", 65536),
        ("256MiB", 256 * 1024**2),
        ("1GiB", 1024**3),
        ("10MB", 10_000_000),
        ("3 k", 3000),
        ("2G", 2 * 10**9),
    ],
)
def test_parse_size(text: object, value: int) -> None:
    """Sizes accept ints, IEC (KiB, MiB, GiB) and SI (kB, MB, GB) units."""
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "MiB", "1.5GiB", "-1", "12 parsecs", True, 1.5])
def test_parse_size_rejects(text: object) -> None:
    """Anything but a whole number of bytes with a known unit is refused."""
    with pytest.raises(ValueError):
        parse_size(text)


def test_contract_validates_unchanged_with_base_dir() -> None:
    """The contract's spool and sinks validate as written; relative paths use base_dir."""
    data = YAML(typ="safe").load(CONTRACT.read_text())
    ctx = {"base_dir": Path("/etc/egressgw")}
    spool = SpoolSpec.model_validate(data["spool"], context=ctx)
    assert spool.dir == Path("/etc/egressgw/spool") and spool.max_bytes == 256 * 1024**2
    sinks = SINKS.validate_python(data["sinks"], context=ctx)
    assert [s.type for s in sinks] == ["file", "syslog", "elasticsearch", "splunk_hec", "webhook"]
    syslog = sinks[1]
    assert isinstance(syslog, SyslogSinkSpec)
    assert syslog.transport == "tls" and syslog.ca == Path("/etc/egressgw/ca.pem")
    es = sinks[2]
    assert isinstance(es, ElasticsearchSinkSpec) and es.data_stream == "logs-egressgw-default"


def test_errors_carry_key_paths() -> None:
    """A bad key inside a sink is reported with its path (sinks.1.transport)."""
    with pytest.raises(ValidationError) as info:
        GatewayLike.model_validate(
            {"sinks": [{"type": "stdout"}, {"type": "syslog", "address": "h:1", "transport": "x"}]}
        )
    assert info.value.errors()[0]["loc"][:3] == ("sinks", 1, "syslog")
    assert "transport" in str(info.value)


@pytest.mark.parametrize(
    "sink",
    [
        {"type": "kafka"},
        {"type": "file"},
        {"type": "file", "path": "x", "colour": "red"},
        {"type": "syslog", "address": "no-port"},
        {"type": "syslog", "address": "h:70000"},
        {"type": "syslog", "address": "h:514", "transport": "tcp", "ca": "ca.pem"},
        {"type": "syslog", "address": "h:514", "transport": "tls", "cert": "c.pem"},
        {"type": "syslog", "address": "h:514", "facility": "local9"},
        {"type": "syslog", "address": "h:514", "transport": "relp", "ca": "ca.pem"},
        {"type": "syslog", "address": "h:514", "transport": "tcp", "window": 64},
        {"type": "syslog", "address": "h:514", "transport": "relp", "window": 0},
        {"type": "syslog", "address": "h:514", "transport": "relp+tls"},
        {"type": "elasticsearch", "hosts": []},
        {"type": "elasticsearch", "hosts": ["http://h"], "username": "u"},
        {"type": "elasticsearch", "hosts": ["http://h"], "data_stream": "Logs"},
        {"type": "splunk_hec", "url": "ftp://h", "token": "t"},
        {"type": "webhook", "url": "http://h", "batch_events": 0},
    ],
)
def test_invalid_sinks_are_refused(sink: dict[str, object]) -> None:
    """Unknown types, unknown keys and inconsistent options fail validation."""
    with pytest.raises(ValidationError):
        SINKS.validate_python([sink])


def test_relp_transports() -> None:
    """relp and relp_tls validate; window defaults to librelp's 128; TLS files need relp_tls."""
    relp, relp_tls = SINKS.validate_python(
        [
            {"type": "syslog", "address": "h:20514", "transport": "relp"},
            {
                "type": "syslog",
                "address": "h:20514",
                "transport": "relp_tls",
                "window": 512,
                "ca": "ca.pem",
                "cert": "c.pem",
                "key": "k.pem",
            },
        ],
        context={"base_dir": Path("/etc/egressgw")},
    )
    assert isinstance(relp, SyslogSinkSpec) and relp.window == 128
    assert isinstance(relp_tls, SyslogSinkSpec) and relp_tls.window == 512
    assert relp_tls.ca == Path("/etc/egressgw/ca.pem")
    with pytest.raises(ValidationError, match="need transport: tls or relp_tls"):
        SINKS.validate_python(
            [{"type": "syslog", "address": "h:1", "transport": "relp", "ca": "x"}]
        )
    with pytest.raises(ValidationError, match="window needs transport: relp or relp_tls"):
        SINKS.validate_python([{"type": "syslog", "address": "h:1", "window": 8}])


def test_spool_limits() -> None:
    """The spool must hold at least two segments; unknown keys and policies are refused."""
    with pytest.raises(ValidationError, match="twice"):
        SpoolSpec(dir=Path("s"), max_bytes="1MiB", segment_bytes="1MiB")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        SpoolSpec.model_validate({"dir": "s", "when_full": "block"})
    with pytest.raises(ValidationError):
        SpoolSpec.model_validate({"dir": "s", "max_size": "1GiB"})


def test_models_are_frozen() -> None:
    """Specs cannot be changed after validation."""
    spec = SpoolSpec.model_validate({"dir": "s"})
    with pytest.raises(ValidationError):
        spec.dir = Path("t")  # type: ignore[misc]


def test_resolve_paths_and_secrets() -> None:
    """resolve_paths makes relative paths absolute; secrets do not show in repr."""
    es = SINKS.validate_python(
        [{"type": "elasticsearch", "hosts": ["http://h:9200"], "api_key": "s3cret", "ca": "ca.pem"}]
    )[0]
    resolved = resolve_paths(es, "/base")
    assert isinstance(resolved, ElasticsearchSinkSpec) and resolved.ca == Path("/base/ca.pem")
    assert "s3cret" not in repr(resolved)


def test_sink_names_are_unique() -> None:
    """Sinks are named by their name key, else their type, numbered when repeated."""
    sinks = SINKS.validate_python(
        [{"type": "stdout"}, {"type": "stdout"}, {"type": "file", "path": "f", "name": "audit"}]
    )
    assert sink_names(sinks) == ["stdout", "stdout-2", "audit"]
