"""YAML files with the line of every key, so errors say file, line and key path."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError


class ConfigError(ValueError):
    """One or more errors in configuration or policy files, each naming file, line and key."""

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


class YamlDocument:
    """A parsed YAML file: plain data for validation, plus the position of every key."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError([f"{path}: cannot read: {e.strerror or e}"]) from e
        except UnicodeDecodeError as e:
            raise ConfigError([f"{path}: not UTF-8 text: {e}"]) from e
        try:
            self.tree = YAML(typ="rt").load(text)
        except MarkedYAMLError as e:
            line = e.problem_mark.line + 1 if e.problem_mark else 0
            raise ConfigError([f"{path}:{line}: invalid YAML: {e.problem}"]) from e
        if self.tree is None:
            self.tree = CommentedMap()
        self.data = _plain(self.tree)

    def line_of(self, loc: Sequence[int | str]) -> int:
        """The 1-based line of the deepest key on a path that exists in the file."""
        node: Any = self.tree
        line = 1
        for key in loc:
            if isinstance(node, CommentedMap) and key in node:
                pos = node.lc.key(key)
                line = pos[0] + 1
                node = node[key]
            elif isinstance(node, CommentedSeq) and isinstance(key, int) and key < len(node):
                pos = node.lc.item(key)
                line = pos[0] + 1
                node = node[key]
            else:
                break
        return line

    def errors_from(self, exc: ValidationError, prefix: Sequence[int | str] = ()) -> list[str]:
        """Turn pydantic errors into ``file:line: key.path: message`` lines."""
        out = []
        for err in exc.errors():
            loc = _key_path(self.data, [*prefix, *err["loc"]])
            path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
            msg = err["msg"].removeprefix("Value error, ")
            out.append(f"{self.path}:{self.line_of(loc)}: {path or '(top)'}: {msg}")
        return out


def _key_path(data: Any, loc: Sequence[int | str]) -> list[int | str]:
    """Keep the parts of a pydantic loc that are keys in the data (drop union tags)."""
    path: list[int | str] = []
    node = data
    for i, part in enumerate(loc):
        child = _child(node, part)
        if child is not _MISSING:
            node = child
        elif i < len(loc) - 1:
            continue  # a discriminator tag or validator name, not a key
        path.append(part)
    return path


_MISSING = object()


def _child(node: Any, part: int | str) -> Any:
    if isinstance(node, dict):
        return node.get(part, _MISSING)
    if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
        return node[part]
    return _MISSING


def _plain(node: Any) -> Any:
    if isinstance(node, CommentedMap):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, CommentedSeq):
        return [_plain(v) for v in node]
    return node
