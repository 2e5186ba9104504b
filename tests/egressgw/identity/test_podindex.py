"""Tests of the pod index (pure core): pods by address, under churn, with owners."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egressgw.identity.podindex import PodIndex, parse_pod
from egressgw.identity.workload import UNKNOWN, Peer, Workload


def pod(
    name: str,
    ip: str | None = "10.0.0.1",
    *,
    uid: str | None = None,
    namespace: str = "payments",
    labels: dict[str, str] | None = None,
    phase: str = "Running",
    created: str = "2026-12-04T10:00:00Z",
    owner: tuple[str, str] | None = None,
    host_network: bool = False,
    node: str = "node-1",
    ips: list[str] | None = None,
) -> dict[str, Any]:
    """A pod object as the API sends it."""
    meta: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "uid": uid or f"uid-{name}",
        "creationTimestamp": created,
        "labels": labels if labels is not None else {"app": "api"},
    }
    if owner:
        meta["ownerReferences"] = [
            {"apiVersion": "apps/v1", "kind": owner[0], "name": owner[1], "controller": True}
        ]
    status: dict[str, Any] = {"phase": phase}
    if ip:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": i} for i in (ips or [ip])]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {"nodeName": node, "serviceAccountName": "api", "hostNetwork": host_network},
        "status": status,
    }


def at(index: PodIndex, ip: str) -> Workload:
    """What the index answers for an address."""
    return index.lookup(Peer(ipaddress.ip_address(ip)))


def test_a_pod_is_found_by_each_of_its_addresses_with_every_field() -> None:
    """Namespace, name, uid, labels, service account, node and owner come from the pod."""
    index = PodIndex()
    index.apply("ADDED", pod("api-1", ips=["10.0.0.1", "fd00::1"], owner=("StatefulSet", "api")))
    w = at(index, "10.0.0.1")
    assert (w.namespace, w.pod, w.uid, w.serviceaccount, w.node) == (
        "payments",
        "api-1",
        "uid-api-1",
        "api",
        "node-1",
    )
    assert w.ecs["pod"] == {"name": "api-1", "uid": "uid-api-1"}
    assert w.ecs["statefulset"] == {"name": "api"}
    assert w.extra == {"service": {"name": "api"}, "egressgw": {"attribution": "kubernetes-pod-ip"}}
    assert at(index, "fd00::1") is w
    assert at(index, "10.0.0.2") is UNKNOWN


def test_service_name_prefers_the_recommended_label() -> None:
    """``app.kubernetes.io/name`` names the service before ``app``; neither: no service."""
    index = PodIndex()
    index.apply("ADDED", pod("a", "10.0.0.1", labels={"app": "x", "app.kubernetes.io/name": "y"}))
    index.apply("ADDED", pod("b", "10.0.0.2", labels={"team": "t"}))
    assert at(index, "10.0.0.1").extra["service"] == {"name": "y"}
    assert "service" not in at(index, "10.0.0.2").extra


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_finished_pods_drop_out_at_once(phase: str) -> None:
    """A pod that ended holds its address no more, though not yet deleted."""
    index = PodIndex()
    index.apply("ADDED", pod("job-1"))
    index.apply("MODIFIED", pod("job-1", phase=phase))
    assert at(index, "10.0.0.1") is UNKNOWN


def test_deleted_pods_drop_out() -> None:
    """A DELETED event lets the address go."""
    index = PodIndex()
    index.apply("ADDED", pod("api-1"))
    index.apply("DELETED", pod("api-1"))
    assert at(index, "10.0.0.1") is UNKNOWN
    assert len(index) == 0


def test_host_network_pods_never_match() -> None:
    """A hostNetwork pod's address is its node's: it never attributes by address."""
    index = PodIndex()
    index.apply("ADDED", pod("kube-proxy", "10.1.0.5", host_network=True))
    assert at(index, "10.1.0.5") is UNKNOWN


def test_a_new_pod_reusing_an_address_replaces_the_old_one() -> None:
    """The newest pod holds a reused address, even when the old one's late update comes after."""
    index = PodIndex()
    index.apply("ADDED", pod("old", created="2026-12-04T10:00:00Z"))
    index.apply("ADDED", pod("new", created="2026-12-04T10:05:00Z"))
    assert at(index, "10.0.0.1").pod == "new"
    index.apply("MODIFIED", pod("old", created="2026-12-04T10:00:00Z", labels={"x": "y"}))
    assert at(index, "10.0.0.1").pod == "new"
    index.apply("DELETED", pod("old"))
    assert at(index, "10.0.0.1").pod == "new"


