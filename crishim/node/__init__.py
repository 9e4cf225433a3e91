"""crishim on a node's host: the shipped systemd unit (``unit``) and ``crishim node install|
uninstall`` (``install``: its steps in ``steps``, their record in ``record``, the layout and
unit files in ``layout``, kubelet's files in ``kubelet``, file and host effects in ``files``
and ``host``)."""
