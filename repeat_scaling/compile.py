r"""Compile a run for a TPU topology on a CPU host: does it fit, how many FLOPs, which collectives.

    python -m repeat_scaling.compile --config=configs/xue2023.py:paper --topology=v4-128 \
        [--num_slices=2] [--eval_topology=v4-8|none] [--config.model.name=t5_xl ...]

No TPU is needed: with libtpu installed (the `dev` extra, or `pip install 'jax[tpu]'`),
``jax.experimental.topologies.get_topology_desc`` gives the abstract devices of a TPU
slice, and ``jit(...).lower(abstract inputs).compile()`` on a mesh of them runs the real
TPU compiler. What is compiled is the trainer's own program: the abstract train state
(``train.state.abstract_state``), the train step (``train.step.make_train_step``, with
the run's grad accumulation, steps per call, dropout, z-loss, interventions), on the
mesh the trainer builds (``mesh.ici`` within a slice, ``mesh.dcn`` across slices; with
``--num_slices`` > 1 and no ``mesh.dcn`` in the config, the slices are data parallel),
fed with the shapes of the run's objective. The evaluator's two programs (per-token loss
and attention weights of ``eval.metrics.ModelRunner``, at ``eval.batch_size`` rows) are
compiled for ``--eval_topology`` (default: the tpu backend's evaluator VM type,
``v5litepod-1``, or one H100 for GPU targets; ``none`` skips them).

Output: a human table, then ONE JSON line (``{"compile_check": ...}``) with

* ``devices``, ``mesh``: the topology and the run's mesh axes;
* ``hbm``: per-chip bytes of arguments (state + batch), temporaries, outputs not
  aliased to (donated) arguments, generated code and their ``total``, against the chip's
  usable HBM (what the TPU compiler itself allows: 15.75 GiB of v5e's 16), ``fits`` and
  ``headroom``. A program over the limit does not compile: the compiler's
  RESOURCE_EXHAUSTED numbers are reported instead (``fits: false``);
* ``flops``: compiled FLOPs per train step with loop trip counts applied (XLA's
  ``cost_analysis`` counts a ``while`` body once, so a scanned layer stack shows up as
  one layer: each loop body is costed separately and multiplied by its trip count), for
  all chips together, beside the model FLOPs of ``models.sizes.flops_per_token`` (3 x
  forward, causal attention halved: remat, full attention masks and MoE capacity show up
  as ratio > 1);
* ``step_time_s``: the compiler's ``optimal_seconds`` when it is positive (else null),
  and the FLOP-bound lower bound compiled FLOPs / (chips x peak bf16 FLOP/s);
* ``collectives``: collective ops by kind, as written in the HLO and as executed per step
  (trip counts applied);
* ``compile_s``: wall time of lowering + compiling.

GPU targets (``--topology=h100x8``, ``h100x16``, ``h100x32``, ``h100x64``: 8 H100 80GB per
host) compile the same way with the CUDA PJRT plugin (``pip install -e '.[compile-gpu]'``,
no GPU or CUDA libraries needed), against ``XLA_PYTHON_CLIENT_MEM_FRACTION`` (default
0.75, what jax preallocates) of each GPU's memory.

Errors (unknown topology, no libtpu, a config that does not validate) are one line on
stderr and exit status 1; a program that does not fit exits 2.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from repeat_scaling import config_files
from repeat_scaling.data.objectives import MANIFEST_OBJECTIVES
from repeat_scaling.errors import first_line

GiB = 1024**3


class CompileCheckError(ValueError):
    """A check that cannot run (unknown topology, no libtpu, bad config): one line."""


# ----------------------------------------------------------------------------------------
# Topologies: accelerator types as passed to `gcloud ... --accelerator-type`.
# ----------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------
# Abstract TPU devices (libtpu).
# ----------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------
# The run's programs, with abstract inputs.
# ----------------------------------------------------------------------------------------
def _resolve_num_slices(config: Any, num_slices: int) -> Any:
    """A copy of ``config`` whose ``mesh.dcn`` spans ``num_slices`` slices."""
    config = copy.deepcopy(config)
    dcn = {a: int(n) for a, n in dict(config.mesh.dcn).items()}
    spanned = math.prod(max(n, 1) for n in dcn.values())
    if num_slices > 1 and spanned == 1:
        config.mesh.dcn.data = num_slices  # slices are data parallel by default
    elif spanned != num_slices:
        raise CompileCheckError(
            f"mesh.dcn={dcn} spans {spanned} slice(s) but --num_slices={num_slices}"
        )
    return config


def _feature_spec(config: Any, model_cfg: Any) -> tuple[dict[str, int], Any]:
    """``(feature name -> row length, objective)`` of the run, without its token store.

    The objective is built with the store's vocabulary when the store is prepared here,
    else with a stand-in of the model's vocabulary size (lengths depend only on it and on
    the data options). `supervised`/`icl` objectives read the store's manifest: they need
    the store.
    """
    from repeat_scaling.data import run_data
    from repeat_scaling.data import vocab as vocab_lib

    store_dir = str(config.data.store)
    vocab = manifest = None
    manifest_path = os.path.join(store_dir, "manifest.json") if "://" not in store_dir else ""
    if manifest_path and os.path.isfile(manifest_path):
        from repeat_scaling.data.store import TokenStore

        store = TokenStore(store_dir)
        vocab, manifest = store.vocab, store.manifest
    elif config.data.objective in MANIFEST_OBJECTIVES:
        raise CompileCheckError(
            f"data.objective={config.data.objective!r} takes its shapes from the store's "
            f"manifest: prepare data.store={store_dir!r} on this machine first"
        )
    if vocab is None:
        vocab = vocab_lib.VocabInfo("tokens", None, None, int(model_cfg.vocab_size))
    try:
        objective = run_data.make_objective(config.data, vocab, model_cfg.arch, manifest)
    except (ValueError, KeyError) as e:
        raise CompileCheckError(first_line(e)) from None
    return {k: int(v) for k, v in objective.feature_lengths.items()}, objective


def _feature_dtype(name: str):
    import numpy as np

    return np.float32 if name == "decoder_loss_weights" else np.int32


@dataclasses.dataclass
class Program:
    """One compiled program and what came out of compiling it."""

    name: str
    compiled: Any = None  # jax.stages.Compiled, or None when it did not compile
    compile_s: float = 0.0
    oom: str | None = None  # the compiler's RESOURCE_EXHAUSTED message
    argument_bytes: int = 0  # per device, from the abstract inputs (used when OOM)


def _bytes_per_device(tree: Any) -> int:
    """Bytes one device holds of a pytree of sharded ShapeDtypeStructs (max over devices)."""
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = tuple(leaf.shape)
        sh = getattr(leaf, "sharding", None)
        if sh is not None and shape:
            shape = sh.shard_shape(shape)
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def _compile(name: str, lower: Callable[[], Any], arguments: Any) -> Program:
    """Lower and compile; a RESOURCE_EXHAUSTED is recorded, other failures raise."""
    t0 = time.perf_counter()
    prog = Program(name, argument_bytes=_bytes_per_device(arguments))
    try:
        prog.compiled = lower().compile()
    except Exception as e:  # JaxRuntimeError (XlaRuntimeError) from the TPU compiler
        msg = first_line(e)
        if "RESOURCE_EXHAUSTED" not in msg and "Ran out of memory" not in msg:
            raise CompileCheckError(f"{name} does not compile: {msg}") from None
        prog.oom = msg
    prog.compile_s = time.perf_counter() - t0
    return prog


@dataclasses.dataclass
class TrainSetup:
    """What the trainer would build for this config on these devices."""

    config: Any
    model_cfg: Any
    mesh: Any
    info: Any
    step: Callable
    batch: dict[str, Any]
    steps_per_call: int
    tokens_per_step: int
    model_flops_per_step: float


def train_setup(config: Any, devices: Sequence[Any], hosts: int = 1) -> TrainSetup:
    """The trainer's mesh, abstract state, train step and abstract batch on ``devices``.

    The same calls, with the same arguments, as ``repeat_scaling.train.loop.train``.
    """
    import jax

    from repeat_scaling import sharding
    from repeat_scaling.data import run_data
    from repeat_scaling.models import sizes
    from repeat_scaling.train import config as config_lib
    from repeat_scaling.train import optimizers
    from repeat_scaling.train import state as state_lib
    from repeat_scaling.train import step as step_lib

    try:
        model_cfg = config_lib.validate(config, num_devices=len(devices), process_count=hosts)
        clamps = config_lib.interventions(config, model_cfg)
    except config_lib.ConfigError as e:
        raise CompileCheckError(str(e)) from None
    lengths_by_feature, objective = _feature_spec(config, model_cfg)
    tc = config.train
    lengths = run_data.lengths_of(objective, model_cfg.arch)
    tokens_per_step = run_data.tokens_per_step(objective, tc.batch_size)
    flops_per_token = sizes.flops_per_token(model_cfg, lengths)["train"]
    n = config_lib.steps_per_call(config, tokens_per_step * flops_per_token)

    dcn = {a: int(k) for a, k in dict(config.mesh.dcn).items()}
    mesh = sharding.make_mesh(
        dict(config.mesh.ici), dcn if any(k > 1 for k in dcn.values()) else None, devices=devices
    )
    rules = sharding.DEFAULT_RULES
    tx, schedule = optimizers.make_optimizer(tc.optimizer, int(tc.steps))
    info = state_lib.abstract_state(model_cfg, tx, mesh, rules)
    step = step_lib.config_train_step(
        config, info, model_cfg, tx, schedule, rules=rules, interventions=clamps, steps_per_call=n
    )
    batch_sh = sharding.batch_sharding(mesh, rules)
    lead: tuple[int, ...] = ()
    if n > 1:
        batch_sh, lead = step_lib.stacked_sharding(batch_sh), (n,)
    batch = {
        k: jax.ShapeDtypeStruct(
            lead + (int(tc.batch_size), length), _feature_dtype(k), sharding=batch_sh
        )
        for k, length in lengths_by_feature.items()
    }
    return TrainSetup(
        config, model_cfg, mesh, info, step, batch, n, tokens_per_step,
        tokens_per_step * flops_per_token,
    )  # fmt: skip


def compile_train(setup: TrainSetup) -> Program:
    """Compile the train step (one call: ``steps_per_call`` steps)."""
    state = setup.info.abstract
    return _compile(
        "train step", lambda: setup.step.lower(state, setup.batch), (state, setup.batch)
    )


def eval_programs(config: Any, model_cfg: Any, devices: Sequence[Any]) -> list[Program]:
    """Compile the evaluator's per-token loss and attention programs on ``devices``.

    The evaluator (``eval.evaluator.Evaluator``) restores the parameters on a data-parallel
    mesh over its host's devices and runs ``eval.metrics.ModelRunner`` on batches of
    ``eval.batch_size`` rows at the run's lengths (sharded on the batch when the rows
    divide the mesh, else replicated).
    """
    import jax
    import numpy as np

    from repeat_scaling import sharding
    from repeat_scaling.eval import metrics
    from repeat_scaling.train import state as state_lib

    fields = {f.name for f in dataclasses.fields(metrics.EvalSettings)}
    recorded = {k: v for k, v in dict(config.get("eval", {}) or {}).items() if k in fields}
    try:
        settings = metrics.EvalSettings.from_overrides(recorded)
    except ValueError as e:
        raise CompileCheckError(str(e)) from None
    lengths_by_feature, _ = _feature_spec(config, model_cfg)
    mesh = sharding.make_mesh({"data": -1}, devices=devices)  # = evaluator.eval_mesh(0)
    graphdef, a_params = state_lib.abstract_params(model_cfg, mesh)
    runner = metrics.ModelRunner(state_lib.merge(graphdef, a_params), model_cfg, mesh)
    rows = settings.batch_size
    dec = lengths_by_feature["decoder_target_tokens"]
    zeros = np.zeros((rows, dec), np.int32)
    if model_cfg.arch == "encoder_decoder":
        enc = np.zeros((rows, lengths_by_feature["encoder_input_tokens"]), np.int32)
        feats = metrics.encdec_features(enc, zeros, zeros.astype(np.float32))
    else:
        feats = metrics.decoder_features(zeros, zeros.astype(np.float32))
    place = runner._batch_sharding if rows % runner.batch_shards == 0 else runner._replicated
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=place) for k, v in feats.items()}
    out = []
    # ModelRunner's jitted functions (what `loss` and `attention` call), lowered as it
    # calls them: inside the mesh context, on its state and a batch of its placement.
    for name, fn in (("eval loss", runner._loss), ("eval attention", runner._attn)):

        def lower(fn=fn):
            with sharding.use_mesh(mesh, runner.rules):
                return fn.lower(runner.state, abstract)

        out.append(_compile(name, lower, (runner.state, abstract)))
    return out


# ----------------------------------------------------------------------------------------
# Reading the compiled programs: memory, FLOPs with trip counts, collectives.
# ----------------------------------------------------------------------------------------
_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_OOM_TEMPS = re.compile(
    r"HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)"
)
_OOM_USED = re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm", re.IGNORECASE)


def _num(value: str, unit: str) -> int:
    return int(float(value) * _UNITS[unit])


def memory_report(prog: Program, topo: Topology) -> dict[str, Any]:
    """Per-chip HBM of one program against the chip's usable HBM."""
    limit = topo.usable_hbm_bytes
    if prog.compiled is None:
        out: dict[str, Any] = {
            "arguments": prog.argument_bytes, "temporaries": None, "outputs": None,
            "generated_code": None, "total": None, "hbm": limit, "fits": False,
            "headroom": None, "compiler_message": prog.oom,
        }  # fmt: skip
        m = _OOM_TEMPS.search(prog.oom or "")
        if m:
            out["temporaries"] = _num(*m.group(1, 2))
            out["hbm"] = _num(*m.group(3, 4))
            out["total"] = out["temporaries"] + prog.argument_bytes
        m = _OOM_USED.search(prog.oom or "")
        if m:
            out["total"], out["hbm"] = _num(*m.group(1, 2)), _num(*m.group(3, 4))
        if out["total"] is not None:
            out["headroom"] = out["hbm"] - out["total"]
        return out
    ma = prog.compiled.memory_analysis()
    args = int(ma.argument_size_in_bytes)
    temps = int(ma.temp_size_in_bytes)
    outputs = int(ma.output_size_in_bytes) - int(ma.alias_size_in_bytes)
    code = int(ma.generated_code_size_in_bytes)
    total = args + temps + outputs + code
    return {
        "arguments": args, "temporaries": temps, "outputs": outputs, "generated_code": code,
        "total": total, "hbm": limit, "fits": total <= limit, "headroom": limit - total,
    }  # fmt: skip