def test_delete_and_readd_with_the_same_address_in_one_batch() -> None:
    """Delete then add with one address, created the same second: the added pod holds it."""
    index = PodIndex()
    index.apply("ADDED", pod("web-0", uid="u1", owner=("StatefulSet", "web")))
    index.apply("DELETED", pod("web-0", uid="u1", owner=("StatefulSet", "web")))
    index.apply("ADDED", pod("web-0", uid="u2", owner=("StatefulSet", "web")))
    assert at(index, "10.0.0.1").uid == "u2"


def test_equal_creation_times_the_last_claim_wins() -> None:
    """Two pods created the same second claim one address: the later claim holds it."""
    index = PodIndex()
    index.apply("ADDED", pod("a"))
    index.apply("ADDED", pod("b"))
    assert at(index, "10.0.0.1").pod == "b"
    index.apply("DELETED", pod("b"))
    assert at(index, "10.0.0.1").pod == "a"


def test_a_pod_moving_address_lets_the_old_one_go() -> None:
    """A pod whose address changes is found at the new one only."""
    index = PodIndex()
    index.apply("ADDED", pod("a", "10.0.0.1"))
    index.apply("MODIFIED", pod("a", "10.0.0.2"))
    assert at(index, "10.0.0.1") is UNKNOWN
    assert at(index, "10.0.0.2").pod == "a"


def test_generation_moves_only_when_an_answer_changes() -> None:
    """Adds, label changes and deletes move it; a status update that changes nothing does not."""
    index = PodIndex()
    g0 = index.generation
    index.apply("ADDED", pod("a"))
    g1 = index.generation
    assert g1 > g0
    held = at(index, "10.0.0.1")
    index.apply("MODIFIED", pod("a"))
    assert index.generation == g1 and at(index, "10.0.0.1") is held
    index.apply("MODIFIED", pod("a", labels={"app": "other"}))
    g2 = index.generation
    assert g2 > g1
    index.apply("ADDED", pod("pending", None))  # no address yet: no answer changes
    assert index.generation == g2
    index.apply("DELETED", pod("a"))
    assert index.generation > g2


def test_owners_are_resolved_through_replicasets_and_jobs() -> None:
    """A ReplicaSet's Deployment and a Job's CronJob join the pods' fields once looked up."""
    index = PodIndex()
    index.apply("ADDED", pod("api-7d-x", "10.0.0.1", owner=("ReplicaSet", "api-7d")))
    index.apply("ADDED", pod("report-1-y", "10.0.0.2", owner=("Job", "report-1")))
    index.apply("ADDED", pod("once-z", "10.0.0.3", owner=("Job", "once")))
    assert index.missing_owners() == {
        ("payments", "ReplicaSet", "api-7d"),
        ("payments", "Job", "report-1"),
        ("payments", "Job", "once"),
    }
    assert at(index, "10.0.0.1").ecs["replicaset"] == {"name": "api-7d"}
    g = index.generation
    index.set_owner(("payments", "ReplicaSet", "api-7d"), ("Deployment", "api"))
    index.set_owner(("payments", "Job", "report-1"), ("CronJob", "report"))
    index.set_owner(("payments", "Job", "once"), None)
    assert index.generation > g
    assert at(index, "10.0.0.1").ecs["deployment"] == {"name": "api"}
    assert at(index, "10.0.0.2").ecs["cronjob"] == {"name": "report"}
    assert at(index, "10.0.0.2").ecs["job"] == {"name": "report-1"}
    assert "cronjob" not in at(index, "10.0.0.3").ecs
    assert index.missing_owners() == set()
    g = index.generation
    index.set_owner(("payments", "Job", "once"), None)  # told again: nothing changes
    assert index.generation == g


def test_owners_are_remembered_for_new_pods_and_forgotten_with_the_last() -> None:
    """A new pod of a known ReplicaSet needs no lookup; once its last pod goes, it is forgotten."""
    index = PodIndex()
    index.apply("ADDED", pod("api-7d-x", "10.0.0.1", owner=("ReplicaSet", "api-7d")))
    index.set_owner(("payments", "ReplicaSet", "api-7d"), ("Deployment", "api"))
    index.apply("ADDED", pod("api-7d-y", "10.0.0.2", owner=("ReplicaSet", "api-7d")))
    assert at(index, "10.0.0.2").ecs["deployment"] == {"name": "api"}
    assert index.missing_owners() == set()
    index.apply("DELETED", pod("api-7d-x", owner=("ReplicaSet", "api-7d")))
    index.apply("DELETED", pod("api-7d-y", owner=("ReplicaSet", "api-7d")))
    index.apply("ADDED", pod("api-7d-z", "10.0.0.3", owner=("ReplicaSet", "api-7d")))
    assert index.missing_owners() == {("payments", "ReplicaSet", "api-7d")}


