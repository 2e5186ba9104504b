"""The container image's rules, read from the Dockerfile (no image is built here): a pinned
base, wheels built in a first stage and only the installed environment copied on, no compiler
or package installs in the explicit-mode image and only nftables in the per-node one, a numeric
non-root user matching the manifests, the `egressgw` entrypoint, and a build context without
the working tree's clutter."""

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


def lineage(stage: Stage) -> list[Stage]:
    """The stage and the stages it is built FROM, oldest first."""
    named = {s.name: s for s in dockerfile() if s.name}
    chain = [stage]
    while chain[0].base in named:
        chain.insert(0, named[chain[0].base])
    return chain


def inherited(stage: Stage, keyword: str) -> list[str]:
    """The arguments of every instruction with this keyword, in the stage and those below it."""
    return [a for s in lineage(stage) for a in s.args(keyword)]


def test_base_images_are_pinned() -> None:
    """Every stage's base is an exact release (x.y.z tag) or a digest, never latest, or one of
    the Dockerfile's own stages."""
    names = {s.name for s in dockerfile() if s.name}
    for stage in dockerfile():
        assert (
            stage.base in names
            or "@sha256:" in stage.base
            or re.search(r":\d+\.\d+\.\d+-", stage.base)
        ), stage.base


def test_wheels_are_built_first_and_only_the_environment_moves_on() -> None:
    """The first stage builds wheels (binary only) and installs them offline; the images copy
    that environment from it and install no compiler. The explicit-mode image (the default,
    last target) runs nothing; the per-node one adds only the nftables package."""
    stages = dockerfile()
    build, final = stages[0], stages[-1]
    node = next(s for s in stages if s.name == "node")
    assert build.name == "build"
    runs = " ".join(build.args("RUN"))
    assert "pip wheel --only-binary=:all:" in runs and "--no-index" in runs
    assert inherited(final, "RUN") == []
    for image in (final, node):
        copies = inherited(image, "COPY")
        assert copies and all(c.startswith("--from=build ") for c in copies)
        text = " ".join(a for s in lineage(image) for _, a in s.instructions)
        assert not any(re.search(rf"\b{re.escape(c)}\b", text) for c in COMPILERS)
        assert lineage(image)[0].base == build.base
    (install,) = node.args("RUN")
    assert "apt-get install -y --no-install-recommends nftables" in install
    assert install.endswith("rm -rf /var/lib/apt/lists/*")
    (daemonset,) = [o for o in render("overlays/per-node") if o["kind"] == "DaemonSet"]
    pod = daemonset["spec"]["template"]["spec"]
    for container in (*pod["initContainers"], *pod["containers"]):
        assert container["image"].split(":")[0].endswith("egressgw-node"), container["image"]


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
    (entrypoint,) = inherited(final, "ENTRYPOINT")
    assert json.loads(entrypoint)[0].endswith("/bin/egressgw")
    (cmd,) = inherited(final, "CMD")
    (deployment,) = [o for o in render("overlays/explicit") if o["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert json.loads(cmd) == container["args"]
    assert inherited(final, "HEALTHCHECK") == []
    env = " ".join(inherited(final, "ENV"))
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