_COMP_HEAD = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_WHILE = re.compile(r"\swhile\(.*?condition=%?([\w.\-]+), body=%?([\w.\-]+)")
_CALLED = re.compile(r"(?:calls|to_apply)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "ragged-all-to-all", "collective-broadcast")  # fmt: skip
_COLLECTIVE = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")


class HloProgram:
    """The optimised HLO text of one compiled program, split into computations.

    ``flops()`` is XLA's own cost analysis (HloCostAnalysis, run by jaxlib on the CPU
    client over the parsed TPU module: the same count as the compiled program's
    ``cost_analysis()``) with each ``while`` body costed on its own and multiplied by its
    trip count. The trip count comes from ``known_trip_count`` when the compiler wrote it,
    else from the loop condition (``i < N`` with i from 0: what ``lax.scan`` and
    ``fori_loop`` produce); a loop whose count cannot be read counts once and is listed in
    ``unknown_trip_counts``.
    """

    def __init__(self, text: str):
        # stack_frame_id refers to a table the text printer leaves out: drop it.
        text = re.sub(r",? ?stack_frame_id=\d+", "", text)
        self.comps: dict[str, list[str]] = {}
        self.order: list[str] = []
        self.entry = ""
        current = None
        for line in text.splitlines():
            if current is None:
                m = _COMP_HEAD.match(line)
                if m:
                    current = m.group(2)
                    self.comps[current], self.order = [line], self.order + [current]
                    if m.group(1):
                        self.entry = current
                continue
            self.comps[current].append(line)
            if line.startswith("}"):
                current = None
        self._cost: dict[str, float] = {}
        self.unknown_trip_counts: list[str] = []

    # -- structure -------------------------------------------------------------------
    def _calls(self, name: str) -> tuple[list[str], list[tuple[str, str, str]]]:
        """(computations called other than as loops, (while line, cond, body) of loops)."""
        subs, loops = [], []
        for line in self.comps[name][1:]:
            m = _WHILE.search(line)
            if m:
                loops.append((line, m.group(1), m.group(2)))
                continue
            found = _CALLED.findall(line)
            b = _BRANCHES.search(line)
            if b:
                found += [s.strip().lstrip("%") for s in b.group(1).split(",") if s.strip()]
            subs += [s for s in found if s in self.comps]
        return subs, loops

    def trip_count(self, line: str, cond: str) -> int | None:
        m = _TRIP.search(line)
        if m:
            return int(m.group(1))
        text, todo, seen = [], [cond], set()
        while todo:  # the condition and what it calls (a fused compare)
            c = todo.pop()
            if c in seen or c not in self.comps:
                continue
            seen.add(c)
            text += self.comps[c]
            todo += self._calls(c)[0]
        body = "\n".join(text)
        consts = {int(v) for v in re.findall(r"s(?:32|64)\[\]\S* constant\((\d+)\)", body)}
        if len(consts) == 1 and "direction=LT" in body:
            return consts.pop()
        if len(consts) == 1 and "direction=GT" in body:  # N > i
            return consts.pop()
        return None

    def _loops(self, name: str, seen: set[str] | None = None) -> list[tuple[str, str, str]]:
        """The loops of ``name`` and of what it calls, not those nested in other loops."""
        seen = set() if seen is None else seen
        subs, loops = self._calls(name)
        for s in subs:
            if s not in seen:
                seen.add(s)
                loops += self._loops(s, seen)
        return loops

    # -- FLOPs -------------------------------------------------------------------------
    def _module_cost(self, name: str) -> float:
        """XLA's cost analysis FLOPs of computation ``name`` (loops counted once)."""
        if name in self._cost:
            return self._cost[name]
        import jax
        from jax._src.lib import _jax
        from jaxlib import _hlo

        parts = []
        for n in self.order:
            if n == self.entry and n != name:
                continue
            lines = list(self.comps[n])
            head = lines[0].removeprefix("ENTRY ")
            lines[0] = ("ENTRY " + head) if n == name else head
            parts.append("\n".join(lines))
        module = _hlo.hlo_module_from_text("HloModule check\n\n" + "\n\n".join(parts))
        client = jax.devices("cpu")[0].client
        cost = _jax.hlo_module_cost_analysis(client, module)
        self._cost[name] = float(cost.get("flops", 0.0))
        return self._cost[name]

    def flops(self, name: str | None = None) -> float:
        """FLOPs of one execution of ``name`` (default: the entry) with trip counts."""
        name = name or self.entry
        total = self._module_cost(name)
        for line, cond, body in self._loops(name):
            n = self.trip_count(line, cond)
            if n is None:
                self.unknown_trip_counts.append(body)
                continue
            total += n * self.flops(body) - self._module_cost(body)
        return total

    # -- collectives -------------------------------------------------------------------
    def collectives(self, name: str | None = None, executed: bool = True) -> dict[str, int]:
        """Collective ops by kind in ``name`` and what it calls; with ``executed``, each
        counted once per execution (loop bodies times their trip count)."""
        name = name or self.entry
        counts: dict[str, int] = {}

        def add(other: dict[str, int], times: int = 1) -> None:
            for k, v in other.items():
                counts[k] = counts.get(k, 0) + v * times

        for line in self.comps[name][1:]:
            m = _COLLECTIVE.search(line)
            if m and " = " in line:
                counts[m.group(1)] = counts.get(m.group(1), 0) + 1
        subs, loops = self._calls(name)
        for s in subs:
            add(self.collectives(s, executed))
        for line, cond, body in loops:
            n = self.trip_count(line, cond) if executed else 1
            add(self.collectives(body, executed), n or 1)
        return counts


def flops_report(prog: Program, setup: TrainSetup, chips: int, peak_tflops: float) -> dict:
    """Compiled FLOPs per train step (trip counts applied) beside the model's."""
    hlo = HloProgram(prog.compiled.as_text())
    n = setup.steps_per_call
    per_chip = hlo.flops() / n
    compiled = per_chip * chips
    cost = prog.compiled.cost_analysis() or {}  # None for the CUDA plugin's programs
    raw, optimal = cost.get("flops"), cost.get("optimal_seconds")
    model = setup.model_flops_per_step
    return {
        "flops": {
            "compiled_per_step": compiled,
            "compiled_per_chip_per_step": per_chip,
            "model_per_step": model,
            "compiled_over_model": compiled / model if model else None,
            "cost_analysis_per_chip_per_call": raw,
            "unknown_trip_counts": len(hlo.unknown_trip_counts),
        },
        "step_time_s": {
            "compiler_estimate": optimal / n if optimal and optimal > 0 else None,
            "flop_bound": per_chip / (peak_tflops * 1e12),
        },
        "collectives": {
            "in_program": hlo.collectives(executed=False),
            "executed_per_call": hlo.collectives(executed=True),
        },
    }


# ----------------------------------------------------------------------------------------
# The check.
# ----------------------------------------------------------------------------------------
def check(
    config: Any,
    topology: str,
    num_slices: int = 1,
    eval_topology: str | None = None,
) -> dict[str, Any]:
    """Compile ``config`` (a resolved training config) for ``topology``; the report dict.

    ``eval_topology``: accelerator type of the evaluator's host (None / "none": skip;
    "default": DEFAULT_EVAL_TOPOLOGY of the platform).
    """
    topo = get_topology(topology)
    eval_topo = None
    if eval_topology == "default":
        eval_topology = DEFAULT_EVAL_TOPOLOGY[topo.generation.platform]
    if eval_topology and str(eval_topology).lower() != "none":
        eval_topo = get_topology(eval_topology)
        if eval_topo.hosts > 1:
            raise CompileCheckError(
                f"--eval_topology={eval_topology}: the evaluator runs on one host; pick a "
                f"single-host type (e.g. v5litepod-1, v5litepod-8, v4-8)"
            )
    config = _resolve_num_slices(config, num_slices)
    devices = topology_devices(topo, num_slices)
    setup = train_setup(config, devices, hosts=topo.hosts * num_slices)
    train = compile_train(setup)
    mesh = {a: int(s) for a, s in setup.mesh.shape.items()}
    report: dict[str, Any] = {
        "model": setup.model_cfg.name,
        "topology": {**topo.describe(), "num_slices": num_slices, "devices": len(devices)},
        "mesh": mesh,
        "mesh_dcn": {a: int(n) for a, n in dict(config.mesh.dcn).items()},
        "batch_size": int(config.train.batch_size),
        "grad_accum": int(config.train.grad_accum),
        "steps_per_call": setup.steps_per_call,
        "feature_shapes": {k: list(v.shape) for k, v in setup.batch.items()},
        "hbm": memory_report(train, topo),
        "compile_s": round(train.compile_s, 2),
    }
    if train.compiled is not None:
        report.update(flops_report(train, setup, len(devices), topo.generation.peak_bf16_tflops))
    else:
        report["flops"] = {"model_per_step": setup.model_flops_per_step}
    report["fits"] = bool(report["hbm"]["fits"])
    if eval_topo is not None:
        edevs = topology_devices(eval_topo, 1)
        progs = eval_programs(config, setup.model_cfg, edevs)
        mems = {p.name: memory_report(p, eval_topo) for p in progs}
        worst = max(mems.values(), key=lambda m: m["total"] if m["total"] is not None else 1 << 62)
        report["eval"] = {
            "topology": eval_topo.accelerator_type,
            "devices": len(edevs),
            "programs": mems,
            "hbm": worst,
            "fits": all(m["fits"] for m in mems.values()),
            "compile_s": round(sum(p.compile_s for p in progs), 2),
        }
        report["fits"] = report["fits"] and report["eval"]["fits"]
    return report


# ----------------------------------------------------------------------------------------
# Output.
# ----------------------------------------------------------------------------------------
def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f} GiB"


