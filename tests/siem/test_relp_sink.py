"""Tests for the RELP sink: into a real rsyslogd with imrelp (plain and TLS, restarted and killed
mid-batch), and against a scripted RELP server for answers imrelp cannot be made to give."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import orjson
import pytest
from prometheus_client import CollectorRegistry

from siem.config import SpoolSpec, SyslogSinkSpec
from siem.exporter import DeliveryOptions, Exporter
from siem.relp import FrameParser, RelpProtocolError, RelpRefused, encode_frame
from siem.sinks import SendResult, build_sink
from siem.sinks.relp import RelpSink
from siem.sinks.syslog import SyslogSink
from siem.spool import Record
from tests.siem.rsyslog_server import Rsyslogd, free_port, make_tls_files, missing_imrelp
from tests.siem.test_formats import RFC5424, parse_cef
from tests.siem.test_syslog import NASTY, event, json_ids
from tests.support.pki import make_client_tls

needs_imrelp = pytest.mark.skipif(missing_imrelp() is not None, reason=str(missing_imrelp()))
TEST_TIMEOUT = 120.0
OPEN_OK = b"200 OK\nrelp_version=0\ncommands=syslog\n"


def records(start: int, count: int, reason: str = "ok") -> list[Record]:
    return [Record(i, orjson.dumps(event(i, reason))) for i in range(start, start + count)]


def relp_spec(port: int, **kwargs: Any) -> SyslogSinkSpec:
    return SyslogSinkSpec(type="syslog", address=f"127.0.0.1:{port}", transport="relp", **kwargs)


def relp_exporter(tmp_path: Path, sink: RelpSink, batch_events: int) -> Exporter:
    options = DeliveryOptions(batch_events=batch_events, backoff_initial=0.02, backoff_max=0.2)
    return Exporter(
        [sink],
        SpoolSpec(dir=tmp_path / "spool", batch_interval=0.01),
        delivery={sink.name: options},
        registry=CollectorRegistry(),
    )


async def mid_batch(sink: RelpSink, acked: int) -> None:
    """Return once `acked` messages were answered and more are in flight (30 s at most)."""
    for _ in range(30_000):
        if sink.acked >= acked and sink.in_flight > 0:
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"sink never had messages in flight after {acked} answers")


def count_ids(rsyslogd: Rsyslogd) -> collections.Counter[str]:
    return collections.Counter(json_ids(rsyslogd.lines()))


# -- a scripted RELP server -----------------------------------------------------------------

Script = Callable[[list[tuple[int, str, bytes]], asyncio.StreamWriter], Awaitable[bool]]


@contextlib.asynccontextmanager
async def scripted_server(script: Script) -> AsyncIterator[tuple[int, list[int]]]:
    """A RELP server on loopback: answers open, then lets `script` answer each read's frames.

    The script gets the (txnr, command, data) frames of one read and the writer; it returns
    False to end the connection. Yields the port and a list with one entry per connection.
    """
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        parser = FrameParser(max_data=1 << 20)
        try:
            while data := await reader.read(65536):
                got = [(f.txnr, f.command, f.data) for f in parser.frames(data)]
                if got and got[0][1] == "open":
                    writer.write(encode_frame(got[0][0], "rsp", OPEN_OK))
                    got = got[1:]
                if got and not await script(got, writer):
                    break
                await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], connections
    finally:
        server.close()
        await server.wait_closed()


async def test_build_sink_picks_relp() -> None:
    """transport relp and relp_tls build a RelpSink through the ordinary factory, never the
    plain syslog sink."""
    for transport in ("relp", "relp_tls"):
        spec = SyslogSinkSpec(type="syslog", address="127.0.0.1:20514", transport=transport)  # type: ignore[arg-type]
        assert isinstance(build_sink(spec, "s", state_dir=Path("/tmp")), RelpSink)
        with pytest.raises(ValueError, match="RELP transports"):
            SyslogSink(spec, "s")


async def test_window_bounds_messages_in_flight() -> None:
    """No more than `window` messages wait for an answer at any time."""
    most = [0]
    pending: list[int] = []

    async def slow(frames: list[tuple[int, str, bytes]], writer: asyncio.StreamWriter) -> bool:
        pending.extend(t for t, c, _ in frames if c == "syslog")
        most[0] = max(most[0], len(pending))
        await asyncio.sleep(0.002)
        for txnr in pending[:2]:
            writer.write(encode_frame(txnr, "rsp", b"200 OK"))
        del pending[:2]
        if pending:  # answer the rest a little later
            await asyncio.sleep(0.002)
            for txnr in pending:
                writer.write(encode_frame(txnr, "rsp", b"200 OK"))
            pending.clear()
        return True

    async with scripted_server(slow) as (port, _):
        sink = RelpSink(relp_spec(port, window=4), "relp")
        await sink.start()
        assert await sink.send(records(0, 40)) == SendResult()
        assert await sink.send(records(40, 1)) == SendResult()
        await sink.aclose()
    assert sink.acked == 41
    assert 1 <= most[0] <= 4


async def test_serverclose_mid_batch_returns_the_unanswered() -> None:
    """Answered messages count; the rest come back for retry and go out on a new session."""
    seen: list[int] = []

    async def close_after_five(
        frames: list[tuple[int, str, bytes]], writer: asyncio.StreamWriter
    ) -> bool:
        for txnr, _, _ in frames:
            if len(seen) == 5:
                writer.write(b"0 serverclose 0\n")
                return False
            seen.append(txnr)
            writer.write(encode_frame(txnr, "rsp", b"200 OK"))
        return True

    async with scripted_server(close_after_five) as (port, connections):
        sink = RelpSink(relp_spec(port), "relp")
        await sink.start()
        batch = records(0, 20)
        result = await sink.send(batch)
        assert list(result.retry) == batch[5:]
        assert sink.interrupted == 1 and sink.resent == 15
        seen.clear()
        result = await sink.send(batch[5:10])
        assert list(result.retry) == [] and len(connections) == 2
        await sink.aclose()


async def test_refusal_names_peer_and_reason(caplog: pytest.LogCaptureFixture) -> None:
    """A non-200 answer: raised if nothing got through, else a warning and the rest retried."""
    answered: list[int] = []

    async def refuse_some(
        frames: list[tuple[int, str, bytes]], writer: asyncio.StreamWriter
    ) -> bool:
        for txnr, _, _ in frames:
            answered.append(txnr)
            status = b"500 disk full" if len(answered) in (1, 5) else b"200 OK"
            writer.write(encode_frame(txnr, "rsp", status))
        return True

    async with scripted_server(refuse_some) as (port, _):
        sink = RelpSink(relp_spec(port, window=1), "relp")
        await sink.start()
        with pytest.raises(RelpRefused, match=rf"RELP receiver 127.0.0.1:{port} refused syslog"):
            await sink.send(records(0, 3))
        with caplog.at_level(logging.WARNING, logger="siem.sinks.relp"):
            batch = records(0, 6)
            result = await sink.send(batch)  # answers 2-4 OK, the 5th refused
        assert list(result.retry) == batch[3:]
        assert "500 disk full" in caplog.text and f"127.0.0.1:{port}" in caplog.text
        await sink.aclose()


async def test_open_refused() -> None:
    """A server that refuses the session is named with its reason."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(encode_frame(1, "rsp", b"500 go away"))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sink = RelpSink(relp_spec(port), "relp")
    await sink.start()
    with pytest.raises(RelpRefused, match=rf"127.0.0.1:{port} refused open \(txnr 1\): 500 go"):
        await sink.send(records(0, 1))
    await sink.aclose()
    server.close()
    await server.wait_closed()


