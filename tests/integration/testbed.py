"""The loopback test bed of the integration tests: who is who, which name points where.

Sources (identity from the contract configuration): 127.0.0.5 is namespace
payments (app=api), 127.0.0.6 namespace batch (app=report), 127.0.0.1 unknown.
Upstreams echo requests; 127.0.0.32 (evil) and 127.0.0.66 (feed-listed) also
listen, so that a bypass shows as a 200 from them instead of a 502.
"""

from __future__ import annotations

from pathlib import Path

from tests.support import Listener

CONTRACT_DIR = Path(__file__).parent / "contract"

PAYMENTS = "127.0.0.5"
BATCH = "127.0.0.6"
UNKNOWN = "127.0.0.1"

ALLOWED_IP = "127.0.0.30"
PARTNER_IP = "127.0.0.31"
EVIL_IP = "127.0.0.32"
STORAGE_IP = "127.0.0.20"
FEED_IP = "127.0.0.66"
GUARDED_IP = "127.0.0.99"
BLACKHOLE_IP = "127.0.0.33"

HTTP_PORT = 8080
HTTPS_PORT = 8443
STORAGE_PORT = 9000

DNS_RECORDS = {
    "allowed.test": ALLOWED_IP,
    "www.allowed.test": ALLOWED_IP,
    "api.partner.test": PARTNER_IP,
    "slow.partner.test": BLACKHOLE_IP,
    "evil.test": EVIL_IP,
    "sub.evil.test": EVIL_IP,
    "badip.allowed.test": FEED_IP,
    "internal.allowed.test": GUARDED_IP,
    "xn--bcher-kva.test": EVIL_IP,
    "v6.allowed.test": "::1",
    "dual.allowed.test": f"{ALLOWED_IP},::1",
}
DNS_CNAMES = {"cname.allowed.test": "evil.test"}

UPSTREAM_LISTENERS = (
    Listener(ALLOWED_IP, HTTP_PORT),
    Listener(ALLOWED_IP, HTTPS_PORT, tls=True),
    Listener(PARTNER_IP, HTTPS_PORT, tls=True),
    Listener(STORAGE_IP, STORAGE_PORT),
    Listener(EVIL_IP, HTTP_PORT),
    Listener(EVIL_IP, HTTPS_PORT, tls=True),
    Listener(FEED_IP, HTTP_PORT),
    Listener(FEED_IP, HTTPS_PORT, tls=True),
)
