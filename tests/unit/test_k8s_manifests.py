"""The Kubernetes manifests (k8s/) and the Containerfile: schema-valid, least privilege, intended flows.

Every overlay is rendered here without kustomize: the kustomizations use only `resources`,
`components` and `patches` (JSON6902 with a target, or a whole-resource `$patch: delete`), which
`render` implements. kustomize itself renders the same overlays (each also with the optional monitoring
component) and the outputs must match, so the small renderer cannot drift from the real one: Debian
unstable's kustomize, unpacked into .cache/kustomize by `scripts/fetch-unstable-packages` (`./run test`
does), or one on PATH; where `kubectl` is installed, its built-in kustomize as well.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import subprocess
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = ("dev", "production", "production-postgresql")
TREES = ("base", *(f"overlays/{name}" for name in OVERLAYS))
# The Kubernetes versions the manifests must validate against: the oldest supported one and a newer
# one (kubernetes-validate ships schemas 1.25 .. 1.37 offline).
K8S_VERSIONS = ("1.30.0", "1.34.0")
IMAGE = "ghcr.io/sevlaunch/sevlaunch:0.1.0"
UID = 10001
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}
MONITORING = "components/monitoring"
HOST_NS, OWNER_NS = "sevlaunch-host", "sevlaunch-owner"
SEV_RESOURCE = "squat.ai/sev"
LIBVIRT_SOCK = "/var/run/libvirt/libvirt-sock"

Doc = dict[str, Any]


# --- a minimal kustomize: resources + JSON6902 patches + $patch: delete ---------------------------------


def _load_docs(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise ValueError(f"JSON pointer must start with '/': {path!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _walk(doc: Any, parts: list[str]) -> Any:
    for part in parts:
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    return doc


def apply_json6902(doc: Doc, ops: list[Doc]) -> Doc:
    """RFC 6902 add/remove/replace/test, enough for our patches; raises on any mismatch."""
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = _pointer(op["path"])
        parent, last = _walk(doc, parts[:-1]), parts[-1]
        kind = op["op"]
        if kind == "test":
            if _walk(doc, parts) != op["value"]:
                raise ValueError(f"test failed at {op['path']}: {_walk(doc, parts)!r} != {op['value']!r}")
        elif kind == "add":
            if isinstance(parent, list):
                index = len(parent) if last == "-" else int(last)
                if not 0 <= index <= len(parent):
                    raise IndexError(op["path"])
                parent.insert(index, copy.deepcopy(op["value"]))
            else:
                parent[last] = copy.deepcopy(op["value"])
        elif kind in ("remove", "replace"):
            key: int | str = int(last) if isinstance(parent, list) else last
            if isinstance(parent, list) and not 0 <= int(key) < len(parent):
                raise IndexError(op["path"])
            if isinstance(parent, dict) and key not in parent:
                raise KeyError(op["path"])
            if kind == "remove":
                del parent[key]
            else:
                parent[key] = copy.deepcopy(op["value"])
        else:
            raise ValueError(f"unsupported op {kind!r}")
    return doc


def _group_version(doc: Doc) -> tuple[str, str]:
    group, _, version = doc["apiVersion"].rpartition("/")
    return group, version


def _matches(doc: Doc, target: Doc) -> bool:
    group, version = _group_version(doc)
    meta = doc["metadata"]
    return bool(
        target.get("group", "") == group
        and target.get("version", version) == version
        and target["kind"] == doc["kind"]
        and target["name"] == meta["name"]
        and target.get("namespace", meta.get("namespace")) == meta.get("namespace")
    )


def _ident(doc: Doc) -> tuple[str, str, str, str]:
    meta = doc["metadata"]
    return doc["apiVersion"], doc["kind"], meta.get("namespace", ""), meta["name"]


def render(directory: Path) -> list[Doc]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - {"apiVersion", "kind", "resources", "components", "patches"}
    if unsupported:
        raise ValueError(f"{directory}: kustomize fields this renderer does not implement: {unsupported}")
    docs: list[Doc] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        docs.extend(render(path) if path.is_dir() else _load_docs(path))
    for entry in kustomization.get("components", []):
        # A Component adds its resources and applies its patches to what the parent has so far.
        component = yaml.safe_load((directory / entry / "kustomization.yaml").read_text())
        if component.get("kind") != "Component" or set(component) - {"apiVersion", "kind", "resources"}:
            raise ValueError(f"{directory / entry}: only a Component with resources is supported")
        for name in component.get("resources", []):
            docs.extend(_load_docs(directory / entry / name))
    for patch in kustomization.get("patches", []):
        path = directory / patch["path"]
        if "target" in patch:
            hits = [i for i, doc in enumerate(docs) if _matches(doc, patch["target"])]
            if len(hits) != 1:
                raise ValueError(f"{path}: target matches {len(hits)} resources")
            docs[hits[0]] = apply_json6902(docs[hits[0]], yaml.safe_load(path.read_text()))
        else:
            for body in _load_docs(path):
                if body.pop("$patch", None) != "delete":
                    raise ValueError(f"{path}: only `$patch: delete` is supported without a target")
                hits = [i for i, doc in enumerate(docs) if _ident(doc) == _ident(body)]
                if len(hits) != 1:
                    raise ValueError(f"{path}: delete matches {len(hits)} resources")
                del docs[hits[0]]
    idents = [_ident(doc) for doc in docs]
    if len(idents) != len(set(idents)):
        raise ValueError(f"{directory}: duplicate resources")
    return docs


def _with_monitoring(tree: str, into: Path) -> Path:
    """A kustomization in `into` of `tree` plus the monitoring component (paths relative: kustomize
    refuses absolute ones)."""
    relative = {name: os.path.relpath(K8S / name, into) for name in (tree, MONITORING)}
    (into / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {relative[tree]}\ncomponents:\n  - {relative[MONITORING]}\n"
    )
    return into


@functools.cache
def _rendered(tree: str) -> tuple[str, ...]:
    """`tree` rendered; `tree+monitoring` with the monitoring component."""
    if tree.endswith("+monitoring"):
        with tempfile.TemporaryDirectory() as tmp:
            docs = render(_with_monitoring(tree.removesuffix("+monitoring"), Path(tmp)))
    else:
        docs = render(K8S / tree)
    return tuple(json.dumps(doc, sort_keys=True) for doc in docs)


def rendered(tree: str) -> list[Doc]:
    """A fresh copy of the tree's resources (tests may not leak changes into each other)."""
    return [json.loads(doc) for doc in _rendered(tree)]


