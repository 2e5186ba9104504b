"""Tests of what every client connection shares: the mode transition table, the peer address."""

import ipaddress

import pytest

from egressgw.listeners.connection import (
    _TRANSITIONS,
    Connection,
    IllegalTransition,
    Mode,
    source_ip,
)


def test_every_mode_has_its_transitions_and_closed_is_final() -> None:
    """The table covers every Mode; CLOSED leads nowhere and every other mode can close."""
    assert set(_TRANSITIONS) == set(Mode)
    assert _TRANSITIONS[Mode.CLOSED] == ()
    assert all(
        Mode.CLOSED in allowed for mode, allowed in _TRANSITIONS.items() if mode is not Mode.CLOSED
    )


@pytest.mark.parametrize("old", list(Mode), ids=lambda m: m.name)
@pytest.mark.parametrize("new", list(Mode), ids=lambda m: m.name)
def test_a_transition_is_made_only_when_the_table_allows_it(old: Mode, new: Mode) -> None:
    """_to changes the mode along the table and raises IllegalTransition for any other pair."""
    conn = Connection()
    conn.mode = old
    if new in _TRANSITIONS[old]:
        conn._to(new)
        assert conn.mode is new
    else:
        with pytest.raises(IllegalTransition) as raised:
            conn._to(new)
        assert conn.mode is old and (raised.value.old, raised.value.new) == (old, new)


def test_an_ipv4_client_of_a_dual_stack_listener_is_its_ipv4_address() -> None:
    """``::ffff:10.0.0.5`` is 10.0.0.5 to identity, policy and events; other IPv6 stays."""
    ip, text = source_ip("::ffff:10.0.0.5")
    assert ip == ipaddress.ip_address("10.0.0.5") and text == "10.0.0.5"
    ip, text = source_ip("2001:db8::5")
    assert ip == ipaddress.ip_address("2001:db8::5") and text == "2001:db8::5"
