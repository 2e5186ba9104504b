"""``proxy.workers`` in the configuration: its values, and what ``check`` refuses beside it."""

import os
from pathlib import Path

import pytest

from egressgw.cli import main
from egressgw.config.model import Config, load_config, worker_count
from egressgw.config.source import ConfigError


def test_workers_default_to_one_and_auto_is_the_cpu_count(tmp_path: Path) -> None:
    """1 unless set; ``auto`` means one per CPU; a whole number is taken as it is."""
    assert worker_count(Config()) == 1
    auto = Config.model_validate({"proxy": {"workers": "auto"}})
    assert worker_count(auto) == (os.cpu_count() or 1)
    assert worker_count(Config.model_validate({"proxy": {"workers": 3}})) == 3


@pytest.mark.parametrize("value", ["0", "-1", "many", "1.5", "true"])
def test_bad_worker_counts_are_refused_with_file_line_and_key(tmp_path: Path, value: str) -> None:
    """Anything but a whole number >= 1 or auto is one error naming the key."""
    path = tmp_path / "gw.yaml"
    path.write_text(f"proxy:\n  workers: {value}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert len(e.value.errors) == 1
    assert e.value.errors[0].startswith(f"{path}:2: proxy.workers:"), e.value.errors


def test_check_refuses_the_dns_proxy_with_more_than_one_worker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The DNS proxy's answers live in one process: check says so with file, line and key."""
    path = tmp_path / "gw.yaml"
    path.write_text(
        "proxy: {workers: 2}\ndns: {listen: '127.0.0.1:5353', upstreams: ['127.0.0.1:53']}\n"
    )
    assert main(["check", "--config", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}:1: proxy.workers: more than one worker with dns.listen set" in out
    path.write_text(
        "proxy: {workers: 1}\ndns: {listen: '127.0.0.1:5353', upstreams: ['127.0.0.1:53']}\n"
    )
    assert main(["check", "--config", str(path)]) == 0
