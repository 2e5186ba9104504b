"""The kustomizations of deploy/: each renders with kubectl, every object validates strictly
against the Kubernetes OpenAPI schemas, and the pods are hardened and wired as documented."""

from __future__ import annotations

import ipaddress
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from egressgw.config.model import load_config, load_policy
from tests.deploy.support import DEPLOY, KUSTOMIZATIONS, Obj, load_yaml_documents, one, render
from tests.support.gateway import egressgw_executable

# The oldest Kubernetes the manifests are written for (ValidatingAdmissionPolicy v1) and the
# newest the validator knows.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
OVERLAYS = ("overlays/explicit", "overlays/per-node", "overlays/explicit-monitoring")
# Kinds whose schemas come from CustomResourceDefinitions, checked in test_crds.py and below.
CUSTOM_GROUPS = ("egressgw.io/", "monitoring.coreos.com/")
CLUSTER_KINDS = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
}


def kustomization_id(path: Path) -> str:
    """A kustomization's folder relative to deploy/."""
    return str(path.relative_to(DEPLOY))


ALL = [kustomization_id(p) for p in KUSTOMIZATIONS]


@pytest.mark.parametrize("name", ALL)
def test_kustomization_renders_and_validates_strictly(name: str) -> None:
    """`kubectl kustomize` renders it and every built-in object passes kubernetes-validate
    --strict (unknown fields refused); cluster-scoped kinds carry no namespace."""
    objects = render(name)
    assert objects
    for obj in objects:
        where = f"{name}: {obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in CLUSTER_KINDS:
            assert "namespace" not in obj["metadata"], where
        if obj["apiVersion"].startswith(CUSTOM_GROUPS):
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{where} (Kubernetes {version}): {e.message} at {list(e.path)}")


