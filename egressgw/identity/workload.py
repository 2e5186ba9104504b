"""Who is talking: a peer (address, and the credential it presented, if any) -> workload.

An inventory answers ``lookup(peer) -> Workload``; a source it does not know is ``UNKNOWN`` (a
workload with no namespace), which policy can select with ``from: {unknown: true}``. The static
inventory (``identity.static``) maps CIDRs to workloads by address; the Kubernetes watcher and a
verifier of client certificates or service-account tokens implement the same ``Inventory``
protocol and may use the peer's credential.

A credential is what the client presented, unverified until an inventory verifies it: the
``Proxy-Authorization`` header (read by the listener, never forwarded), later a TLS client
certificate. Its value is a secret: it is never logged or put in an event.

An inventory lives as long as the process and changes in place (a reload with other static
entries, a watch event): its ``generation`` changes with every change of what ``lookup`` may
answer, and the decision path's outcome cache holds only while it stays the same.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


# The owner kinds events name by their ECS field (``kubernetes.<kind>.name``).
OWNER_KINDS = {
    "ReplicaSet": "replicaset",
    "Deployment": "deployment",
    "StatefulSet": "statefulset",
    "DaemonSet": "daemonset",
    "Job": "job",
    "CronJob": "cronjob",
}
# Labels naming the app, most specific first: the first present becomes ``service.name``.
SERVICE_LABELS = ("app.kubernetes.io/name", "app")


@dataclass(frozen=True, slots=True)
class Workload:
    """A workload as policy and events see it; hashable so decisions can be cached per workload."""

    namespace: str | None = None
    pod: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    serviceaccount: str | None = None
    node: str | None = None
    label_map: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)
    # The ECS ``kubernetes.*`` object of this workload, built once and shared by every event.
    ecs: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    # Other top-level ECS fields of its events (``service``, ``egressgw.attribution``), built
    # once too: an event adds them with one dict update.
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    # A pod replaced by one of the same name (a StatefulSet's) is another workload.
    uid: str | None = None

    @classmethod
    def make(
        cls,
        namespace: str | None,
        pod: str | None = None,
        labels: Mapping[str, str] | None = None,
        serviceaccount: str | None = None,
        node: str | None = None,
        *,
        uid: str | None = None,
        owners: tuple[tuple[str, str], ...] = (),
        attribution: str | None = None,
        shared: dict[Any, Any] | None = None,
    ) -> Workload:
        """Build a workload from plain values (labels as a mapping; owners as (kind, name)).

        ``shared``, a table kept by the caller, lets workloads share their equal parts (the
        labels of one ReplicaSet's pods, a node's name): a big inventory's memory then grows
        with what differs. Nobody changes these parts, so sharing them is safe.
        """
        table: dict[Any, Any] = {} if shared is None else shared
        items = tuple(sorted((labels or {}).items()))
        items, label_map = _share(table, ("labels", items), lambda: (items, dict(items)))
        ecs: dict[str, Any] = {"namespace": namespace}
        if pod:
            ecs["pod"] = {"name": pod, "uid": uid} if uid else {"name": pod}
        if items:
            ecs["labels"] = label_map
        if serviceaccount:
            ecs["serviceaccount"] = _share(
                table, ("sa", serviceaccount), lambda: {"name": serviceaccount}
            )
        if node:
            ecs["node"] = _share(table, ("node", node), lambda: {"name": node})
        for kind, name in owners:
            ecs_kind = OWNER_KINDS.get(kind)
            if ecs_kind is not None:
                ecs[ecs_kind] = _share(table, (kind, name), partial(dict, name=name))
        service = next((label_map[k] for k in SERVICE_LABELS if k in label_map), None)

        def make_extra() -> dict[str, Any]:
            extra: dict[str, Any] = {}
            if service:
                extra["service"] = {"name": service}
            if attribution:
                extra["egressgw"] = {"attribution": attribution}
            return extra

        extra = _share(table, ("extra", service, attribution), make_extra)
        return cls(namespace, pod, items, serviceaccount, node, label_map, ecs, extra, uid)

    def same_as(self, other: Workload) -> bool:
        """True when both would select and record alike (every field, events' included)."""
        return self == other and self.ecs == other.ecs and self.extra == other.extra

    @property
    def known(self) -> bool:
        """True when the source was attributed to a workload."""
        return self.namespace is not None


UNKNOWN = Workload()


def _share(table: dict[Any, Any], key: Any, make: Callable[[], Any]) -> Any:
    found = table.get(key)
    if found is None:
        found = table[key] = make()
    return found


@dataclass(frozen=True, slots=True)
class Credential:
    """A credential a client presented: ``scheme`` (lowercase, e.g. ``bearer``) and its value."""

    scheme: str
    value: str = field(repr=False)  # a secret: kept out of reprs and logs


def parse_credential(header: bytes) -> Credential:
    """A ``Proxy-Authorization`` value -> Credential, or ValueError (RFC 9110 section 11.4)."""
    scheme, _, value = header.strip().partition(b" ")
    if not scheme or not value.strip():
        raise ValueError("Proxy-Authorization needs a scheme and credentials")
    try:
        return Credential(scheme.decode("ascii").lower(), value.strip().decode("ascii"))
    except UnicodeDecodeError as e:
        raise ValueError("Proxy-Authorization is not ASCII") from e


@dataclass(frozen=True, slots=True)
class Peer:
    """The other end of a client connection, as an inventory judges it."""

    ip: IPAddress
    credential: Credential | None = None


class Inventory(Protocol):
    """What identity sources provide to the proxy."""

    @property
    def generation(self) -> int:
        """Changes whenever ``lookup`` may answer differently for some peer."""
        ...

    def lookup(self, peer: Peer) -> Workload:
        """Return the workload behind a peer, or UNKNOWN."""
        ...


class FirstKnown:
    """Inventories asked in order: the first that knows the peer answers (pods, then CIDRs)."""

    def __init__(self, *inventories: Inventory) -> None:
        self.inventories = inventories

    @property
    def generation(self) -> int:
        """Moves when any inventory's does (each only grows, so their sum does too)."""
        return sum(i.generation for i in self.inventories)

    def lookup(self, peer: Peer) -> Workload:
        """The first known answer, or UNKNOWN."""
        for inventory in self.inventories:
            found = inventory.lookup(peer)
            if found.namespace is not None:
                return found
        return UNKNOWN
