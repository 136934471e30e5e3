"""Multi-host start-up: ``jax.distributed.initialize`` from flags or the environment.

Call :func:`initialize` before anything touches a jax backend.

* Explicit: ``coordinator_address`` (``host:port`` of process 0), ``num_processes`` and
  ``process_id`` (``local_device_ids`` optional), e.g. two CPU processes on localhost.
* Auto-detected: Cloud TPU pods (``TPU_WORKER_HOSTNAMES`` / ``MEGASCALE_*`` set by the
  TPU runtime) and SLURM jobs with more than one task (``SLURM_NTASKS`` > 1); jax's
  cluster detection then finds the coordinator itself.
* Otherwise a single process: nothing to do.

Multi-process on CPU uses gloo collectives
(``jax_cpu_collectives_implementation=gloo``), which makes two processes on one machine
a real multi-host test.
"""

from __future__ import annotations

import os

import jax


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
