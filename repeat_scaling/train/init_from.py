"""Fine-tuning: start a new run from the parameters of another run or a Hugging Face T5.

``--config.init_from=DIR [--config.init_step=N]`` where DIR (a local path, or a
``gs://BUCKET/PATH`` run workdir as a sweep on a gs:// root names its stages) is either

* a training workdir (``config.json`` + ``checkpoints/``): its committed checkpoint
  ``N`` (``-1``: the latest committed one) — kind ``"run"``; a checkpoint directory
  ``WORKDIR/checkpoints/N`` is accepted too (the same as ``WORKDIR`` with step N); or
* a Hugging Face T5 v1.1 directory (``config.json`` with ``model_type: "t5"`` plus
  ``model.safetensors`` / ``pytorch_model.bin``), imported through
  :mod:`repeat_scaling.models.convert` — kind ``"huggingface"`` (``init_step`` must stay -1;
  the directory must be local).

Only the parameters are taken. The new run gets a fresh optimizer state, its own
learning-rate schedule starting at step 0, and the data source / objective of its own
config. Parameters are restored directly onto the new run's mesh (a run checkpoint is
read shard by shard by orbax; a Hugging Face import is read on the host and then placed).

Every check runs before anything is written to the new workdir (:func:`resolve`):
a missing directory, a workdir without a committed checkpoint, an unknown step, another
vocabulary, or a model whose parameters differ are each a one-line
:class:`~repeat_scaling.train.config.ConfigError`; for a model mismatch the message
names the FIRST differing parameter path (in sorted path order) and both shapes.
The vocabulary check reads the source run's token store (its ``data.store``; a relative
one is looked up from the current directory, then inside the source workdir, like the
evaluator does); when that store cannot be read the check is skipped with a one-line
``warning:`` on stderr and the reason is kept in the record's ``vocab_check``.

The new workdir records where it started in ``init_from.json`` (and the same dict under
``config.json`` ``derived["init_from"]``)::

    {"path": absolute DIR or gs:// URL, "kind": "run" | "huggingface",
     "step": N (run) or null, "model": the source ModelConfig dict,
     "source_config": the source run's config.json "data" block (run) or null,
     "vocab_check": "same vocabulary as STORE" | "not checked: REASON" | null}

The report links a fine-tuned run to its pre-training run through ``path``/``step``.
A rerun of a workdir that already holds checkpoints resumes it (:func:`check_resume`):
its ``init_from`` must name the recorded source — the same real path (symlinks
resolved), or, when one of the two no longer exists (a sweep moved, or a relative root
resolved from another directory), a path with the same run name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from repeat_scaling import run_files, workdir_io
from repeat_scaling.errors import first_line
from repeat_scaling.models.config import ModelConfig
from repeat_scaling.train import checkpointing
from repeat_scaling.train import record as record_lib
from repeat_scaling.train.config import ConfigError

RUN = "run"
HUGGINGFACE = "huggingface"

#: ModelConfig fields that change how parameters are laid out or computed but not what
#: they are; a Hugging Face import takes them from the new run's model.
_LAYOUT_FIELDS = (
    "scan_layers",
    "remat_policy",
    "dtype",
    "param_dtype",
    "float32_logits",
    "attention_impl",
    "ops",
    "dropout_rate",
    "attention_dropout_rate",
    "droppath_rate",
)


@dataclasses.dataclass(frozen=True)
class InitSource:
    """A checked fine-tuning source (see :func:`resolve`)."""

    path: str  # absolute directory or gs:// URL
    kind: str  # RUN | HUGGINGFACE
    step: int | None  # the run checkpoint's step (None for huggingface)
    model: ModelConfig  # the source's model
    source_config: dict[str, Any] | None  # the source run's config.json "data" block
    vocab_check: str | None = None  # how the vocabulary check went (run); None for HF

    def describe(self) -> str:
        if self.kind == RUN:
            return f"init_from={self.path} step {self.step}"
        return f"init_from={self.path} (Hugging Face T5)"

    def record(self) -> dict[str, Any]:
        """The ``init_from.json`` dict."""
        return {
            "path": self.path,
            "kind": self.kind,
            "step": self.step,
            "model": self.model.to_dict(),
            "source_config": self.source_config,
            "vocab_check": self.vocab_check,
        }

    def load_params(self, model_cfg: ModelConfig, abstract_params: Any, mesh, rules) -> Any:
        """The source parameters as a pure-dict pytree placed like ``abstract_params``."""
        if self.kind == RUN:
            _, params, _ = checkpointing.restore_params(
                self.path, self.step, mesh, model_config=model_cfg, rules=rules
            )
            return params
        from repeat_scaling.models import convert

        layout = {f: getattr(model_cfg, f) for f in _LAYOUT_FIELDS}
        try:
            _, model = convert.load_hf_t5(self.path, **layout)
        except (convert.ConversionError, OSError) as e:
            raise ConfigError(f"{self.describe()}: {first_line(e)}") from None
        flat = _flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))

        def place(kp, a):
            return jax.device_put(np.asarray(flat[_path(kp)], a.dtype), a.sharding)

        return jax.tree_util.tree_map_with_path(place, abstract_params)


# ----------------------------------------------------------------------------------
# Parameter shapes
# ----------------------------------------------------------------------------------
def _path(kp) -> str:
    parts = []
    for k in kp:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return "/".join(parts)


def _flat(tree: Any) -> dict[str, Any]:
    return {_path(kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """``{"decoder/layers/mlp/wi/kernel": shape, ...}`` of ``cfg``'s model (nothing allocated)."""
    from repeat_scaling import models

    abstract = nnx.eval_shape(lambda: models.build(cfg, nnx.Rngs(0)))
    pure = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    return {k: tuple(v.shape) for k, v in _flat(pure).items()}


