"""Compose spec options into the runtime spec of a container or of a pod's infra process."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from crishim.model.container import ContainerMetadata
from crishim.model.specs import (
    Capability,
    ContainerConfig,
    LinuxContainerConfig,
    NamespaceMode,
    SecurityContext,
)
from crishim.oci import opts, security
from crishim.oci.context import CONTAINER_TYPE_SANDBOX, BuildContext, SpecOpt
from crishim.oci.spec import Spec, base_spec

__all__ = [
    "CONTAINER_OPTS",
    "INFRA_OPTS",
    "BuildContext",
    "apply_opts",
    "build_container_spec",
    "build_sandbox_infra_spec",
]

# Order matters where options touch the same fields: env after hostname (HOSTNAME may be
# overridden), terminal after env (TERM only when unset), privileged after mounts (/sys rw).
CONTAINER_OPTS: tuple[SpecOpt, ...] = (
    opts.with_root,
    opts.with_process_args,
    opts.with_hostname,
    opts.with_env,
    opts.with_terminal,
    opts.with_cwd,
    opts.with_user,
    opts.with_namespaces,
    opts.with_mounts,
    opts.with_devices,
    opts.with_privileged,
    security.with_capabilities,
    security.with_no_new_privs,
    security.with_readonly_rootfs,
    security.with_masked_and_readonly_paths,
    security.with_seccomp,
    security.with_apparmor,
    security.with_selinux,
    opts.with_resources,
    opts.with_oom_score_adj,
    opts.with_sysctls,
    opts.with_cgroups_path,
    opts.with_annotations,
)

INFRA_OPTS: tuple[SpecOpt, ...] = (
    opts.with_root,
    opts.with_process_args,
    opts.with_cwd,
    opts.with_user,
    opts.with_namespaces,
    security.with_capabilities,
    security.with_no_new_privs,
    security.with_readonly_rootfs,
    security.with_masked_and_readonly_paths,
    security.with_seccomp,
    security.with_apparmor,
    security.with_selinux,
    opts.with_cgroups_path,
    opts.with_annotations,
)

# The infra process is the last thing in a pod the OOM killer should pick.
INFRA_OOM_SCORE_ADJ = -998


def apply_opts(
    spec: Spec, config: ContainerConfig, ctx: BuildContext, options: Sequence[SpecOpt]
) -> Spec:
    """Apply ``options`` in order to ``spec`` and return it."""
    for option in options:
        option(spec, config, ctx)
    return spec


def build_container_spec(config: ContainerConfig, ctx: BuildContext) -> Spec:
    """The runtime spec of a container: the bundled base spec with every option applied.

    Raises ``InvalidArgument`` for requests that cannot be honoured; conditions that are
    only worth a warning (an LSM the host lacks) end up in ``ctx.warnings``.
    """
    return apply_opts(base_spec(), config, ctx, CONTAINER_OPTS)


def build_sandbox_infra_spec(args: Sequence[str], ctx: BuildContext) -> Spec:
    """The runtime spec of the process holding a pod's shared PID namespace.

    ``args`` is its command (for example catatonit's). It creates the PID namespace and joins
    the pod's network, IPC and UTS ones; it runs with a read-only root, no capabilities and
    no_new_privs, under the pod's user, seccomp and LSM settings. ``ctx.container_id`` is the
    id the infra container gets in the runtime.
    """
    pod = ctx.sandbox.security_context
    namespaces = ctx.sandbox.namespace_options.model_copy(update={"pid": NamespaceMode.CONTAINER})
    config = ContainerConfig(
        metadata=ContainerMetadata(name="infra"),
        command=list(args),
        linux=LinuxContainerConfig(
            security_context=SecurityContext(
                capabilities=Capability(drop_capabilities=["ALL"]),
                namespace_options=namespaces,
                selinux_options=pod.selinux_options,
                run_as_user=pod.run_as_user,
                run_as_group=pod.run_as_group,
                readonly_rootfs=True,
                supplemental_groups=pod.supplemental_groups,
                supplemental_groups_policy=pod.supplemental_groups_policy,
                no_new_privs=True,
                seccomp=pod.seccomp,
                apparmor=pod.apparmor,
                seccomp_profile_path=pod.seccomp_profile_path,
            )
        ),
    )
    infra_ctx = replace(ctx, container_type=CONTAINER_TYPE_SANDBOX, extra_mounts=[])
    spec = apply_opts(base_spec(), config, infra_ctx, INFRA_OPTS)
    ctx.warnings.extend(w for w in infra_ctx.warnings if w not in ctx.warnings)
    assert spec.process is not None
    spec.process.oom_score_adj = max(INFRA_OOM_SCORE_ADJ, ctx.min_oom_score_adj)
    return spec
