"""The supervisor's egress map: rounds of questions shared, silent workers left out."""

import asyncio
import ipaddress
from typing import Any

import pytest

from egressgw.decision.names import Host
from egressgw.decision.policy import Decision
from egressgw.decision.verdict import Verdict
from egressgw.flow import Flow
from egressgw.identity.workload import Workload
from egressgw.record.egressmap import EgressMap
from egressgw.record.mapmerge import resume_after
from egressgw.workers.maps import MergedMap

SHOP = Workload.make("shop", "cart-1", {"app": "cart"})
DENY = Verdict.deny("denied by sec/x", decision=Decision("deny", "sec", "x", "x"))
ALLOW = Verdict.allow(ipaddress.ip_address("198.51.100.7"), "ok", Decision("allow", "t", "r", "ok"))


def decide(m: EgressMap, host: str, verdict: Verdict, t: float = 100.0) -> None:
    """One flow from the shop app to ``host:443``, decided now (monotonic ``t``)."""
    f = Flow(ipaddress.ip_address("10.0.0.5"), 40000, 1.7e9 + t, t)
    f.source_text = "10.0.0.5"
    f.workload, f.host, f.port, f.verdict = SHOP, Host(host, None), 443, verdict
    m.flow_decided(f)


class FakeWorker:
    """A worker's channel answering from a real EgressMap, as worker.py does."""

    def __init__(self, m: EgressMap, silent: bool = False) -> None:
        self.map, self.silent, self.asked = m, silent, 0

    async def request(self, op: str, within: float, **fields: Any) -> dict[str, Any]:
        """The worker's answer (after a turn of the loop), or a timeout when silent."""
        self.asked += 1
        await asyncio.sleep(0.01)
        if self.silent:
            raise TimeoutError
        if op == "map_graph":
            return {"share": self.map.share(100.0, fields["window"])}
        after = resume_after(fields["after"], self.map.seq)
        flows = self.map.recent_flows(limit=fields["limit"], after=after)
        return {"version": self.map.version, "seq": self.map.seq, "flows": flows}


def merged(workers: list[FakeWorker]) -> MergedMap:
    """A MergedMap over ``workers`` (slot i, process 1000 + i)."""
    running = [(i, 1000 + i, w) for i, w in enumerate(workers)]
    return MergedMap(lambda: running, windows=(300, 3600), max_edges=100, recent=50, timeout=1.0)


async def test_counts_and_refused_flows_of_every_worker_add_up() -> None:
    """Two workers' flows: the graph sums them, the flows list each refused one once."""
    a, b = EgressMap(), EgressMap()
    decide(a, "x.test", ALLOW)
    decide(b, "x.test", DENY)
    decide(b, "y.test", DENY)
    m = merged([FakeWorker(a), FakeWorker(b)])
    g = await m.graph(300, namespace=None, decision=None, tier=None, limit=10)
    x = next(e for e in g["edges"] if e["destination"]["host"] == "x.test")
    assert (x["flows"], x["allowed"], x["denied"], x["decision"]) == (2, 1, 1, "denied")
    flows = await m.flows(decision=None, limit=10, after=0)
    assert [f["seq"] for f in flows] == [2, 1]
    decide(a, "z.test", DENY, t=101.0)
    assert [f["seq"] for f in await m.flows(decision=None, limit=10, after=2)] == [3]
    with pytest.raises(ValueError, match="decision must be one of"):
        await m.graph(300, namespace=None, decision="maybe", tier=None, limit=10)


async def test_many_streams_share_one_round_per_interval() -> None:
    """Sixteen callers accepting a 2 s old answer cause one question to each worker."""
    workers = [FakeWorker(EgressMap()), FakeWorker(EgressMap())]
    m = merged(workers)
    await asyncio.gather(*(m.version(max_age=2.0) for _ in range(16)))
    await asyncio.gather(*(m.version(max_age=2.0) for _ in range(16)))
    await asyncio.gather(
        *(
            m.graph(300, namespace=None, decision=None, tier=None, limit=5, max_age=2.0)
            for _ in range(16)
        )
    )
    assert [w.asked for w in workers] == [2, 2] and m.rounds == 2
    await m.version()  # a fresh question (the API's) asks again
    assert m.rounds == 3


async def test_a_silent_worker_is_left_out_not_failing_the_answer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A worker that does not answer in time is left out; the others' flows are served."""
    a = EgressMap()
    decide(a, "x.test", DENY)
    m = merged([FakeWorker(a), FakeWorker(EgressMap(), silent=True)])
    assert [f["destination"]["host"] for f in await m.flows(decision=None, limit=5, after=0)] == [
        "x.test"
    ]
    g = await m.graph(300, namespace=None, decision=None, tier=None, limit=5)
    assert [e["flows"] for e in g["edges"]] == [1]
    assert m._silent == {1}
