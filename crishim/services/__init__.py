"""Use cases of the CRI, one module per concern. Speaks model types, never protobuf."""