def _sci(x: float | None) -> str:
    return "-" if x is None else f"{x:.3e}"


def format_report(r: dict[str, Any]) -> str:
    """The human table of one report."""
    t, h = r["topology"], r["hbm"]
    slices = f" x {t['num_slices']} slices" if t["num_slices"] > 1 else ""
    rows = [
        ("model", r["model"]),
        ("topology", f"{t['accelerator_type']}{slices} ({t['topology']}, {t['devices']} "
                     f"devices, {t['hosts'] * t['num_slices']} hosts)"),
        ("mesh", " ".join(f"{a}={s}" for a, s in r["mesh"].items())
         + ("  (dcn: " + " ".join(f"{a}={s}" for a, s in r["mesh_dcn"].items() if s > 1) + ")"
            if any(s > 1 for s in r["mesh_dcn"].values()) else "")),
        ("batch", f"{r['batch_size']} rows, grad_accum {r['grad_accum']}, "
                  f"{r['steps_per_call']} step(s) per call"),
        ("HBM per chip: arguments", gib(h["arguments"])),
        ("  temporaries", gib(h["temporaries"])),
        ("  outputs (not aliased)", gib(h["outputs"])),
        ("  generated code", gib(h["generated_code"])),
        ("  total", f"{gib(h['total'])} of {gib(h['hbm'])} usable"),
        ("fits", ("yes" if h["fits"] else "NO")
         + (f" (headroom {gib(h['headroom'])})" if h["headroom"] is not None else "")),
    ]  # fmt: skip
    if h.get("compiler_message"):
        rows.append(("compiler", h["compiler_message"]))
    f = r.get("flops", {})
    if "compiled_per_step" in f:
        ratio = f["compiled_over_model"]
        rows += [
            ("FLOPs per step: compiled", _sci(f["compiled_per_step"])
             + (f" ({f['unknown_trip_counts']} loop(s) counted once)"
                if f["unknown_trip_counts"] else "")),
            ("  model (3 x forward)", _sci(f["model_per_step"])
             + (f" (compiled / model = {ratio:.3f})" if ratio else "")),
        ]  # fmt: skip
        st = r["step_time_s"]
        est = st["compiler_estimate"]
        rows.append(("step time: compiler", "-" if est is None else f"{est:.4f} s"))
        rows.append(("  FLOP-bound at peak", f"{st['flop_bound']:.4f} s"))
        coll = r["collectives"]["executed_per_call"]
        rows.append(
            (
                "collectives per call",
                ", ".join(f"{k} {v}" for k, v in sorted(coll.items())) or "none",
            )
        )
    rows.append(("compile time", f"{r['compile_s']:.1f} s"))
    if "eval" in r:
        e = r["eval"]
        eh = e["hbm"]
        rows.append(
            (f"evaluator ({e['topology']})",
             f"{gib(eh['total'])} of {gib(eh['hbm'])}: " + ("fits" if e["fits"] else "does NOT fit")
             + f" ({e['compile_s']:.1f} s)")
        )  # fmt: skip
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def json_line(r: dict[str, Any]) -> str:
    return json.dumps({"compile_check": r}, sort_keys=False, default=str)


