"""Tests for the shipped assets: Kibana saved objects and the rsyslog receiver example."""

from __future__ import annotations

import ast
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import orjson
import pytest

from siem.config import (
    ElasticsearchSinkSpec,
    FileSinkSpec,
    SplunkHecSinkSpec,
    SpoolSpec,
    StdoutSinkSpec,
    SyslogSinkSpec,
    WebhookSinkSpec,
)
from siem.formats import CEF_FIELDS, LEEF_FIELDS, SD_FIELDS
from tests.siem.rsyslog_server import make_tls_files


def asset(name: str) -> str:
    return resources.files("siem.assets").joinpath(name).read_text()


def test_kibana_saved_objects_reference_each_other() -> None:
    """Every reference in the saved objects points at an object in the same file."""
    objects = [orjson.loads(line) for line in asset("kibana-saved-objects.ndjson").splitlines()]
    ids = {o["id"] for o in objects}
    assert {o["type"] for o in objects} == {"index-pattern", "visualization", "dashboard"}
    for obj in objects:
        for ref in obj["references"]:
            assert ref["id"] in ids
    dashboard = next(o for o in objects if o["type"] == "dashboard")
    assert len(orjson.loads(dashboard["attributes"]["panelsJSON"])) == 3


@pytest.mark.skipif(shutil.which("rsyslogd") is None, reason="needs rsyslogd (Debian rsyslog)")
def test_rsyslog_example_is_valid_config(tmp_path: Path) -> None:
    """rsyslogd -N1 accepts the receiver example once its certificate paths exist."""
    tls = make_tls_files(tmp_path)
    text = asset("rsyslog-receiver.conf").replace("/etc/rsyslog.d/tls", str(tmp_path))
    text = text.replace("/var/log/egressgw", str(tmp_path))
    conf = tmp_path / "rsyslog.conf"
    conf.write_text(text)
    assert tls.ca_cert.exists()
    proc = subprocess.run(
        ["rsyslogd", "-N1", "-f", str(conf)], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr


DOCS = Path(__file__).resolve().parents[2] / "docs" / "siem.md"


def test_docs_cover_every_config_key() -> None:
    """docs/siem.md names every key of the spool and of every sink type."""
    text = DOCS.read_text()
    specs = [
        SpoolSpec,
        FileSinkSpec,
        StdoutSinkSpec,
        SyslogSinkSpec,
        ElasticsearchSinkSpec,
        SplunkHecSinkSpec,
        WebhookSinkSpec,
    ]
    missing = [
        f"{spec.__name__}.{key}"
        for spec in specs
        for key in spec.model_fields
        if f"`{key}`" not in text
    ]
    assert missing == []


def test_docs_mapping_tables_match_the_code() -> None:
    """Every CEF, LEEF and structured-data mapping appears as a row in docs/siem.md."""
    text = DOCS.read_text()
    for key, path in (*CEF_FIELDS, *LEEF_FIELDS, *SD_FIELDS):
        cells = " or ".join(f"`{p}`" for p in path.split("|"))
        assert f"| `{key}` | {cells} |" in text, key


@pytest.mark.parametrize("module", ["siem/formats.py", "siem/firewall.py", "siem/config.py"])
def test_pure_cores_import_no_io(module: str) -> None:
    """The format, firewall and config modules never import sockets, asyncio or ssl."""
    tree = ast.parse((DOCS.parents[1] / module).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported.isdisjoint({"asyncio", "socket", "ssl", "aiohttp", "elasticsearch", "os"})
