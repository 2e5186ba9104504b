"""Tests of the identity core: credentials a client presents, and peers."""

import pytest

from egressgw.identity.workload import Credential, parse_credential


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b"Bearer abc.def", Credential("bearer", "abc.def")),
        (b"  Basic dXNlcjpwdw==  ", Credential("basic", "dXNlcjpwdw==")),
    ],
)
def test_parse_credential(header: bytes, expected: Credential) -> None:
    """The scheme is lowercased, the value kept exactly, surrounding blanks dropped."""
    assert parse_credential(header) == expected


@pytest.mark.parametrize("header", [b"", b"Bearer", b"Bearer   ", b"Bearer \xff"])
def test_parse_credential_refuses(header: bytes) -> None:
    """No scheme, no value, or bytes that are not ASCII: ValueError."""
    with pytest.raises(ValueError):
        parse_credential(header)


def test_a_credential_never_shows_its_value() -> None:
    """The value is a secret: repr (and so any log line of a flow or peer) leaves it out."""
    assert "s3cret" not in repr(Credential("bearer", "s3cret"))
