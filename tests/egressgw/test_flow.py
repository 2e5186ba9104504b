"""Tests of flow ids: unique within a process and across forked workers."""

from __future__ import annotations

import ipaddress
import os

import pytest

from egressgw.flow import Flow

SOURCE = ipaddress.ip_address("10.0.0.1")
IDS_PER_PROCESS = 1000


def new_ids(count: int) -> list[str]:
    """Ids of `count` new flows."""
    return [Flow(SOURCE, 40000, 0.0, 0.0).id for _ in range(count)]


def test_ids_within_a_process_are_unique() -> None:
    """Every flow of one process gets an id no other flow of it has."""
    ids = new_ids(IDS_PER_PROCESS)
    assert len(set(ids)) == len(ids)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_draws_ids_of_its_own() -> None:
    """A forked child's flow ids differ from every id the parent makes before and after."""
    before = new_ids(10)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its ids and leave without running pytest's teardown
        code = 1
        try:
            os.close(read_end)
            with os.fdopen(write_end, "w") as out:
                out.write("\n".join(new_ids(IDS_PER_PROCESS)))
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as inp:
        child = inp.read().split("\n")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    parent = before + new_ids(IDS_PER_PROCESS)
    assert len(child) == IDS_PER_PROCESS
    assert not set(child) & set(parent)
    assert child[0][:12] != parent[0][:12]  # a prefix of its own, not only other counter values
