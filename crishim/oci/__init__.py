"""The OCI runtime spec: typed models, one option per concern, and their composition.

Pure: no subprocesses and no file access beyond the ``bundles/`` data; everything read from
a container's root file system or the host arrives through the lookups of ``BuildContext``.
"""

from crishim.oci.build import (
    CONTAINER_OPTS,
    INFRA_OPTS,
    apply_opts,
    build_container_spec,
    build_sandbox_infra_spec,
)
from crishim.oci.context import (
    BuildContext,
    DeviceNode,
    DeviceStat,
    FileLoader,
    GroupEntry,
    HostDevices,
    PasswdDb,
    PasswdEntry,
    PasswdView,
    SpecOpt,
)
from crishim.oci.spec import (
    Spec,
    base_spec,
    bundles_dir,
    default_seccomp,
    dump_spec,
    spec_json,
)

__all__ = [
    "CONTAINER_OPTS",
    "INFRA_OPTS",
    "BuildContext",
    "DeviceNode",
    "DeviceStat",
    "FileLoader",
    "GroupEntry",
    "HostDevices",
    "PasswdDb",
    "PasswdEntry",
    "PasswdView",
    "Spec",
    "SpecOpt",
    "apply_opts",
    "base_spec",
    "build_container_spec",
    "build_sandbox_infra_spec",
    "bundles_dir",
    "default_seccomp",
    "dump_spec",
    "spec_json",
]
