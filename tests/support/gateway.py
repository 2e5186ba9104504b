"""The real gateway as a subprocess: `egressgw run --config FILE`, ready when /readyz says 200.

`write_config` turns the contract configuration into one for a test: free
loopback ports, the test's dnsmasq as resolver, events to a file sink, and any
overrides. `Gateway` starts the process, waits for readiness (failing with its
stderr), reads its events file and stops it with SIGTERM (SIGKILL after a
timeout), also when the test failed.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Self

from ruamel.yaml import YAML

from tests.support.service import Service

from .net import free_port, http_status

READY_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
EVENT_TIMEOUT = 5.0
POLL_INTERVAL = 0.05
STDERR_TAIL = 4000
EVENTS_FILE = "events.jsonl"
CONFIG_FILE = "egressgw.yaml"
CONTRACT_FILES = ("egressgw.yaml", "policy.yaml", "feed-ips.txt", "feed-domains.txt")

Event = dict[str, Any]


def egressgw_executable() -> Path:
    """Return the `egressgw` console script of the running interpreter's environment."""
    return Path(sys.executable).parent / "egressgw"


def field(event: Mapping[str, Any], path: str) -> Any:
    """Return the value at dotted `path` in an ECS event (nested or dotted keys), or None."""
    node: Any = event
    parts = path.split(".")
    i = 0
    while i < len(parts):
        if not isinstance(node, Mapping):
            return None
        # ECS allows both {"a": {"b": 1}} and {"a.b": 1}: try the longest dotted key first.
        for j in range(len(parts), i, -1):
            key = ".".join(parts[i:j])
            if key in node:
                node, i = node[key], j
                break
        else:
            return None
    return node


def load_yaml(path: Path) -> Any:
    """Return the data of a YAML file."""
    return YAML(typ="safe").load(path)


def dump_yaml(data: Any, path: Path) -> None:
    """Write `data` as block-style YAML."""
    yaml = YAML(typ="safe")
    yaml.default_flow_style = False
    with path.open("w") as out:
        yaml.dump(data, out)


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Return `base` with `update` merged in: mappings merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in update.items():
        old = merged.get(key)
        if isinstance(old, Mapping) and isinstance(value, Mapping):
            merged[key] = merge(old, value)
        else:
            merged[key] = value
    return merged


