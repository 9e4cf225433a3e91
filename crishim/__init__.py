"""crishim: a Kubernetes container runtime (CRI) on asyncio, running pods with runc or crun."""

__version__ = "0.1.0"

__all__ = ["__version__"]