def test_replace_swaps_the_view_and_keeps_owners() -> None:
    """A re-list drops pods it lacks, keeps resolved owners, and moves generation on change only."""
    index = PodIndex()
    index.apply("ADDED", pod("gone", "10.0.0.9"))
    index.apply("ADDED", pod("api-7d-x", "10.0.0.1", owner=("ReplicaSet", "api-7d")))
    index.set_owner(("payments", "ReplicaSet", "api-7d"), ("Deployment", "api"))
    index.replace([pod("api-7d-x", "10.0.0.1", owner=("ReplicaSet", "api-7d"))])
    assert at(index, "10.0.0.9") is UNKNOWN
    assert at(index, "10.0.0.1").ecs["deployment"] == {"name": "api"}
    g = index.generation
    index.replace([pod("api-7d-x", "10.0.0.1", owner=("ReplicaSet", "api-7d"))])
    assert index.generation == g


def test_replace_with_a_bad_object_changes_nothing() -> None:
    """One unreadable pod in a list: ValueError, and the index keeps its view."""
    index = PodIndex()
    index.apply("ADDED", pod("a"))
    with pytest.raises(ValueError):
        index.replace([pod("b", "10.0.0.2"), {"metadata": {"name": "x"}}])
    assert at(index, "10.0.0.1").pod == "a"
    assert at(index, "10.0.0.2") is UNKNOWN


@pytest.mark.parametrize(
    "obj",
    [
        {},
        {"metadata": {"name": "a", "namespace": "n"}},
        {"metadata": {"name": "a", "namespace": "n", "uid": "u"}, "status": {"podIP": "nope"}},
        {"metadata": {"name": "a", "namespace": "n", "uid": "u"}, "status": {"podIP": 167772161}},
    ],
)
def test_parse_pod_refuses_unreadable_objects(obj: dict[str, Any]) -> None:
    """No uid, a bad address, an address that is not text: ValueError."""
    with pytest.raises(ValueError):
        parse_pod(obj)


# ---- properties: incremental events agree with a fresh list of the end state ------------------

NAMES = ["a", "b", "c", "d"]
IPS = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]


@st.composite
def events(draw: st.DrawFn) -> list[tuple[str, dict[str, Any]]]:
    """A sequence of watch events over a few pods sharing few addresses."""
    out = []
    for _ in range(draw(st.integers(0, 30))):
        name = draw(st.sampled_from(NAMES))
        generation = draw(st.integers(0, 2))  # the same name recreated: another uid
        kind = draw(st.sampled_from(["ADDED", "MODIFIED", "DELETED"]))
        obj = pod(
            name,
            draw(st.sampled_from([*IPS, None])),
            uid=f"{name}-{generation}",
            # Distinct creation times per uid: which pod holds an address is then a function
            # of the live pods alone, whatever order the events came in.
            created=f"2026-12-04T10:{NAMES.index(name):02d}:{generation:02d}Z",
            phase=draw(st.sampled_from(["Running", "Pending", "Succeeded"])),
            labels={"v": str(draw(st.integers(0, 1)))},
            host_network=draw(st.booleans()),
        )
        out.append((kind, obj))
    return out


def answers(index: PodIndex) -> dict[str, tuple[Any, ...]]:
    """Every address's answer, as comparable values."""
    out = {}
    for ip in IPS:
        w = at(index, ip)
        out[ip] = (w, dict(w.ecs), dict(w.extra))
    return out


@settings(max_examples=300, deadline=None)
@given(events())
def test_events_agree_with_a_list_of_the_end_state(evs: list[tuple[str, dict[str, Any]]]) -> None:
    """After any events, each address is answered as a fresh list of the surviving pods would."""
    index = PodIndex()
    alive: dict[str, dict[str, Any]] = {}
    for kind, obj in evs:
        index.apply(kind, obj)
        uid = obj["metadata"]["uid"]
        if kind == "DELETED":
            alive.pop(uid, None)
        else:
            alive[uid] = obj
    fresh = PodIndex()
    fresh.replace(alive.values())
    assert answers(index) == answers(fresh)


@settings(max_examples=300, deadline=None)
@given(events())
def test_generation_moves_exactly_when_an_answer_changes(
    evs: list[tuple[str, dict[str, Any]]],
) -> None:
    """Each event moves generation if and only if some address is answered differently."""
    index = PodIndex()
    for kind, obj in evs:
        before, g = answers(index), index.generation
        index.apply(kind, obj)
        assert (answers(index) != before) == (index.generation != g)


def test_replace_of_one_namespace_keeps_the_others() -> None:
    """A namespace's re-list replaces its pods only."""
    index = PodIndex()
    index.apply("ADDED", pod("a", "10.0.0.1", namespace="one"))
    index.apply("ADDED", pod("b", "10.0.0.2", namespace="two"))
    index.replace([pod("c", "10.0.0.3", namespace="one")], namespace="one")
    assert at(index, "10.0.0.1") is UNKNOWN
    assert at(index, "10.0.0.2").pod == "b"
    assert at(index, "10.0.0.3").pod == "c"
