"""The Kubernetes deployment in deploy/daemonset/ checked against the code it
runs: the agent's command line is parsed by the real CLI parser, the probes
point at the socket the agent really opens, the cgroup root is one the agent
accepts, and RBAC stays read-only. No root and no cluster needed."""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from agent.instance import Instance
from nodemesh.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy" / "daemonset"
MANIFEST = DEPLOY / "nodemesh.yaml"
CONTAINERFILE = DEPLOY / "Containerfile"
NAMESPACE = "nodemesh-system"
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
READ_VERBS = {"get", "list", "watch"}
FAKE_NODE = "node-under-test"


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    loaded = list(yaml.safe_load_all(MANIFEST.read_text()))
    return [d for d in loaded if d is not None]


def only(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def daemonset(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return only(docs, "DaemonSet")


@pytest.fixture(scope="module")
def pod_spec(daemonset: dict[str, Any]) -> dict[str, Any]:
    return daemonset["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def agent(pod_spec: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in pod_spec["containers"] if c["name"] == "nodemesh-agent"]
    return container


# -- how the kubelet turns the manifest into a command line -----------------

def container_env(container: dict[str, Any], docs: list[dict[str, Any]]) -> dict[str, str]:
    """The container's environment as the kubelet builds it, with this node's
    name for the downward API and the manifest's own ConfigMaps."""
    configmaps = {(d["metadata"].get("namespace"), d["metadata"]["name"]): d.get("data") or {}
                  for d in docs if d["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = expand(str(var["value"]), env)
            continue
        source = var["valueFrom"]
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            assert path == "spec.nodeName", f"env {var['name']}: unexpected fieldRef {path}"
            env[var["name"]] = FAKE_NODE
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            data = configmaps.get((NAMESPACE, ref["name"]))
            assert data is not None, f"env {var['name']}: ConfigMap {ref['name']} is not in the manifest"
            assert ref["key"] in data, f"env {var['name']}: ConfigMap {ref['name']} has no key {ref['key']}"
            env[var["name"]] = str(data[ref["key"]])
        else:
            pytest.fail(f"env {var['name']}: unexpected valueFrom {source}")
    return env


_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined variables are replaced, $$ is a
    literal $, anything else is left as written."""
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _REF.sub(sub, text)


def image_entrypoint() -> list[str]:
    for line in CONTAINERFILE.read_text().splitlines():
        if line.startswith("ENTRYPOINT"):
            return list(yaml.safe_load(line.split(None, 1)[1]))
    pytest.fail("the Containerfile has no ENTRYPOINT")


def nodemesh_argv(container: dict[str, Any], env: dict[str, str]) -> list[str]:
    """The arguments the `nodemesh` program receives in this container."""
    command = [expand(c, env) for c in container.get("command") or image_entrypoint()]
    args = [expand(a, env) for a in container.get("args", [])]
    assert Path(command[0]).name == "nodemesh", f"the container runs {command}, not nodemesh"
    return command[1:] + args


@pytest.fixture(scope="module")
def agent_args(agent: dict[str, Any], docs: list[dict[str, Any]]) -> Any:
    argv = nodemesh_argv(agent, container_env(agent, docs))
    unexpanded = [a for a in argv if "$(" in a]
    assert not unexpanded, f"arguments the kubelet would leave unexpanded: {unexpanded}"
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse's answer to an unknown or malformed flag
        pytest.fail(f"`nodemesh {' '.join(argv)}` is refused by the CLI (exit {exc.code})")


def mounts(container: dict[str, Any], pod_spec: dict[str, Any]) -> dict[str, tuple[dict, dict]]:
    """mountPath -> (volumeMount, volume) for one container."""
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    out = {}
    for m in container.get("volumeMounts", []):
        assert m["name"] in volumes, f"volumeMount {m['name']} has no volume"
        out[m["mountPath"]] = (m, volumes[m["name"]])
    return out


def host_path(volume: dict[str, Any]) -> str | None:
    return (volume.get("hostPath") or {}).get("path")


def norm(path: str | Path) -> PurePosixPath:
    return PurePosixPath(os.path.normpath(str(path)))


# -- the objects -------------------------------------------------------------

def test_every_document_is_a_named_kubernetes_object(docs: list[dict[str, Any]]) -> None:
    assert docs
    seen = set()
    for d in docs:
        assert isinstance(d.get("apiVersion"), str) and d["apiVersion"], d
        assert isinstance(d.get("kind"), str) and d["kind"], d
        name = (d.get("metadata") or {}).get("name")
        assert isinstance(name, str) and name, f"{d['kind']} without metadata.name"
        key = (d["kind"], d["metadata"].get("namespace"), name)
        assert key not in seen, f"{key} declared twice"
        seen.add(key)


def test_the_expected_objects_are_there(docs: list[dict[str, Any]]) -> None:
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
            "DaemonSet"} <= kinds
    assert only(docs, "Namespace")["metadata"]["name"] == NAMESPACE
    assert only(docs, "DaemonSet")["metadata"]["name"] == "nodemesh-agent"


def test_namespaced_objects_live_in_the_mesh_namespace(docs: list[dict[str, Any]]) -> None:
    for d in docs:
        ns = d["metadata"].get("namespace")
        if d["kind"] in CLUSTER_SCOPED:
            assert ns is None, f"{d['kind']} {d['metadata']['name']} is cluster-scoped"
        else:
            assert ns == NAMESPACE, f"{d['kind']} {d['metadata']['name']} is in {ns!r}"


def test_the_mesh_namespace_is_not_meshed_and_allows_a_host_agent(docs: list[dict[str, Any]]) -> None:
    labels = only(docs, "Namespace")["metadata"].get("labels", {})
    assert labels.get("nodemesh.io/mesh") != "enabled"
    assert labels.get("pod-security.kubernetes.io/enforce") == "privileged"


# -- RBAC --------------------------------------------------------------------

def test_rbac_grants_only_reads_of_what_the_agent_watches(docs: list[dict[str, Any]]) -> None:
    granted: dict[str, set[str]] = {}
    for role in (d for d in docs if d["kind"] in ("ClusterRole", "Role")):
        assert "aggregationRule" not in role
        for rule in role.get("rules", []):
            assert "nonResourceURLs" not in rule
            assert "resourceNames" not in rule or rule["resourceNames"]
            verbs = set(rule["verbs"])
            assert verbs <= READ_VERBS, f"write or wildcard verbs granted: {verbs - READ_VERBS}"
            for group in rule["apiGroups"]:
                assert group != "*"
                for resource in rule["resources"]:
                    assert "*" not in resource
                    granted.setdefault(group, set()).add(resource)
    assert granted == {
        "": {"pods", "namespaces", "services", "endpoints"},
        "discovery.k8s.io": {"endpointslices"},
    }
    assert all("secrets" not in resources for resources in granted.values())


def test_the_binding_gives_the_role_to_the_agents_service_account(
        docs: list[dict[str, Any]], pod_spec: dict[str, Any]) -> None:
    binding = only(docs, "ClusterRoleBinding")
    role = only(docs, "ClusterRole")
    account = only(docs, "ServiceAccount")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": NAMESPACE}]
    assert pod_spec["serviceAccountName"] == account["metadata"]["name"]


# -- the agent's command line ------------------------------------------------

def test_the_agent_command_line_is_accepted_by_the_cli(agent_args: Any) -> None:
    assert agent_args.command == "agent"


def test_the_node_name_comes_from_the_downward_api(agent: dict[str, Any], agent_args: Any) -> None:
    (var,) = [v for v in agent["env"] if v["name"] == "NODE_NAME"]
    assert var["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert agent_args.node_name == FAKE_NODE


def test_the_config_dir_is_a_mounted_folder(agent: dict[str, Any], pod_spec: dict[str, Any],
                                            agent_args: Any) -> None:
    assert agent_args.config_dir == Path("/etc/nodemesh/manifests")
    assert str(agent_args.config_dir) in mounts(agent, pod_spec)


def test_the_cgroup_root_is_a_subtree_of_the_hosts_cgroup_fs(
        agent: dict[str, Any], pod_spec: dict[str, Any], agent_args: Any) -> None:
    root = norm(agent_args.cgroup_root)
    by_path = mounts(agent, pod_spec)
    cgroup_mounts = [norm(p) for p, (_, vol) in by_path.items() if host_path(vol) == "/sys/fs/cgroup"]
    assert cgroup_mounts == [PurePosixPath("/sys/fs/cgroup")], \
        "the host's cgroup fs must be mounted over the container's own view at /sys/fs/cgroup"
    mount = cgroup_mounts[0]
    # The agent refuses the bare mount (the machine's root cgroup); so do we,
    # and the cgroup2 root of a hybrid host as well.
    assert root != mount and root != mount / "unified"
    assert mount in root.parents, f"{root} is not inside {mount}"
    assert ".." not in root.parts


def test_probes_talk_to_the_admin_socket_the_agent_opens(agent: dict[str, Any], pod_spec: dict[str, Any],
                                                         agent_args: Any) -> None:
    socket_path = str(Instance(agent_args.instance).admin_socket)
    expected = {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    for probe, endpoint in expected.items():
        cmd = agent[probe]["exec"]["command"]
        assert cmd[0] == "curl" and "-f" in "".join(a for a in cmd if a.startswith("-") and
                                                    not a.startswith("--")), cmd
        assert cmd[cmd.index("--unix-socket") + 1] == socket_path, (probe, cmd)
        assert cmd[-1].endswith(endpoint), (probe, cmd)
        assert agent[probe]["timeoutSeconds"] > float(cmd[cmd.index("--max-time") + 1])
    run_mount = norm(Instance(agent_args.instance).run_dir).parent
    assert str(run_mount) in mounts(agent, pod_spec)


def test_the_image_runs_nodemesh() -> None:
    text = CONTAINERFILE.read_text()
    assert image_entrypoint() == ["nodemesh"]
    assert re.search(r"^FROM debian:12-slim\b", text, re.M)
    assert "python3-bpfcc" in text and "requirements.lock" in text


def test_everything_the_containerfile_copies_exists() -> None:
    for line in CONTAINERFILE.read_text().splitlines():
        if line.startswith("COPY") and "--from=" not in line:
            *sources, _dest = line.split()[1:]
            for src in sources:
                assert (REPO / src).exists(), f"Containerfile copies {src}, which is not in the repo"


# -- privileges, mounts, placement ------------------------------------------

def test_the_daemonset_mounts_bpffs_cgroups_headers_netns_and_run_dir(
        agent: dict[str, Any], pod_spec: dict[str, Any]) -> None:
    by_path = mounts(agent, pod_spec)
    expected_host = {
        "/sys/fs/bpf": "/sys/fs/bpf",
        "/sys/fs/cgroup": "/sys/fs/cgroup",
        "/lib/modules": "/lib/modules",
        "/usr/src": "/usr/src",
        "/var/run/netns": "/var/run/netns",
        "/run/nodemesh": "/run/nodemesh",
    }
    for path, host in expected_host.items():
        assert path in by_path, f"{path} is not mounted"
        assert host_path(by_path[path][1]) == host, f"{path} does not come from the host's {host}"
    for path in ("/lib/modules", "/usr/src", "/var/run/netns", "/sys/fs/cgroup"):
        assert by_path[path][0].get("readOnly") is True, f"{path} should be read-only"
    assert by_path["/var/run/netns"][0].get("mountPropagation") == "HostToContainer"
    assert by_path["/sys/fs/bpf"][0].get("mountPropagation") in ("HostToContainer", "Bidirectional")
    assert by_path["/run/nodemesh"][0].get("readOnly") is not True


def test_something_makes_sure_bpffs_is_mounted_on_the_host(pod_spec: dict[str, Any]) -> None:
    bidirectional = [
        c for c in pod_spec.get("initContainers", []) + pod_spec["containers"]
        for m in mounts(c, pod_spec).items()
        if m[0] == "/sys/fs/bpf" and m[1][0].get("mountPropagation") == "Bidirectional"
    ]
    assert bidirectional, "no container can mount bpffs on the host's /sys/fs/bpf"


def test_bidirectional_propagation_only_in_privileged_containers(pod_spec: dict[str, Any]) -> None:
    # The API server refuses it otherwise.
    for c in pod_spec.get("initContainers", []) + pod_spec["containers"]:
        for m in c.get("volumeMounts", []):
            if m.get("mountPropagation") == "Bidirectional":
                assert (c.get("securityContext") or {}).get("privileged") is True, c["name"]


def test_the_agent_gets_capabilities_not_privileged_mode(agent: dict[str, Any]) -> None:
    sc = agent["securityContext"]
    assert sc.get("privileged") is False
    caps = sc["capabilities"]
    assert caps["drop"] == ["ALL"]
    assert {"BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"} <= set(caps["add"])
    assert all(not c.startswith("CAP_") for c in caps["add"]), "Kubernetes names drop the CAP_ prefix"
    # Kubernetes refuses allowPrivilegeEscalation: false with SYS_ADMIN.
    assert sc.get("allowPrivilegeEscalation") is not False


def test_host_namespaces(pod_spec: dict[str, Any]) -> None:
    assert pod_spec.get("hostPID") is True
    assert not pod_spec.get("hostNetwork")
    assert not pod_spec.get("hostIPC")


def test_it_runs_on_every_node_and_survives_pressure(daemonset: dict[str, Any],
                                                     pod_spec: dict[str, Any]) -> None:
    assert {"operator": "Exists"} in pod_spec["tolerations"]
    assert pod_spec["priorityClassName"] == "system-node-critical"
    strategy = daemonset["spec"]["updateStrategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] == 1
    assert strategy["rollingUpdate"].get("maxSurge", 0) == 0, "two agents on one node would collide"
    assert pod_spec["terminationGracePeriodSeconds"] >= 30


def test_the_selector_matches_the_pod_template(daemonset: dict[str, Any]) -> None:
    selector = daemonset["spec"]["selector"]["matchLabels"]
    labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert selector and selector.items() <= labels.items()


def _bytes(quantity: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in units.items():
        if str(quantity).endswith(suffix):
            return float(str(quantity)[: -len(suffix)]) * factor
    return float(quantity)


def test_resources_are_requested_and_memory_is_bounded(pod_spec: dict[str, Any]) -> None:
    for c in pod_spec.get("initContainers", []) + pod_spec["containers"]:
        res = c["resources"]
        assert {"cpu", "memory"} <= set(res["requests"]), c["name"]
        assert "memory" in res["limits"], c["name"]
        assert _bytes(res["limits"]["memory"]) >= _bytes(res["requests"]["memory"]), c["name"]
