"""Pods by IP, from the Kubernetes API's list and watch events. Pure: objects in, answers out.

Rules (what ``lookup`` answers for an address):

1. A pod holds its addresses (``status.podIPs``, else ``status.podIP``) while it is live: not
   ``hostNetwork`` (its address is the node's, shared by every such pod and the node itself),
   not in phase ``Succeeded`` or ``Failed``, and not deleted. A pod that stops being live lets
   its addresses go at once.
2. When several live pods claim one address (the API can show a new pod before the old one's
   last update), the most recently created pod holds it; at equal creation times (the API's
   clock has seconds), the pod that claimed it last. A late update of the old pod never takes
   the address back from the new one.
3. The owner named by a pod's controller ``ownerReference`` is recorded; a ReplicaSet or Job is
   looked one step further up (to its Deployment or CronJob) by the edge that can ask the API,
   which reports the answer with ``set_owner``. Pods of that owner are attributed again then.
4. ``generation`` moves with every change of what ``lookup`` answers for some address (a new
   holder, another label, a resolved owner), and only then: a pod's status heartbeat changes
   nothing and keeps the decision path's caches.
5. ``replace`` (a new initial list, after a 410 Gone) swaps the whole view, or one namespace's
   when each namespace is watched on its own, keeping resolved owners; ``generation`` moves if
   any answer changed.

Workloads are built once per pod change (their ECS fields too), so a lookup is one dict get.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from egressgw.identity.workload import UNKNOWN, IPAddress, Peer, Workload

ATTRIBUTION = "kubernetes-pod-ip"
TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})
# Owners whose own owner is looked up: what users think of as the workload sits above them.
LOOKED_UP_KINDS = frozenset({"ReplicaSet", "Job"})
SHARED_SLACK = 10_000

OwnerKey = tuple[str, str, str]  # namespace, kind, name


@dataclass(frozen=True, slots=True)
class Pod:
    """What the index keeps of one pod."""

    uid: str
    namespace: str
    name: str
    created: str  # RFC 3339 UTC ("2026-12-04T10:00:00Z"): orders as text
    ips: tuple[IPAddress, ...]
    live: bool
    owner: tuple[str, str] | None  # the controller ownerReference's (kind, name)
    labels: Mapping[str, str]
    serviceaccount: str | None
    node: str | None


def _text(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} missing or not a string")
    return value


def parse_pod(obj: Mapping[str, Any]) -> Pod:
    """A pod object as the API sends it (JSON) -> Pod, or ValueError naming the bad field."""
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        raise ValueError("metadata missing")
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    if not isinstance(spec, Mapping) or not isinstance(status, Mapping):
        raise ValueError("spec or status is not an object")
    texts = [p.get("ip") for p in status.get("podIPs") or () if isinstance(p, Mapping)]
    if not texts and status.get("podIP"):
        texts = [status["podIP"]]
    ips = []
    for text in texts:
        if not isinstance(text, str):  # ip_address would take an int as an address
            raise ValueError(f"status.podIPs: {text!r} is not a string")
        try:
            ips.append(ipaddress.ip_address(text))
        except ValueError as e:
            raise ValueError(f"status.podIPs: {e}") from e
    owner = None
    for ref in meta.get("ownerReferences") or ():
        if isinstance(ref, Mapping) and ref.get("controller") is True:
            owner = (_text(ref.get("kind"), "ownerReference kind"), _text(ref.get("name"), "name"))
    labels = meta.get("labels") or {}
    if not isinstance(labels, Mapping):
        raise ValueError("metadata.labels is not an object")
    live = (
        not spec.get("hostNetwork", False)
        and status.get("phase") not in TERMINAL_PHASES
        and bool(ips)
    )
    serviceaccount, node = spec.get("serviceAccountName"), spec.get("nodeName")
    # Texts many pods repeat are interned: one copy each, not one per pod.
    return Pod(
        uid=_text(meta.get("uid"), "metadata.uid"),
        namespace=sys.intern(_text(meta.get("namespace"), "metadata.namespace")),
        name=_text(meta.get("name"), "metadata.name"),
        created=sys.intern(str(meta.get("creationTimestamp") or "")),
        ips=tuple(ips),
        live=live,
        owner=(sys.intern(owner[0]), sys.intern(owner[1])) if owner else None,
        labels={sys.intern(str(k)): sys.intern(str(v)) for k, v in labels.items()},
        serviceaccount=sys.intern(serviceaccount) if isinstance(serviceaccount, str) else None,
        node=sys.intern(node) if isinstance(node, str) and node else None,
    )


class PodIndex:
    """The ``Inventory`` of pods by address, kept by list and watch events."""

    def __init__(self) -> None:
        self.generation = 0
        # Parts equal between workloads, shared (Workload.make); emptied when it outgrows the
        # pods, so label sets of pods long gone do not stay.
        self._shared: dict[Any, Any] = {}
        self._owners: dict[OwnerKey, tuple[str, str] | None] = {}
        self._reset()

    def _reset(self) -> None:
        self._by_ip: dict[IPAddress, Workload] = {}
        self._pods: dict[str, Pod] = {}  # by uid: the live pods only
        self._workloads: dict[str, Workload] = {}  # by uid
        # address -> {uid: (created, claim number)}: who claims it; the greatest holds it.
        self._claims: dict[IPAddress, dict[str, tuple[str, int]]] = {}
        self._claim_count = 0
        # self._owners: (namespace, kind, name) of a ReplicaSet or Job -> its owner (kind, name),
        # or None when it has none; absent until looked up. Kept by _reset.
        self._owned: dict[OwnerKey, set[str]] = {}  # owner -> uids of its live pods

    def __len__(self) -> int:
        return len(self._pods)

    def lookup(self, peer: Peer) -> Workload:
        """The workload of the live pod holding the peer's address, or UNKNOWN."""
        return self._by_ip.get(peer.ip, UNKNOWN)

    def apply(self, kind: str, obj: Mapping[str, Any]) -> None:
        """Apply one watch event (``ADDED``, ``MODIFIED``, ``DELETED``) of a pod object."""
        pod = parse_pod(obj)
        if kind == "DELETED" or not pod.live:
            self._remove(pod.uid)
        else:
            self._put(pod)

    def replace(self, objects: Iterable[Mapping[str, Any]], namespace: str | None = None) -> None:
        """Replace the view (of one namespace, or all) with a list's pods; owners are kept.

        Every object is read first: one that cannot be raises ValueError and changes nothing.
        """
        self.replace_pods(list(map(parse_pod, objects)), namespace)

    def replace_pods(self, pods: Iterable[Pod], namespace: str | None = None) -> None:
        """``replace`` with pods already read."""
        kept = [
            p for p in self._pods.values() if namespace is not None and p.namespace != namespace
        ]
        pods = [*kept, *(p for p in pods if p.live)]
        before, generation = self._by_ip, self.generation
        self._shared.clear()
        self._reset()  # a fresh state, built by the same rules as the events build it
        for pod in pods:
            self._put(pod)
        self.generation = generation
        after = self._by_ip
        if before.keys() != after.keys() or any(
            not w.same_as(before[ip]) for ip, w in after.items()
        ):
            self.generation += 1

    def missing_owners(self) -> set[OwnerKey]:
        """ReplicaSets and Jobs owning live pods whose own owner is not known yet."""
        return {key for key in self._owned if key not in self._owners}

    def set_owner(self, key: OwnerKey, parent: tuple[str, str] | None) -> None:
        """Record the owner of a ReplicaSet or Job (None: it has none) and attribute its pods."""
        if key in self._owners and self._owners[key] == parent:
            return
        self._owners[key] = parent
        for uid in list(self._owned.get(key, ())):
            self._put(self._pods[uid])

    # -- the state changes -----------------------------------------------------------------------
    def _owner_key(self, pod: Pod) -> OwnerKey | None:
        if pod.owner is None or pod.owner[0] not in LOOKED_UP_KINDS:
            return None
        return (pod.namespace, *pod.owner)

    def _workload(self, pod: Pod) -> Workload:
        owners: tuple[tuple[str, str], ...] = ()
        if pod.owner is not None:
            owners = (pod.owner,)
            key = self._owner_key(pod)
            parent = self._owners.get(key) if key is not None else None
            if parent is not None:
                owners += (parent,)
        return Workload.make(
            pod.namespace,
            pod.name,
            pod.labels,
            pod.serviceaccount,
            pod.node,
            uid=pod.uid,
            owners=owners,
            attribution=ATTRIBUTION,
            shared=self._shared,
        )

    def _put(self, pod: Pod) -> None:
        old = self._pods.get(pod.uid)
        if len(self._shared) > 4 * len(self._pods) + SHARED_SLACK:
            self._shared.clear()
        workload = self._workload(pod)
        if pod.labels is not workload.label_map and pod.labels == workload.label_map:
            pod = dataclasses.replace(pod, labels=workload.label_map)  # one copy of the labels
        self._pods[pod.uid] = pod
        previous = self._workloads.get(pod.uid)
        if previous is not None and previous.same_as(workload):
            workload = previous  # unchanged: keep the object the caches hold
        self._workloads[pod.uid] = workload
        key = self._owner_key(pod)
        if old is not None:
            old_key = self._owner_key(old)
            if old_key is not None and old_key != key:
                self._disown(old_key, pod.uid)
            for ip in old.ips:
                if ip not in pod.ips:
                    self._unclaim(ip, pod.uid)
        if key is not None:
            self._owned.setdefault(key, set()).add(pod.uid)
        for ip in pod.ips:
            claims = self._claims.setdefault(ip, {})
            if pod.uid not in claims:
                self._claim_count += 1
                claims[pod.uid] = (pod.created, self._claim_count)
            self._settle(ip)

    def _remove(self, uid: str) -> None:
        pod = self._pods.pop(uid, None)
        if pod is None:
            return
        del self._workloads[uid]
        key = self._owner_key(pod)
        if key is not None:
            self._disown(key, uid)
        for ip in pod.ips:
            self._unclaim(ip, uid)

    def _disown(self, key: OwnerKey, uid: str) -> None:
        uids = self._owned.get(key)
        if uids is not None:
            uids.discard(uid)
            if not uids:
                del self._owned[key]
                # Forgotten with its last pod: the cache of owners stays as big as the cluster.
                self._owners.pop(key, None)

    def _unclaim(self, ip: IPAddress, uid: str) -> None:
        claims = self._claims.get(ip)
        if claims is not None and claims.pop(uid, None) is not None:
            if not claims:
                del self._claims[ip]
            self._settle(ip)

    def _settle(self, ip: IPAddress) -> None:
        """Give the address to its rightful holder; move ``generation`` if the answer changed."""
        claims = self._claims.get(ip)
        current = self._by_ip.get(ip)
        if not claims:
            if current is not None:
                del self._by_ip[ip]
                self.generation += 1
            return
        holder = max(claims, key=claims.__getitem__)
        workload = self._workloads[holder]
        if current is workload:
            return
        self._by_ip[ip] = workload
        if current is None or not current.same_as(workload):
            self.generation += 1