def first_mismatch(there: dict[str, tuple], here: dict[str, tuple]) -> str | None:
    """Describe the first (sorted) parameter path whose presence or shape differs."""
    for path in sorted(set(there) | set(here)):
        a, b = there.get(path), here.get(path)
        if a == b:
            continue
        if a is None:
            return f"parameter {path} with shape {b} in this model does not exist there"
        if b is None:
            return f"parameter {path} with shape {a} there does not exist in this model"
        return f"parameter {path} has shape {a} there but {b} in this model"
    return None


# ----------------------------------------------------------------------------------
# Resolving a source
# ----------------------------------------------------------------------------------
def _read_json(path: pathlib.Path, what: str) -> dict[str, Any]:
    try:
        return run_files.load_json(path)
    except (run_files.RunFileError, OSError) as e:
        raise ConfigError(f"{what}: {first_line(e)}") from None


def _as_path(init_from: str, *, check: bool = False):
    """``init_from`` as an absolute ``pathlib.Path`` or a gs:// ``epath.Path``.

    ``check`` also lists a gs:// bucket once, so a missing bucket or missing credentials
    are a one-line error here.
    """
    text = init_from if workdir_io.is_url(init_from) else os.path.expanduser(init_from)
    try:
        if check:
            return workdir_io.check_workdir(text, what="init_from")
        return workdir_io.workdir_path(text, what="init_from")
    except workdir_io.WorkdirError as e:
        raise ConfigError(str(e)) from None


def normalize(init_from: str, init_step: int) -> tuple[Any, int]:
    """``(absolute directory or gs:// path, step)``; ``RUN/checkpoints/N`` becomes ``(RUN, N)``."""
    return _split_step(_as_path(init_from), init_step)


