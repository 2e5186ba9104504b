"""Credentials a sink reads from files (a mounted Kubernetes Secret), at the edge.

A sink spec gives a secret inline (``token``) or as a file (``token_file``); the sink reads the
file when it starts, so a Secret rotated in place is picked up by the next start. The value is
the file's content without surrounding whitespace (``kubectl create secret`` keeps a trailing
newline when the source file has one). ``egressgw check`` reports files that are missing or empty.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, SecretStr

SECRET_FILE_FIELDS = ("token_file", "api_key_file", "password_file")


def read_secret(inline: SecretStr | None, path: Path | None) -> str | None:
    """The secret given inline, else the content of its file, else None; OSError/ValueError."""
    if inline is not None:
        return inline.get_secret_value()
    if path is None:
        return None
    value = path.read_text(encoding="utf-8").strip()
    if not value:
        raise ValueError(f"{path}: the secret file is empty")
    return value


def secret_file_problems(spec: BaseModel) -> list[tuple[str, str]]:
    """``(key, problem)`` for each secret file of a sink that is missing, unreadable or empty."""
    problems: list[tuple[str, str]] = []
    for key in SECRET_FILE_FIELDS:
        path = getattr(spec, key, None)
        if not isinstance(path, Path):
            continue
        try:
            read_secret(None, path)
        except OSError as e:
            problems.append((key, f"cannot read {path}: {e.strerror or e}"))
        except ValueError as e:
            problems.append((key, str(e)))
    return problems
