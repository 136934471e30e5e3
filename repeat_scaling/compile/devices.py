"""Abstract (compile-only) devices of a slice: libtpu for TPUs, the CUDA PJRT plugin for
GPU targets; neither needs the accelerator."""

from __future__ import annotations

import os

from repeat_scaling.compile import CompileCheckError
from repeat_scaling.compile.topologies import GPU_TARGET_CONFIGS, Topology
from repeat_scaling.errors import first_line


def libtpu_hint() -> str:
    from importlib import metadata

    try:
        version = metadata.version("jax")
    except metadata.PackageNotFoundError:
        version = "<your jax version>"
    return (
        f"libtpu is not installed: run `make setup` (the dev extra brings it) or "
        f"`pip install 'jax[tpu]=={version}'`"
    )


def prefer_cpu_host() -> None:
    """Let jax's own backend be the CPU (it never needs the TPU runtime here).

    Without this, a host with libtpu installed and no TPU attached tries (and fails) to
    start a TPU client at the first jax operation. Only acts before backends start and
    when ``JAX_PLATFORMS`` / ``jax_platforms`` is not set.
    """
    import jax
    from jax._src import xla_bridge

    if not os.environ.get("JAX_PLATFORMS") and not jax.config.jax_platforms:
        if not xla_bridge.backends_are_initialized():
            jax.config.update("jax_platforms", "cpu")


def has_cuda_plugin() -> bool:
    """Whether jax's CUDA PJRT plugin (``jax-cuda12-plugin``) is installed."""
    import importlib.util

    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:  # no jax_plugins namespace at all
        return False


def gpu_devices(topo: Topology, num_slices: int = 1) -> list:
    """The abstract devices of a GPU target (CUDA PJRT plugin, no GPU needed)."""
    if num_slices != 1:
        raise CompileCheckError(
            f"--num_slices={num_slices} is for TPU slices; pick a bigger GPU target "
            f"(e.g. h100x{topo.chips * num_slices})"
        )
    if not has_cuda_plugin():
        from importlib import metadata

        raise CompileCheckError(
            "the CUDA PJRT plugin is not installed: pip install -e '.[compile-gpu]' (or "
            f"'jax-cuda12-plugin=={metadata.version('jax')}'; no GPU or CUDA libraries needed)"
        )
    prefer_cpu_host()
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(
            topo.generation.name,
            "cuda",
            target_config=GPU_TARGET_CONFIGS[topo.generation.name],
            topology=topo.topology_name,
        )
    except Exception as e:  # JaxRuntimeError from the plugin
        raise CompileCheckError(
            f"cannot build the {topo.accelerator_type} target with the CUDA plugin: {first_line(e)}"
        ) from None
    return list(desc.devices)


def topology_devices(topo: Topology, num_slices: int = 1) -> list:
    """The abstract (compile-only) devices of ``num_slices`` slices of ``topo``."""
    if num_slices < 1:
        raise CompileCheckError(f"--num_slices={num_slices}; expected an int >= 1")
    if topo.generation.platform == "cuda":
        return gpu_devices(topo, num_slices)
    from jax._src import cloud_tpu_init

    if cloud_tpu_init.get_tpu_library_path() is None:  # the libtpu package, or TPU_LIBRARY_PATH
        raise CompileCheckError(libtpu_hint())
    # libtpu takes /tmp/libtpu_lockfile for a process that owns TPU chips; compiling
    # owns none, so another jax process (a trainer, a second check) must not block it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # No TPU VM here: no metadata server to ask, and libtpu's start-up warnings about
    # the host's (absent) accelerator type and worker names are answered up front.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", topo.accelerator_type)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    prefer_cpu_host()
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(
            topo.topology_name,
            "tpu",
            chip_config_name=topo.generation.chip_config,
            chips_per_host_bounds=topo.chips_per_host,
            wrap=topo.wrap,
            num_slices=num_slices,
        )
    except Exception as e:  # JaxRuntimeError / RuntimeError from the plugin
        raise CompileCheckError(
            f"cannot build the {topo.accelerator_type} topology ({topo.topology_name}) with "
            f"libtpu: {first_line(e)}"
        ) from None
    return list(desc.devices)
