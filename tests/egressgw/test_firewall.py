"""Tests of the firewall exports: EDLs on the admin server and ``egressgw firewall nft``."""

import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from egressgw.app import Gateway
from egressgw.cli import main
from egressgw.config.model import load_config


def write_config(tmp_path: Path) -> Path:
    """Two local blocklists and an allowlist; admin and proxy on free ports."""
    (tmp_path / "ips.txt").write_text("93.184.216.34\n198.51.100.0/24\n2001:db8:66::/48\n")
    (tmp_path / "names.txt").write_text("evil.example\nhttp://bad.example/x\n")
    (tmp_path / "allow.txt").write_text("good.example\n")
    path = tmp_path / "gw.yaml"
    path.write_text(
        "proxy: {listen: '127.0.0.1:0'}\nadmin: {listen: '127.0.0.1:0'}\n"
        "feeds:\n"
        "  - {name: ips, url: ips.txt, format: lines}\n"
        "  - {name: names, url: names.txt, format: lines}\n"
        "  - {name: allow, url: allow.txt, format: lines, kind: allowlist}\n"
        "sinks: [{type: file, path: events.jsonl}]\n"
    )
    return path


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    """A running gateway whose feeds have been fetched."""
    path = write_config(tmp_path)
    gw = Gateway(load_config(path), path)
    await gw.start()
    await gw.feeds.update_now()
    try:
        yield gw
    finally:
        await gw.stop()


async def test_edl_endpoints(gateway: Gateway) -> None:
    """/edl/ips, /edl/domains and /edl/urls list blocklist values, one per line; ?feed filters."""
    assert gateway.admin_address is not None
    base = "http://{}:{}/edl".format(*gateway.admin_address)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/ips") as r:
            assert r.status == 200 and r.content_type == "text/plain"
            assert (await r.text()).splitlines() == [
                "198.51.100.0/24",
                "2001:db8:66::/48",
                "93.184.216.34",
            ]
        async with http.get(f"{base}/domains") as r:
            assert (await r.text()) == "evil.example\n"
        async with http.get(f"{base}/urls?feed=names") as r:
            assert (await r.text()) == "http://bad.example/x\n"
        async with http.get(f"{base}/ips?feed=names") as r:
            assert (await r.text()) == ""
        async with http.get(f"{base}/ips?feed=nosuch") as r:
            assert r.status == 400 and "nosuch" in await r.text()
        async with http.get(f"{base}/hashes") as r:
            assert r.status == 404


async def test_edl_is_unavailable_while_a_feed_has_no_data(tmp_path: Path) -> None:
    """Before a blocklist has data, its EDL is a 503 with Retry-After, not an empty list."""
    path = write_config(tmp_path)
    (tmp_path / "ips.txt").unlink()  # its first fetch fails: nothing to serve yet
    gw = Gateway(load_config(path), path)
    await gw.start()
    try:
        await gw.feeds.update_now()
        assert gw.admin_address is not None
        base = "http://{}:{}/edl".format(*gw.admin_address)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/ips") as r:
                assert r.status == 503 and r.headers["Retry-After"] == "30"
                assert "no data yet for feed(s): ips" in await r.text()
            async with http.get(f"{base}/domains?feed=names") as r:
                assert r.status == 200 and (await r.text()) == "evil.example\n"
    finally:
        await gw.stop()


def test_firewall_nft_refuses_an_empty_set_without_config(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Without ``--config`` no set is rendered (exit 1) unless ``--allow-empty`` asks for one."""
    assert main(["firewall", "nft"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "refusing an empty set: no --config given" in captured.err
    assert main(["firewall", "nft", "--allow-empty"]) == 0
    assert "flush set inet egressgw blocked_v4" in capsys.readouterr().out


def test_firewall_nft_refuses_a_feed_without_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A blocklist with no data, stored or fetched, makes ``firewall nft`` refuse with exit 4."""
    path = write_config(tmp_path)
    (tmp_path / "ips.txt").unlink()
    assert main(["firewall", "nft", "--config", str(path), "--allow-empty"]) == 4
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "feed ips: no data: " in captured.err
    assert "refusing to render the set: no data yet for feed(s): ips" in captured.err


def test_firewall_nft_reads_local_feeds_before_any_update(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``firewall nft`` reads local feed files itself when no feed state is stored yet."""
    path = write_config(tmp_path)
    assert main(["firewall", "nft", "--config", str(path)]) == 0
    assert "93.184.216.34, 198.51.100.0/24" in capsys.readouterr().out


def test_firewall_nft_renders_sets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``firewall nft`` renders both address families from the last good feed data."""
    path = write_config(tmp_path)
    assert main(["feeds", "update", "--config", str(path)]) == 0
    capsys.readouterr()
    assert main(["firewall", "nft", "--config", str(path)]) == 0
    script = capsys.readouterr().out
    assert "blocked_v4" in script and "blocked_v6" in script
    assert (
        "93.184.216.34" in script and "198.51.100.0/24" in script and "2001:db8:66::/48" in script
    )


@pytest.mark.netns
def test_firewall_nft_apply_in_a_network_namespace(tmp_path: Path) -> None:
    """``firewall nft --apply`` loads the sets with real nft, in a namespace of the test's own."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a network namespace")
    for tool in ("nft", "unshare"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    path = write_config(tmp_path)
    assert main(["feeds", "update", "--config", str(path)]) == 0
    script = (
        f"{sys.executable} -m egressgw firewall nft --apply --config {path} "
        "&& nft list set inet egressgw blocked_v4"
    )
    done = subprocess.run(
        ["unshare", "--net", "sh", "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "loaded 3 addresses and networks" in done.stdout
    assert "93.184.216.34" in done.stdout and "198.51.100.0/24" in done.stdout


@pytest.mark.netns
def test_firewall_nft_apply_never_empties_a_loaded_set(tmp_path: Path) -> None:
    """``--apply`` without config, or with a feed lacking data, leaves the loaded set intact."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a network namespace")
    for tool in ("nft", "unshare"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    path = write_config(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "gw.yaml").write_text("feeds: [{name: ips, url: gone.txt, format: lines}]\n")
    egressgw = f"{sys.executable} -m egressgw firewall nft --apply"
    script = (
        f"{egressgw} --config {path} && nft list set inet egressgw blocked_v4 "
        f"&& ! {egressgw} && ! {egressgw} --config {empty / 'gw.yaml'} "
        "&& nft list set inet egressgw blocked_v4"
    )
    done = subprocess.run(
        ["unshare", "--net", "sh", "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("93.184.216.34") == 2, done.stdout
    assert "refusing an empty set" in done.stderr and "no data yet for feed(s): ips" in done.stderr
