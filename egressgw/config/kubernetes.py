"""Policy resources from the Kubernetes API: watch them, hand them over, write their status.

1. One list-and-watch per kind (``egressgw.kube.ListWatch``: GlobalEgressPolicy, EgressPolicy
   of every namespace, ThreatFeed) keeps the objects as the API has them.
2. Once a burst of changes has been quiet for ``settle`` seconds, every object goes to
   ``apply`` at once (the gateway judges them, swaps its policy and feeds, and answers one
   verdict per object). Only a change of some object's ``spec`` counts: the status writes of
   this gateway (or of another replica) come back as watch events and must not rebuild policy.
   ``poke()`` applies again anyway (a reload changed the tiers or feeds objects are judged by).
3. Each verdict whose ``Accepted`` condition the object does not show yet is written with a
   merge PATCH of its ``/status`` (``policyobjects.status_patch``): nothing when it shows it
   already, so replicas judging alike do not take turns rewriting it. A failed write is tried
   again after ``STATUS_RETRY`` seconds; it never holds policy back.
4. ``ready`` once every kind was listed and the first objects were applied.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import structlog
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio.config import ConfigException

from egressgw.config import policyobjects as po
from egressgw.kube import Api, ApiError, ListWatch, check

log = structlog.get_logger("egressgw.policy")

# A burst of changes (a kubectl apply of many objects, a re-list) becomes one rebuild.
DEFAULT_SETTLE = 0.2
STATUS_RETRY = 5.0
LIST_TIMEOUT = 10.0  # a one-off list (check, explain): a tool must not hang on a dead API

# kind -> (plural, namespaced)
RESOURCES = {
    po.GLOBAL_POLICY: ("globalegresspolicies", False),
    po.POLICY: ("egresspolicies", True),
    po.THREAT_FEED: ("threatfeeds", False),
}

Apply = Callable[[list[Mapping[str, Any]]], Awaitable[Mapping[po.Key, po.Verdict]]]


class PolicyWatcher:
    """Keeps the gateway's policy resources current and their status written; ``run()``."""

    def __init__(
        self, api: Api, apply: Apply, *, settle: float = DEFAULT_SETTLE, **watch_options: Any
    ) -> None:
        self.api = api
        self.apply = apply
        self.settle = settle
        self.objects: dict[po.Key, dict[str, Any]] = {}
        self.watches = [
            ListWatch(
                plural,
                api,
                self._lister(plural),
                self._on_list(kind),
                self._on_event,
                **watch_options,
            )
            for kind, (plural, _) in RESOURCES.items()
        ]
        self._wake = asyncio.Event()
        self._force = False
        self._applied: dict[po.Key, tuple[Any, Any]] | None = None  # (generation, spec) each
        self._verdicts: Mapping[po.Key, po.Verdict] = {}
        self.status_writes = 0

    @property
    def ready(self) -> bool:
        """True once every kind was listed and the objects were applied."""
        return self._applied is not None and all(w.synced.is_set() for w in self.watches)

    def poke(self) -> None:
        """Apply the objects again although none changed (what they are judged by did)."""
        self._force = True
        self._wake.set()

    @staticmethod
    def _lister(plural: str) -> Any:
        def lister(client: k8s_client.ApiClient) -> Any:
            custom = k8s_client.CustomObjectsApi(client)

            def list_all(**params: Any) -> Any:
                return custom.list_cluster_custom_object(po.GROUP, po.VERSION, plural, **params)

            return list_all

        return lister

    def _on_list(self, kind: str) -> Callable[[Sequence[Any]], None]:
        def on_list(items: Sequence[Any]) -> None:
            for key in [k for k in self.objects if k[0] == kind]:
                del self.objects[key]
            for obj in items:
                if isinstance(obj, dict):
                    obj.setdefault("kind", kind)  # list items may leave kind to the list
                    self.objects[po.key_of(obj)] = obj
            self._wake.set()

        return on_list

    def _on_event(self, event_type: str, obj: Mapping[str, Any]) -> None:
        key = po.key_of(obj)
        if event_type == "DELETED":
            self.objects.pop(key, None)
        else:
            self.objects[key] = dict(obj)
        self._wake.set()

    async def run(self) -> None:
        """Watch each kind and apply what changed, until cancelled."""
        async with asyncio.TaskGroup() as group:
            for watch in self.watches:
                group.create_task(watch.run(), name=f"watch {watch.what}")
            group.create_task(self._apply_loop(), name="policy resources")

    async def _apply_loop(self) -> None:
        retry_writes = False
        while True:
            if retry_writes:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), STATUS_RETRY)
            else:
                await self._wake.wait()
            # Let the burst settle: each event during the wait restarts it.
            while True:
                self._wake.clear()
                await asyncio.sleep(self.settle)
                if not self._wake.is_set():
                    break
            if not all(w.synced.is_set() for w in self.watches):
                continue  # judged whole: a kind not yet listed would look deleted
            current = {
                k: (o["metadata"].get("generation"), o.get("spec")) for k, o in self.objects.items()
            }
            if self._force or current != self._applied:
                self._force = False
                self._verdicts = await self.apply(list(self.objects.values()))
                self._applied = current
            retry_writes = not await self._write_statuses()

    async def _write_statuses(self) -> bool:
        """Write each verdict the object does not show yet; False if a write failed."""
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        ok = True
        for key, verdict in self._verdicts.items():
            obj = self.objects.get(key)
            if obj is None:
                continue
            patch = po.status_patch(obj, verdict, now)
            if patch is None:
                continue
            try:
                written = await self._patch_status(key, patch)
            except (ApiError, aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
                ok = False
                log.warning("status not written", object=po.describe(key), error=str(e))
                continue
            self.status_writes += 1
            # The object as written: the next pass compares with it, not with the stale copy.
            if isinstance(written, dict) and po.key_of(written) == key:
                self.objects[key] = written
        return ok

    async def _patch_status(self, key: po.Key, body: dict[str, Any]) -> Any:
        kind, namespace, name = key
        plural, namespaced = RESOURCES[kind]
        client = self.api.client
        assert client is not None
        custom = k8s_client.CustomObjectsApi(client)
        options: dict[str, Any] = {
            "_content_type": "application/merge-patch+json",
            "_preload_content": False,
        }
        if namespaced:
            response = await custom.patch_namespaced_custom_object_status(
                po.GROUP, po.VERSION, namespace, plural, name, body, **options
            )
        else:
            response = await custom.patch_cluster_custom_object_status(
                po.GROUP, po.VERSION, plural, name, body, **options
            )
        await check(response)
        try:
            return orjson.loads(await response.read())
        finally:
            response.release()


async def list_objects(api: Api) -> list[dict[str, Any]]:
    """Every policy resource, listed once (for ``check`` and ``explain``)."""
    client = api.client
    assert client is not None
    custom = k8s_client.CustomObjectsApi(client)
    out: list[dict[str, Any]] = []
    for kind, (plural, _) in RESOURCES.items():
        response = await custom.list_cluster_custom_object(
            po.GROUP, po.VERSION, plural, _preload_content=False, _request_timeout=LIST_TIMEOUT
        )
        await check(response)
        try:
            page = orjson.loads(await response.read())
        finally:
            response.release()
        for obj in page.get("items") or () if isinstance(page, dict) else ():
            if isinstance(obj, dict):
                obj.setdefault("kind", kind)
                out.append(obj)
    return out


async def read_objects(kubeconfig: Path | None) -> list[dict[str, Any]]:
    """Every policy resource, read once with a client of its own (for ``check``, ``explain``).

    Raises ``ResourcesUnreadable`` saying why when there is no API configuration or it fails.
    """
    api = Api(kubeconfig)
    try:
        await api.open()
        return await list_objects(api)
    except (ConfigException, ApiError, aiohttp.ClientError, OSError, TimeoutError) as e:
        raise ResourcesUnreadable(str(e) or type(e).__name__) from e
    finally:
        await api.aclose()


class ResourcesUnreadable(Exception):
    """The policy resources could not be read from the API."""
