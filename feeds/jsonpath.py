"""A small path language that selects values inside a JSON document.

Syntax (a subset of JSONPath, enough for every feed we know):

- ``$`` is the document (optional at the start); steps follow, each one of
- ``.key`` or ``key`` (letters, digits, ``_``, ``-``) or ``['any key']`` / ``["any key"]``: the
  member of an object (objects without it, and non-objects, are skipped);
- ``[*]`` or ``[]``: every element of an array;
- ``.*``: every value of an object;
- ``[N]``: element N (0-based) of an array.

Examples: ``[*].ip_address`` (Feodo JSON), ``objects``, ``data.items[*].value``,
``trustgroup1.collections[*].objects[*]``. An empty path (or ``$``) selects the document itself.
"""

from __future__ import annotations

import re
from typing import Any

_STEP = re.compile(
    r"""\.?(?P<key>[A-Za-z0-9_\-]+)|\.?(?P<star>\*)|\[(?P<index>\*|\d*|'[^']*'|"[^"]*")\]"""
)

Step = tuple[str, str | int | None]


def parse_path(path: str) -> tuple[Step, ...]:
    """Compile a path expression into steps; raise ValueError on a syntax error."""
    text = path.strip()
    if text.startswith("$"):
        text = text[1:]
    steps: list[Step] = []
    pos = 0
    while pos < len(text):
        m = _STEP.match(text, pos)
        if m is None or m.end() == pos:
            raise ValueError(f"invalid path {path!r} at offset {pos}")
        if m.group("key") is not None:
            steps.append(("key", m.group("key")))
        elif m.group("star") is not None:
            steps.append(("values", None))
        else:
            index = m.group("index")
            if index in ("*", ""):
                steps.append(("each", None))
            elif index[0] in "'\"":
                steps.append(("key", index[1:-1]))
            else:
                steps.append(("index", int(index)))
        pos = m.end()
    return tuple(steps)


def select(document: Any, path: str) -> list[Any]:
    """Every node the path selects in the document, in document order."""
    nodes: list[Any] = [document]
    for kind, arg in parse_path(path):
        out: list[Any] = []
        for node in nodes:
            if kind == "key":
                if isinstance(node, dict) and arg in node:
                    out.append(node[arg])
            elif kind == "each":
                if isinstance(node, list):
                    out.extend(node)
            elif kind == "values":
                if isinstance(node, dict):
                    out.extend(node.values())
            elif isinstance(node, list) and isinstance(arg, int) and arg < len(node):
                out.append(node[arg])
        nodes = out
    return nodes
