"""Pods from the Kubernetes API: the watch that keeps a PodIndex current (identity's I/O edge).

1. One list-and-watch of pods (``egressgw.kube.ListWatch``: resumes from its resourceVersion,
   asks for bookmarks, lists again on 410 Gone, backs off on errors and keeps the last view) for
   the whole cluster, or one per namespace of ``identity.kubernetes.namespaces``; restricted to
   this node's pods (``spec.nodeName`` field selector) when the gateway runs one per node.
2. The owners the index asks for (a pod's ReplicaSet or Job) are read from the API once each,
   a few at a time, and remembered by the index: never one request per connection. A failed
   read is tried again after a backoff; meanwhile the pod is attributed to its direct owner.
3. Ready once every watch handed over its first list and the owners that list named were each
   asked for once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
import orjson
import structlog
from kubernetes_asyncio import client as k8s_client

from egressgw.identity.podindex import OwnerKey, Pod, PodIndex, parse_pod
from egressgw.kube import Api, ApiError, ListWatch, check

log = structlog.get_logger("egressgw.identity.workload")

OWNER_CONCURRENCY = 4
OWNER_RETRY_MIN = 1.0
OWNER_RETRY_MAX = 60.0


class PodWatcher:
    """Keeps a PodIndex from the API's pods; ``run()`` until cancelled."""

    def __init__(
        self,
        index: PodIndex,
        api: Api,
        namespaces: Sequence[str] = (),
        node: str | None = None,
        **watch_options: Any,
    ) -> None:
        self.index = index
        self.api = api
        selector = f"spec.nodeName={node}" if node else None
        self.watches = [
            ListWatch(
                f"pods in {namespace}" if namespace else "pods",
                api,
                self._lister(namespace),
                self._on_list(namespace),
                self._on_event,
                read_page=read_pods,
                field_selector=selector,
                **watch_options,
            )
            for namespace in (list[str | None](namespaces) or [None])
        ]
        self._wake = asyncio.Event()
        self._retry_at: dict[OwnerKey, tuple[float, float]] = {}  # key -> (when, last delay)
        self.owners_settled = False  # the first lists' owners were each asked for once

    @property
    def ready(self) -> bool:
        """True once every first list is in and its owners were asked for."""
        return self.owners_settled and all(w.synced.is_set() for w in self.watches)

    @staticmethod
    def _lister(namespace: str | None) -> Any:
        def lister(client: k8s_client.ApiClient) -> Any:
            core = k8s_client.CoreV1Api(client)
            if namespace is None:
                return core.list_pod_for_all_namespaces

            def in_namespace(**params: Any) -> Any:
                return core.list_namespaced_pod(namespace, **params)

            return in_namespace

        return lister

    def _on_list(self, namespace: str | None) -> Any:
        def on_list(pods: Sequence[Pod]) -> None:
            self.index.replace_pods(pods, namespace)
            self._wake.set()

        return on_list

    def _on_event(self, kind: str, obj: Mapping[str, Any]) -> None:
        self.index.apply(kind, obj)
        self._wake.set()

    async def run(self) -> None:
        """Watch (each namespace) and look owners up, until cancelled."""
        async with asyncio.TaskGroup() as group:
            for watch in self.watches:
                group.create_task(watch.run(), name=f"watch {watch.what}")
            group.create_task(self._owners(), name="pod owners")

    async def _owners(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            synced = all(w.synced.is_set() for w in self.watches)
            now = time.monotonic()
            due = [
                key
                for key in self.index.missing_owners()
                if self._retry_at.get(key, (0.0, 0.0))[0] <= now
            ]
            for start in range(0, len(due), OWNER_CONCURRENCY):
                batch = due[start : start + OWNER_CONCURRENCY]
                await asyncio.gather(*(self._look_up(key) for key in batch))
            if synced:
                self.owners_settled = True
            if self._retry_at:
                # Wake again when the next failed lookup is due.
                soonest = min(when for when, _ in self._retry_at.values())
                asyncio.get_running_loop().call_at(
                    asyncio.get_running_loop().time() + max(0.0, soonest - time.monotonic()),
                    self._wake.set,
                )

    async def _look_up(self, key: OwnerKey) -> None:
        namespace, kind, name = key
        client = self.api.client
        assert client is not None
        # Unread (_preload_content=False), the library's typed read returns the HTTP response.
        read: Any = (
            k8s_client.AppsV1Api(client).read_namespaced_replica_set
            if kind == "ReplicaSet"
            else k8s_client.BatchV1Api(client).read_namespaced_job
        )
        try:
            response: aiohttp.ClientResponse = await read(name, namespace, _preload_content=False)
            if response.status == 404:
                response.release()
                parent = None  # gone already: its pods go soon too
            else:
                await check(response)
                try:
                    parent = controller_of(orjson.loads(await response.read()))
                finally:
                    response.release()
        except (ApiError, aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
            _, last = self._retry_at.get(key, (0.0, OWNER_RETRY_MIN / 2))
            wait = min(OWNER_RETRY_MAX, last * 2)
            self._retry_at[key] = (time.monotonic() + wait, wait)
            log.warning("owner lookup failed", owner=f"{kind} {namespace}/{name}", error=str(e))
            return
        self._retry_at.pop(key, None)
        self.index.set_owner(key, parent)


def read_pods(objects: list[Any]) -> list[Any]:
    """One page of a pod list -> Pods; an unreadable pod is skipped and said, not fatal."""
    pods = []
    for obj in objects:
        try:
            pods.append(parse_pod(obj))
        except ValueError as e:
            log.warning("pod skipped", error=str(e))
    return pods


def controller_of(obj: Any) -> tuple[str, str] | None:
    """The (kind, name) of an object's controller ownerReference, or None."""
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    for ref in (meta or {}).get("ownerReferences") or ():
        if isinstance(ref, dict) and ref.get("controller") is True:
            kind, name = ref.get("kind"), ref.get("name")
            if isinstance(kind, str) and isinstance(name, str):
                return kind, name
    return None
