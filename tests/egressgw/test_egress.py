"""Tests of egress source addresses: the choice per workload, and readiness when one is missing."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path

import pytest

from egressgw.app import Gateway
from egressgw.config.model import load_config
from egressgw.config.source import ConfigError
from egressgw.egress import egress_source
from egressgw.identity.workload import UNKNOWN, Workload

IPS = {"payments": ipaddress.ip_address("10.98.0.10"), "batch": ipaddress.ip_address("fd00::11")}


def test_namespace_listed_gets_its_address() -> None:
    """A workload of a listed namespace leaves from that namespace's address."""
    assert egress_source(Workload.make("payments", "api-1"), IPS) == "10.98.0.10"
    assert egress_source(Workload.make("batch"), IPS) == "fd00::11"


def test_unlisted_and_unknown_sources_leave_from_the_node() -> None:
    """Other namespaces and unknown sources get None: the kernel's choice."""
    assert egress_source(Workload.make("web"), IPS) is None
    assert egress_source(UNKNOWN, IPS) is None


def test_namespace_keys_must_be_namespace_names(tmp_path: Path) -> None:
    """A key that cannot be a namespace name is refused, naming the key."""
    path = tmp_path / "gw.yaml"
    path.write_text("egress_ips:\n  Payments_X: 10.98.0.10\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "egress_ips.Payments_X" in info.value.errors[0]


@pytest.mark.parametrize(
    ("address", "ready"),
    [("127.0.0.1", True), ("192.0.2.123", False)],
)
async def test_readiness_checks_each_address_is_on_the_node(
    tmp_path: Path, address: str, ready: bool
) -> None:
    """An egress address the node has: ready; one it lacks: not ready, saying which and why."""
    path = tmp_path / "gw.yaml"
    path.write_text(
        "proxy: {listen: '127.0.0.1:0'}\nadmin: {listen: '127.0.0.1:0'}\n"
        f"egress_ips: {{payments: '{address}'}}\nsinks: [{{type: file, path: events.jsonl}}]\n"
    )
    gw = Gateway(load_config(path), path)
    await gw.start()
    try:
        why = gw.readiness()
    finally:
        await gw.stop()
    if ready:
        assert why is None
    else:
        assert why == (
            "egress_ips: 192.0.2.123 (payments) is not an address of this node: "
            "Cannot assign requested address"
        )


async def test_connections_leave_from_the_namespace_address(tmp_path: Path) -> None:
    """A payments tunnel and a payments request reach the upstream from 127.0.0.55; a source
    of no listed namespace from the kernel's choice (127.0.0.1)."""
    seen: list[str] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(writer.get_extra_info("peername")[0])
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    path = tmp_path / "gw.yaml"
    path.write_text(
        "proxy: {listen: '127.0.0.1:0'}\nadmin: {listen: '127.0.0.1:0'}\n"
        "guard: {allow: ['127.0.0.0/8']}\n"
        "identity: {static: [{cidr: '127.0.0.5/32', namespace: payments}]}\n"
        "egress_ips: {payments: '127.0.0.55'}\nsinks: [{type: file, path: events.jsonl}]\n"
    )
    gw = Gateway(load_config(path), path)
    await gw.start()
    assert gw.proxy_address is not None
    try:
        async with server:
            for source, request in (
                (
                    "127.0.0.5",
                    f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\n\r\n",
                ),
                ("127.0.0.5", f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: x\r\n\r\n"),
                ("127.0.0.1", f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: x\r\n\r\n"),
            ):
                reader, writer = await asyncio.open_connection(
                    *gw.proxy_address, local_addr=(source, 0)
                )
                writer.write(request.encode())
                async with asyncio.timeout(5):
                    answer = await reader.read(4096)
                    while b"ok" not in answer:
                        more = await reader.read(4096)
                        assert more, answer
                        answer += more
                writer.close()
    finally:
        await gw.stop()
    assert seen == ["127.0.0.55", "127.0.0.55", "127.0.0.1"]
