"""Does the name a transparent connection claims belong to the address it was sent to? Pure.

A redirected connection arrives with an original destination (an IP and a port) and, in its
first bytes, maybe a name (a TLS server name, an HTTP Host). A client chooses both, so the name
alone proves nothing: an SNI of an allowed name on a forbidden address is domain fronting, or a
plain lie. ``classify_binding`` says which name policy may judge.

Rules, in order:

1. No claimed name: the flow is decided by address and port, and by the name the client got
   that address for from the gateway's DNS proxy, when there is one (``answered``).
2. A claimed name equal to ``answered`` is bound: the gateway itself told this client, within
   the answer's TTL, that the name has this address.
3. A claimed name whose resolution (the gateway's resolver) includes the address is bound.
4. Any other claimed name is refused, with a reason naming the name, the address and what the
   name resolves to. A name that did not resolve is refused the same way.

Names compare case-insensitively and without a trailing dot.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Binding:
    """What policy may judge of a transparent flow: ``name`` (None: its address), or why not."""

    name: str | None
    how: str  # "claimed, resolves there", "claimed, DNS answer", "DNS answer", "address only"
    refusal: str | None = None


def canonical(name: str) -> str:
    """A name as the comparison sees it: lower case, no trailing dot."""
    return name.lower().rstrip(".")


def classify_binding(
    claimed: str | None,
    ip: IPAddress,
    answered: str | None,
    resolved: Sequence[IPAddress] | None,
    resolve_error: str | None = None,
) -> Binding:
    """Judge a claimed name against the original address (see the module docstring).

    ``answered``: the name the DNS proxy gave ``ip`` to this client for, within its TTL;
    ``resolved``: the claimed name's addresses (None when not looked up or failed, with
    ``resolve_error`` saying why).
    """
    if claimed is None:
        if answered is not None:
            return Binding(canonical(answered), "DNS answer")
        return Binding(None, "address only")
    name = canonical(claimed)
    if answered is not None and canonical(answered) == name:
        return Binding(name, "claimed, DNS answer")
    if resolved is not None and ip in resolved:
        return Binding(name, "claimed, resolves there")
    if resolved is None:
        found = f"does not resolve ({resolve_error})" if resolve_error else "was not resolved"
    else:
        found = f"resolves to {', '.join(map(str, resolved)) or 'nothing'}"
    return Binding(
        None,
        "refused",
        f"name {name} is not bound to {ip}: it {found}, and no DNS answer of the gateway "
        f"gave {ip} to this client for it",
    )