async def test_garbage_from_server() -> None:
    """A framing error from the server ends the session with a clear error."""

    async def garbage(frames: list[tuple[int, str, bytes]], writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        return True

    async with scripted_server(garbage) as (port, _):
        sink = RelpSink(relp_spec(port), "relp")
        await sink.start()
        with pytest.raises(RelpProtocolError, match=rf"127.0.0.1:{port}: invalid frame header"):
            await sink.send(records(0, 2))
        await sink.aclose()


async def test_no_answer_times_out() -> None:
    """A receiver that takes messages but never answers fails the send after `timeout`."""

    async def silent(frames: list[tuple[int, str, bytes]], writer: asyncio.StreamWriter) -> bool:
        return True

    async with scripted_server(silent) as (port, _):
        sink = RelpSink(relp_spec(port, timeout=0.3), "relp")
        await sink.start()
        with pytest.raises(TimeoutError, match=r"sent no answer for 0.3s with 3 messages"):
            await sink.send(records(0, 3))
        await sink.aclose()


async def test_send_fails_when_receiver_is_down() -> None:
    """With nothing listening, send raises naming the receiver, so the exporter retries."""
    port = free_port()
    sink = RelpSink(relp_spec(port), "relp")
    await sink.start()
    with pytest.raises(ConnectionError, match=rf"RELP receiver 127.0.0.1:{port}"):
        await sink.send(records(0, 1))
    await sink.aclose()


# -- a real rsyslogd with imrelp ------------------------------------------------------------


@pytest.mark.integration
@needs_imrelp
async def test_into_rsyslogd_framed_and_across_idle_restart(tmp_path: Path) -> None:
    """rsyslogd receives each message exactly as formatted, once; after a restart while idle
    (serverclose arrives between batches) the next batch opens a new session."""
    port = free_port()
    rsyslogd = Rsyslogd(tmp_path / "rsyslog", port, relp=True)
    await asyncio.to_thread(rsyslogd.start)
    spec = relp_spec(port, format="cef")
    sink = RelpSink(spec, "relp")
    exp = relp_exporter(tmp_path, sink, 100)
    await exp.start()
    try:
        for i in range(300):
            exp.submit(event(i, reason=NASTY))
        await exp.flush()
        assert await exp.wait_delivered(within=15)
        await asyncio.to_thread(rsyslogd.stop)
        await asyncio.to_thread(rsyslogd.start)
        for i in range(300, 600):
            exp.submit(event(i, reason=NASTY))
        await exp.flush()
        assert await exp.wait_delivered(within=15)
    finally:
        await exp.aclose()
        await asyncio.to_thread(rsyslogd.stop)
    lines = rsyslogd.lines()
    assert len(lines) == 600
    for n, line in enumerate(lines):
        assert line == sink.to_message(Record(n, orjson.dumps(event(n, reason=NASTY))))
        m = RFC5424.match(line)
        assert m is not None
        _, ext = parse_cef(m.group(8).decode())
        assert ext["reason"] == NASTY and ext["externalId"] == f"e-{n}"
    assert sink.connects == 2 and sink.resent == 0


@pytest.mark.integration
@needs_imrelp
@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
async def test_rsyslogd_stopped_mid_batch(
    tmp_path: Path, how: Literal["sigterm", "sigkill"], capsys: pytest.CaptureFixture[str]
) -> None:
    """rsyslogd is stopped while a batch is in flight and started again: every event arrives.

    SIGTERM: imrelp answers what it read, sends serverclose and closes; the sink resends only
    the unanswered, so nothing is duplicated. SIGKILL: a message written just before the kill
    may miss its answer and arrive twice (at most the window), but none is lost: the receiver
    runs its ruleset without a queue, so it answers only written messages.
    """
    total, batch = 20_000, 5_000
    port = free_port()
    rsyslogd = Rsyslogd(tmp_path / "rsyslog", port, relp=True)
    await asyncio.to_thread(rsyslogd.start)
    sink = RelpSink(relp_spec(port, timeout=5), "relp")
    exp = relp_exporter(tmp_path, sink, batch)
    await exp.start()
    async with asyncio.timeout(TEST_TIMEOUT):  # stuck: fail with the traceback, never hang
        try:
            for i in range(total):
                exp.submit(event(i))
            await exp.flush()
            await mid_batch(sink, total // 4)
            acked_at_stop = sink.acked
            # The stop runs in a thread while the loop goes on sending: it lands mid-batch.
            await asyncio.to_thread(rsyslogd.kill if how == "sigkill" else rsyslogd.stop)
            await asyncio.sleep(0.2)
            await asyncio.to_thread(rsyslogd.start)
            assert await exp.wait_delivered(within=60)
        finally:
            await exp.aclose()
            await asyncio.to_thread(rsyslogd.stop)
    counts = count_ids(rsyslogd)
    duplicates = sum(counts.values()) - len(counts)
    with capsys.disabled():
        print(
            f"\nRELP {how} mid-batch: sent {total}, received {sum(counts.values())},"
            f" distinct {len(counts)}, duplicates {duplicates}, acked before the stop"
            f" {acked_at_stop}, resent {sink.resent}, sessions {sink.connects}"
        )
    assert set(counts) == {f"e-{i}" for i in range(total)}
    assert sink.interrupted >= 1 and sink.connects >= 2
    if how == "sigterm":
        assert duplicates == 0
    else:
        assert duplicates <= sink.spec.window


@pytest.mark.integration
@needs_imrelp
async def test_session_rollover_before_txnr_wraps(tmp_path: Path) -> None:
    """When txnrs run out the sink closes the session and opens a new one: nothing is lost."""
    port = free_port()
    rsyslogd = Rsyslogd(tmp_path / "rsyslog", port, relp=True)
    await asyncio.to_thread(rsyslogd.start)
    sink = RelpSink(relp_spec(port, window=16), "relp", max_txnr=50)
    exp = relp_exporter(tmp_path, sink, 200)
    await exp.start()
    try:
        for i in range(1000):
            exp.submit(event(i))
        await exp.flush()
        assert await exp.wait_delivered(within=20)
    finally:
        await exp.aclose()
        await asyncio.to_thread(rsyslogd.stop)
    counts = count_ids(rsyslogd)
    assert set(counts) == {f"e-{i}" for i in range(1000)} and max(counts.values()) == 1
    assert sink.connects == 21  # 49 messages per session (open takes txnr 1)


@pytest.mark.integration
@needs_imrelp
@pytest.mark.parametrize("tlslib", ["openssl", "gnutls"])
async def test_relp_tls_into_rsyslogd(tmp_path: Path, tlslib: Literal["openssl", "gnutls"]) -> None:
    """RELP over TLS reaches imrelp with either TLS library of librelp.

    OpenSSL: server certificate only. GnuTLS: its default needs a client certificate
    fingerprint, so it runs with tls.authMode="certvalid" and the sink's cert/key.
    """
    server = make_tls_files(tmp_path / "pki")
    client = make_client_tls(tmp_path / "client") if tlslib == "gnutls" else None
    port = free_port()
    rsyslogd = Rsyslogd(
        tmp_path / "rsyslog",
        port,
        tls=server,
        relp=True,
        tlslib=tlslib,
        client_ca=client.ca_cert if client else None,
    )
    await asyncio.to_thread(rsyslogd.start)
    spec = SyslogSinkSpec(
        type="syslog",
        address=f"127.0.0.1:{port}",
        transport="relp_tls",
        ca=server.ca_cert,
        cert=client.cert if client else None,
        key=client.key if client else None,
    )
    sink = RelpSink(spec, "relp")
    exp = relp_exporter(tmp_path, sink, 100)
    await exp.start()
    try:
        for i in range(500):
            exp.submit(event(i))
        await exp.flush()
        assert await exp.wait_delivered(within=15)
    finally:
        await exp.aclose()
        await asyncio.to_thread(rsyslogd.stop)
    counts = count_ids(rsyslogd)
    assert set(counts) == {f"e-{i}" for i in range(500)} and max(counts.values()) == 1


@pytest.mark.integration
@needs_imrelp
async def test_relp_tls_restart_mid_batch(tmp_path: Path) -> None:
    """Over TLS too, a SIGTERM mid-batch loses nothing and duplicates nothing."""
    server = make_tls_files(tmp_path / "pki")
    port = free_port()
    rsyslogd = Rsyslogd(tmp_path / "rsyslog", port, tls=server, relp=True, tlslib="openssl")
    await asyncio.to_thread(rsyslogd.start)
    spec = SyslogSinkSpec(
        type="syslog",
        address=f"127.0.0.1:{port}",
        transport="relp_tls",
        ca=server.ca_cert,
        timeout=5,
    )
    sink = RelpSink(spec, "relp")
    exp = relp_exporter(tmp_path, sink, 4000)
    await exp.start()
    async with asyncio.timeout(TEST_TIMEOUT):
        try:
            for i in range(12_000):
                exp.submit(event(i))
            await exp.flush()
            await mid_batch(sink, 4100)  # early in the second batch of 4,000
            await asyncio.to_thread(rsyslogd.stop)
            await asyncio.sleep(0.2)
            await asyncio.to_thread(rsyslogd.start)
            assert await exp.wait_delivered(within=60)
        finally:
            await exp.aclose()
            await asyncio.to_thread(rsyslogd.stop)
    counts = count_ids(rsyslogd)
    assert set(counts) == {f"e-{i}" for i in range(12_000)}
    assert max(counts.values()) == 1
    assert sink.interrupted >= 1


@pytest.mark.integration
@needs_imrelp
@pytest.mark.parametrize("problem", ["unknown CA", "no client certificate"])
async def test_relp_tls_refusals(tmp_path: Path, problem: str) -> None:
    """A server certificate from another CA, or a missing client certificate where imrelp
    requires one: send raises naming the receiver, and nothing is written."""
    server = make_tls_files(tmp_path / "pki")
    other = make_tls_files(tmp_path / "other")
    client = make_client_tls(tmp_path / "client")
    port = free_port()
    rsyslogd = Rsyslogd(
        tmp_path / "rsyslog",
        port,
        tls=server,
        relp=True,
        tlslib="openssl",
        client_ca=client.ca_cert,
    )
    await asyncio.to_thread(rsyslogd.start)
    if problem == "unknown CA":
        spec = SyslogSinkSpec(
            type="syslog",
            address=f"127.0.0.1:{port}",
            transport="relp_tls",
            ca=other.ca_cert,
            cert=client.cert,
            key=client.key,
            timeout=5,
        )
        expected = "CERTIFICATE_VERIFY_FAILED"
    else:
        spec = SyslogSinkSpec(
            type="syslog",
            address=f"127.0.0.1:{port}",
            transport="relp_tls",
            ca=server.ca_cert,
            timeout=5,
        )
        expected = "CERTIFICATE_REQUIRED"
    sink = RelpSink(spec, "relp")
    await sink.start()
    try:
        with pytest.raises(ConnectionError, match=rf"RELP receiver 127.0.0.1:{port}.*{expected}"):
            await sink.send(records(0, 1))
    finally:
        await sink.aclose()
        await asyncio.to_thread(rsyslogd.stop)
    assert rsyslogd.lines() == []


@pytest.mark.integration
@needs_imrelp
async def test_shipped_receiver_example(tmp_path: Path) -> None:
    """siem/assets/rsyslog-relp-receiver.conf, with local paths and port, takes events over
    RELP/TLS from a gateway with a client certificate and writes one body per line."""
    server = make_tls_files(tmp_path / "pki")
    client = make_client_tls(tmp_path / "client")
    port = free_port()
    workdir = tmp_path / "rsyslog"
    text = (
        resources.files("siem.assets")
        .joinpath("rsyslog-relp-receiver.conf")
        .read_text()
        .replace('port="2514"', f'port="{port}"')
        .replace("/etc/rsyslog.d/tls/gateway-ca.pem", str(client.ca_cert))
        .replace("/etc/rsyslog.d/tls/server.pem", str(server.server_cert))
        .replace("/etc/rsyslog.d/tls/server-key.pem", str(server.server_key))
        .replace("/var/log/egressgw/events.log", str(workdir / "out.log"))
    )
    rsyslogd = Rsyslogd(workdir, port, config=f'global(workDirectory="{workdir}")\n' + text)
    await asyncio.to_thread(rsyslogd.start)
    spec = SyslogSinkSpec(
        type="syslog",
        address=f"127.0.0.1:{port}",
        transport="relp_tls",
        ca=server.ca_cert,
        cert=client.cert,
        key=client.key,
    )
    sink = RelpSink(spec, "relp")
    exp = relp_exporter(tmp_path, sink, 100)
    await exp.start()
    try:
        for i in range(200):
            exp.submit(event(i, reason=NASTY))
        await exp.flush()
        assert await exp.wait_delivered(within=15)
    finally:
        await exp.aclose()
        await asyncio.to_thread(rsyslogd.stop)
    bodies = [orjson.loads(line) for line in rsyslogd.lines()]
    assert [b["event"]["id"] for b in bodies] == [f"e-{i}" for i in range(200)]
    assert all(b["event"]["reason"] == NASTY for b in bodies)
