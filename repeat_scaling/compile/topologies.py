"""The slice types of the compile check: accelerator types as passed to
`gcloud ... --accelerator-type` (and the GPU targets ``h100xN``), with their chips, HBM
and peak FLOP/s."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from repeat_scaling.compile import CompileCheckError

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Generation:
    """One TPU generation.

    Attributes:
      prefixes: accelerator-type prefixes (gcloud's first; others are aliases).
      topology_prefix: what libtpu calls it in a topology name (``v5:4x8x8``).
      cores_per_name: TensorCores per chip counted in the accelerator-type suffix
        (v4-8 and v5p-8 are 4 chips; v5litepod-8 and v6e-8 are 8).
      chip_config: ``megacore`` (one device per chip of two cores) or ``default``.
      hbm_gib: HBM per chip; usable_hbm_gib: what the TPU compiler allows a program
        (from its own RESOURCE_EXHAUSTED messages, libtpu 0.0.42).
      peak_bf16_tflops: dense bf16 peak per chip (public specs).
      shapes: chips -> chip grid of each slice size offered.
    """

    name: str
    prefixes: tuple[str, ...]
    topology_prefix: str
    cores_per_name: int
    chip_config: str
    hbm_gib: float
    usable_hbm_gib: float
    peak_bf16_tflops: float
    shapes: dict[int, tuple[int, ...]]
    platform: str = "tpu"


_CUBES = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
          128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16),
          2048: (8, 16, 16), 4096: (16, 16, 16)}  # fmt: skip
_GRIDS = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
          256: (16, 16)}  # fmt: skip

GENERATIONS = (
    Generation("v4", ("v4",), "v4", 2, "megacore", 32, 30.75, 275.0, _CUBES),
    Generation("v5p", ("v5p",), "v5", 2, "megacore", 95, 95.74, 459.0, _CUBES),
    Generation("v5e", ("v5litepod", "v5e"), "v5e", 1, "default", 16, 15.75, 197.0, _GRIDS),
    Generation("v6e", ("v6e",), "v6e", 1, "default", 32, 31.25, 918.0, _GRIDS),
)


@dataclasses.dataclass(frozen=True)
class Topology:
    """One slice type: what `get_topology_desc` needs and what the report compares to."""

    accelerator_type: str
    generation: Generation
    chips: int
    shape: tuple[int, ...]
    chips_per_host: tuple[int, int, int]
    wrap: tuple[bool, bool, bool]

    @property
    def topology_name(self) -> str:
        if self.generation.platform == "cuda":  # partitions x hosts x GPUs per host
            return "x".join(map(str, self.shape))
        return f"{self.generation.topology_prefix}:{'x'.join(map(str, self.shape))}"

    @property
    def hosts(self) -> int:
        return self.chips // math.prod(self.chips_per_host)

    @property
    def usable_hbm_bytes(self) -> int:
        return int(self.generation.usable_hbm_gib * GiB)

    def describe(self) -> dict[str, Any]:
        g = self.generation
        return {
            "accelerator_type": self.accelerator_type,
            "topology": self.topology_name,
            "chips": self.chips,
            "hosts": self.hosts,
            "chips_per_host": math.prod(self.chips_per_host),
            "wrap": list(self.wrap),
            "hbm_gib_per_chip": g.hbm_gib,
            "usable_hbm_gib_per_chip": g.usable_hbm_gib,
            "peak_bf16_tflops_per_chip": g.peak_bf16_tflops,
        }


def _topology(gen: Generation, prefix: str, chips: int) -> Topology:
    shape = gen.shapes[chips]
    if len(shape) == 3:  # v4 / v5p: 4-chip hosts; a full torus from 4x4x4 up
        per_host, wrap = (2, 2, 1), (min(shape) >= 4,) * 3
    else:  # v5e / v6e: 1-, 4- and 8-chip single hosts, else 4-chip hosts
        per_host = {1: (1, 1, 1), 4: (2, 2, 1), 8: (2, 4, 1)}.get(chips, (2, 2, 1))
        wrap = (shape[0] >= 16, shape[1] >= 16, False)
    return Topology(f"{prefix}-{chips * gen.cores_per_name}", gen, chips, shape, per_host, wrap)


#: accelerator type (gcloud --accelerator-type, plus `v5e-N` for v5litepod-N) -> Topology
TOPOLOGIES: dict[str, Topology] = {
    f"{prefix}-{chips * gen.cores_per_name}": _topology(gen, gen.prefixes[0], chips)
    for gen in GENERATIONS
    for prefix in gen.prefixes
    for chips in gen.shapes
}

# GPU targets: the CUDA PJRT plugin (`jax-cuda12-plugin`, the `compile-gpu` extra) compiles
# for a described GPU without one (and without the CUDA libraries): `target_config` is the
# device description (a GpuTargetConfigProto), `topology` partitions x hosts x GPUs.
H100_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 3352320000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 84978434048 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
#: jax preallocates XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.75) of a GPU's memory: the
#: part a program can use unless that is raised.
GPU_MEM_FRACTION = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))
H100 = Generation(
    "h100", ("h100x",), "", 1, "", 84978434048 / GiB, GPU_MEM_FRACTION * 84978434048 / GiB,
    989.0, {1: (1, 1, 1), **{8 * h: (1, h, 8) for h in (1, 2, 4, 8)}}, platform="cuda",
)  # fmt: skip
GPU_TARGET_CONFIGS = {"h100": H100_TARGET_CONFIG}
TOPOLOGIES.update(
    {
        f"h100x{n}": Topology(f"h100x{n}", H100, n, shape, (min(n, 8), 1, 1), (False,) * 3)
        for n, shape in H100.shapes.items()
    }
)
#: The evaluator's host when --eval_topology is not given: the tpu backend's default
#: evaluator VM, or one GPU (the slurm backend's evaluator job).
DEFAULT_EVAL_TOPOLOGY = {"tpu": "v5litepod-1", "cuda": "h100x1"}


def get_topology(name: str) -> Topology:
    """The Topology of an accelerator type; CompileCheckError listing the known ones."""
    topo = TOPOLOGIES.get(str(name).strip().lower())
    if topo is None:
        known = ", ".join(TOPOLOGIES)
        raise CompileCheckError(f"unknown --topology={name!r}; known accelerator types: {known}")
    return topo
