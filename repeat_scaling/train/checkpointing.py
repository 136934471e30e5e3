"""Checkpoints: an orbax ``CheckpointManager`` around the train state.

Layout: ``workdir/checkpoints/<step>/{params,train}`` where ``params`` holds only the
model parameters (so the evaluator restores them alone, onto any mesh) and ``train``
holds ``{"step", "opt_state", "extra"}``. ``<step>`` is the number of completed updates.

* Saves are asynchronous (the device-to-host copy happens before ``save`` returns, so
  the caller may donate the state buffers right after) and commit atomically: orbax
  writes into a temporary directory and renames it when complete, so a process killed
  mid-save leaves only the previous checkpoints visible; leftovers are cleaned on the
  next start.
* Retention: the last ``keep`` checkpoints, plus every checkpoint whose step is a
  multiple of ``keep_period`` (> 0), for the evaluator's curves.
* The data position is the step number: nothing else needs saving to resume exactly.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from repeat_scaling import workdir_io
from repeat_scaling.train import state as state_lib

PARAMS = "params"
TRAIN = "train"


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be used (one-line message)."""


def checkpoint_dir(workdir: str | pathlib.Path) -> pathlib.Path:
    """``workdir/checkpoints`` (absolute local path, or an epath for a gs:// workdir)."""
    return workdir_io.workdir_path(workdir) / "checkpoints"


class Checkpointer:
    """Save / restore the train state under ``workdir/checkpoints``."""

    def __init__(
        self,
        workdir: str | pathlib.Path,
        *,
        save_every: int,
        keep: int = 3,
        keep_period: int = 0,
        async_save: bool = True,
        read_only: bool = False,
    ):
        self.directory = checkpoint_dir(workdir)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(int(save_every), 1),
            max_to_keep=int(keep),
            keep_period=int(keep_period) or None,
            create=not read_only,
            cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=async_save,
            read_only=read_only,
        )
        self.save_every = int(save_every)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(PARAMS, TRAIN)
        )

    # -- queries ------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    # -- save ---------------------------------------------------------------------------
    def save(self, state: dict[str, Any], *, force: bool = False) -> bool:
        """Save ``state`` at its step if due (every ``save_every``) or ``force``."""
        step = int(jax.device_get(state["step"]))
        if not force and (self.save_every <= 0 or step % self.save_every):
            return False
        if step in self.manager.all_steps():
            return False
        train = {"step": state["step"], "opt_state": state["opt_state"], "extra": state["extra"]}
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    PARAMS: ocp.args.StandardSave(state["params"]),
                    TRAIN: ocp.args.StandardSave(train),
                }
            ),
            force=True,
        )

    def wait(self) -> None:
        """Block until pending asynchronous saves are committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    # -- restore ------------------------------------------------------------------------
    def restore(self, step: int, abstract: dict[str, Any]) -> dict[str, Any]:
        """Restore the full train state at ``step`` with the shardings of ``abstract``."""
        a_train = {
            "step": abstract["step"],
            "opt_state": abstract["opt_state"],
            "extra": abstract["extra"],
        }
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    PARAMS: ocp.args.StandardRestore(abstract["params"]),
                    TRAIN: ocp.args.StandardRestore(a_train),
                }
            ),
        )
        train = out[TRAIN]
        return {
            "step": train["step"],
            "params": out[PARAMS],
            "opt_state": train["opt_state"],
            "extra": train["extra"],
        }


def committed_steps(workdir: str | pathlib.Path) -> list[int]:
    """Committed checkpoint steps of ``workdir`` (sorted; [] when none), creating nothing.

    Uses orbax's own notion of a finalized step directory (no temporary
    ``*.orbax-checkpoint-tmp-*`` directory; on GCS, a ``commit_success.txt`` marker), so a
    checkpoint still being written is never listed. Only lists files: it neither builds a
    ``CheckpointManager`` nor initialises a JAX backend, so the evaluator, the trainer and
    ``launch/status.py`` (which runs next to the jobs it watches) all share it.
    """
    directory = checkpoint_dir(workdir)
    if not directory.is_dir():
        return []
    return sorted(int(s) for s in ocp.path.step.checkpoint_steps(directory))


def _read_model_config(workdir: pathlib.Path):
    from repeat_scaling.models.config import ModelConfig

    path = workdir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: is {workdir} a training workdir?")
    d = json.loads(path.read_text())
    return ModelConfig.from_dict(d["model"])


def restore_params(
    workdir: str | pathlib.Path,
    step: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    *,
    model_config: Any = None,
    rules: Any = None,
) -> tuple[Any, Any, int]:
    """Restore ONLY the model parameters of a checkpoint, onto any mesh.

    Args:
      workdir: training workdir (its ``config.json`` gives the model config unless
        ``model_config`` is passed).
      step: checkpoint step; None = latest committed.
      mesh: target mesh (default: all local devices on the data axis). The checkpoint
        may have been written on a different mesh / device count.
    Returns:
      ``(model, params, step)``: the NNX module with the restored parameters, the
      parameters as a pure-dict pytree of sharded arrays, and the restored step.
    """
    from repeat_scaling import sharding

    workdir = workdir_io.workdir_path(workdir)
    rules = sharding.DEFAULT_RULES if rules is None else rules
    cfg = model_config if model_config is not None else _read_model_config(workdir)
    if mesh is None:
        mesh = sharding.make_mesh({"data": -1})
    directory = checkpoint_dir(workdir)
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoints in {workdir} ({directory} does not exist)")
    with ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(read_only=True, create=False),
        item_names=(PARAMS, TRAIN),
    ) as manager:
        steps = sorted(manager.all_steps())
        if not steps:
            raise CheckpointError(f"no committed checkpoint in {directory}")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise CheckpointError(f"checkpoint step {step} not in {directory}; available: {steps}")
        graphdef, a_params = state_lib.abstract_params(cfg, mesh, rules)
        try:
            out = manager.restore(
                step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(a_params)})
            )
        except (ValueError, KeyError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(
                f"checkpoint {directory}/{step} does not match model {cfg.name!r}: {msg}"
            ) from None
    params = out[PARAMS]
    model = state_lib.merge(graphdef, params)
    return model, params, int(step)
