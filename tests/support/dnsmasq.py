"""A real dnsmasq serving fixed test names on a free loopback port.

dnsmasq reads nothing from the machine (`--conf-file=/dev/null`, `--no-hosts`,
`--no-resolv`), answers only the `host-record`s and `cname`s it is given, and is
stopped by its PID when the context exits, also when the test failed.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Self

from tests.support.service import Service

from .net import free_port, wait_for_port

DNSMASQ_START_TIMEOUT = 5.0
DNSMASQ_STOP_TIMEOUT = 5.0
DEFAULT_TTL = 30
LISTEN_ADDRESS = "127.0.0.1"


def dnsmasq_path() -> str | None:
    """Return the dnsmasq executable, or None when it is not installed."""
    return shutil.which("dnsmasq") or next(
        (p for p in ("/usr/sbin/dnsmasq", "/sbin/dnsmasq") if Path(p).exists()), None
    )


def local_zones(names: Iterable[str]) -> list[str]:
    """Return the top-level labels of `names`, the zones dnsmasq answers alone (NODATA/NXDOMAIN)."""
    return sorted({name.rstrip(".").rsplit(".", 1)[-1].lower() for name in names})


def dnsmasq_args(
    exe: str,
    port: int,
    records: Mapping[str, str],
    cnames: Mapping[str, str],
    ttl: int = DEFAULT_TTL,
    extra: Sequence[str] = (),
) -> list[str]:
    """Return the dnsmasq command line serving `records` (name -> ip) and `cnames` (alias -> to).

    `extra` options are added as given (say `--txt-record=...` for a long answer).
    """
    args = [
        exe,
        "-k",
        "--conf-file=/dev/null",
        f"--port={port}",
        f"--listen-address={LISTEN_ADDRESS}",
        "--bind-interfaces",
        "--no-resolv",
        "--no-hosts",
        "--pid-file",
        "--log-facility=-",
        f"--local-ttl={ttl}",
    ]
    # Without --local a AAAA query for an A-only name is REFUSED; with it: NODATA, like real DNS.
    args += [f"--local=/{zone}/" for zone in local_zones([*records, *cnames])]
    args += [f"--host-record={name},{ip}" for name, ip in records.items()]
    args += [f"--cname={alias},{target}" for alias, target in cnames.items()]
    return [*args, *extra]


class Dnsmasq(Service):
    """Context manager running dnsmasq on 127.0.0.1:`port` (a free one unless given)."""

    def __init__(
        self,
        records: Mapping[str, str],
        cnames: Mapping[str, str] | None = None,
        port: int | None = None,
        ttl: int = DEFAULT_TTL,
        extra: Sequence[str] = (),
    ) -> None:
        exe = dnsmasq_path()
        if exe is None:
            raise FileNotFoundError("dnsmasq is not installed (Debian package dnsmasq)")
        self.host = LISTEN_ADDRESS
        self.port = port if port is not None else free_port()
        self.records = dict(records)
        self.cnames = dict(cnames or {})
        self.args = dnsmasq_args(exe, self.port, self.records, self.cnames, ttl, extra)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def nameserver(self) -> str:
        """Return this server as `host:port`, the gateway's resolver.nameservers form."""
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """Return the PID of the running dnsmasq, or None when stopped."""
        return self._proc.pid if self._proc is not None else None

    def start(self) -> Self:
        """Start dnsmasq and wait until its TCP port answers."""
        self._proc = subprocess.Popen(
            self.args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            wait_for_port(self.host, self.port, DNSMASQ_START_TIMEOUT)
        except TimeoutError:
            output = self.stop()
            raise RuntimeError(f"dnsmasq did not start: {' '.join(self.args)}\n{output}") from None
        return self

    def stop(self) -> str:
        """Stop dnsmasq by its PID (SIGTERM, then SIGKILL) and return what it logged."""
        proc, self._proc = self._proc, None
        if proc is None:
            return ""
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=DNSMASQ_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        return out.decode(errors="replace")
