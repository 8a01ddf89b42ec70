"""A virtual node for the demo, the tests and the benchmarks: a node netns with
a bridge, and pods made of a netns, a veth, an IP and a cgroup, all inside a
cgroup subtree and netns names unique to the run. See ``sandbox.node``."""

from sandbox.node import Pod, Sandbox

__all__ = ["Pod", "Sandbox"]
