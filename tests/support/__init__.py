"""Real-process test support: dnsmasq, echo upstreams, the gateway subprocess, curl, raw sockets."""

from .blackhole import BlackHole
from .clients import CurlResult, RawConnection, RawResponse, curl, parse_response, raw_request
from .dnsmasq import Dnsmasq
from .gateway import Gateway, GatewayError, decision_of, end_of, field, write_config
from .lock import machine_lock
from .net import free_port, wait_for_port, wait_http_ok
from .pki import TlsFiles, make_test_pki
from .rawupstream import RawPeer, RawUpstream
from .scripted_dns import ScriptedDns
from .upstream import Listener, Upstream, header_names, header_value

__all__ = [
    "BlackHole",
    "CurlResult",
    "Dnsmasq",
    "Gateway",
    "GatewayError",
    "Listener",
    "RawConnection",
    "RawPeer",
    "RawResponse",
    "RawUpstream",
    "ScriptedDns",
    "TlsFiles",
    "Upstream",
    "curl",
    "decision_of",
    "end_of",
    "field",
    "free_port",
    "header_names",
    "header_value",
    "machine_lock",
    "make_test_pki",
    "parse_response",
    "raw_request",
    "wait_for_port",
    "wait_http_ok",
    "write_config",
]
