"""The kind node image (docker/kind/) built on a stand-in base and booted."""
