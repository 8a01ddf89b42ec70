"""Resilience policies of the node proxy, sans-IO with time passed in: breakers, ejection, retries, limits."""
