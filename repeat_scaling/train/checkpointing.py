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
* Verified: every save records, in the checkpoint's own orbax metadata (committed with
  it), a checksum per array (:func:`checksums`: the wrapping uint32 sum of its bits,
  exact on any mesh, any single flipped bit changes it). A restore checks that orbax
  succeeded, that every floating array is finite and that the checksums match
  (:class:`CorruptCheckpointError` otherwise). :meth:`Checkpointer.restore_latest_good`
  falls back from a corrupt or unreadable latest checkpoint to the newest good one,
  moving the bad step directory aside to ``workdir/checkpoints_corrupt/`` (kept for
  inspection, no longer listed).
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from repeat_scaling import run_files, workdir_io
from repeat_scaling.errors import first_line
from repeat_scaling.train import state as state_lib

PARAMS = "params"
TRAIN = "train"


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be used (one-line message)."""


class CorruptCheckpointError(CheckpointError):
    """A committed checkpoint whose content does not restore, or does not match the
    checksums recorded when it was saved (one-line message)."""


#: Key of the per-array checksums in a checkpoint's orbax custom metadata.
CHECKSUMS = "repeat_scaling_checksums"
#: Where corrupt checkpoints are moved (kept, no longer listed as committed).
CORRUPT_DIR = run_files.CHECKPOINTS_CORRUPT

_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _leaf_sum(x: jax.Array) -> jax.Array:
    """uint32 [wrapping sum of the bits, 1 if all finite] of one array."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    bits = jax.lax.bitcast_convert_type(x, _UINT[x.dtype.itemsize]).astype(jnp.uint32)
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else True
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.asarray(finite, jnp.uint32)])


@jax.jit
def _tree_sums(tree: Any) -> Any:
    return jax.tree.map(_leaf_sum, tree)


def checksums(tree: Any, prefix: str = "") -> tuple[dict[str, int], list[str]]:
    """``({array path: checksum}, [paths of arrays with NaN/Inf])`` of a pytree.

    The checksum is the uint32 sum, wrapping, of each array's bit patterns: integer
    addition is associative, so it is the same for any sharding, and a single flipped
    bit always changes it. One jitted reduction per call (no host copy of the arrays).
    """
    sums = jax.device_get(_tree_sums(tree))
    out: dict[str, int] = {}
    bad: list[str] = []
    for path, pair in jax.tree_util.tree_flatten_with_path(sums)[0]:
        key = prefix + jax.tree_util.keystr(path)
        out[key] = int(pair[0])
        if not int(pair[1]):
            bad.append(key)
    return out, bad


def verify(tree: Any, recorded: dict[str, int] | None, where: str, prefix: str) -> None:
    """:class:`CorruptCheckpointError` unless ``tree`` is finite and matches ``recorded``
    (the checksums saved with it; None for checkpoints saved without them)."""
    got, bad = checksums(tree, prefix)
    if bad:
        raise CorruptCheckpointError(
            f"checkpoint {where} restored non-finite values in {len(bad)} array(s), first {bad[0]}"
        )
    if recorded is None:
        return
    wrong = [k for k, v in got.items() if k in recorded and recorded[k] != v]
    missing = [k for k in got if k not in recorded]
    if wrong or missing:
        first = (wrong or missing)[0]
        raise CorruptCheckpointError(
            f"checkpoint {where} does not match the checksums recorded when it was saved "
            f"({len(wrong)} array(s) differ, {len(missing)} unrecorded; first {first})"
        )


def recorded_checksums(manager: Any, step: int) -> dict[str, int] | None:
    """The checksums saved with checkpoint ``step`` (None: saved without them)."""
    try:
        meta = manager.metadata(step)
    except (OSError, ValueError, KeyError):
        return None
    custom = getattr(meta, "custom_metadata", None) or {}
    sums = custom.get(CHECKSUMS)
    return {str(k): int(v) for k, v in sums.items()} if isinstance(sums, dict) else None


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


