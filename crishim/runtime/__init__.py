"""The OCI runtimes (runc, crun), the container monitor (conmon) and cgroups on the host."""