def _split_step(path, init_step: int) -> tuple[Any, int]:
    if (
        path.name.isdigit()
        and path.parent.name == run_files.CHECKPOINTS
        and (path.parent.parent / run_files.CONFIG).is_file()
    ):
        step = int(path.name)
        if init_step not in (-1, step):
            raise ConfigError(f"init_step={init_step} contradicts init_from={path} (step {step})")
        return path.parent.parent, step
    return path, init_step


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def resolve(
    init_from: str,
    init_step: int,
    model_cfg: ModelConfig,
    store_vocab=None,
    *,
    log: Callable[[str], None] | None = None,
) -> InitSource:
    """Check ``init_from`` against the new run's model (and vocabulary); ConfigError if unfit.

    ``store_vocab`` (the new run's :class:`VocabInfo`) is compared with the source run's
    store vocabulary when that store is still readable; otherwise ``log`` (default: stderr)
    gets a one-line warning and the record's ``vocab_check`` says why.
    """
    path, init_step = _split_step(_as_path(init_from, check=True), init_step)
    what = f"init_from={path}"
    if not path.is_dir():
        raise ConfigError(f"{what} does not exist; expected a run workdir or a Hugging Face T5 dir")
    cfg_path = path / run_files.CONFIG
    if not cfg_path.is_file():
        raise ConfigError(
            f"{what} has no config.json; expected a run workdir (config.json + checkpoints/) "
            "or a Hugging Face T5 directory"
        )
    d = _read_json(cfg_path, what)
    if d.get("model_type") == "t5":
        source = _resolve_hf(path, d, init_step, model_cfg)
    elif isinstance(d.get("model"), dict):
        source = _resolve_run(path, d, init_step, model_cfg, store_vocab, log or _stderr)
    else:
        raise ConfigError(
            f"{what}: config.json is neither a training run's (no 'model' block) nor a "
            f"Hugging Face T5 config (model_type={d.get('model_type')!r}, expected 't5')"
        )
    mismatch = first_mismatch(param_shapes(source.model), param_shapes(model_cfg))
    if mismatch:
        raise ConfigError(f"{source.describe()}: {mismatch}")
    return source


def _resolve_run(path, d, init_step, model_cfg, store_vocab, log) -> InitSource:
    what = f"init_from={path}"
    try:
        src_model = ModelConfig.from_dict(d["model"])
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{what}: config.json has a bad model block ({e})") from None
    steps = checkpointing.committed_steps(path)
    if not steps:
        raise ConfigError(f"{what} has no committed checkpoint (in {path / 'checkpoints'})")
    if init_step == -1:
        step = steps[-1]
    elif init_step in steps:
        step = init_step
    else:
        raise ConfigError(f"init_step={init_step} is not a committed checkpoint of {path}: {steps}")
    if src_model.scan_layers != model_cfg.scan_layers:
        raise ConfigError(
            f"{what} step {step} stores layers with model.scan_layers={src_model.scan_layers}, "
            f"this model has {model_cfg.scan_layers}; set --config.model.scan_layers="
            f"{src_model.scan_layers}"
        )
    data = d.get("data") if isinstance(d.get("data"), dict) else None
    note = None
    if store_vocab is not None:
        note = _check_vocab(path, step, (data or {}).get("store"), store_vocab)
        if note.startswith("not checked"):
            log(f"warning: init_from={path} step {step}: vocabulary {note}")
    return InitSource(str(path), RUN, int(step), src_model, data, note)


def source_store(workdir, store: Any) -> tuple[pathlib.Path | None, str]:
    """Where the source run's token store is: ``(local directory, "")`` or ``(None, why)``
    (``store`` is the source ``config.json`` ``data.store``; see ``record.find_store``)."""
    if not isinstance(store, str) or not store:
        return None, "the source run's config.json names no data.store"
    if workdir_io.is_url(store):
        return None, f"its data.store={store!r} is a URL (token stores are local)"
    found, tried = record_lib.find_store(workdir, store)
    if found is None:
        return None, "its data.store is not readable here (tried " + ", ".join(
            map(str, tried)
        ) + ")"
    return found, ""


