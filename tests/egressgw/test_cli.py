"""Tests of the ``egressgw feeds`` and ``explain`` subcommands on local files (no network)."""

from pathlib import Path

import pytest

from egressgw.cli import main


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A configuration with two local feeds and a policy that denies feed matches."""
    (tmp_path / "ips.txt").write_text("# ips\n203.0.113.7\n198.51.100.0/24\n")
    (tmp_path / "domains.txt").write_text("evil.example\n")
    (tmp_path / "policy.yaml").write_text(
        "default: allow\n"
        "tiers:\n"
        "  - name: security\n"
        "    rules:\n"
        "      - name: block-feeds\n"
        "        action: deny\n"
        "        to: {feeds: ['*']}\n"
    )
    path = tmp_path / "gw.yaml"
    path.write_text(
        "feeds:\n"
        "  - {name: ips, url: ips.txt, format: lines}\n"
        "  - {name: domains, url: domains.txt, format: lines}\n"
        "policy: {files: [policy.yaml]}\n"
    )
    return path


def test_feeds_update_then_lookup(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``feeds update`` prints a row per feed; ``feeds lookup`` then names feed and reason."""
    assert main(["feeds", "update", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "ips" in out and "domains" in out and out.count("updated") == 2
    assert main(["feeds", "lookup", "www.evil.example", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "domains" in out and "parent domain" in out
    assert main(["feeds", "lookup", "198.51.100.9", "--config", str(config)]) == 0
    assert "198.51.100.0/24" in capsys.readouterr().out
    assert main(["feeds", "lookup", "good.example", "--config", str(config)]) == 1


def test_explain_denies_listed_ip_literal(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``explain`` shows the feed match, the steps and the deciding rule; exit 3 on deny."""
    assert main(["feeds", "update", "--config", str(config)]) == 0
    capsys.readouterr()
    code = main(
        ["explain", "--config", str(config), "--from", "10.1.1.1", "--to", "203.0.113.7:443"]
    )
    out = capsys.readouterr().out
    assert code == 3
    assert "feed match:  ips: 203.0.113.7" in out
    assert "security/block-feeds: matches: deny" in out
    assert out.rstrip().splitlines()[-1].startswith("decision:    DENY (security/block-feeds)")


def test_feeds_check_reports_rejected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``feeds check`` parses a local file and reports indicators and rejected lines."""
    path = tmp_path / "list.txt"
    path.write_text("1.2.3.4\nnot a value!\nexample.org\n")
    main(["feeds", "check", str(path), "--format", "lines"])
    out = capsys.readouterr().out
    assert "indicators: 2" in out and "rejected: 1" in out
