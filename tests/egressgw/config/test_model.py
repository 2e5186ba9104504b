"""Tests of configuration and policy loading: validation, file/line/key errors, the CLI check."""

import shutil
from pathlib import Path

import pytest

from egressgw.cli import main
from egressgw.config.model import default_config, load_config, load_policy
from egressgw.config.source import ConfigError
from tests.support.pki import make_client_tls, make_test_pki

CONTRACT = Path(__file__).resolve().parents[2] / "integration" / "contract"


@pytest.fixture
def contract_dir(tmp_path: Path) -> Path:
    """A copy of the contract examples (skipped only if the shared folder is absent)."""
    if not CONTRACT.is_dir():
        pytest.skip(f"contract examples not found at {CONTRACT}")
    shutil.copytree(CONTRACT, tmp_path / "contract")
    return tmp_path / "contract"


def test_contract_config_loads(contract_dir: Path) -> None:
    """The contract egressgw.yaml validates unchanged; relative paths resolve beside it."""
    cfg = load_config(contract_dir / "egressgw.yaml")
    assert cfg.proxy.listen == "127.0.0.1:3128"
    assert cfg.policy.files == (contract_dir / "policy.yaml",)
    assert [f.name for f in cfg.feeds] == ["local-ips", "local-domains"]
    assert cfg.identity.static[0].labels == {"app": "api", "team": "payments"}
    pol = load_policy(cfg.policy.files, {f.name for f in cfg.feeds})
    assert [t.name for t in pol.tiers] == ["security", "platform", "apps"]


def test_embedded_defaults() -> None:
    """Without a file: proxy and admin on loopback, stdout events, guard on, allow all."""
    cfg = default_config()
    assert (cfg.proxy.listen, cfg.admin.listen) == ("127.0.0.1:3128", "127.0.0.1:9090")
    assert [s.type for s in cfg.sinks] == ["stdout"]
    assert cfg.guard.enabled and cfg.policy.files == ()