# --- helpers over the rendered resources -------------------------------------------------------------


def find(docs: list[Doc], kind: str, name: str | None = None) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[Doc], kind: str, name: str) -> Doc:
    (doc,) = find(docs, kind, name)
    return doc


def workloads(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if d["kind"] in ("DaemonSet", "Deployment", "StatefulSet", "Job", "Pod")]


def pod_spec(workload: Doc) -> Doc:
    spec: Doc = workload["spec"] if workload["kind"] == "Pod" else workload["spec"]["template"]["spec"]
    return spec


def containers(spec: Doc) -> list[Doc]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def container(docs: list[Doc], name: str) -> Doc:
    (found,) = [c for w in workloads(docs) for c in containers(pod_spec(w)) if c["name"] == name]
    return found


def env(c: Doc) -> dict[str, Any]:
    """name -> literal value, or the valueFrom mapping."""
    names = [e["name"] for e in c.get("env", [])]
    assert len(names) == len(set(names)), f"{c['name']}: duplicate env {names}"
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def volume_at(spec: Doc, c: Doc, path: str) -> tuple[Doc, Doc]:
    """(mount, volume) of the mount whose mountPath is `path` or a parent of it."""
    mounts = [
        m
        for m in c.get("volumeMounts", [])
        if path == m["mountPath"] or path.startswith(m["mountPath"] + "/")
    ]
    assert len(mounts) == 1, f"{c['name']}: {len(mounts)} mounts hold {path}"
    (volume,) = [v for v in spec.get("volumes", []) if v["name"] == mounts[0]["name"]]
    return mounts[0], volume


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def selects(selector: Doc, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are used here"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


# --- the renderer itself -----------------------------------------------------------------------------


def test_json6902_guards_and_escapes() -> None:
    doc = {"a": {"b/c": [1, 2]}}
    out = apply_json6902(
        doc,
        [
            {"op": "test", "path": "/a/b~1c/0", "value": 1},
            {"op": "add", "path": "/a/b~1c/-", "value": 3},
            {"op": "replace", "path": "/a/b~1c/0", "value": 0},
            {"op": "remove", "path": "/a/b~1c/1"},
            {"op": "add", "path": "/a/d", "value": {"e": 1}},
        ],
    )
    assert out == {"a": {"b/c": [0, 3], "d": {"e": 1}}}
    assert doc == {"a": {"b/c": [1, 2]}}  # the input is not changed
    with pytest.raises(ValueError, match="test failed"):
        apply_json6902(doc, [{"op": "test", "path": "/a/b~1c/0", "value": 2}])
    with pytest.raises(IndexError):
        apply_json6902(doc, [{"op": "remove", "path": "/a/b~1c/5"}])


KUSTOMIZE = REPO / ".cache" / "kustomize" / "usr" / "bin" / "kustomize"


def _kustomize_renderers() -> list[list[str]]:
    """The commands that render a kustomization directory given as their last argument: kustomize
    (required: a machine without it fails, it does not skip) and, where installed, kubectl's."""
    standalone = str(KUSTOMIZE) if KUSTOMIZE.exists() else shutil.which("kustomize")
    if standalone is None:
        pytest.fail("no kustomize: run scripts/fetch-unstable-packages (./run test does)")
    renderers = [[standalone, "build"]]
    kubectl = shutil.which("kubectl")
    if kubectl is not None:
        renderers.append([kubectl, "kustomize"])
    return renderers


@pytest.mark.parametrize("monitoring", [False, True])
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renders_like_kustomize(overlay: str, monitoring: bool, tmp_path: Path) -> None:
    tree = f"overlays/{overlay}"
    directory = _with_monitoring(tree, tmp_path) if monitoring else K8S / tree
    ours = sorted(_rendered(tree + ("+monitoring" if monitoring else "")))
    for command in _kustomize_renderers():
        out = subprocess.run(
            [*command, str(directory)], capture_output=True, text=True, check=True, timeout=60
        ).stdout
        theirs = sorted(json.dumps(d, sort_keys=True) for d in yaml.safe_load_all(out) if d)
        assert theirs == ours, " ".join(command[:2])


@pytest.mark.parametrize("tree", TREES)
def test_the_base_and_overlays_need_no_prometheus_operator(tree: str) -> None:
    # `kubectl apply -k` must work on a cluster without the Prometheus Operator's CRDs.
    assert not [d for d in rendered(tree) if d["apiVersion"].startswith("monitoring.coreos.com/")]


# --- schema --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("tree", TREES)
def test_every_resource_validates_against_the_kubernetes_schema(tree: str, version: str) -> None:
    docs = rendered(tree)
    assert docs
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRDS:
            continue  # no schema shipped: checked by test_service_monitors
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("tree", TREES)
def test_service_monitors(tree: str) -> None:
    docs = rendered(tree + "+monitoring")
    monitors = find(docs, "ServiceMonitor")
    assert {m["metadata"]["namespace"] for m in monitors} == {HOST_NS, OWNER_NS}
    scraped: set[int] = set()
    for monitor in monitors:
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
        assert monitor["metadata"]["name"]
        spec = monitor["spec"]
        assert set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
        assert "namespaceSelector" not in spec  # each monitor watches its own namespace
        services = [
            s
            for s in find(docs, "Service")
            if s["metadata"]["namespace"] == monitor["metadata"]["namespace"]
            and selects(spec["selector"], s["metadata"]["labels"])
        ]
        assert len(services) == 1, f"{monitor['metadata']['name']} selects {len(services)} Services"
        ports = {p["name"]: p for p in services[0]["spec"]["ports"]}
        assert spec["endpoints"]
        for endpoint in spec["endpoints"]:
            assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
            assert endpoint["port"] in ports
            assert endpoint["path"] == "/metrics"
            assert re.fullmatch(r"\d+[sm]", endpoint["interval"])
            scraped.add(ports[endpoint["port"]]["port"])
    assert scraped == {9101, 9102, 9103}


@pytest.mark.parametrize("tree", TREES)
def test_services_point_at_declared_container_ports(tree: str) -> None:
    docs = rendered(tree)
    for service in find(docs, "Service"):
        pods = [
            w
            for w in workloads(docs)
            if w["metadata"]["namespace"] == service["metadata"]["namespace"]
            and selects(
                {"matchLabels": service["spec"]["selector"]}, w["spec"]["template"]["metadata"]["labels"]
            )
        ]
        assert len(pods) == 1, service["metadata"]["name"]
        declared = {
            p["name"]: p["containerPort"] for c in containers(pod_spec(pods[0])) for p in c.get("ports", [])
        }
        for port in service["spec"]["ports"]:
            assert declared[port["targetPort"]] == port["port"]
        assert 50051 not in [p["port"] for p in service["spec"]["ports"]]  # the platform stays in its pod


# --- least privilege ---------------------------------------------------------------------------------


@pytest.mark.parametrize("tree", TREES)
def test_every_container_runs_with_least_privilege(tree: str) -> None:
    docs = rendered(tree)
    names = {c["name"] for w in workloads(docs) for c in pod_spec(w)["containers"]}
    assert names == {"platform", "launcher", "owner"}
    for workload in workloads(docs):
        spec = pod_spec(workload)
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True
        assert (pod_sc["runAsUser"], pod_sc["runAsGroup"], pod_sc["fsGroup"]) == (UID, UID, UID)
        assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
        for host_flag in ("hostNetwork", "hostPID", "hostIPC", "shareProcessNamespace"):
            assert not spec.get(host_flag, False), host_flag
        assert spec["automountServiceAccountToken"] is False
        for c in containers(spec):
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True, c["name"]
            assert sc.get("runAsUser", UID) != 0
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc.get("privileged", False) is False, c["name"]
            assert sc["capabilities"] == {"drop": ["ALL"]}, c["name"]  # nothing added back
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
            assert "procMount" not in sc
            assert c["image"] == IMAGE
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), (c["name"], kind)