def test_every_manifest_file_is_rendered_by_a_kustomization() -> None:
    """No YAML file under deploy/ sits outside every kustomization (nothing unvalidated)."""
    used: set[Path] = set()
    for directory in KUSTOMIZATIONS:
        (kustomization,) = load_yaml_documents(directory / "kustomization.yaml")
        for key in ("resources", "patchesStrategicMerge"):
            used.update(directory / f for f in kustomization.get(key, []))
        for generator in kustomization.get("configMapGenerator", []):
            used.update(directory / f for f in generator.get("files", []))
    files = {p for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert files - used == set()


def pod_spec(workload: Obj) -> Obj:
    """The pod spec of a Deployment or DaemonSet."""
    spec: Obj = workload["spec"]["template"]["spec"]
    return spec


def workloads() -> list[tuple[str, Obj]]:
    """(overlay, Deployment or DaemonSet) of each mode."""
    out = []
    for name in OVERLAYS:
        for obj in render(name):
            if obj["kind"] in ("Deployment", "DaemonSet"):
                out.append((name, obj))
    return out


def rendered_config(objects: list[Obj], tmp_path: Path) -> Any:
    """The gateway configuration of the rendered ConfigMap, loaded by the gateway itself."""
    (cm,) = [
        o
        for o in objects
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("egressgw-config")
    ]
    for key, text in cm["data"].items():
        (tmp_path / key).write_text(text)
    cfg = load_config(tmp_path / "egressgw.yaml")
    load_policy(cfg.policy.files, {f.name for f in cfg.feeds})
    return cfg


def test_pods_are_hardened() -> None:
    """Every container, init containers too: no privilege escalation, read-only root,
    capabilities drop ALL, seccomp RuntimeDefault, requests and limits; non-root except the
    per-node ones, which alone add capabilities: NET_ADMIN and NET_RAW for the gateway,
    NET_ADMIN alone for the init container that loads the node rules."""
    found = workloads()
    assert {w["kind"] for _, w in found} == {"Deployment", "DaemonSet"}
    for name, workload in found:
        pod = pod_spec(workload)
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        init = pod.get("initContainers", [])
        for c in pod["containers"] + init:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", name
            for section in ("requests", "limits"):
                assert set(c["resources"][section]) == {"cpu", "memory"}, name
            if workload["kind"] == "DaemonSet":
                added = {"NET_ADMIN"} if c in init else {"NET_ADMIN", "NET_RAW"}
                assert set(sc["capabilities"]["add"]) == added, c["name"]
            else:
                assert "add" not in sc["capabilities"]
                assert sc["runAsNonRoot"] is True and pod["securityContext"]["runAsNonRoot"]
                assert pod["securityContext"]["runAsUser"] > 0


@pytest.mark.parametrize(
    ("overlay", "image"),
    [
        ("overlays/explicit", "registry.example/egressgw:0.1.0"),
        ("overlays/explicit-monitoring", "registry.example/egressgw:0.1.0"),
        ("overlays/per-node", "registry.example/egressgw-node:0.1.0"),
    ],
)
def test_every_container_runs_the_image_its_overlay_names(overlay: str, image: str) -> None:
    """The images: entry reaches every container (an entry in the base would not reach the
    overlay's own workload: kustomize rewrites only resources at or below its kustomization)."""
    for workload in render(overlay):
        if workload["kind"] in ("Deployment", "DaemonSet"):
            pod = pod_spec(workload)
            for c in pod["containers"] + pod.get("initContainers", []):
                assert c["image"] == image, (overlay, c["name"], c["image"])


def test_pods_probe_mount_and_stop_as_the_configuration_says(tmp_path: Path) -> None:
    """Probes hit /healthz and /readyz on the admin port, Prometheus annotations name it, the
    spool and feed state sit on a writable volume, the seed and config come from ConfigMaps,
    and the grace period outlasts shutdown delay plus drain."""
    for name, workload in workloads():
        cfg = rendered_config(render(name), tmp_path)
        admin_port = int(cfg.admin.listen.rsplit(":", 1)[1])
        proxy_port = int(cfg.proxy.listen.rsplit(":", 1)[1])
        pod = pod_spec(workload)
        (c,) = pod["containers"]
        ports = {p["name"]: (p["containerPort"], p["protocol"]) for p in c["ports"]}
        expected = {"admin": (admin_port, "TCP"), "proxy": (proxy_port, "TCP")}
        if cfg.transparent.listen is not None:
            expected["transparent"] = (int(cfg.transparent.listen.rsplit(":", 1)[1]), "TCP")
        if cfg.dns.listen is not None:
            dns_port = int(cfg.dns.listen.rsplit(":", 1)[1])
            expected |= {"dns-udp": (dns_port, "UDP"), "dns-tcp": (dns_port, "TCP")}
        assert ports == expected, name
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(admin_port)
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        config_file = Path(c["args"][c["args"].index("--config") + 1])
        config_mount = mounts[str(config_file.parent)]
        assert volumes[config_mount["name"]]["configMap"]["name"].startswith("egressgw-config-")
        assert cfg.spool is not None
        for path in (cfg.spool.dir, cfg.state_dir):
            (data,) = [m for p, m in mounts.items() if Path(p) in Path(path).parents]
            assert not data.get("readOnly") and {"emptyDir", "hostPath"} & set(
                volumes[data["name"]]
            ), path
        assert cfg.state_seed_dir is not None
        seed = volumes[mounts[str(cfg.state_seed_dir / "feeds")]["name"]]["configMap"]
        assert seed == {"name": "egressgw-feed-seed", "optional": True}
        grace = pod["terminationGracePeriodSeconds"]
        assert grace > cfg.proxy.shutdown_delay + cfg.proxy.drain_timeout + 5


def test_explicit_mode_is_highly_available() -> None:
    """At least two replicas spread over nodes, surge-only rollouts, a PodDisruptionBudget and
    a CPU autoscaler on the Deployment, a Service selecting its pods' named ports."""
    objects = render("overlays/explicit")
    deployment = one(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    spread = pod_spec(deployment)["topologySpreadConstraints"]
    by_node = [s for s in spread if s["topologyKey"] == "kubernetes.io/hostname"]
    assert by_node and by_node[0]["whenUnsatisfiable"] == "DoNotSchedule"
    assert by_node[0]["labelSelector"]["matchLabels"].items() <= pod_labels.items()
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    service = one(objects, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (c,) = pod_spec(deployment)["containers"]
    named = {p["name"] for p in c["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= named


def test_servicemonitor_scrapes_the_service_metrics_port() -> None:
    """The optional ServiceMonitor selects the gateway's Service and its metrics port."""
    objects = render("overlays/explicit-monitoring")
    monitor, service = one(objects, "ServiceMonitor"), one(objects, "Service")
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}


def test_rbac_is_least_privilege() -> None:
    """The gateway's ClusterRole reads pods, replicasets, jobs and the egressgw.io resources,
    writes only their status and creates TokenReviews: no wildcard, no secrets."""
    objects = render("overlays/explicit")
    role = one(objects, "ClusterRole", "egressgw")
    grants = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    read = {"get", "list", "watch"}
    expected = (
        {("", "pods", v) for v in read}
        | {("apps", "replicasets", v) for v in read}
        | {("batch", "jobs", v) for v in read}
        | {
            ("egressgw.io", r, v)
            for r in ("egresspolicies", "globalegresspolicies", "threatfeeds")
            for v in read
        }
        | {
            ("egressgw.io", f"{r}/status", v)
            for r in ("egresspolicies", "globalegresspolicies", "threatfeeds")
            for v in ("get", "patch", "update")
        }
        | {("authentication.k8s.io", "tokenreviews", "create")}
    )
    assert grants == expected
    binding = one(objects, "ClusterRoleBinding", "egressgw")
    account = one(objects, "ServiceAccount", "egressgw")
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": "egressgw",
            "namespace": account["metadata"]["namespace"],
        }
    ]
    assert pod_spec(one(objects, "Deployment"))["serviceAccountName"] == "egressgw"


def test_workload_namespace_egress_goes_through_gateway_and_dns_only() -> None:
    """A workload namespace denies all egress, then opens the gateway's proxy port, DNS on 53
    UDP and TCP, and in-cluster pods; its proxy variables name the Service and skip the
    cluster's names and CIDRs."""
    objects = render("examples/workload-payments")
    explicit = render("overlays/explicit")
    service, deployment = one(explicit, "Service"), one(explicit, "Deployment")
    policies = {o["metadata"]["name"]: o for o in objects if o["kind"] == "NetworkPolicy"}
    assert all(o["metadata"]["namespace"] == "payments" for o in objects)
    deny = policies["egressgw-default-deny-egress"]["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Egress"]}
    gateway_rule, dns_rule = policies["egressgw-allow-gateway-and-dns"]["spec"]["egress"]
    (peer,) = gateway_rule["to"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert peer["podSelector"]["matchLabels"].items() <= pod_labels.items()
    namespace = deployment["metadata"]["namespace"]
    assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": namespace}
    proxy_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "proxy")
    assert gateway_rule["ports"] == [{"protocol": "TCP", "port": proxy_port}]
    assert {(p["protocol"], p["port"]) for p in dns_rule["ports"]} == {("UDP", 53), ("TCP", 53)}
    env = one(objects, "ConfigMap", "egressgw-proxy-env")["data"]
    url = f"http://{service['metadata']['name']}.{namespace}.svc.cluster.local:{proxy_port}"
    for key in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        assert env[key] == url
    assert env["NO_PROXY"] == env["no_proxy"]
    skipped = env["NO_PROXY"].split(",")
    assert {".svc", ".cluster.local", "localhost"} <= set(skipped)
    cidrs = [ipaddress.ip_network(s) for s in skipped if "/" in s]
    assert len(cidrs) == 2 and all(n.is_private for n in cidrs)


def test_per_node_namespace_admits_its_pods() -> None:
    """The per-node overlay's namespace admits privileged pods; explicit mode stays restricted."""
    label = "pod-security.kubernetes.io/enforce"
    node = one(render("overlays/per-node"), "Namespace")["metadata"]["labels"][label]
    explicit = one(render("overlays/explicit"), "Namespace")["metadata"]["labels"][label]
    assert (node, explicit) == ("privileged", "restricted")
    daemonset = one(render("overlays/per-node"), "DaemonSet")
    assert pod_spec(daemonset)["hostNetwork"] is True


def test_per_node_overlay_runs_a_node_gateway(tmp_path: Path) -> None:
    """The per-node configuration has the transparent listener, the DNS proxy, the node rules
    and this node's pods only, and `egressgw check` accepts it; NODE_NAME comes from the
    downward API; an init container and postStart run `node setup` with the same file, and
    nothing tears the rules down when the pod ends (fail closed); the rules it renders redirect
    to the ports the pod names."""
    objects = render("overlays/per-node")
    cfg = rendered_config(objects, tmp_path)
    assert cfg.transparent.listen is not None
    assert cfg.dns.listen is not None and cfg.dns.upstreams
    assert cfg.node.enabled and cfg.node.exempt_mark and cfg.node.exclude_cidrs
    assert cfg.identity.kubernetes is not None and cfg.identity.kubernetes.own_node
    check = subprocess.run(
        [str(egressgw_executable()), "check", "--config", str(tmp_path / "egressgw.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr

    pod = pod_spec(one(objects, "DaemonSet"))
    (c,) = pod["containers"]
    config_file = c["args"][c["args"].index("--config") + 1]
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    (init,) = pod["initContainers"]
    assert init["image"] == c["image"]
    assert init["args"] == ["node", "setup", "--config", config_file]
    mounts = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
    assert mounts[str(Path(config_file).parent)] == "config"
    hooks = c["lifecycle"]
    assert hooks["postStart"]["exec"]["command"][1:] == ["node", "setup", "--config", config_file]
    assert hooks["postStart"]["exec"]["command"][0].endswith("/bin/egressgw")
    assert "preStop" not in hooks  # a gateway gone must not let pod egress out unfiltered

    script = subprocess.run(
        [str(egressgw_executable()), "node", "setup", "--dry-run", "--config",
         str(tmp_path / "egressgw.yaml")],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert f"udp dport 53 redirect to :{ports['dns-udp']}" in script
    assert f"tcp dport 53 redirect to :{ports['dns-tcp']}" in script
    assert f"meta l4proto tcp redirect to :{ports['transparent']}" in script
