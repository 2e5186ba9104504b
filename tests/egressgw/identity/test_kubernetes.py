"""Tests of the pod watch against the stand-in API server, through the real client library."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from egressgw.identity.kubernetes import PodWatcher
from egressgw.identity.podindex import PodIndex
from egressgw.identity.workload import UNKNOWN, Peer, Workload
from egressgw.kube import Api
from siem.tasks import spawn
from tests.egressgw.identity.test_podindex import pod
from tests.support.kube_apiserver import TRUE, KubeApiServer


async def eventually(check: Callable[[], bool], within: float = 2.0) -> None:
    """Wait until ``check()`` holds, or fail after ``within`` seconds."""
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def at(index: PodIndex, ip: str) -> Workload:
    """The index's answer for an address."""
    return index.lookup(Peer(ipaddress.ip_address(ip)))


@pytest.fixture
async def apiserver(tmp_path: Path) -> AsyncIterator[KubeApiServer]:
    """The stand-in API server, with bookmarks every 0.2 s."""
    async with KubeApiServer(tmp_path, bookmark_interval=0.2) as server:
        yield server


class Running:
    """A PodWatcher running against the stand-in."""

    def __init__(self, server: KubeApiServer, **options: Any) -> None:
        self.server = server
        self.index = PodIndex()
        self.api = Api(server.kubeconfig)
        self.options = options

    async def __aenter__(self) -> Running:
        await self.api.open()
        self.watcher = PodWatcher(
            self.index, self.api, backoff=(0.02, 0.1), watch_timeout=5, **self.options
        )
        self.task = spawn(self.watcher.run(), name="test pod watcher")
        await eventually(lambda: self.watcher.ready)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.api.aclose()

    @property
    def watch(self) -> Any:
        """The (only) list-and-watch."""
        return self.watcher.watches[0]


async def test_list_then_watch_follows_pods(apiserver: KubeApiServer) -> None:
    """Listed pods are found at once; created and deleted ones change answers within a second."""
    apiserver.create(pod("api-1", "10.0.0.1"))
    async with Running(apiserver) as run:
        assert at(run.index, "10.0.0.1").pod == "api-1"
        apiserver.create(pod("api-2", "10.0.0.2"))
        await eventually(lambda: at(run.index, "10.0.0.2").pod == "api-2", 1.0)
        apiserver.delete("Pod", "api-1", "payments")
        await eventually(lambda: at(run.index, "10.0.0.1") is UNKNOWN, 1.0)
        assert run.watch.lists == 1
    watches = [q for m, p, q in apiserver.requests if q.get("watch")]
    assert watches and all(q["watch"] in TRUE for q in watches)
    assert all(q.get("allowWatchBookmarks") in TRUE for q in watches)


async def test_delete_and_readd_with_one_address_in_one_batch(apiserver: KubeApiServer) -> None:
    """A pod deleted and created again with its address before the watch reads: the new one."""
    apiserver.create(pod("web-0", "10.0.0.7", uid="u1", owner=("StatefulSet", "web")))
    async with Running(apiserver) as run:
        apiserver.delete("Pod", "web-0", "payments")
        apiserver.create(pod("web-0", "10.0.0.7", uid="u2", owner=("StatefulSet", "web")))
        await eventually(lambda: at(run.index, "10.0.0.7").uid == "u2", 1.0)
        await asyncio.sleep(0.3)  # and stays so
        assert at(run.index, "10.0.0.7").uid == "u2"