@pytest.mark.parametrize("tree", TREES)
def test_only_emptydirs_and_volume_claims_are_writable(tree: str) -> None:
    for workload in workloads(rendered(tree)):
        spec = pod_spec(workload)
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in containers(spec):
            for mount in c.get("volumeMounts", []):
                volume = volumes[mount["name"]]
                if "emptyDir" in volume or "persistentVolumeClaim" in volume:
                    continue
                assert mount.get("readOnly") is True, (c["name"], mount["name"])
                for source in ("secret", "configMap"):
                    if source in volume:
                        assert volume[source]["defaultMode"] & 0o003 == 0, (
                            "no world bits on Secrets/ConfigMaps"
                        )
                        if source == "secret":
                            assert volume[source]["defaultMode"] & 0o222 == 0
        for volume in volumes.values():
            if "emptyDir" in volume:
                assert volume["emptyDir"].get("sizeLimit"), volume["name"]


def _hostpaths(docs: list[Doc]) -> dict[str, list[tuple[str, Doc]]]:
    """host path -> [(container name, volume)] for every container that mounts it."""
    found: dict[str, list[tuple[str, Doc]]] = {}
    for workload in workloads(docs):
        spec = pod_spec(workload)
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        unmounted = {name for name, v in volumes.items() if "hostPath" in v}
        for c in containers(spec):
            for mount in c.get("volumeMounts", []):
                volume = volumes[mount["name"]]
                if "hostPath" in volume:
                    unmounted.discard(mount["name"])
                    found.setdefault(volume["hostPath"]["path"], []).append((c["name"], volume))
        assert not unmounted
    return found