# ----------------------------------------------------------------------------------------
# Many runs (launch/submit.py): one compile per distinct program.
# ----------------------------------------------------------------------------------------
#: Config keys that never change the compiled programs (data selection, bookkeeping,
#: schedule constants): runs differing only in these share one compile.
PROGRAM_NEUTRAL = (
    "seed", "init_from", "init_step", "data.store", "data.source", "data.vocab",
    "data.prepare_options", "data.repeated_fraction", "data.repeated_epochs", "data.prefetch",
    "train.steps", "train.log_every", "train.checkpoint_every", "train.keep",
    "train.keep_period", "train.async_checkpointing", "train.peak_tflops",
    "train.profile_start_step", "train.profile_steps", "train.progress_bar",
    "train.dropout_start_step", "train.optimizer.learning_rate",
    "train.optimizer.warmup_steps", "train.optimizer.decay_steps",
    "train.optimizer.end_learning_rate_fraction", "model.name",
)  # fmt: skip


def program_key(config: Any) -> str:
    """A key equal for configs that compile to the same programs."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    d.pop("sweep", None)
    for key in PROGRAM_NEUTRAL:
        *parents, leaf = key.split(".")
        node = d
        for p in parents:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return json.dumps(d, sort_keys=True, default=str)


def default_cache_dir() -> str:
    """Where ``check_runs`` keeps reports: $REPEAT_SCALING_COMPILE_CACHE ('' = no cache),
    else ``workdir_io.user_cache_dir()/compile_check`` (``~/.cache/repeat_scaling/...``)."""
    from repeat_scaling import workdir_io

    default = str(workdir_io.user_cache_dir() / "compile_check")
    return os.environ.get("REPEAT_SCALING_COMPILE_CACHE", default)


def _code_fingerprint() -> str:
    """Versions of jax, jaxlib, libtpu and a hash of this package's sources: a cached
    report is reused only while all of them are unchanged."""
    import hashlib
    import pathlib
    from importlib import metadata

    h = hashlib.sha256()
    for pkg in ("jax", "jaxlib", "libtpu", "jax-cuda12-plugin", "flax", "optax"):
        try:
            h.update(f"{pkg}={metadata.version(pkg)};".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{pkg}=;".encode())
    root = pathlib.Path(__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return h.hexdigest()


def check_runs(
    runs: Iterable[tuple[str, Any]],
    topology: str,
    num_slices: int = 1,
    eval_topology: str | None = None,
    log: Callable[[str], None] = print,
    cache_dir: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Check every ``(name, config)``; configs with the same program compile once.

    Reports are kept in ``cache_dir`` (default :func:`default_cache_dir`; '' = none),
    keyed by the program, the topology and the code (:func:`_code_fingerprint`), so a
    re-submitted sweep does not compile again. Returns run name -> report.
    """
    import hashlib

    runs = list(runs)
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    fingerprint = _code_fingerprint() if cache_dir else ""
    by_key: dict[str, dict[str, Any]] = {}
    out: dict[str, dict[str, Any]] = {}
    distinct = len({program_key(c) for _, c in runs})
    log(f"# compile check: {len(runs)} run(s), {distinct} distinct program(s) for {topology}"
        + (f" x {num_slices} slices" if num_slices > 1 else ""))  # fmt: skip
    for name, config in runs:
        key = program_key(config)
        if key not in by_key:
            spec = json.dumps([key, topology, num_slices, eval_topology, fingerprint])
            path = ""
            if cache_dir:
                digest = hashlib.sha256(spec.encode()).hexdigest()[:32]
                path = os.path.join(cache_dir, f"{digest}.json")
            if path and os.path.isfile(path):
                with open(path) as f:
                    by_key[key] = json.load(f)
                log(f"#   {name}: cached ({path})")
            else:
                t0 = time.perf_counter()
                by_key[key] = check(config, topology, num_slices, eval_topology)
                log(f"#   {name}: compiled in {time.perf_counter() - t0:.0f} s")
                if path:
                    os.makedirs(cache_dir, exist_ok=True)
                    with open(path + ".tmp", "w") as f:
                        json.dump(by_key[key], f, default=str)
                    os.replace(path + ".tmp", path)
        out[name] = by_key[key]
    return out


