"""A gateway in the worker role keeps only what a worker serves."""

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


def test_a_worker_keeps_no_egress_map(tmp_path: Path) -> None:
    """The map (on by default) is kept by one process only: a worker would count its share of
    the flows for a page nobody is served."""
    path = tmp_path / "gw.yaml"
    path.write_text("sinks: [{type: file, path: events.jsonl}]\n")
    cfg = load_config(path)
    assert cfg.admin.map.enabled
    assert Gateway(cfg, path).egress_map is not None
    worker = Gateway(cfg, path, worker=WorkerRole(_NoEvents(), {"proxy": "127.0.0.1:0"}))
    assert worker.egress_map is None
    assert all(type(c).__name__ != "EgressMap" for c in worker.consumers)
