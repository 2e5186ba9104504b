"""The real gateway attributing flows by pods it watches on the (stand-in) Kubernetes API."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.egressgw.identity.test_podindex import pod
from tests.support import Gateway, TlsFiles, Upstream, curl, write_config
from tests.support.dnsmasq import Dnsmasq
from tests.support.gateway import Event, decision_of, field
from tests.support.kube_apiserver import KubeApiServer, ThreadedKubeApi

from .testbed import CONTRACT_DIR, HTTPS_PORT

pytestmark = pytest.mark.integration

POD_IP = "127.0.0.7"
ATTRIBUTION_TIMEOUT = 10.0


@pytest.fixture
def apiserver(tmp_path: Path) -> Iterator[tuple[ThreadedKubeApi, KubeApiServer]]:
    """The stand-in API server in a thread of its own."""
    threaded = ThreadedKubeApi(tmp_path / "api", bookmark_interval=0.5)
    with threaded as server:
        yield threaded, server


def flow_from(gw: Gateway, pki: TlsFiles) -> Event:
    """CONNECT from the pod address to api.partner.test (allowed for all); its decision event."""
    result = curl(
        f"https://api.partner.test:{HTTPS_PORT}/",
        proxy=gw.proxy_url,
        interface=POD_IP,
        cacert=pki.ca_cert,
    )
    assert result.status == 200, (result.status, result.error)
    return decision_of(gw.flow_events(result.local_ip, result.local_port))


def attributed(gw: Gateway, pki: TlsFiles, **expect: object) -> Event:
    """The first flow whose fields (dots spelt ``__``) are ``expect``, trying until the deadline.

    The index follows the API a moment later, and a pod's owner above its ReplicaSet is read
    after the pod arrives (until then the flow names the direct owner), so a caller waits for
    each field it goes on to check.
    """
    deadline = time.monotonic() + ATTRIBUTION_TIMEOUT
    while True:
        event = flow_from(gw, pki)
        if time.monotonic() > deadline or all(
            field(event, key.replace("__", ".")) == value for key, value in expect.items()
        ):
            return event
        time.sleep(0.05)


def test_flows_are_attributed_to_the_pod_holding_the_address(
    tmp_path: Path,
    apiserver: tuple[ThreadedKubeApi, KubeApiServer],
    dns: Dnsmasq,
    upstream: Upstream,
    pki: TlsFiles,
    curl_installed: None,
) -> None:
    """A new pod's flows carry its fields; when its address moves, the next flow is the other's."""
    threaded, server = apiserver
    rs: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "ReplicaSet",
        "metadata": {
            "name": "api-7d",
            "namespace": "payments",
            "ownerReferences": [{"kind": "Deployment", "name": "api", "controller": True}],
        },
    }
    threaded.call(server.create, rs)
    path = write_config(
        tmp_path / "gw",
        CONTRACT_DIR,
        nameserver=dns.nameserver,
        overrides={"identity": {"kubernetes": {"kubeconfig": str(server.kubeconfig)}}},
    )
    with Gateway(path) as gw:
        first = pod(
            "api-7d-x",
            POD_IP,
            labels={"app.kubernetes.io/name": "api", "team": "payments"},
            owner=("ReplicaSet", "api-7d"),
        )
        threaded.call(server.create, first)
        event = attributed(
            gw, pki, kubernetes__pod__name="api-7d-x", kubernetes__deployment__name="api"
        )
        assert field(event, "kubernetes.namespace") == "payments"
        assert field(event, "kubernetes.pod.name") == "api-7d-x"
        assert field(event, "kubernetes.pod.uid") == "uid-api-7d-x"
        assert field(event, "kubernetes.labels") == {
            "app.kubernetes.io/name": "api",
            "team": "payments",
        }
        assert field(event, "kubernetes.node.name") == "node-1"
        assert field(event, "kubernetes.deployment.name") == "api"
        assert field(event, "service.name") == "api"
        assert field(event, "egressgw.attribution") == "kubernetes-pod-ip"

        threaded.call(server.delete, "Pod", "api-7d-x", "payments")
        second = pod(
            "report-1",
            POD_IP,
            namespace="batch",
            labels={"app": "report"},
            owner=("StatefulSet", "report"),
            node="node-2",
        )
        threaded.call(server.create, second)
        event = attributed(gw, pki, kubernetes__pod__name="report-1")
        assert field(event, "kubernetes.namespace") == "batch"
        assert field(event, "kubernetes.statefulset.name") == "report"
        assert field(event, "kubernetes.node.name") == "node-2"
        assert field(event, "kubernetes.deployment") is None

        threaded.call(server.delete, "Pod", "report-1", "batch")
        event = attributed(gw, pki, kubernetes=None)  # the address is no pod's
        assert field(event, "kubernetes") is None
