"""The node agent: what the node knows (workloads, enrollment, BPF state) and
the daemon that keeps the kernel and the proxy in step with it."""
