"""Rendering the kustomizations of deploy/ and reading their objects, for the deploy tests."""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
KUSTOMIZATIONS = sorted(p.parent for p in DEPLOY.rglob("kustomization.yaml"))
RENDER_TIMEOUT = 60

Obj = dict[str, Any]


def kubectl() -> str:
    """The kubectl program, or skip the test naming the Debian package that provides it."""
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl is not installed (Debian package kubernetes-client)")
    return path


@functools.cache
def _render(directory: Path) -> tuple[Obj, ...]:
    proc = subprocess.run(
        [kubectl(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=RENDER_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, f"kubectl kustomize {directory}: {proc.stderr}"
    return tuple(d for d in YAML(typ="safe").load_all(proc.stdout) if d)


def render(name: str) -> list[Obj]:
    """The objects `kubectl kustomize deploy/<name>` renders."""
    return list(_render(DEPLOY / name))


def one(objects: list[Obj], kind: str, name: str | None = None) -> Obj:
    """The single object of a kind (and name) among `objects`."""
    found = [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"{len(found)} objects of kind {kind} named {name}"
    return found[0]


def load_yaml_documents(path: Path) -> list[Obj]:
    """Every non-empty YAML document of a file."""
    return [d for d in YAML(typ="safe").load_all(path.read_text()) if d]
