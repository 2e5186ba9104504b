"""Tests of the idle connection pool: take and park by key, bounds, expiry, discard."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from egressgw.net.pool import IdlePool


class Conn:
    """A connection that remembers being closed."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = 0

    def close(self) -> None:
        """Close (counted: a connection must never be closed twice)."""
        self.closed += 1

    def __repr__(self) -> str:
        return self.name


def test_take_gives_the_connection_of_that_key_parked_last() -> None:
    """Most recently parked first (its peer most likely still holds it); other keys apart."""
    pool: IdlePool[Conn] = IdlePool()
    a, b, c = Conn("a"), Conn("b"), Conn("c")
    pool.park("x", a, 1.0)
    pool.park("x", b, 2.0)
    pool.park("y", c, 3.0)
    assert pool.take("x") is b and pool.take("x") is a and pool.take("x") is None
    assert pool.take("y") is c and len(pool) == 0
    assert not (a.closed or b.closed or c.closed)


def test_past_the_per_key_bound_the_oldest_of_that_key_is_closed() -> None:
    """max_idle_per_key: parking one more closes the key's oldest, not another key's."""
    pool: IdlePool[Conn] = IdlePool(max_idle=10, max_idle_per_key=2)
    other = Conn("other")
    pool.park("y", other, 0.0)
    first, second, third = Conn("1"), Conn("2"), Conn("3")
    for i, conn in enumerate((first, second, third)):
        pool.park("x", conn, float(i))
    assert first.closed == 1 and not second.closed and not third.closed and not other.closed
    assert pool.take("x") is third and pool.take("x") is second and pool.take("x") is None


def test_past_the_total_bound_the_oldest_of_all_is_closed() -> None:
    """max_idle: the connection parked longest ago goes, whatever its key."""
    pool: IdlePool[Conn] = IdlePool(max_idle=2, max_idle_per_key=10)
    oldest, middle, newest = Conn("o"), Conn("m"), Conn("n")
    pool.park("a", oldest, 0.0)
    pool.park("b", middle, 1.0)
    pool.park("c", newest, 2.0)
    assert oldest.closed == 1 and len(pool) == 2 and pool.take("a") is None


def test_expire_closes_those_idle_past_the_timeout() -> None:
    """Parked at or before now - idle_timeout: closed and gone; the others stay."""
    pool: IdlePool[Conn] = IdlePool(idle_timeout=10.0)
    old, fresh = Conn("old"), Conn("fresh")
    pool.park("x", old, 0.0)
    pool.park("x", fresh, 5.0)
    assert pool.expire(9.0) == 0
    assert pool.expire(10.0) == 1 and old.closed == 1 and not fresh.closed
    assert pool.take("x") is fresh


def test_parking_again_counts_idle_time_from_then() -> None:
    """A connection taken and parked again is idle from its new parking time."""
    pool: IdlePool[Conn] = IdlePool(idle_timeout=10.0)
    conn = Conn("c")
    pool.park("x", conn, 0.0)
    assert pool.take("x") is conn
    pool.park("x", conn, 8.0)
    assert pool.expire(12.0) == 0 and pool.expire(18.0) == 1


def test_a_discarded_connection_leaves_without_being_closed_again() -> None:
    """Its peer closed it while parked: it is forgotten, not closed a second time."""
    pool: IdlePool[Conn] = IdlePool()
    conn = Conn("c")
    pool.park("x", conn, 0.0)
    pool.discard(conn)
    pool.discard(conn)  # (twice is nothing)
    assert pool.take("x") is None and conn.closed == 0 and len(pool) == 0


def test_a_pool_of_size_zero_keeps_nothing() -> None:
    """max_idle 0 turns pooling off: a parked connection is closed at once."""
    pool: IdlePool[Conn] = IdlePool(max_idle=0)
    conn = Conn("c")
    pool.park("x", conn, 0.0)
    assert conn.closed == 1 and pool.take("x") is None


def test_close_closes_every_parked_connection() -> None:
    """The gateway stops: every idle connection is closed, once."""
    pool: IdlePool[Conn] = IdlePool()
    conns = [Conn(str(i)) for i in range(5)]
    for i, conn in enumerate(conns):
        pool.park(i % 2, conn, 0.0)
    pool.close()
    assert [c.closed for c in conns] == [1] * 5 and len(pool) == 0


@given(
    st.lists(
        st.tuples(st.sampled_from(["park", "take", "expire"]), st.integers(0, 3)),
        max_size=60,
    ),
    st.integers(1, 4),
    st.integers(1, 6),
)
def test_bounds_hold_and_nothing_is_lost_or_closed_twice(
    ops: list[tuple[str, int]], per_key: int, total: int
) -> None:
    """Under any sequence: within both bounds, and every connection is parked, taken or
    closed exactly once.
    """
    pool: IdlePool[Conn] = IdlePool(max_idle=total, max_idle_per_key=per_key, idle_timeout=5.0)
    taken: list[Conn] = []
    made: list[Conn] = []
    now = 0.0
    for op, key in ops:
        now += 1.0
        if op == "park":
            conn = Conn(f"{len(made)}")
            made.append(conn)
            pool.park(key, conn, now)
        elif op == "take":
            got = pool.take(key)
            if got is not None:
                taken.append(got)
        else:
            pool.expire(now)
        assert len(pool) <= total
        assert all(len(conns) <= per_key for conns in pool.by_key.values())
    parked = set(pool.parked)
    for conn in made:
        assert conn.closed <= 1
        assert (conn in parked) + (conn in taken) + conn.closed == 1, conn