def test_errors_name_file_line_and_key(tmp_path: Path) -> None:
    """Every error is reported, each with file, line and key path."""
    path = tmp_path / "gw.yaml"
    path.write_text(
        "proxy:\n"
        "  listen: nowhere\n"
        "  max_connections: -1\n"
        "guard:\n"
        "  allow: ['10.0.0.1/8']\n"
        "identity:\n"
        "  static:\n"
        "    - cidr: 10.1.0.0/16\n"
        "      pods: typo\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    errors = info.value.errors
    assert any(e.startswith(f"{path}:2: proxy.listen: ") for e in errors), errors
    assert any(e.startswith(f"{path}:3: proxy.max_connections: ") for e in errors), errors
    assert any(e.startswith(f"{path}:5: guard.allow[0]: bad CIDR") for e in errors), errors
    assert any(e.startswith(f"{path}:9: identity.static[0].pods: Extra") for e in errors), errors
    assert any(
        e.startswith(f"{path}:8: identity.static[0].namespace: Field required") for e in errors
    ), errors


def test_policy_errors(tmp_path: Path) -> None:
    """Unknown feeds, duplicate rules and bad selectors are refused with their line."""
    path = tmp_path / "policy.yaml"
    path.write_text(
        "tiers:\n"
        "  - name: a\n"
        "    rules:\n"
        "      - name: r\n"
        "        action: deny\n"
        "        to: {feeds: [nosuch]}\n"
        "      - name: r\n"
        "        action: allow\n"
        "        from:\n"
        "          matchExpressions: [{key: app, operator: In}]\n"
    )
    with pytest.raises(ConfigError) as info:
        load_policy((path,), {"known"})
    assert info.value.errors == [
        f"{path}:6: tiers[0].rules[0].to.feeds[0]: no feed named 'nosuch' is configured",
        f"{path}:7: tiers[1].rules[1].name: duplicate rule 'r' in tier 'a'".replace(
            "tiers[1]", "tiers[0]"
        ),
        f"{path}:10: tiers[0].rules[1].from.matchExpressions[0].values: In needs values",
    ]


def test_invalid_yaml(tmp_path: Path) -> None:
    """Broken YAML is reported with its line."""
    path = tmp_path / "gw.yaml"
    path.write_text("proxy:\n  listen: [\n")
    with pytest.raises(ConfigError, match=r"gw.yaml:\d+: invalid YAML"):
        load_config(path)


def test_check_command(contract_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``egressgw check`` exits 0 on the contract and 1 with every error on a broken policy."""
    assert main(["check", "--config", str(contract_dir / "egressgw.yaml")]) == 0
    assert "3 tiers, 6 rules" in capsys.readouterr().out
    (contract_dir / "policy.yaml").write_text(
        "tiers:\n  - name: x\n    rules:\n      - action: allow\n"
    )
    assert main(["check", "--config", str(contract_dir / "egressgw.yaml")]) == 1
    out = capsys.readouterr().out
    assert "policy.yaml:4: tiers[0].rules[0].name: Field required" in out
    assert out.rstrip().endswith("1 error")


def test_siem_contract_needs_its_ca_file(contract_dir: Path) -> None:
    """The contract with every sink is accepted once ca.pem exists; before, the error names it."""
    with pytest.raises(ConfigError) as info:
        load_config(contract_dir / "egressgw-siem.yaml")
    [error] = info.value.errors
    assert error.startswith(
        f"{contract_dir / 'egressgw-siem.yaml'}:34: sinks[1].ca: file not found"
    )
    (contract_dir / "ca.pem").write_bytes(make_test_pki(contract_dir / "pki").ca_cert.read_bytes())
    cfg = load_config(contract_dir / "egressgw-siem.yaml")
    assert [s.type for s in cfg.sinks] == [
        "file",
        "syslog",
        "elasticsearch",
        "splunk_hec",
        "webhook",
    ]
    assert cfg.spool is not None and cfg.spool.max_bytes == 256 * 1024 * 1024


def test_schema_errors_do_not_hide_unknown_feeds(tmp_path: Path) -> None:
    """A policy with a bad action and an unknown feed reports both."""
    path = tmp_path / "policy.yaml"
    path.write_text(
        "tiers:\n  - name: a\n    rules:\n"
        "      - name: r\n        action: permit\n        to: {feeds: [nosuch]}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_policy((path,), set())
    assert info.value.errors == [
        f"{path}:5: tiers[0].rules[0].action: Input should be 'allow', 'deny' or 'pass'",
        f"{path}:6: tiers[0].rules[0].to.feeds[0]: no feed named 'nosuch' is configured",
    ]


def test_ipv6_addresses_spelled_as_the_resolver_takes_them(tmp_path: Path) -> None:
    """Listen addresses and nameservers accept ``[::1]:port`` and a bare or bracketed ``::1``."""
    path = tmp_path / "gw.yaml"
    path.write_text(
        'proxy: {listen: "[::1]:3128"}\nadmin: {listen: "[::1]:0"}\n'
        'resolver: {nameservers: ["[::1]", "::1", "[::1]:5353", "127.0.0.1:53"]}\n'
    )
    cfg = load_config(path)
    assert cfg.proxy.listen == "[::1]:3128"
    assert len(cfg.resolver.nameservers) == 4


def test_check_reports_a_missing_ca_and_a_missing_policy_file_at_once(
    contract_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``check`` goes on to the policy files when a sink's CA file is missing: both reported."""
    config = contract_dir / "egressgw-siem.yaml"
    (contract_dir / "policy.yaml").unlink()
    assert main(["check", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert f"{config}:34: sinks[1].ca: file not found" in out
    assert f"{contract_dir / 'policy.yaml'}: cannot read: No such file or directory" in out
    assert out.rstrip().endswith("2 errors")


def test_a_ca_file_that_is_not_a_certificate_is_refused(contract_dir: Path) -> None:
    """A sink's ca that holds no PEM certificate is an error naming file, line and key."""
    (contract_dir / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n")
    with pytest.raises(ConfigError) as info:
        load_config(contract_dir / "egressgw-siem.yaml")
    [error] = info.value.errors
    assert error.startswith(f"{contract_dir / 'egressgw-siem.yaml'}:34: sinks[1].ca: ")
    assert "not a PEM CA certificate" in error


def test_a_client_key_that_does_not_match_its_certificate_is_refused(tmp_path: Path) -> None:
    """cert and key of a syslog sink must load together: another key is refused."""
    mine, other = make_client_tls(tmp_path / "a"), make_client_tls(tmp_path / "b")
    path = tmp_path / "gw.yaml"
    path.write_text(
        "sinks:\n"
        "  - type: syslog\n"
        "    address: siem.example:6514\n"
        "    transport: tls\n"
        f"    ca: {mine.ca_cert}\n"
        f"    cert: {mine.cert}\n"
        f"    key: {other.key}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    [error] = info.value.errors
    assert error.startswith(f"{path}:6: sinks[0].cert: {mine.cert} with {other.key}: not a PEM")
    path.write_text(path.read_text().replace(str(other.key), str(mine.key)))
    assert load_config(path).sinks[0].type == "syslog"


def test_check_reports_a_missing_local_feed_file(
    contract_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``check`` names a local feed file that does not exist, with its line."""
    config = contract_dir / "egressgw.yaml"
    (contract_dir / "feed-ips.txt").unlink()
    assert main(["check", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert f"feeds[0].url: feed file not found: {contract_dir / 'feed-ips.txt'}" in out
    assert out.rstrip().endswith("1 error")


def test_schema_errors_do_not_hide_duplicate_tiers(tmp_path: Path) -> None:
    """A tier named twice is reported although the second file also has a schema error."""
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("default: deny\ntiers:\n  - name: security\n")
    second.write_text(
        "default: allow\n"
        "tiers:\n"
        "  - name: security\n"
        "    rules:\n"
        "      - {name: r, action: permit}\n"
        "      - {name: r, action: deny}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_policy((first, second), set())
    assert info.value.errors == [
        f"{second}:1: default: set in two files",
        f"{second}:3: tiers[0].name: tier 'security' also in {first}:3",
        f"{second}:5: tiers[0].rules[0].action: Input should be 'allow', 'deny' or 'pass'",
        f"{second}:6: tiers[0].rules[1].name: duplicate rule 'r' in tier 'security'",
    ]


def test_cluster_lifecycle_keys(tmp_path: Path) -> None:
    """shutdown_delay (0 allowed), readiness.feeds_timeout and a feed's required flag load;
    state_seed_dir resolves beside the file; a negative delay names its key."""
    cfg = default_config()
    assert (cfg.proxy.shutdown_delay, cfg.readiness.feeds_timeout) == (5.0, 60.0)
    assert cfg.state_seed_dir is None
    path = tmp_path / "gw.yaml"
    path.write_text(
        "proxy: {shutdown_delay: 0}\n"
        "readiness: {feeds_timeout: 2m}\n"
        "state_seed_dir: seed\n"
        "feeds: [{name: f, url: f.txt, format: lines, required: true}]\n"
    )
    cfg = load_config(path)
    assert (cfg.proxy.shutdown_delay, cfg.readiness.feeds_timeout) == (0.0, 120.0)
    assert cfg.state_seed_dir == tmp_path / "seed" and cfg.feeds[0].required
    path.write_text("proxy:\n  shutdown_delay: -1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.errors[0].startswith(f"{path}:2: proxy.shutdown_delay:"), e.value.errors


def test_kubernetes_keys(tmp_path: Path) -> None:
    """identity.kubernetes: kubeconfig beside the file, defaults; policy.kubernetes needs it."""
    (tmp_path / "kubeconfig.yaml").write_text("apiVersion: v1\n")
    path = tmp_path / "egressgw.yaml"
    path.write_text(
        "identity:\n  kubernetes:\n    kubeconfig: kubeconfig.yaml\n    namespaces: [a]\n"
        "policy:\n  kubernetes: true\n"
    )
    kube = load_config(path).identity.kubernetes
    assert kube is not None
    assert (kube.kubeconfig, kube.namespaces, kube.own_node, kube.watch_timeout) == (
        tmp_path / "kubeconfig.yaml",
        ("a",),
        False,
        300,
    )
    path.write_text("identity:\n  kubernetes: {}\n")
    kube = load_config(path).identity.kubernetes
    assert kube is not None and kube.kubeconfig is None  # in-cluster
    path.write_text("policy:\n  kubernetes: true\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.errors == [
        f"{path}:2: policy.kubernetes: needs identity.kubernetes (where the "
        "API is, and whose pods policy selects)"
    ]


NODE_CONTRACT = Path(__file__).resolve().parents[2] / "integration" / "contract"


def test_node_contract_checks_with_no_unbuilt_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The per-node contract validates; check no longer warns of an unbuilt transparent listener."""
    for name in ("egressgw-node.yaml", "policy.yaml", "feed-domains.txt"):
        shutil.copyfile(NODE_CONTRACT / name, tmp_path / name)
    cfg = load_config(tmp_path / "egressgw-node.yaml")
    assert cfg.dns.listen == "0.0.0.0:53" and cfg.dns.upstreams == ("127.0.0.1:5353",)
    assert cfg.node.exempt_mark == 0x539 and str(cfg.node.pod_cidrs[0]) == "10.99.0.0/24"
    assert {ns: str(ip) for ns, ip in cfg.egress_ips.items()} == {
        "payments": "10.98.0.10",
        "batch": "10.98.0.11",
    }
    assert main(["check", "--config", str(tmp_path / "egressgw-node.yaml")]) == 0
    out = capsys.readouterr().out
    assert "not built" not in out


def test_dns_listen_needs_upstreams(tmp_path: Path) -> None:
    """A DNS proxy with nowhere to forward is refused, naming the key."""
    path = tmp_path / "gw.yaml"
    path.write_text("dns:\n  listen: 127.0.0.1:5300\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == [
        f"{path}:1: dns: dns.listen needs dns.upstreams (the servers queries go to)"
    ]


def test_check_names_a_missing_secret_file(tmp_path: Path) -> None:
    """A sink's token_file that does not exist is an error of check, with line and key."""
    path = tmp_path / "gw.yaml"
    path.write_text(
        "sinks:\n"
        "  - type: splunk_hec\n"
        "    url: https://hec.example:8088\n"
        "    token_file: hec-token\n"
    )
    with pytest.raises(ConfigError) as e:
        load_config(path)
    missing = f"cannot read {tmp_path / 'hec-token'}: No such file or directory"
    assert e.value.errors == [f"{path}:4: sinks[0].token_file: {missing}"]


def test_admin_auth_and_map_keys(tmp_path: Path) -> None:
    """admin.auth needs a readable, non-empty token file; map windows are whole minutes."""
    path = tmp_path / "gw.yaml"
    path.write_text("admin:\n  auth: {token_file: admin-token}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    missing = f"cannot read {tmp_path / 'admin-token'}: No such file or directory"
    assert e.value.errors == [f"{path}:2: admin.auth.token_file: {missing}"]
    (tmp_path / "admin-token").write_text("\n")
    with pytest.raises(ConfigError, match="admin-token is empty"):
        load_config(path)
    (tmp_path / "admin-token").write_text("t0ken\n")
    cfg = load_config(path)
    assert cfg.admin.map.enabled and cfg.admin.map.windows == (300.0, 3600.0)
    path.write_text("admin: {map: {windows: [90s]}}\n")
    with pytest.raises(ConfigError, match="not a whole number of minutes"):
        load_config(path)
