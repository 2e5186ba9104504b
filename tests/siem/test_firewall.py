"""Tests for the firewall export formatters (EDL lines and nftables sets)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from siem.firewall import parse_networks, to_edl, to_nft_set


def test_edl_one_value_per_line_deduplicated() -> None:
    """An EDL has one value per line, duplicates and blanks removed, order kept."""
    assert to_edl(["b.example", "a.example", "b.example", " ", "10.0.0.0/8"]) == (
        b"b.example\na.example\n10.0.0.0/8\n"
    )
    assert to_edl([]) == b""


def test_edl_refuses_line_breaks() -> None:
    """A value with a line break would inject a second entry, so it is refused."""
    with pytest.raises(ValueError, match="line break"):
        to_edl(["evil.example\n0.0.0.0/0"])


def test_networks_split_and_collapsed() -> None:
    """IPs and CIDRs split by family; overlapping and adjacent networks merge."""
    v4, v6 = parse_networks(["10.0.0.1", "10.0.0.0/24", "10.0.1.0/24", "2001:db8::1", "::1/128"])
    assert [str(n) for n in v4] == ["10.0.0.0/23"]
    assert [str(n) for n in v6] == ["::1/128", "2001:db8::1/128"]
    with pytest.raises(ValueError, match="not an IP"):
        parse_networks(["example.com"])


def test_nft_script_replaces_both_sets() -> None:
    """The script declares v4 and v6 interval sets, flushes them and adds the elements."""
    script = to_nft_set("egressgw", "blocked", ["192.0.2.1", "198.51.100.0/24", "2001:db8::/32"])
    assert "set blocked_v4 { type ipv4_addr; flags interval; }" in script
    assert "flush set inet egressgw blocked_v4" in script
    assert "add element inet egressgw blocked_v4 { 192.0.2.1, 198.51.100.0/24 }" in script
    assert "add element inet egressgw blocked_v6 { 2001:db8::/32 }" in script


def test_nft_names_are_checked() -> None:
    """Table and set names that could inject nft syntax are refused."""
    with pytest.raises(ValueError, match="invalid nftables name"):
        to_nft_set("t; flush ruleset", "s", [])


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft (nftables)")
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")
def test_nft_loads_script_in_own_namespace(tmp_path: Path) -> None:
    """Real nft accepts the script twice (replacing elements) in a fresh network namespace."""
    first = tmp_path / "first.nft"
    second = tmp_path / "second.nft"
    first.write_text(to_nft_set("egressgw", "blocked", ["192.0.2.1", "2001:db8::/32"]))
    second.write_text(to_nft_set("egressgw", "blocked", ["198.51.100.0/24"]))
    cmd = f"nft -f {first} && nft -f {second} && nft list table inet egressgw"
    proc = subprocess.run(
        ["unshare", "--net", "sh", "-c", cmd], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    assert "198.51.100.0/24" in proc.stdout
    assert "192.0.2.1" not in proc.stdout and "2001:db8::/32" not in proc.stdout
