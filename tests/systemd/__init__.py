"""The systemd test bed: a Debian 12 with systemd booted in a container, crishim its service."""
