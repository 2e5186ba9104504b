"""A gateway in the worker role keeps only what a worker serves (and its egress map)."""

from pathlib import Path

from egressgw.app import Gateway, WorkerRole
from egressgw.config.model import load_config


class _NoEvents:
    """Events go nowhere: the test starts nothing."""

    def submit(self, event: object) -> None:
        """Drop the event."""

    async def start(self) -> None:
        """Nothing to open."""

    async def flush(self) -> None:
        """Nothing held."""

    async def aclose(self) -> None:
        """Nothing to close."""


def test_a_worker_keeps_its_own_egress_map_for_the_supervisor_to_merge(tmp_path: Path) -> None:
    """The map (on by default) is kept by every worker too, as a flow consumer: the supervisor
    asks each for its share and merges them; with admin.map.enabled false nobody keeps one."""
    path = tmp_path / "gw.yaml"
    path.write_text("sinks: [{type: file, path: events.jsonl}]\n")
    cfg = load_config(path)
    assert cfg.admin.map.enabled
    assert Gateway(cfg, path).egress_map is not None
    worker = Gateway(cfg, path, worker=WorkerRole(_NoEvents(), {"proxy": "127.0.0.1:0"}))
    assert worker.egress_map is not None and worker.egress_map in worker.consumers
    path.write_text("admin: {map: {enabled: false}}\nsinks: [{type: file, path: events.jsonl}]\n")
    off = Gateway(load_config(path), path, worker=WorkerRole(_NoEvents(), {"proxy": "127.0.0.1:0"}))
    assert off.egress_map is None and off.map_source is None
    assert all(type(c).__name__ != "EgressMap" for c in off.consumers)
