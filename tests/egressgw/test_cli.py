"""Tests of the ``egressgw feeds`` and ``explain`` subcommands on local files (no network)."""

import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from egressgw.cli import main
from tests.support.kube_apiserver import ThreadedKubeApi


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
        # Nothing listens there: names do not resolve, fast, and feed matches still decide.
        "resolver: {nameservers: ['127.0.0.1:9'], timeout: 1}\n"
    )
    return path


@pytest.fixture
def unreachable_feed(tmp_path: Path) -> Path:
    """A configuration whose only feed is a URL nothing answers, with nothing stored."""
    path = tmp_path / "gw.yaml"
    path.write_text(
        "feeds:\n"
        "  - {name: remote, url: 'http://127.0.0.1:9/list.txt', format: lines, retries: 0}\n"
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


def test_explain_judges_with_the_local_feed_before_any_update(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With no stored feed data, ``explain`` reads the local feed files and says it did."""
    code = main(
        ["explain", "--config", str(config), "--from", "10.1.1.1", "--to", "api.evil.example:443"]
    )
    out = capsys.readouterr().out
    assert code == 3, out
    assert "feed data:   ips: 2 entries, fetched now (age 0s)" in out
    assert "domains: 1 entries, fetched now (age 0s)" in out
    assert "feed match:  domains: api.evil.example" in out
    assert out.rstrip().splitlines()[-1].startswith("decision:    DENY (security/block-feeds)")


def test_explain_reads_a_local_feed_edited_since_the_last_update(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A name added to a local feed after ``feeds update`` is denied by ``explain`` at once."""
    assert main(["feeds", "update", "--config", str(config)]) == 0
    (config.parent / "domains.txt").write_text("evil.example\napi.partner.example\n")
    capsys.readouterr()
    args = ["--config", str(config), "--from", "10.1.1.1", "--to", "api.partner.example:8081"]
    assert main(["explain", *args]) == 3
    assert "feed match:  domains: api.partner.example" in capsys.readouterr().out


def test_explain_offline_names_the_age_of_stored_data(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``explain --offline`` uses the stored data and says how old it is."""
    assert main(["feeds", "update", "--config", str(config)]) == 0
    capsys.readouterr()
    args = ["--config", str(config), "--from", "10.1.1.1", "--to", "203.0.113.7:443", "--offline"]
    assert main(["explain", *args]) == 3
    out = capsys.readouterr().out
    assert "feed data:   ips: 2 entries, stored (age 0s)" in out
    assert "feed match:  ips: 203.0.113.7" in out


def test_feeds_lookup_before_any_update(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``feeds lookup`` answers from the local feed files when nothing is stored yet."""
    assert main(["feeds", "lookup", "sub.evil.example", "--config", str(config)]) == 0
    assert "domains: domain-name evil.example" in capsys.readouterr().out


def test_feeds_lookup_without_config_refuses(capsys: pytest.CaptureFixture[str]) -> None:
    """Without ``--config`` there are no feeds: ``lookup`` says so (exit 2), not "not listed"."""
    assert main(["feeds", "lookup", "sub.evil.example"]) == 2
    captured = capsys.readouterr()
    assert "not listed" not in captured.out
    assert "no feeds configured (no --config given)" in captured.err


def test_tools_refuse_to_answer_without_feed_data(
    unreachable_feed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A feed with no data, stored or fetched, makes explain and lookup refuse with exit 4."""
    explain = ["explain", "--config", str(unreachable_feed), "--from", "10.1.1.1"]
    assert main([*explain, "--to", "203.0.113.7:443"]) == 4
    out = capsys.readouterr().out
    assert "remote: no data: request failed" in out
    assert "cannot explain: no data for feed(s) remote" in out and "decision:" not in out
    lookup = ["feeds", "lookup", "203.0.113.7", "--config", str(unreachable_feed)]
    assert main(lookup) == 4
    assert main([*lookup, "--offline"]) == 4
    captured = capsys.readouterr()
    assert "not listed" not in captured.out
    assert "cannot look up 203.0.113.7: no data for feed(s) remote" in captured.err


def test_feeds_check_reports_bad_options_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A misspelt or ill-typed ``--option`` is a usage error (exit 2) naming the option."""
    path = tmp_path / "list.csv"
    path.write_text("url\nhttp://evil.example/x\n")
    args = ["feeds", "check", str(path), "--format", "csv"]
    assert main([*args, "--option", "colum=url", "--option", "max_samples=abc"]) == 2
    err = capsys.readouterr().err
    assert "--option colum: unknown option; known: column, delimiter" in err
    assert "--option max_samples: Input should be a valid integer" in err
    assert "Traceback" not in err and "ValidationError" not in err


def help_text(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The help the command prints for argv (argparse exits 0 after printing it)."""
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 0
    return capsys.readouterr().out


def test_help_is_plain_text_and_names_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    """Top-level help has no docstring markup and its description names feeds and firewall."""
    text = help_text(["--help"], capsys)
    description = text.split("\n\n")[1]
    assert "``" not in text
    assert "threat feeds" in description and "firewalls" in description


def test_every_argument_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    """``explain --protocol`` and the ``file`` of ``feeds check`` say what they are."""
    assert "what the flow carries" in help_text(["explain", "--help"], capsys)
    assert "feed file to parse" in help_text(["feeds", "check", "--help"], capsys)


def test_run_counts_one_error_in_the_singular(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A configuration with one error is "refused (1 error)", not "(1 errors)"."""
    path = tmp_path / "gw.yaml"
    path.write_text("proxy: {listen: nowhere}\n")
    assert main(["run", "--config", str(path)]) == 1
    assert "egressgw: configuration refused (1 error):" in capsys.readouterr().err


def test_check_accepts_the_kubernetes_contract_once_its_kubeconfig_exists(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``check`` of egressgw-k8s.yaml: refused, naming the key, until kubeconfig.yaml exists."""
    contract = Path(__file__).parents[1] / "integration" / "contract"
    for name in ("egressgw-k8s.yaml", "policy.yaml", "feed-domains.txt"):
        shutil.copyfile(contract / name, tmp_path / name)
    config = str(tmp_path / "egressgw-k8s.yaml")
    assert main(["check", "--config", config]) == 1
    assert "identity.kubernetes.kubeconfig: kubeconfig not found" in capsys.readouterr().out
    (tmp_path / "kubeconfig.yaml").write_text("apiVersion: v1\nkind: Config\n")
    assert main(["check", "--config", config]) == 0
    assert capsys.readouterr().out.startswith("ok: ")


def test_check_and_explain_show_policy_resources(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With ``policy.kubernetes`` both read the resources from the API: ``check`` refuses an
    invalid one naming it and the key, ``explain`` names the object a deciding rule came from."""
    (tmp_path / "policy.yaml").write_text(
        "default: deny\ntiers: [{name: security}, {name: apps}]\n"
    )
    threaded = ThreadedKubeApi(tmp_path / "api")
    with threaded as server:
        path = tmp_path / "gw.yaml"
        path.write_text(
            f"identity:\n  kubernetes: {{kubeconfig: {server.kubeconfig}}}\n"
            "  static: [{cidr: 10.1.1.1/32, namespace: payments}]\n"
            "policy: {files: [policy.yaml], kubernetes: true}\n"
            "resolver: {nameservers: ['127.0.0.1:9'], timeout: 1}\n"
        )
        rule = {"name": "psp", "action": "allow", "to": {"cidrs": ["203.0.113.7/32"]}}
        threaded.call(
            server.create,
            {
                "apiVersion": "egressgw.io/v1alpha1",
                "kind": "EgressPolicy",
                "metadata": {"name": "allow-psp", "namespace": "payments"},
                "spec": {"rules": [rule]},
            },
        )
        threaded.call(
            server.create,
            {
                "apiVersion": "egressgw.io/v1alpha1",
                "kind": "GlobalEgressPolicy",
                "metadata": {"name": "broken"},
                "spec": {"tier": "platform", "rules": []},
            },
        )
        assert main(["check", "--config", str(path)]) == 1
        out = capsys.readouterr().out
        assert (
            "GlobalEgressPolicy broken: spec.tier: no tier named 'platform' in the policy files "
            "(tiers: security, apps)"
        ) in out
        threaded.call(server.delete, "GlobalEgressPolicy", "broken")
        assert main(["check", "--config", str(path)]) == 0
        assert ", 1 resources" in capsys.readouterr().out
        args = ["explain", "--config", str(path), "--from", "10.1.1.1", "--to", "203.0.113.7:443"]
        assert main(args) == 0
        out = capsys.readouterr().out
        assert "resources:   1 from the API" in out
        assert "apps/psp (EgressPolicy payments/allow-psp): matches: allow" in out
        assert (
            out.rstrip()
            .splitlines()[-1]
            .startswith("decision:    ALLOW (apps/psp (EgressPolicy payments/allow-psp))")
        )
        args[4] = "10.1.1.2"  # not of namespace payments: the EgressPolicy does not apply
        assert main(args) == 3
        assert "apps/psp (EgressPolicy payments/allow-psp): source not selected" in (
            capsys.readouterr().out
        )
    # The API gone: the files alone are checked, with a warning.
    assert main(["check", "--config", str(path)]) == 0
    assert "warning: policy.kubernetes: resources not read from the API" in capsys.readouterr().out


def test_run_lifts_the_soft_descriptor_limit_to_the_hard_one(tmp_path: Path) -> None:
    """`egressgw run` started with a soft limit of 256 open files runs with the hard limit."""
    (tmp_path / "gw.yaml").write_text(
        "proxy: {listen: '127.0.0.1:0'}\nadmin: {listen: '127.0.0.1:0'}\n"
        "sinks: [{type: file, path: events.jsonl}]\n"
    )
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"the hard open-file limit is {hard}: nothing to lift")
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "egressgw"),
            "run",
            "--config",
            str(tmp_path / "gw.yaml"),
        ],
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        soft = "256"
        for _ in range(100):
            limits = Path(f"/proc/{proc.pid}/limits").read_text().splitlines()
            soft = next(line for line in limits if line.startswith("Max open files")).split()[3]
            if soft != "256":
                break
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(10)
    assert soft == (str(hard) if hard != resource.RLIM_INFINITY else "unlimited")
