"""nodemesh: a node-level, eBPF-assisted, sidecarless service mesh agent."""

__version__ = "0.1.0"
