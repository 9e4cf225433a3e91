"""Pod networking: network namespaces and CNI plugins."""
