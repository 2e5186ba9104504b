"""Do a sink's TLS files load? Checked by ``egressgw check`` with ``ssl``, as the sinks load them.

Kept out of ``siem.config`` (a pure core that never imports ssl): this reads files and builds
TLS contexts.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from pydantic import BaseModel

_TLS_FILE_FIELDS = ("ca", "cert", "key")


def _no_password() -> bytes:
    # An encrypted key cannot be used by the sinks (they pass no password): fail, never prompt.
    return b""


def tls_file_problems(spec: BaseModel) -> list[tuple[str, str]]:
    """``(key, problem)`` for each TLS file of a sink that is missing or does not load."""
    problems: list[tuple[str, str]] = []
    files = {k: v for k in _TLS_FILE_FIELDS if isinstance(v := getattr(spec, k, None), Path)}
    for field, path in files.items():
        if not path.is_file():
            problems.append((field, f"file not found: {path}"))
    if problems:
        return problems
    ca = files.get("ca")
    if ca is not None:
        try:
            ssl.create_default_context(cafile=str(ca))
        except (ssl.SSLError, OSError) as e:
            problems.append(("ca", f"{ca}: not a PEM CA certificate: {e}"))
    cert, key = files.get("cert"), files.get("key")
    if cert is not None and key is not None:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(
                str(cert), str(key), password=_no_password
            )
        except (ssl.SSLError, OSError) as e:
            problems.append(
                ("cert", f"{cert} with {key}: not a PEM certificate and its unencrypted key: {e}")
            )
    return problems
