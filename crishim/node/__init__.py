"""What crishim installs on a node: the systemd unit it ships."""
