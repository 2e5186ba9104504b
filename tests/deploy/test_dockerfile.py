"""The container image's rules, read from the Dockerfile (no image is built here): a pinned
base, wheels built in a first stage and only the installed environment copied on, no compiler
or package installs in the final stage, a numeric non-root user matching the manifests, the
`egressgw` entrypoint, and a build context without the working tree's clutter."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from tests.deploy.support import render

ROOT = Path(__file__).resolve().parents[2]
COMPILERS = ("gcc", "g++", "clang", "build-essential", "make", "cargo", "rustc")


@dataclass
class Stage:
    """One FROM ... stage: its base, name and instructions (keyword, arguments)."""

    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        """The arguments of every instruction with this keyword."""
        return [a for k, a in self.instructions if k == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages of a Dockerfile (continuations joined)."""
    text = re.sub(r"\\\n", " ", text)
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            parts = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], parts[0])
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        elif keyword == "ARG" and not stages:
            key, _, default = rest.partition("=")
            args[key] = default
        elif stages:
            stages[-1].instructions.append((keyword, rest))
    return args, stages


def dockerfile() -> list[Stage]:
    """The project's Dockerfile stages."""
    return parse_dockerfile((ROOT / "Dockerfile").read_text())[1]


def test_base_images_are_pinned() -> None:
    """Every stage's base is an exact release (x.y.z tag) or a digest, never latest."""
    for stage in dockerfile():
        assert "@sha256:" in stage.base or re.search(r":\d+\.\d+\.\d+-", stage.base), stage.base


def test_wheels_are_built_first_and_only_the_environment_moves_on() -> None:
    """The first stage builds wheels (binary only) and installs them offline; the final stage
    copies that environment from it, runs nothing, and installs no compiler."""
    build, final = dockerfile()
    assert build.name == "build" and len(dockerfile()) == 2
    runs = " ".join(build.args("RUN"))
    assert "pip wheel --only-binary=:all:" in runs and "--no-index" in runs
    assert final.args("RUN") == []
    copies = final.args("COPY")
    assert copies and all(c.startswith("--from=build ") for c in copies)
    text = " ".join(a for _, a in final.instructions)
    assert not any(re.search(rf"\b{re.escape(c)}\b", text) for c in COMPILERS)
    assert final.base == build.base


def test_runs_as_numeric_non_root_user_of_the_manifests() -> None:
    """USER is numeric and not 0, the same user the explicit-mode Deployment runs as."""
    (user,) = dockerfile()[-1].args("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit() and int(gid) > 0
    (deployment,) = [o for o in render("overlays/explicit") if o["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]["securityContext"]
    assert (pod["runAsUser"], pod["runAsGroup"]) == (int(uid), int(gid))


def test_entrypoint_is_egressgw_and_cmd_matches_the_manifests() -> None:
    """Exec-form ENTRYPOINT runs the egressgw script (SIGTERM reaches it, no shell); CMD and
    the pods' args run the configuration the ConfigMap mounts; no HEALTHCHECK (Kubernetes
    probes instead)."""
    final = dockerfile()[-1]
    (entrypoint,) = final.args("ENTRYPOINT")
    assert json.loads(entrypoint)[0].endswith("/bin/egressgw")
    (cmd,) = final.args("CMD")
    (deployment,) = [o for o in render("overlays/explicit") if o["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert json.loads(cmd) == container["args"]
    assert final.args("HEALTHCHECK") == []
    env = " ".join(final.args("ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env  # the root filesystem is read-only


def test_dockerignore_keeps_the_build_inputs_only() -> None:
    """The context leaves out .git, .venv, tests and state, and keeps what the build copies."""
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "tests", "**/__pycache__"} <= ignored
    copied = set()
    for keyword, rest in dockerfile()[0].instructions:
        if keyword == "COPY":
            copied.update(shlex.split(rest)[:-1])
    assert copied == {"pyproject.toml", "README.md", "egressgw", "feeds", "siem"}
    assert not copied & ignored