def write_config(
    directory: Path,
    contract_dir: Path,
    *,
    nameserver: str,
    proxy_port: int | None = None,
    admin_port: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Copy the contract files into `directory` and write a test config there; return its path.

    Listeners go to free ports of 127.0.0.1 (the proxy with no shutdown delay), the resolver to
    `nameserver`, the sinks to one file sink (`events.jsonl`); `overrides` are then merged in
    (see `merge`) and `extra_files` (name -> text) are written beside it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for name in CONTRACT_FILES:
        shutil.copyfile(contract_dir / name, directory / name)
    for name, text in (extra_files or {}).items():
        (directory / name).write_text(text)
    config: dict[str, Any] = load_yaml(contract_dir / CONFIG_FILE)
    # No shutdown delay unless a test asks for one: a SIGTERM then stops at once, as before.
    config["proxy"] = dict(
        config.get("proxy") or {},
        listen=f"127.0.0.1:{proxy_port or free_port()}",
        shutdown_delay=0,
    )
    config["admin"] = dict(
        config.get("admin") or {}, listen=f"127.0.0.1:{admin_port or free_port()}"
    )
    config["resolver"] = dict(config.get("resolver") or {}, nameservers=[nameserver])
    config["sinks"] = [{"type": "file", "path": EVENTS_FILE}]
    path = directory / CONFIG_FILE
    dump_yaml(merge(config, overrides or {}), path)
    return path


class GatewayError(RuntimeError):
    """The gateway did not become ready or did not stop; the message carries its stderr."""


class Gateway(Service):
    """Context manager running `egressgw run --config <config>` until it exits."""

    def __init__(self, config: Path, *, ready_timeout: float = READY_TIMEOUT) -> None:
        self.config = config
        self.directory = config.parent
        self.ready_timeout = ready_timeout
        data = load_yaml(config)
        self.proxy_address: str = data["proxy"]["listen"]
        self.admin_address: str = data["admin"]["listen"]
        self.events_path = self.directory / EVENTS_FILE
        self.stdout_path = self.directory / "gateway.stdout"
        self.stderr_path = self.directory / "gateway.stderr"
        self.returncode: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def proxy_host(self) -> str:
        """Return the proxy listener's host."""
        return self.proxy_address.rsplit(":", 1)[0]

    @property
    def proxy_port(self) -> int:
        """Return the proxy listener's port."""
        return int(self.proxy_address.rsplit(":", 1)[1])

    @property
    def proxy_url(self) -> str:
        """Return the proxy as a URL for `curl -x`."""
        return f"http://{self.proxy_address}"

    @property
    def admin_url(self) -> str:
        """Return the admin base URL (no trailing slash)."""
        return f"http://{self.admin_address}"

    @property
    def pid(self) -> int | None:
        """Return the gateway's PID while it runs."""
        return self._proc.pid if self._proc is not None else None

    def rss_bytes(self) -> int:
        """Return the gateway's resident memory (VmRSS), for backpressure checks."""
        if self._proc is None:
            raise GatewayError("the gateway is not running")
        for line in Path(f"/proc/{self._proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise GatewayError("no VmRSS in /proc status")

    def stderr(self) -> str:
        """Return everything the gateway wrote to stderr so far."""
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def logs(self) -> str:
        """Return the tail of the gateway's stdout and stderr, for failure messages."""
        out = self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""
        return (
            f"--- stdout ---\n{out[-STDERR_TAIL:]}\n--- stderr ---\n{self.stderr()[-STDERR_TAIL:]}"
        )

    def start(self) -> Self:
        """Start the gateway and wait until GET /readyz answers 200."""
        self.launch()
        self._wait_status("/readyz")
        return self

    def launch(self) -> Self:
        """Start the gateway and wait only until GET /healthz answers 200 (it may be unready)."""
        exe = egressgw_executable()
        if not exe.exists():
            raise GatewayError(f"{exe} not found: install the project (pip install -e .)")
        # Another working directory: relative paths must resolve against the config file.
        workdir = self.directory / "cwd"
        workdir.mkdir(exist_ok=True)
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self._proc = subprocess.Popen(
                [str(exe), "run", "--config", str(self.config)],
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
        self._wait_status("/healthz")
        return self

    def _wait_status(self, path: str) -> None:
        """Wait until GET `path` of the admin server answers 200; kill and raise if it does not."""
        assert self._proc is not None
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self.returncode = self._proc.returncode
                self._proc = None
                raise GatewayError(f"gateway exited with {self.returncode}\n{self.logs()}")
            if http_status(f"{self.admin_url}{path}") == 200:
                return
            time.sleep(POLL_INTERVAL)
        self.kill()
        raise GatewayError(f"{path} not 200 within {self.ready_timeout}s\n{self.logs()}")

    def signal(self, signum: signal.Signals) -> None:
        """Send `signum` to the gateway."""
        if self._proc is not None:
            self._proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        """Wait for the gateway to exit and return its exit code; raise TimeoutError."""
        if self._proc is None:
            return self.returncode if self.returncode is not None else 0
        try:
            self.returncode = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"gateway still running after {timeout}s") from None
        self._proc = None
        return self.returncode

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, wait up to `timeout` s, then SIGKILL; return the exit code (-9 if killed)."""
        if self._proc is None:
            return self.returncode if self.returncode is not None else 0
        self.signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except TimeoutError:
            return self.kill()

    def kill(self) -> int:
        """SIGKILL the gateway and return its exit code."""
        if self._proc is None:
            return self.returncode if self.returncode is not None else 0
        self._proc.kill()
        return self.wait(STOP_TIMEOUT)

    def events(self) -> list[Event]:
        """Return every complete event line of the file sink, parsed."""
        if not self.events_path.exists():
            return []
        events: list[Event] = []
        for line in self.events_path.read_bytes().split(b"\n"):
            if line.strip():
                try:
                    events.append(json.loads(line))
                except ValueError:
                    # A line the sink is still writing; it is complete on the next read.
                    continue
        return events

    def wait_events(
        self,
        predicate: Callable[[Event], bool],
        count: int = 1,
        timeout: float = EVENT_TIMEOUT,
    ) -> list[Event]:
        """Poll the events file until `count` events match `predicate`; raise AssertionError."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.events() if predicate(e)]
            if len(found) >= count:
                return found
            if time.monotonic() >= deadline:
                recent = "\n".join(json.dumps(e) for e in self.events()[-5:])
                raise AssertionError(
                    f"{len(found)} of {count} expected events after {timeout}s; last:\n{recent}"
                )
            time.sleep(POLL_INTERVAL)

    def flow_events(
        self,
        source_ip: str,
        source_port: int,
        *,
        ended: bool = False,
        timeout: float = EVENT_TIMEOUT,
    ) -> list[Event]:
        """Return the events of the flow from source_ip:source_port (the decision, and the end)."""

        def from_source(e: Event) -> bool:
            return bool(
                field(e, "source.ip") == source_ip and field(e, "source.port") == source_port
            )

        decision = self.wait_events(
            lambda e: from_source(e) and field(e, "event.action") != "connection_ended",
            timeout=timeout,
        )[-1]
        flow_id = field(decision, "flow.id")
        if ended:
            self.wait_events(
                lambda e: (
                    field(e, "flow.id") == flow_id
                    and field(e, "event.action") == "connection_ended"
                ),
                timeout=timeout,
            )
        return [e for e in self.events() if flow_id is not None and field(e, "flow.id") == flow_id]


def decision_of(events: Iterable[Event]) -> Event:
    """Return the decision event among one flow's events."""
    for event in events:
        if field(event, "event.action") != "connection_ended":
            return event
    raise AssertionError("no decision event in the flow")


def end_of(events: Iterable[Event]) -> Event:
    """Return the connection_ended event among one flow's events."""
    for event in events:
        if field(event, "event.action") == "connection_ended":
            return event
    raise AssertionError("no connection_ended event in the flow")
