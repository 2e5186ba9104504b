"""A real rsyslogd on a loopback port, writing each received message (raw) as one line.

It listens with imtcp (plain or TLS) or, with ``relp=True``, with imrelp (Debian
rsyslog-relp), plain or TLS through librelp's OpenSSL or GnuTLS backend.
"""

from __future__ import annotations

import glob
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import IO, Literal

from tests.support.pki import TlsFiles, make_test_pki

RSYSLOGD = "/usr/sbin/rsyslogd"
START_TIMEOUT = 10.0
# Where Debian (multiarch), Fedora and source builds put rsyslog's modules.
MODULE_GLOBS = (
    "/usr/lib/*/rsyslog/imrelp.so",
    "/usr/lib/rsyslog/imrelp.so",
    "/usr/lib64/rsyslog/imrelp.so",
)


def missing_rsyslogd() -> str | None:
    """Why rsyslogd tests cannot run here, or None."""
    if shutil.which(RSYSLOGD) is None:
        return f"needs rsyslogd ({RSYSLOGD} is absent; Debian package rsyslog)"
    return None


def missing_imrelp() -> str | None:
    """Why RELP tests cannot run here (no rsyslogd, or no imrelp module), or None."""
    if (reason := missing_rsyslogd()) is not None:
        return reason
    if not any(glob.glob(pattern) for pattern in MODULE_GLOBS):
        return "needs rsyslogd's imrelp module (imrelp.so is absent; Debian package rsyslog-relp)"
    return None


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Rsyslogd:
    """Starts, stops and reads one rsyslogd instance (imtcp, optionally TLS via gtls)."""

    def __init__(
        self,
        workdir: Path,
        port: int,
        tls: TlsFiles | None = None,
        *,
        relp: bool = False,
        tlslib: Literal["gnutls", "openssl"] | None = None,
        client_ca: Path | None = None,
        config: str | None = None,
    ) -> None:
        """relp: imrelp instead of imtcp; client_ca: require client certificates it signed;
        config: this rsyslog.conf instead of the generated one."""
        self.dir = workdir
        self.port = port
        self.tls = tls
        self.relp = relp
        self.tlslib = tlslib
        self.client_ca = client_ca
        self.config = config
        self.out = workdir / "out.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self.dir.mkdir(parents=True, exist_ok=True)

    def _relp_config(self) -> str:
        # The ruleset runs without a queue of its own (Direct): imrelp answers 200 OK only
        # after omfile has written the message, so an acknowledged message survives SIGKILL.
        module = 'module(load="imrelp"'
        module += f' tls.tlslib="{self.tlslib}")' if self.tlslib else ")"
        listen = f'input(type="imrelp" address="127.0.0.1" port="{self.port}" ruleset="out"'
        if self.tls is not None:
            ca = self.dir / "relp-ca.pem"
            ca.write_bytes(
                self.tls.ca_cert.read_bytes()
                + (self.client_ca.read_bytes() if self.client_ca else b"")
            )
            listen += (
                f' tls="on" tls.caCert="{ca}" tls.myCert="{self.tls.server_cert}"'
                f' tls.myPrivKey="{self.tls.server_key}"'
            )
            if self.client_ca is not None:
                listen += ' tls.authMode="certvalid"'
        lines = [
            f'global(workDirectory="{self.dir}" maxMessageSize="64k"'
            ' parser.escapeControlCharactersOnReceive="off")',
            module,
            listen + ")",
            'template(name="raw" type="string" string="%rawmsg%\\n")',
            'ruleset(name="out" queue.type="Direct") {',
            f'  action(type="omfile" file="{self.out}" template="raw")',
            "}",
        ]
        return "\n".join(lines) + "\n"

    def _config(self) -> str:
        if self.config is not None:
            return self.config
        if self.relp:
            return self._relp_config()
        lines = [
            f'global(workDirectory="{self.dir}" maxMessageSize="64k"'
            ' parser.escapeControlCharactersOnReceive="off"'
        ]
        if self.tls is not None:
            lines[0] += (
                f' defaultNetstreamDriver="gtls" defaultNetstreamDriverCAFile="{self.tls.ca_cert}"'
                f' defaultNetstreamDriverCertFile="{self.tls.server_cert}"'
                f' defaultNetstreamDriverKeyFile="{self.tls.server_key}"'
            )
        lines[0] += ")"
        if self.tls is not None:
            lines.append(
                'module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1"'
                ' streamDriver.authMode="anon")'
            )
        else:
            lines.append('module(load="imtcp")')
        lines += [
            f'input(type="imtcp" address="127.0.0.1" port="{self.port}" ruleset="out")',
            'template(name="raw" type="string" string="%rawmsg%\\n")',
            f'ruleset(name="out") {{ action(type="omfile" file="{self.out}" template="raw") }}',
        ]
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        """Start rsyslogd and wait until it accepts connections."""
        conf = self.dir / "rsyslog.conf"
        conf.write_text(self._config())
        self._stderr = (self.dir / "rsyslogd.stderr").open("ab")
        self.proc = subprocess.Popen(
            [RSYSLOGD, "-n", "-f", str(conf), "-i", str(self.dir / "rsyslogd.pid")],
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = (self.dir / "rsyslogd.stderr").read_text()
                self.stop()
                raise RuntimeError(f"rsyslogd exited: {err}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        err = (self.dir / "rsyslogd.stderr").read_text()
        self.stop()
        raise RuntimeError(f"rsyslogd did not start listening on {self.port}: {err}")

    def kill(self) -> None:
        """Kill rsyslogd (SIGKILL), as a crash would, and wait for it to exit."""
        if self.proc is not None:
            self.proc.kill()
        self.stop()

    def stop(self) -> None:
        """Stop rsyslogd (SIGTERM) and wait for it to exit."""
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def lines(self) -> list[bytes]:
        """Messages written so far, one per line."""
        return self.out.read_bytes().splitlines() if self.out.exists() else []


def make_tls_files(directory: Path) -> TlsFiles:
    """A test CA and a server certificate for the receiver on 127.0.0.1."""
    return make_test_pki(directory, ("localhost", "127.0.0.1"))