def _mentions(c: Doc, text: str) -> bool:
    return text in json.dumps(c)


@pytest.mark.parametrize("tree", TREES)
def test_only_the_platform_reaches_dev_sev(tree: str) -> None:
    docs = rendered(tree)
    assert not any(path.startswith("/dev") for path in _hostpaths(docs)), "devices come from a device plugin"
    for workload in workloads(docs):
        for c in containers(pod_spec(workload)):
            if c["name"] != "platform":
                assert not _mentions(c, "/dev/sev"), c["name"]
                assert not _mentions(c, SEV_RESOURCE), c["name"]
    platform = container(docs, "platform")
    if tree == "overlays/production" or tree == "overlays/production-postgresql":
        assert env(platform)["SEVLAUNCH_DEV_SEV"] == "/dev/sev"
        assert platform["resources"]["limits"][SEV_RESOURCE] == "1"
    else:
        assert not _mentions(platform, "/dev/sev")
        assert SEV_RESOURCE not in platform["resources"]["limits"]


@pytest.mark.parametrize("tree", TREES)
def test_only_the_launcher_mounts_the_libvirt_socket(tree: str) -> None:
    docs = rendered(tree)
    hostpaths = _hostpaths(docs)
    for workload in workloads(docs):
        for c in containers(pod_spec(workload)):
            if c["name"] != "launcher":
                assert not _mentions(c, "libvirt"), c["name"]
    if tree.startswith("overlays/production"):
        assert list(hostpaths) == [LIBVIRT_SOCK]
        ((name, volume),) = hostpaths[LIBVIRT_SOCK]
        assert name == "launcher"
        assert volume["hostPath"]["type"] == "Socket"
        host_spec = pod_spec(one(docs, "DaemonSet", "sevlaunch-host"))
        mount, _ = volume_at(host_spec, container(docs, "launcher"), LIBVIRT_SOCK)
        assert mount["mountPath"] == LIBVIRT_SOCK
    else:
        assert hostpaths == {}


def test_dev_runs_the_emulator_with_one_chip_shared_in_the_pod() -> None:  # and kept across restarts
    docs = rendered("overlays/dev")
    spec = pod_spec(one(docs, "DaemonSet", "sevlaunch-host"))
    platform, launcher = container(docs, "platform"), container(docs, "launcher")
    state = env(platform)["SEVLAUNCH_EMULATOR"]
    assert env(launcher)["SEVLAUNCH_EMULATOR"] == state
    assert env(launcher)["SEVLAUNCH_HYPERVISOR"] == "emulated"
    # Debian's OVMF in the image declares no secret area: LAUNCH_SECRET needs an explicit address.
    assert int(env(launcher)["SEVLAUNCH_SECRET_GPA"], 0) > 0
    assert "SEVLAUNCH_DEV_SEV" not in env(platform)
    assert "SEVLAUNCH_LIBVIRT_URI" not in env(launcher)
    (_, volume_p), (_, volume_l) = volume_at(spec, platform, state), volume_at(spec, launcher, state)
    # One chip shared by both containers, kept across pod restarts on its own volume claim.
    assert volume_p is volume_l and "emptyDir" not in volume_p
    claim = one(docs, "PersistentVolumeClaim", volume_p["persistentVolumeClaim"]["claimName"])
    assert claim["metadata"]["namespace"] == HOST_NS and claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    # The owner trusts the emulated root in dev, and only there.
    assert env(container(docs, "owner"))["SEVLAUNCH_TRUST_ROOT"].startswith("/etc/sevlaunch/trust/")
    for tree in ("base", "overlays/production", "overlays/production-postgresql"):
        assert "SEVLAUNCH_TRUST_ROOT" not in env(container(rendered(tree), "owner"))