async def test_owners_are_looked_up_once(apiserver: KubeApiServer) -> None:
    """ReplicaSet -> Deployment and Job -> CronJob are read from the API, once per owner."""
    apiserver.create(
        {
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "metadata": {
                "name": "api-7d",
                "namespace": "payments",
                "ownerReferences": [{"kind": "Deployment", "name": "api", "controller": True}],
            },
        }
    )
    apiserver.create(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {
                "name": "report-1",
                "namespace": "payments",
                "ownerReferences": [{"kind": "CronJob", "name": "report", "controller": True}],
            },
        }
    )
    apiserver.create(pod("api-7d-a", "10.0.0.1", owner=("ReplicaSet", "api-7d")))
    apiserver.create(pod("api-7d-b", "10.0.0.2", owner=("ReplicaSet", "api-7d")))
    apiserver.create(pod("report-1-x", "10.0.0.3", owner=("Job", "report-1")))
    async with Running(apiserver) as run:
        assert at(run.index, "10.0.0.1").ecs["deployment"] == {"name": "api"}
        assert at(run.index, "10.0.0.3").ecs["cronjob"] == {"name": "report"}
        apiserver.create(pod("api-7d-c", "10.0.0.4", owner=("ReplicaSet", "api-7d")))
        await eventually(lambda: "deployment" in at(run.index, "10.0.0.4").ecs, 1.0)
    reads = [p for m, p, q in apiserver.requests if p.endswith("/replicasets/api-7d")]
    assert len(reads) == 1


async def test_410_as_an_error_event_lists_again(apiserver: KubeApiServer) -> None:
    """A watch answered with an ERROR 410 lists again and misses nothing."""
    apiserver.create(pod("a", "10.0.0.1"))
    async with Running(apiserver) as run:
        apiserver.fail("/pods", watch=True, error_event=410)
        apiserver.cut_watches()
        apiserver.create(pod("b", "10.0.0.2"))
        await eventually(lambda: run.watch.lists >= 2)
        await eventually(lambda: at(run.index, "10.0.0.2").pod == "b", 1.0)


async def test_a_too_old_resource_version_lists_again(apiserver: KubeApiServer) -> None:
    """History compacted while disconnected: the resumed watch gets 410 and lists again."""
    apiserver.create(pod("a", "10.0.0.1"))
    async with Running(apiserver) as run:
        apiserver.fail("/pods", watch=True, status=500, count=1000)  # watches fail...
        apiserver.cut_watches()  # ...once this one is cut
        await eventually(lambda: run.watch.failures >= 1)
        apiserver.delete("Pod", "a", "payments")
        apiserver.create(pod("b", "10.0.0.2"))
        apiserver.compact()
        apiserver.faults.clear()
        await eventually(lambda: run.watch.lists >= 2)
        await eventually(lambda: at(run.index, "10.0.0.2").pod == "b", 1.0)
        assert at(run.index, "10.0.0.1") is UNKNOWN


async def test_410_as_a_list_response_lists_again(apiserver: KubeApiServer) -> None:
    """A list answered 410 (an expired continue token) is started again from scratch."""
    for i in range(5):
        apiserver.create(pod(f"p{i}", f"10.0.0.{i + 1}"))
    apiserver.fail("/pods", watch=False, status=410)
    async with Running(apiserver) as run:
        assert [at(run.index, f"10.0.0.{i + 1}").pod for i in range(5)] == [
            f"p{i}" for i in range(5)
        ]


async def test_lists_are_read_in_pages(apiserver: KubeApiServer) -> None:
    """A list is read in pages of ``limit`` with ``continue`` and handed over whole."""
    for i in range(5):
        apiserver.create(pod(f"p{i}", f"10.0.0.{i + 1}"))
    async with Running(apiserver, page_size=2) as run:
        pages = [q for m, p, q in apiserver.requests if p == "/api/v1/pods" and "continue" in q]
        assert len(pages) == 2
        assert len(run.index) == 5


async def test_dropped_connections_resume_without_listing(apiserver: KubeApiServer) -> None:
    """A watch cut mid-event resumes from its resourceVersion: no list, no event lost."""
    async with Running(apiserver) as run:
        apiserver.fail("/pods", watch=True, drop_after=1)
        apiserver.create(pod("a", "10.0.0.1"))
        apiserver.create(pod("b", "10.0.0.2"))  # sent half, then the connection closes
        await eventually(lambda: at(run.index, "10.0.0.2").pod == "b", 1.0)
        assert at(run.index, "10.0.0.1").pod == "a"
        assert run.watch.lists == 1


