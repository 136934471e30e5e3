"""Multi-host start-up: ``jax.distributed.initialize`` from flags or the environment.

Call :func:`initialize` before anything touches a jax backend.

* Explicit: ``coordinator_address`` (``host:port`` of process 0), ``num_processes`` and
  ``process_id`` (``local_device_ids`` optional), e.g. two CPU processes on localhost.
* Cloud TPU pods (``TPU_WORKER_HOSTNAMES`` / ``MEGASCALE_*`` set by the TPU runtime):
  jax's cluster detection finds everything itself.
* SLURM job steps with more than one task (``srun``; ``SLURM_NTASKS`` > 1): every
  argument is read from the step's environment by :func:`slurm_layout` and passed
  explicitly. Each task gets the GPUs SLURM gave it (``CUDA_VISIBLE_DEVICES``); when
  several tasks of a node all see the node's GPUs, task ``SLURM_LOCALID`` takes its
  own equal share. (jax's own SLURM detection assumes one GPU per task and would make
  a one-task-per-node job use GPU 0 of each node.)
* Otherwise a single process: nothing to do.

Multi-process on CPU uses gloo collectives
(``jax_cpu_collectives_implementation=gloo``), which makes two processes on one machine
a real multi-host test.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping

import jax

#: jax's own choice of coordinator port for a SLURM job (its ``SlurmCluster``): one
#: port of the ephemeral range [61440, 65535] per job id, the same on every task.
_SLURM_PORT_BASE = 65535 - 2**12 + 1


class LayoutError(ValueError):
    """A SLURM environment this trainer cannot map onto processes and devices."""


@dataclasses.dataclass(frozen=True)
class SlurmLayout:
    """The arguments of ``jax.distributed.initialize`` for one task of a SLURM step.

    ``local_device_ids`` are the task's GPUs as CUDA numbers them inside the task
    (after ``CUDA_VISIBLE_DEVICES``); ``None`` when SLURM gave the job no GPUs (a
    CPU job: every local device).
    """

    coordinator_address: str
    num_processes: int
    process_id: int
    local_device_ids: list[int] | None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[07-09,12],cpu1`` -> ``gpu07``."""
    m = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?([^,]*)", nodelist.strip())
    if not m or not (m.group(1) or m.group(2)):
        raise LayoutError(f"SLURM node list {nodelist!r}; expected e.g. 'gpu01' or 'gpu[01-04]'")
    prefix, ranges, suffix = m.groups()
    if ranges is None:
        return prefix + suffix
    return prefix + re.split(r"[-,]", ranges)[0] + suffix


def _tasks_per_node(spec: str, node_id: int) -> int:
    """Tasks on node ``node_id`` from ``SLURM_STEP_TASKS_PER_NODE``, e.g. ``2(x3),1``."""
    counts: list[int] = []
    for item in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise LayoutError(f"SLURM_STEP_TASKS_PER_NODE={spec!r}; expected e.g. '2(x3),1'")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    if not 0 <= node_id < len(counts):
        raise LayoutError(
            f"SLURM_NODEID={node_id} is not a node of SLURM_STEP_TASKS_PER_NODE={spec!r}"
        )
    return counts[node_id]


def _env_int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        if default is None:
            raise LayoutError(f"{name} is not set; expected inside a SLURM job step (srun)")
        return default
    try:
        return int(raw)
    except ValueError:
        raise LayoutError(f"{name}={raw!r}; expected an integer") from None


def slurm_layout(env: Mapping[str, str] | None = None) -> SlurmLayout:
    """Process count, process id, coordinator and local GPUs of this SLURM task."""
    env = os.environ if env is None else env
    num_processes = _env_int(env, "SLURM_NTASKS")
    process_id = _env_int(env, "SLURM_PROCID")
    if not 0 <= process_id < num_processes:
        raise LayoutError(
            f"SLURM_PROCID={process_id}; expected in [0, SLURM_NTASKS={num_processes})"
        )
    coordinator = env.get("JAX_COORDINATOR_ADDRESS", "")
    if not coordinator:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
        if not nodelist:
            raise LayoutError("SLURM_STEP_NODELIST is not set; expected inside a SLURM job step")
        port = env.get("JAX_COORDINATOR_PORT") or str(
            _env_int(env, "SLURM_JOB_ID") % 2**12 + _SLURM_PORT_BASE
        )
        coordinator = f"{first_host(nodelist)}:{port}"
    visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    ids = [v for v in visible.split(",") if v.strip()] if visible else []
    if ids and not all(re.fullmatch(r"\s*(\d+|GPU-[\w-]+|MIG-[\w/-]+)\s*", v) for v in ids):
        ids = []  # e.g. SLURM's "NoDevFiles": no GPU for this task
    on_node = _env_int(env, "SLURM_GPUS_ON_NODE", len(ids))
    n_visible = len(ids) if visible else on_node
    if n_visible == 0:
        return SlurmLayout(coordinator, num_processes, process_id, None)
    tasks = _tasks_per_node(
        env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1",
        _env_int(env, "SLURM_NODEID", 0),
    )
    if tasks > 1 and n_visible == on_node:  # every task of the node sees all its GPUs
        if n_visible % tasks:
            raise LayoutError(
                f"{n_visible} GPUs on this node for {tasks} tasks; expected a multiple of {tasks}"
            )
        share = n_visible // tasks
        local = _env_int(env, "SLURM_LOCALID")
        return SlurmLayout(
            coordinator, num_processes, process_id, list(range(local * share, (local + 1) * share))
        )
    return SlurmLayout(coordinator, num_processes, process_id, list(range(n_visible)))


def _auto_cluster() -> str | None:
    """Name of an auto-detectable multi-host environment, or None."""
    if os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") >= 1 or os.environ.get(
        "MEGASCALE_COORDINATOR_ADDRESS"
    ):
        return "tpu"
    try:
        if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and os.environ.get("SLURM_JOB_ID"):
            return "slurm"
    except ValueError:
        pass
    return None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: list[int] | None = None,
) -> bool:
    """Initialise multi-host jax if asked or detected; return whether it did."""
    explicit = bool(coordinator_address)
    if explicit:
        if num_processes is None or process_id is None:
            raise ValueError(
                f"coordinator_address={coordinator_address!r} needs num_processes and process_id"
            )
        if not 0 <= process_id < num_processes:
            raise ValueError(
                f"process_id={process_id}; expected in [0, num_processes={num_processes})"
            )
    elif num_processes not in (None, 1) or process_id not in (None, 0):
        raise ValueError(
            f"num_processes={num_processes} / process_id={process_id} need --coordinator_address"
        )
    cluster = None if explicit else _auto_cluster()
    if not explicit and cluster is None:
        return False
    platforms = os.environ.get("JAX_PLATFORMS", "") or str(jax.config.jax_platforms or "")
    if "cpu" in platforms.split(",") or platforms == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            local_device_ids=local_device_ids,
        )
    elif cluster == "slurm":
        layout = slurm_layout()
        jax.distributed.initialize(
            coordinator_address=layout.coordinator_address,
            num_processes=layout.num_processes,
            process_id=layout.process_id,
            local_device_ids=layout.local_device_ids,
            cluster_detection_method="deactivate",  # all four are given
        )
    else:
        jax.distributed.initialize()
    return True


def is_primary() -> bool:
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Barrier across processes (no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
