"""nodemesh benchmark harness (issue 5, L4 part): the mesh against a sidecar
HAProxy, a node HAProxy reached by iptables, and no mesh at all, side by side
in one sandbox and one run. Entry point: ``python -m bench`` (see --help and
bench/README.md). Not part of the test suite."""