def runs_table(reports: dict[str, dict[str, Any]]) -> str:
    """One line per run: fits, per-chip HBM (train; evaluator when checked)."""
    name_w = max([len(n) for n in reports] + [3])
    lines = [f"{'run':<{name_w}}  fits  {'HBM/chip':>20}  {'evaluator':>20}"]
    for name, r in reports.items():
        h = r["hbm"]
        train = f"{gib(h['total'])}/{h['hbm'] / GiB:.2f}"
        ev = "-"
        if "eval" in r:
            eh = r["eval"]["hbm"]
            ev = f"{gib(eh['total'])}/{eh['hbm'] / GiB:.2f}"
        lines.append(f"{name:<{name_w}}  {'yes' if r['fits'] else 'NO':<4}  {train:>20}  {ev:>20}")
    return "\n".join(lines)


def misfit_line(name: str, r: dict[str, Any]) -> str:
    """One line naming a run that does not fit and the numbers."""
    t = r["topology"]
    parts = []
    for what, h in (("train step", r["hbm"]), ("evaluator", r.get("eval", {}).get("hbm"))):
        if h is None or h["fits"]:
            continue
        need = gib(h["total"]) if h["total"] is not None else "more"
        where = t["accelerator_type"] if what == "train step" else r["eval"]["topology"]
        extra = f" [{h['compiler_message']}]" if h.get("compiler_message") else ""
        parts.append(f"{what} needs {need} per chip of {gib(h['hbm'])} on {where}{extra}")
    return f"run {name} does not fit: " + "; ".join(parts)


