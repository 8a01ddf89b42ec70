"""Which of the node's pods are enrolled, and the reason given for each."""

from __future__ import annotations

from types import MappingProxyType

from agent.enrollment import decide
from controlplane.registry import Namespace, Pod, Registry


def pod(ns: str, name: str, node: str = "n1", labels: dict[str, str] | None = None,
        netns: str | None = "/var/run/netns/x") -> Pod:
    ann = {"nodemesh.io/netns": netns} if netns else {}
    return Pod(ns, name, MappingProxyType(labels or {}), MappingProxyType(ann), node,
               "198.18.0.10", "test")


def reg(*pods: Pod) -> Registry:
    namespaces = {
        "shop": Namespace("shop", MappingProxyType({"nodemesh.io/mesh": "enabled"})),
        "legacy": Namespace("legacy", MappingProxyType({})),
        "off": Namespace("off", MappingProxyType({"nodemesh.io/mesh": "disabled"})),
    }
    return Registry(namespaces=MappingProxyType(namespaces),
                    pods=MappingProxyType({p.key: p for p in pods}))


def test_decisions_and_reasons() -> None:
    r = reg(pod("shop", "a"), pod("shop", "b", labels={"nodemesh.io/mesh": "disabled"}),
            pod("legacy", "c"), pod("off", "d"), pod("shop", "e", node="n2"),
            pod("shop", "f", netns=None), pod("ghost", "g"))
    got = {d.pod: (d.enroll, d.reason) for d in decide(r, "n1")}
    assert "shop/e" not in got  # another node's pod
    assert got["shop/a"][0] is True
    assert got["shop/b"] == (False, "pod opted out (nodemesh.io/mesh=disabled)")
    assert got["legacy/c"][0] is False and "not labelled" in got["legacy/c"][1]
    assert got["off/d"][0] is False
    assert got["shop/f"][0] is False and "netns unknown" in got["shop/f"][1]
    assert got["ghost/g"] == (False, "namespace ghost not declared")


def test_pod_label_enabled_does_not_override_unlabelled_namespace() -> None:
    r = reg(pod("legacy", "x", labels={"nodemesh.io/mesh": "enabled"}))
    assert decide(r, "n1")[0].enroll is False