def checkpoint_dir(workdir: str | pathlib.Path) -> pathlib.Path:
    """``workdir/checkpoints`` (absolute local path, or an epath for a gs:// workdir)."""
    return workdir_io.workdir_path(workdir) / run_files.CHECKPOINTS


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
        sums = {**checksums(state["params"], PARAMS)[0], **checksums(train, TRAIN)[0]}
        self.check_errors()
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    PARAMS: ocp.args.StandardSave(state["params"]),
                    TRAIN: ocp.args.StandardSave(train),
                }
            ),
            force=True,
            custom_metadata={CHECKSUMS: sums},
        )

    def check_errors(self) -> None:
        """:class:`CheckpointError` (one line) if an asynchronous save failed."""
        try:
            self.manager.check_for_errors()
        except Exception as e:  # orbax re-raises the background thread's error as is
            raise CheckpointError(
                f"saving a checkpoint under {self.directory} failed ({_one_line(e)}); "
                f"committed checkpoints: {committed_steps(self.directory.parent)}"
            ) from None

    def wait(self) -> None:
        """Block until pending asynchronous saves are committed (CheckpointError if one
        failed)."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise CheckpointError(
                f"saving a checkpoint under {self.directory} failed ({_one_line(e)}); "
                f"committed checkpoints: {committed_steps(self.directory.parent)}"
            ) from None
        self.check_errors()

    def close(self) -> None:
        try:
            self.wait()
        finally:
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
        where = f"{self.directory}/{step}"
        sums = recorded_checksums(self.manager, step)
        verify(out[PARAMS], sums, where, PARAMS)
        verify(train, sums, where, TRAIN)
        return {
            "step": train["step"],
            "params": out[PARAMS],
            "opt_state": train["opt_state"],
            "extra": train["extra"],
        }

    def restore_latest_good(
        self, abstract: dict[str, Any], warn: Callable[[str], None]
    ) -> dict[str, Any] | None:
        """The newest committed checkpoint that restores and verifies (None: none saved).

        A corrupt or unreadable newer one is moved to ``workdir/checkpoints_corrupt/``
        with a warning naming it and the step restored instead; CheckpointError when no
        committed checkpoint is good.
        """
        steps = self.all_steps()
        bad: list[str] = []
        for step in reversed(steps):
            try:
                state = self.restore(step, abstract)
            except Exception as e:  # orbax/tensorstore error classes vary by failure
                reason = _one_line(e)
                bad.append(f"{step} ({reason})")
                self._set_aside(step)
                continue
            if bad:
                warn(
                    f"checkpoint step {steps[-1]} is corrupt or unreadable "
                    f"({bad[0].split(' ', 1)[1]}); resuming from step {step}, the newest "
                    f"good checkpoint (bad ones moved to {self.directory.parent / CORRUPT_DIR})"
                )
            return state
        if bad:
            raise CheckpointError(
                f"no committed checkpoint under {self.directory} restores: {'; '.join(bad)} "
                f"(moved to {self.directory.parent / CORRUPT_DIR})"
            )
        return None

    def _set_aside(self, step: int) -> None:
        """Move step ``step``'s directory to ``workdir/checkpoints_corrupt/<step>-<time>``."""
        target = self.directory.parent / CORRUPT_DIR
        workdir_io.mkdirs(target)
        src = self.directory / str(step)
        try:
            src.rename(target / f"{step}-{int(time.time())}")
        except OSError as e:
            raise CheckpointError(
                f"checkpoint {src} is corrupt and cannot be moved aside ({_one_line(e)}); "
                "move or delete it by hand to resume from an older checkpoint"
            ) from None
        self.manager.reload()


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

    try:
        d = run_files.load_json(workdir / run_files.CONFIG)
    except run_files.RunFileError as e:
        raise CheckpointError(f"{e}: is {workdir} a training workdir?") from None
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
            msg = first_line(e)
            raise CheckpointError(
                f"checkpoint {directory}/{step} does not match model {cfg.name!r}: {msg}"
            ) from None
        except Exception as e:  # tensorstore/orbax read errors: a damaged checkpoint
            raise CorruptCheckpointError(
                f"checkpoint {directory}/{step} is unreadable ({_one_line(e)})"
            ) from None
        verify(out[PARAMS], recorded_checksums(manager, step), f"{directory}/{step}", PARAMS)
    params = out[PARAMS]
    model = state_lib.merge(graphdef, params)
    return model, params, int(step)