@pytest.mark.parametrize("overlay", ["production", "production-postgresql"])
def test_production_uses_dev_sev_and_qemu_system(overlay: str) -> None:
    docs = rendered(f"overlays/{overlay}")
    platform, launcher = container(docs, "platform"), container(docs, "launcher")
    assert env(launcher)["SEVLAUNCH_HYPERVISOR"] == "libvirt"
    assert env(launcher)["SEVLAUNCH_LIBVIRT_URI"] == "qemu:///system"
    assert "SEVLAUNCH_EMULATOR" not in env(platform) | env(launcher)
    spec = pod_spec(one(docs, "DaemonSet", "sevlaunch-host"))
    _, cache = volume_at(spec, platform, env(platform)["SEVLAUNCH_CEK_CACHE_DIR"])
    assert "emptyDir" in cache


# --- services, secrets, probes -----------------------------------------------------------------------

EXPECTED_PORTS = {
    # container: (SEVLAUNCH_LISTEN, health port, metrics port, gRPC service)
    "platform": ("localhost:50051", 50061, 9101, "sevlaunch.v1.PlatformService"),
    "launcher": ("0.0.0.0:50052", 50062, 9102, "sevlaunch.v1.LauncherService"),
    "owner": ("0.0.0.0:50053", 50063, 9103, "sevlaunch.v1.OwnerService"),
}


@pytest.mark.parametrize("tree", TREES)
def test_ports_and_grpc_probes(tree: str) -> None:
    docs = rendered(tree)
    for name, (listen, health, metrics, service) in EXPECTED_PORTS.items():
        c = container(docs, name)
        variables = env(c)
        assert variables["SEVLAUNCH_LISTEN"] == listen
        assert port_of(variables["SEVLAUNCH_HEALTH_LISTEN"]) == health
        assert port_of(variables["SEVLAUNCH_METRICS_LISTEN"]) == metrics
        assert c["command"] == [f"sevlaunch-{name}"]
        declared = {p["containerPort"] for p in c["ports"]}
        assert {health, metrics} <= declared
        assert (port_of(listen) in declared) == (name != "platform")  # the platform is loopback-only
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c[kind]
            timing = {"periodSeconds", "failureThreshold", "initialDelaySeconds", "timeoutSeconds"}
            assert set(probe) - timing == {"grpc"}
            assert probe["grpc"]["port"] == health, (name, kind)
        assert c["readinessProbe"]["grpc"]["service"] == service
        assert "service" not in c["livenessProbe"]["grpc"]  # "" = the server as a whole
    assert env(container(docs, "launcher"))["SEVLAUNCH_PLATFORM"] == "localhost:50051"


@pytest.mark.parametrize("tree", TREES)
def test_tls_and_the_kek_come_from_secrets_one_identity_per_container(tree: str) -> None:
    docs = rendered(tree)
    secrets_seen: dict[str, str] = {}
    for workload in workloads(docs):
        spec = pod_spec(workload)
        for c in spec["containers"]:
            tls_dir = env(c)["SEVLAUNCH_TLS_DIR"]
            mount, volume = volume_at(spec, c, tls_dir)
            assert mount["mountPath"] == tls_dir and mount["readOnly"] is True
            secrets_seen[c["name"]] = volume["secret"]["secretName"]
            # No other container of the pod mounts this identity.
            for other in containers(spec):
                if other is not c:
                    assert mount["name"] not in {m["name"] for m in other.get("volumeMounts", [])}
    assert secrets_seen == {n: f"sevlaunch-{n}-tls" for n in ("platform", "launcher", "owner")}

    # The KEK: the owner reads it, read-only, from memory; only the init container `kek` mounts the
    # Secret, and copies it there as 0400 (owner_svc refuses a KEK readable by group or others).
    owner_spec = pod_spec(one(docs, "Deployment", "sevlaunch-owner"))
    owner = container(docs, "owner")
    kek_file = env(owner)["SEVLAUNCH_KEK_FILE"]
    mount, volume = volume_at(owner_spec, owner, kek_file)
    assert mount["readOnly"] is True
    assert volume["emptyDir"]["medium"] == "Memory"
    (init,) = owner_spec["initContainers"]
    command = init["command"]
    assert command[:3] == ["install", "-m", "0400"] and command[-1] == kek_file
    source_mount, source = volume_at(owner_spec, init, command[-2])
    assert source_mount["readOnly"] is True
    assert source["secret"]["secretName"] == "sevlaunch-owner-kek"
    (item,) = source["secret"]["items"]
    assert f"{source_mount['mountPath']}/{item['path']}" == command[-2]
    mount_in_init, _ = volume_at(owner_spec, init, kek_file)
    assert mount_in_init["name"] == mount["name"] and not mount_in_init.get("readOnly")
    secret_mounts = [
        c["name"]
        for w in workloads(docs)
        for c in containers(pod_spec(w))
        for m in c.get("volumeMounts", [])
        if m["name"] == source_mount["name"] and w is one(docs, "Deployment", "sevlaunch-owner")
    ]
    assert secret_mounts == ["kek"]
    assert not find(docs, "Secret"), "no secret material in the repository: operators create the Secrets"


