"""The egressgw command on the contract files: `check`, `explain`, and policy reload on SIGHUP."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import Dnsmasq, Gateway, TlsFiles, Upstream, curl, write_config
from tests.support.gateway import egressgw_executable

from .testbed import BATCH, CONTRACT_DIR, HTTP_PORT, HTTPS_PORT, PAYMENTS

pytestmark = pytest.mark.integration

CLI_TIMEOUT = 30.0
RELOAD_TIMEOUT = 5.0
WATCH_TIMEOUT = 10.0
POLL_INTERVAL = 0.1

BROKEN_POLICY = """\
default: deny
tiers:
  - name: security
    rules:
      - name: bad-port
        action: deny
        to: {ports: [70000]}
      - name: bad-action
        action: permit
"""
UNKNOWN_FEED_POLICY = """\
tiers:
  - name: security
    rules:
      - name: block
        action: deny
        to: {feeds: ["no-such-feed"]}
"""


def egressgw(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the egressgw command and capture its output."""
    return subprocess.run(
        [str(egressgw_executable()), *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )


@pytest.fixture
def config(tmp_path: Path, dns: Dnsmasq) -> Path:
    """A test copy of the contract configuration in tmp_path."""
    return write_config(tmp_path, CONTRACT_DIR, nameserver=dns.nameserver)


def test_check_accepts_the_contract(config: Path) -> None:
    """`egressgw check` accepts the contract configuration and policy: exit 0."""
    done = egressgw("check", "--config", str(config))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok" in done.stdout


def test_check_reports_every_error_with_file_line_and_key(config: Path) -> None:
    """A policy with two errors makes `check` exit 1 naming file, line and key path of both."""
    (config.parent / "policy.yaml").write_text(BROKEN_POLICY)
    done = egressgw("check", "--config", str(config))
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert re.search(r"policy\.yaml:7: tiers\[0\]\.rules\[0\]\.to\.ports", output), output
    assert re.search(r"policy\.yaml:9: tiers\[0\]\.rules\[1\]\.action", output), output


def test_check_reports_an_unknown_feed_name(config: Path) -> None:
    """A rule naming a feed that is not configured is an error with its line."""
    (config.parent / "policy.yaml").write_text(UNKNOWN_FEED_POLICY)
    done = egressgw("check", "--config", str(config))
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert re.search(r"policy\.yaml:6: .*no-such-feed", output), output


def test_explain_names_the_deciding_rule(config: Path) -> None:
    """`explain` prints ALLOW by platform/payments-to-psp for payments -> allowed.test:8080."""
    done = egressgw(
        "explain", "--config", str(config), "--from", PAYMENTS, "--to", f"allowed.test:{HTTP_PORT}"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "platform/payments-to-psp" in done.stdout
    assert "ALLOW" in done.stdout


def test_explain_shows_a_feed_deny(config: Path) -> None:
    """`explain` for a feed-listed name shows the feed match and the deny by the security tier."""
    done = egressgw(
        "explain", "--config", str(config), "--from", PAYMENTS, "--to", f"evil.test:{HTTP_PORT}"
    )
    assert done.returncode != 0, done.stdout
    assert "security/block-threat-feeds" in done.stdout
    assert "DENY" in done.stdout


def test_explain_shows_the_audit_and_the_pass(config: Path) -> None:
    """`explain` for batch -> api.partner.test lists the audit's would-deny, then the allow."""
    done = egressgw(
        "explain",
        "--config",
        str(config),
        "--from",
        BATCH,
        "--to",
        f"api.partner.test:{HTTPS_PORT}",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    steps = done.stdout
    assert "security/batch-audit-partner" in steps and "would deny" in steps
    assert steps.index("batch-audit-partner") < steps.index("platform/partner-for-all")
    assert "ALLOW (platform/partner-for-all)" in steps


def status_until(gw: Gateway, url: str, wanted: int, timeout: float = RELOAD_TIMEOUT) -> int:
    """Request `url` as payments until the status is `wanted` or the timeout passes; return it."""
    deadline = time.monotonic() + timeout
    while True:
        status = curl(url, proxy=gw.proxy_url, interface=PAYMENTS).status
        if status == wanted or time.monotonic() >= deadline:
            return status
        time.sleep(POLL_INTERVAL)


def test_sighup_reloads_policy_and_keeps_the_last_good_one(
    config: Path, upstream: Upstream, pki: TlsFiles, curl_installed: None
) -> None:
    """SIGHUP applies a new policy; a broken one is logged with its line and the old one stays."""
    url = f"http://allowed.test:{HTTP_PORT}/"
    policy = config.parent / "policy.yaml"
    with Gateway(config) as gw:
        assert status_until(gw, url, 200) == 200
        before = policy.stat()
        policy.write_text(policy.read_text().replace("ports: [8443, 8080]", "ports: [8443, 8081]"))
        # Same size, old mtime: the file watcher sees no change, so only SIGHUP can apply it.
        os.utime(policy, ns=(before.st_atime_ns, before.st_mtime_ns))
        gw.signal(signal.SIGHUP)
        assert status_until(gw, url, 403) == 403
        policy.write_text(BROKEN_POLICY)
        gw.signal(signal.SIGHUP)
        deadline = time.monotonic() + RELOAD_TIMEOUT
        while "policy.yaml:9" not in gw.stderr() and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL)
        assert "policy.yaml:9" in gw.stderr(), gw.logs()
        blocked = curl(url, proxy=gw.proxy_url, interface=PAYMENTS)
        assert blocked.status == 403 and "default" in blocked.reason
        tunnel = curl(
            f"https://www.allowed.test:{HTTPS_PORT}/",
            proxy=gw.proxy_url,
            interface=PAYMENTS,
            cacert=pki.ca_cert,
        )
        assert tunnel.status == 200, (tunnel.reason, tunnel.error)


def test_policy_file_change_is_applied_without_a_signal(
    config: Path, upstream: Upstream, curl_installed: None
) -> None:
    """Editing the policy file is noticed and applied by the gateway on its own."""
    url = f"http://allowed.test:{HTTP_PORT}/"
    policy = config.parent / "policy.yaml"
    with Gateway(config) as gw:
        assert status_until(gw, url, 200) == 200
        policy.write_text(policy.read_text().replace("ports: [8443, 8080]", "ports: [8443]"))
        assert status_until(gw, url, 403, timeout=WATCH_TIMEOUT) == 403


@pytest.mark.parametrize("taken", ["proxy", "admin"])
def test_run_names_a_taken_address_and_leaves_nothing_open(tmp_path: Path, taken: str) -> None:
    """A listen address in use stops `run` with exit 1 naming the key and address, no warning."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        addresses = {"proxy": "127.0.0.1:0", "admin": "127.0.0.1:0", taken: f"127.0.0.1:{port}"}
        (tmp_path / "ips.txt").write_text("203.0.113.7\n")
        config = tmp_path / "gw.yaml"
        config.write_text(
            f"proxy: {{listen: '{addresses['proxy']}'}}\n"
            f"admin: {{listen: '{addresses['admin']}'}}\n"
            "feeds: [{name: ips, url: ips.txt, format: lines}]\n"
            "sinks: [{type: file, path: events.jsonl}]\n"
        )
        done = egressgw("run", "--config", str(config))
    assert done.returncode == 1, done.stdout + done.stderr
    assert (
        f"egressgw: cannot start: {taken}.listen 127.0.0.1:{port}: Address already in use"
        in done.stderr
    )
    assert "Unclosed" not in done.stderr and "Traceback" not in done.stderr, done.stderr
