"""The node proxy: what moves bytes. It reads the agent's immutable tables and
never decides policy of its own."""
