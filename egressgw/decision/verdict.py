"""The outcome of deciding a flow: one value the proxy acts on and the events record.

``action`` is the ECS ``event.action``: ``connection_allowed``; ``would_deny`` (allowed, but an
audit-mode rule would have denied it: the flow goes through and the event says which rule);
``connection_denied``. ``status`` is 200 when allowed, else the HTTP status a refusal is answered
with (403 policy, guard or feed; 502 the name did not resolve or the destination was
unreachable). ``ip`` is the checked address to connect to, set only when allowed. ``decision``
is policy's decision when policy decided (the guard and DNS refuse before it).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal

from egressgw.decision.policy import Decision

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
FlowAction = Literal["connection_allowed", "connection_denied", "would_deny"]


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the proxy does with a flow: connect to ``ip``, or answer ``status`` with ``reason``."""

    # A field, not a property of ``action``: it is read on every flow, and a property is a call.
    allowed: bool
    action: FlowAction
    status: int
    reason: str
    ip: IPAddress | None = None
    decision: Decision | None = None

    @classmethod
    def allow(cls, ip: IPAddress, reason: str, decision: Decision | None = None) -> Verdict:
        """Allowed to ``ip``; ``would_deny`` when an audit-mode rule would have refused it."""
        if decision is not None and decision.audits:
            return cls(
                True, "would_deny", 200, f"{'; '.join(decision.audits)}; {reason}", ip, decision
            )
        return cls(True, "connection_allowed", 200, reason, ip, decision)

    @classmethod
    def deny(cls, reason: str, status: int = 403, decision: Decision | None = None) -> Verdict:
        """Refused, answered with ``status``."""
        return cls(False, "connection_denied", status, reason, None, decision)

    def unreachable(self, status: int) -> Verdict:
        """This verdict once its allowed destination could not be reached (502 or 504).

        The flow is refused; an audited flow keeps ``would_deny`` so the audit is not lost.
        """
        action: FlowAction = "would_deny" if self.action == "would_deny" else "connection_denied"
        return Verdict(False, action, status, self.reason, self.ip, self.decision)


# The verdict of a flow refused before anything decided it (a malformed request).
UNDECIDED = Verdict.deny("not decided", status=400)