def _check_vocab(path, step, store: Any, vocab) -> str:
    """Refuse a source run whose store used another vocabulary; return the check's note."""
    from repeat_scaling.data.store import StoreError, TokenStore

    store_path, why = source_store(path, store)
    if store_path is None:
        return f"not checked: {why}"
    try:
        src_vocab = TokenStore(store_path).vocab
    except (StoreError, KeyError, ValueError, OSError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        return f"not checked: its store {store_path} is unreadable ({first})"
    if not src_vocab.same_vocabulary(vocab):
        raise ConfigError(
            f"init_from={path} step {step} was trained with vocabulary {src_vocab.describe()}, "
            f"but this run's store uses {vocab.describe()}"
        )
    return f"same vocabulary as {store_path}"


def _resolve_hf(path, d, init_step, model_cfg) -> InitSource:
    from repeat_scaling.models import convert

    what = f"init_from={path} (Hugging Face T5)"
    if not isinstance(path, pathlib.Path):
        raise ConfigError(
            f"{what} is a URL; expected a local Hugging Face T5 directory (copy it to local disk)"
        )
    if init_step != -1:
        raise ConfigError(f"init_step={init_step}; expected -1 for a Hugging Face directory {path}")
    if not any((path / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")):
        raise ConfigError(f"{what} holds neither model.safetensors nor pytorch_model.bin")
    try:
        src = convert.config_from_hf(d, name=path.name or "hf_t5")
        layout = {f: getattr(model_cfg, f) for f in _LAYOUT_FIELDS}
        src = src.replace(**layout)
    except (convert.ConversionError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{what}: {first_line(e)}") from None
    return InitSource(str(path), HUGGINGFACE, None, src, None)


# ----------------------------------------------------------------------------------
# The workdir's record
# ----------------------------------------------------------------------------------
def read_record(workdir: Any) -> dict[str, Any] | None:
    """The ``init_from.json`` of a workdir (local or gs://; None when it did not fine-tune)."""
    from repeat_scaling import workdir_io

    text = workdir_io.read_text(workdir_io.workdir_path(workdir) / run_files.INIT_FROM)
    if text is None:
        return None
    try:
        d = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"workdir {workdir}: {run_files.INIT_FROM} is unreadable ({e})") from None
    return d if isinstance(d, dict) else None


def check_resume(workdir: Any, init_from: str, init_step: int) -> dict[str, Any] | None:
    """A workdir with its own checkpoints resumes; refuse a different ``init_from``.

    ``init_from`` names the recorded source when both are the same real path (symlinks
    resolved; gs:// URLs compared as text) or, when either of the two does not exist
    (the sweep was moved, or a relative root was resolved from another directory), when
    both have the same run name. Returns the recorded ``init_from.json`` dict (None if
    the run did not fine-tune).
    """
    recorded = read_record(workdir)
    if not init_from:
        return recorded
    want_path, init_step = normalize(init_from, init_step)
    want = str(want_path)
    if recorded is None:
        raise ConfigError(
            f"init_from={want} but workdir {workdir} already holds checkpoints of a run that "
            "did not start from it; use a new --workdir"
        )
    if not same_source(recorded.get("path"), want_path):
        raise ConfigError(
            f"init_from={want} differs from {recorded.get('path')}, which workdir {workdir} "
            "started from; use a new --workdir (or the recorded init_from to resume)"
        )
    if init_step != -1 and recorded.get("step") != init_step:
        raise ConfigError(
            f"init_step={init_step} differs from step {recorded.get('step')}, which workdir "
            f"{workdir} started from; use a new --workdir"
        )
    return recorded


def same_source(recorded: Any, want: Any) -> bool:
    """Whether the recorded source path and ``want`` (from :func:`normalize`) are one run."""
    if not isinstance(recorded, str) or not recorded:
        return False
    if workdir_io.is_url(recorded) or not isinstance(want, pathlib.Path):
        return recorded.rstrip("/") == str(want).rstrip("/")
    there = pathlib.Path(recorded)
    if os.path.realpath(there) == os.path.realpath(want):
        return True
    if there.exists() and want.exists():
        return os.path.samefile(there, want)
    return there.name == want.name