async def test_errors_back_off_and_the_last_view_keeps_serving(apiserver: KubeApiServer) -> None:
    """500s and ERROR events: the index keeps answering; the watch recovers after them."""
    apiserver.create(pod("a", "10.0.0.1"))
    async with Running(apiserver) as run:
        apiserver.fail("/pods", watch=True, error_event=500)
        apiserver.fail("/pods", status=500, count=4)
        apiserver.cut_watches()
        await eventually(lambda: run.watch.failures >= 3)
        assert at(run.index, "10.0.0.1").pod == "a"
        apiserver.create(pod("b", "10.0.0.2"))
        await eventually(lambda: at(run.index, "10.0.0.2").pod == "b")


async def test_first_list_retried_until_the_api_answers(apiserver: KubeApiServer) -> None:
    """Not ready while the API fails; ready once the first list is in."""
    apiserver.create(pod("a", "10.0.0.1"))
    apiserver.fail("/pods", status=500, count=3)
    async with Running(apiserver) as run:
        assert run.watch.failures == 3
        assert at(run.index, "10.0.0.1").pod == "a"


async def test_a_rotated_token_is_read_again_after_401(apiserver: KubeApiServer) -> None:
    """401 after the token rotated: the kubeconfig is read again and the watch goes on."""
    async with Running(apiserver) as run:
        apiserver.rotate_token("token-2")
        apiserver.write_kubeconfig("token-2")
        apiserver.cut_watches()
        apiserver.create(pod("a", "10.0.0.1"))
        await eventually(lambda: at(run.index, "10.0.0.1").pod == "a")
        assert any(m == "GET" for m, p, q in apiserver.requests)
        assert run.watch.failures >= 1


async def test_bookmarks_move_the_resource_version(apiserver: KubeApiServer) -> None:
    """With no pod change, BOOKMARK events still move where the watch resumes."""
    async with Running(apiserver) as run:
        first = run.watch.resource_version
        apiserver.create({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j"}})
        await eventually(lambda: run.watch.resource_version != first)


async def test_per_node_mode_watches_its_node_only(apiserver: KubeApiServer) -> None:
    """With a node name, only that node's pods are listed and watched (spec.nodeName)."""
    apiserver.create(pod("here", "10.0.0.1", node="node-1"))
    apiserver.create(pod("there", "10.0.0.2", node="node-2"))
    async with Running(apiserver, node="node-1") as run:
        apiserver.create(pod("there-2", "10.0.0.3", node="node-2"))
        apiserver.create(pod("here-2", "10.0.0.4", node="node-1"))
        await eventually(lambda: at(run.index, "10.0.0.4").pod == "here-2", 1.0)
        assert at(run.index, "10.0.0.1").pod == "here"
        assert at(run.index, "10.0.0.2") is UNKNOWN
        assert at(run.index, "10.0.0.3") is UNKNOWN
    assert all(
        q.get("fieldSelector") == "spec.nodeName=node-1"
        for m, p, q in apiserver.requests
        if p.endswith("/pods")
    )


async def test_namespaces_are_watched_each_on_their_own(apiserver: KubeApiServer) -> None:
    """With namespaces listed, pods of the others are never seen."""
    apiserver.create(pod("a", "10.0.0.1", namespace="payments"))
    apiserver.create(pod("b", "10.0.0.2", namespace="other"))
    apiserver.create(pod("c", "10.0.0.3", namespace="batch"))
    async with Running(apiserver, namespaces=["payments", "batch"]) as run:
        assert at(run.index, "10.0.0.1").pod == "a"
        assert at(run.index, "10.0.0.2") is UNKNOWN
        assert at(run.index, "10.0.0.3").pod == "c"
