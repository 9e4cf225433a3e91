"""Snapshotters: an overlayfs one keyed by chain ID, and a copying fallback."""