@pytest.mark.parametrize("tree", TREES)
def test_owner_store_replicas_only_with_postgresql(tree: str) -> None:
    docs = rendered(tree)
    deployment = one(docs, "Deployment", "sevlaunch-owner")
    spec = pod_spec(deployment)
    db = env(container(docs, "owner"))["SEVLAUNCH_DB"]
    claims = [v for v in spec["volumes"] if "persistentVolumeClaim" in v]
    if deployment["spec"]["replicas"] == 1:
        # SQLite: the path from the ConfigMap, on the claim, and never two pods at once.
        ref = db["configMapKeyRef"]
        path = one(docs, "ConfigMap", ref["name"])["data"][ref["key"]]
        _, volume = volume_at(spec, container(docs, "owner"), path)
        assert volume in claims
        one(docs, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
        assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    else:
        assert db == {"secretKeyRef": {"name": "sevlaunch-owner-db", "key": "dsn"}}
        assert claims == [] and not find(docs, "PersistentVolumeClaim") and not find(docs, "ConfigMap")
        assert one(docs, "PodDisruptionBudget", "sevlaunch-owner")["spec"]["minAvailable"] == 1
    assert deployment["spec"]["replicas"] == (2 if tree == "overlays/production-postgresql" else 1)


# --- trust domains, scheduling -----------------------------------------------------------------------


@pytest.mark.parametrize("tree", TREES)
def test_one_namespace_and_service_account_per_trust_domain(tree: str) -> None:
    docs = rendered(tree)
    namespaces = {n["metadata"]["name"]: n["metadata"]["labels"] for n in find(docs, "Namespace")}
    assert set(namespaces) == {HOST_NS, OWNER_NS}
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] in namespaces
    for account in find(docs, "ServiceAccount"):
        assert account["metadata"]["name"] == account["metadata"]["namespace"]
        assert account["automountServiceAccountToken"] is False
    assert len(find(docs, "ServiceAccount")) == 2
    assert not [d for d in docs if d["kind"] in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")]
    assert {
        (w["kind"], w["metadata"]["namespace"], pod_spec(w)["serviceAccountName"]) for w in workloads(docs)
    } == {
        ("DaemonSet", HOST_NS, HOST_NS),
        ("Deployment", OWNER_NS, OWNER_NS),
    }
    for labels in namespaces.values():
        assert (
            labels["pod-security.kubernetes.io/warn"]
            == labels["pod-security.kubernetes.io/audit"]
            == "restricted"
        )
    assert namespaces[OWNER_NS]["pod-security.kubernetes.io/enforce"] == "restricted"
    # Only a hostPath (the libvirt socket) justifies lowering enforcement for the host namespace.
    expected = "privileged" if _hostpaths(docs) else "restricted"
    assert namespaces[HOST_NS]["pod-security.kubernetes.io/enforce"] == expected


@pytest.mark.parametrize("tree", TREES)
def test_host_pods_schedule_on_sev_hardware_labels_or_the_override(tree: str) -> None:
    spec = pod_spec(one(rendered(tree), "DaemonSet", "sevlaunch-host"))
    assert "nodeSelector" not in spec
    required = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    terms = required["nodeSelectorTerms"]
    override = {"key": "sevlaunch.io/host", "operator": "In", "values": ["enabled"]}
    opt_out = {"key": "sevlaunch.io/host", "operator": "NotIn", "values": ["disabled"]}
    hardware = [t for t in terms if t["matchExpressions"] != [override]]
    assert [t for t in terms if t["matchExpressions"] == [override]] == [{"matchExpressions": [override]}]
    if tree == "overlays/dev":
        assert hardware == []  # the emulator needs no hardware: opted-in nodes only
    else:
        assert {t["matchExpressions"][0]["key"] for t in hardware} == {
            "amd.com/sev",
            "feature.node.kubernetes.io/cpu-security.sev.enabled",
        }
        for term in hardware:
            label, rest = term["matchExpressions"][0], term["matchExpressions"][1:]
            assert (label["operator"], label["values"]) == ("In", ["true"])
            assert rest == [opt_out]


# --- network policies --------------------------------------------------------------------------------


def _labels(selector: Doc | None) -> str:
    if selector is None:
        return "*"
    assert set(selector) <= {"matchLabels"}
    return ",".join(f"{k}={v}" for k, v in sorted(selector.get("matchLabels", {}).items())) or "{}"


def _peer(peer: Doc, own_namespace: str) -> str:
    if "ipBlock" in peer:
        return f"cidr:{peer['ipBlock']['cidr']}-{len(peer['ipBlock'].get('except', []))}"
    namespace = (
        _labels(peer.get("namespaceSelector")) if "namespaceSelector" in peer else f"ns={own_namespace}"
    )
    return f"{namespace}/{_labels(peer.get('podSelector'))}"


def flows(docs: list[Doc]) -> set[str]:
    """Every allowed flow, one readable line per (policy target, direction, peer, port)."""
    out: set[str] = set()
    for policy in find(docs, "NetworkPolicy"):
        namespace, spec = policy["metadata"]["namespace"], policy["spec"]
        target = f"{namespace}/{_labels(spec['podSelector'])}"
        for direction, key, word in (("Ingress", "ingress", "from"), ("Egress", "egress", "to")):
            assert (direction in spec["policyTypes"]) or key not in spec
            for rule in spec.get(key, []):
                peers = [_peer(p, namespace) for p in rule.get(word, [])] or ["any"]
                assert rule.get("ports"), (
                    f"{policy['metadata']['name']}: a rule without ports opens every port"
                )
                for peer in peers:
                    for port in rule["ports"]:
                        arrow = "<-" if direction == "Ingress" else "->"
                        out.add(f"{target} {arrow} {peer} {port['protocol']}/{port['port']}")
    return out


HOST = "sevlaunch-host/app.kubernetes.io/name=sevlaunch-host"
OWNER = "sevlaunch-owner/app.kubernetes.io/name=sevlaunch-owner"
PROMETHEUS = "kubernetes.io/metadata.name=monitoring/app.kubernetes.io/name=prometheus"
DNS = "kubernetes.io/metadata.name=kube-system/k8s-app=kube-dns"
BASE_FLOWS = {
    f"{HOST} <- any TCP/50052",  # clients -> launcher
    f"{HOST} <- {PROMETHEUS} TCP/9101",
    f"{HOST} <- {PROMETHEUS} TCP/9102",
    f"{HOST} -> kubernetes.io/metadata.name=sevlaunch-owner/app.kubernetes.io/name=sevlaunch-owner TCP/50053",
    f"{HOST} -> {DNS} UDP/53",
    f"{HOST} -> {DNS} TCP/53",
    f"{OWNER} <- kubernetes.io/metadata.name=sevlaunch-host/app.kubernetes.io/name=sevlaunch-host TCP/50053",
    f"{OWNER} <- ns=sevlaunch-owner/sevlaunch.io/owner-client=true TCP/50053",  # admin / two-phase clients
    f"{OWNER} <- {PROMETHEUS} TCP/9103",
    # SEV-SNP guests -> the owner's guest port (their network; emulated guests in the host pods).
    f"{OWNER} <- cidr:10.0.0.0/8-0 TCP/50054",
    f"{OWNER} <- kubernetes.io/metadata.name=sevlaunch-host/app.kubernetes.io/name=sevlaunch-host TCP/50054",
}
KDS_FLOW = {f"{HOST} -> cidr:0.0.0.0/0-5 TCP/443"}  # platform -> AMD KDS, private ranges excepted
POSTGRESQL_FLOWS = {
    f"{OWNER} -> ns=sevlaunch-owner/app.kubernetes.io/name=postgresql TCP/5432",
    f"{OWNER} -> {DNS} UDP/53",
    f"{OWNER} -> {DNS} TCP/53",
}
EXPECTED_FLOWS = {
    "base": BASE_FLOWS,
    "overlays/dev": BASE_FLOWS,
    "overlays/production": BASE_FLOWS | KDS_FLOW,
    "overlays/production-postgresql": BASE_FLOWS | KDS_FLOW | POSTGRESQL_FLOWS,
}


@pytest.mark.parametrize("tree", TREES)
def test_network_policies_deny_by_default_and_allow_only_the_design_flows(tree: str) -> None:
    docs = rendered(tree)
    denies = {
        p["metadata"]["namespace"]
        for p in find(docs, "NetworkPolicy", "default-deny")
        if p["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    }
    assert denies == {HOST_NS, OWNER_NS}
    assert flows(docs) == EXPECTED_FLOWS[tree]
    # Each policy applies to pods that exist (a typo in a selector would silently protect nothing).
    for policy in find(docs, "NetworkPolicy"):
        selector = policy["spec"]["podSelector"]
        if selector:
            assert [
                w
                for w in workloads(docs)
                if w["metadata"]["namespace"] == policy["metadata"]["namespace"]
                and selects(selector, w["spec"]["template"]["metadata"]["labels"])
            ], policy["metadata"]["name"]
    # And the peers name the real pods of the other trust domain.
    host_labels = one(docs, "DaemonSet", "sevlaunch-host")["spec"]["template"]["metadata"]["labels"]
    owner_labels = one(docs, "Deployment", "sevlaunch-owner")["spec"]["template"]["metadata"]["labels"]
    assert host_labels["app.kubernetes.io/name"] == "sevlaunch-host"
    assert owner_labels["app.kubernetes.io/name"] == "sevlaunch-owner"


@pytest.mark.parametrize("tree", TREES)
def test_the_owner_guest_port_has_its_own_service_policy_and_tls(tree: str) -> None:
    """SEV-SNP guests reach only the guest port: its own Service (nothing else exposed on it, not
    scraped), a NetworkPolicy opening 50054 alone, and a server certificate apart from the mTLS one."""
    docs = rendered(tree)
    service = one(docs, "Service", "sevlaunch-owner-guest")
    assert service["metadata"]["namespace"] == OWNER_NS
    assert [(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [
        ("guest", 50054, "guest")
    ]
    assert service["spec"]["selector"] == {"app.kubernetes.io/name": "sevlaunch-owner"}
    for monitor in find(docs, "ServiceMonitor"):
        assert not selects(monitor["spec"]["selector"], service["metadata"]["labels"])
    mtls = one(docs, "Service", "sevlaunch-owner")
    assert 50054 not in [p["port"] for p in mtls["spec"]["ports"]]
    policy = one(docs, "NetworkPolicy", "sevlaunch-owner-guests")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]} == {50054}
    owner = container(docs, "owner")
    variables = env(owner)
    assert port_of(variables["SEVLAUNCH_GUEST_LISTEN"]) == 50054
    assert 50054 in {p["containerPort"] for p in owner["ports"]}
    spec = pod_spec(one(docs, "Deployment", "sevlaunch-owner"))
    mounts = {
        volume_at(spec, owner, variables[f"SEVLAUNCH_GUEST_TLS_{k}"])[1]["secret"]["secretName"]
        for k in ("CERT", "KEY", "CA")
    }
    assert mounts == {"sevlaunch-owner-guest-cert"}
    endpoint = variables["SEVLAUNCH_GUEST_ENDPOINT"]
    assert endpoint.startswith("https://") and port_of(endpoint) == 50054


# --- the image ---------------------------------------------------------------------------------------


def test_containerfile_builds_the_image_the_manifests_run() -> None:
    text = (REPO / "Containerfile").read_text()
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert IMAGE == f"ghcr.io/sevlaunch/sevlaunch:{version}"
    assert IMAGE in text
    assert re.search(r"^ARG BASE_IMAGE=docker\.io/library/python:3\.11-slim-bookworm$", text, re.M)
    stages = re.findall(r"^FROM (\S+)(?: AS (\w+))?$", text, re.M)
    assert stages == [("${BASE_IMAGE}", "builder"), ("${BASE_IMAGE}", "")]
    builder, runtime = text.split("\nFROM ${BASE_IMAGE}\n")
    for package in ("libvirt-dev", "pkg-config", "gcc"):
        assert package in builder and package not in runtime
    assert "libvirt0" in runtime
    assert "pip install /src" in builder
    assert f"--uid {UID} --gid {UID}" in runtime
    (user,) = re.findall(r"^USER (\S+)$", text, re.M)
    assert user == f"{UID}:{UID}"  # numeric, so runAsNonRoot can verify it; matches the manifests


def test_build_context_ignores_are_the_same_for_podman_and_docker() -> None:
    ignore = (REPO / ".containerignore").read_text()
    assert (REPO / ".dockerignore").read_text() == ignore
    entries = {line for line in ignore.splitlines() if line and not line.startswith("#")}
    assert {".git", ".venv", "*.egg-info"} <= entries
    assert not {"sevlaunch", "platform_svc", "launcher_svc", "owner_svc", "pyproject.toml"} & entries


RECOMMENDED_LABELS = ("name", "instance", "version", "component", "part-of", "managed-by")


@pytest.mark.parametrize("tree", TREES)
def test_workloads_carry_the_recommended_labels_priority_and_budgets(tree: str) -> None:
    docs = rendered(tree)
    for workload in workloads(docs):
        for labels in (workload["metadata"]["labels"], workload["spec"]["template"]["metadata"]["labels"]):
            assert {f"app.kubernetes.io/{k}" for k in RECOMMENDED_LABELS} <= set(labels), workload["kind"]
        name = workload["metadata"]["labels"]["app.kubernetes.io/name"]
        budgets = [
            b
            for b in find(docs, "PodDisruptionBudget")
            if b["metadata"]["namespace"] == workload["metadata"]["namespace"]
            and selects(b["spec"]["selector"], workload["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(budgets) == 1, name
        budget = budgets[0]["spec"]
        replicas = workload["spec"].get("replicas", 1)
        # A budget never blocks a drain for ever: with one replica it must allow one pod down.
        assert budget.get("maxUnavailable") == 1 or (
            replicas > 1 and budget.get("minAvailable", 0) < replicas
        )
    host = one(docs, "DaemonSet", "sevlaunch-host")
    assert pod_spec(host)["priorityClassName"] == "system-node-critical"
