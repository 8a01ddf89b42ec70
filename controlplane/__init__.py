"""The control plane: the registry model of the mesh (what exists) and the
sources it is read from. The xDS server that serves it builds on this."""