# ----------------------------------------------------------------------------------------
# CLI.
# ----------------------------------------------------------------------------------------
def apply_model_name(config: Any, overrides: dict[str, Any], base: Any = None) -> Any:
    """``--config.model.name=X`` means the fields of size X, as in a sweep entry
    (``repeat_scaling.sweeps.expand_model_name``): the new size's fields, plus what the config
    file (``base``) changed relative to its own size (e.g. ``remat_policy``), plus the
    other ``--config.model.*`` overrides."""
    from repeat_scaling.train import config as config_lib

    new = overrides.get("model.name")
    if new is None:
        return config
    explicit = {k.split(".", 1)[1] for k in overrides if k.startswith("model.")}
    try:
        fields = config_lib.model_fields(str(new)).to_dict()
        customised = {}
        if base is not None and base.model.get("name"):
            old = config_lib.model_fields(str(base.model.name)).to_dict()
            customised = {k: v for k, v in base.model.items() if k in old and old[k] != v}
    except config_lib.ConfigError as e:
        raise CompileCheckError(str(e)) from None
    for field, value in {**fields, **customised}.items():
        if field not in explicit:
            config.model[field] = value
    config.model.name = str(new)
    return config


def main(argv: list[str]) -> None:
    from absl import flags

    flags_ = flags.FLAGS
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; use --config.KEY=VALUE to override the config")
    if flags_.config is None:
        _fail("--config is required (e.g. --config=configs/xue2023.py:paper)")
    if not flags_.topology:
        _fail(f"--topology is required; known accelerator types: {', '.join(TOPOLOGIES)}")
    from ml_collections import config_flags

    try:
        overrides = config_flags.get_override_values(flags_["config"])
        base = None
        if "model.name" in overrides:
            base = config_files.load(flags_["config"].serialize().partition("=")[2])
        config = apply_model_name(flags_.config, overrides, base)
        report = check(config, flags_.topology, flags_.num_slices, flags_.eval_topology)
    except CompileCheckError as e:
        _fail(str(e))
    print(format_report(report), flush=True)
    print(json_line(report), flush=True)
    sys.exit(0 if report["fits"] else 2)


def _fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def run() -> None:
    """Entry point: ``python -m repeat_scaling.compile``."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # jax's own backend: this host's CPU
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # libtpu's start-up chatter
    from absl import app, flags
    from ml_collections import config_flags

    from repeat_scaling import cli

    config_flags.DEFINE_config_file("config", None, "Training config file (configs/x.py[:arg]).")
    flags.DEFINE_string("topology", "", "accelerator type, e.g. v4-128, v5litepod-256, v5p-512")
    flags.DEFINE_integer("num_slices", 1, "slices of --topology (multi-slice over DCN)")
    flags.DEFINE_string(
        "eval_topology",
        "default",
        "the evaluator's host type ('none': skip; default: v5litepod-1, or h100x1 for GPUs)",
    )
    app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    run()
