"""Running ``nft``: load a script as one transaction, list a table. Blocking; callers on the
event loop run these in a thread."""

from __future__ import annotations

import shutil
import subprocess

NFT_TIMEOUT = 30.0


class NftError(Exception):
    """nft is missing or refused a script; the message says which and why."""


def _nft() -> str:
    nft = shutil.which("nft")
    if nft is None:
        raise NftError("nft not found (install nftables)")
    return nft


def apply(script: str) -> None:
    """Load ``script`` with ``nft -f -`` (one transaction); NftError with nft's words if refused."""
    done = subprocess.run(
        [_nft(), "-f", "-"], input=script, text=True, capture_output=True, timeout=NFT_TIMEOUT
    )
    if done.returncode != 0:
        raise NftError(f"nft refused the rules: {done.stderr.strip()}")


def list_table(table: str, family: str = "inet") -> str | None:
    """``nft list table`` of one table, or None when it does not exist."""
    done = subprocess.run(
        [_nft(), "list", "table", family, table],
        text=True,
        capture_output=True,
        timeout=NFT_TIMEOUT,
    )
    if done.returncode != 0:
        if "No such file or directory" in done.stderr:
            return None
        raise NftError(f"nft could not list table {family} {table}: {done.stderr.strip()}")
    return done.stdout
