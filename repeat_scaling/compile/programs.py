"""The run's programs with abstract inputs, compiled: the trainer's train step on its mesh
and the evaluator's loss and attention programs."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from repeat_scaling.compile import CompileCheckError
from repeat_scaling.data.objectives import MANIFEST_OBJECTIVES
from repeat_scaling.errors import first_line


def resolve_num_slices(config: Any, num_slices: int) -> Any:
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
    mesh over its host's devices and runs ``eval.runner.ModelRunner`` on batches of
    ``eval.batch_size`` rows at the run's lengths (sharded on the batch when the rows
    divide the mesh, else replicated).
    """
    import jax
    import numpy as np

    from repeat_scaling import sharding
    from repeat_scaling.eval.features import decoder_features, encdec_features
    from repeat_scaling.eval.runner import ModelRunner
    from repeat_scaling.eval.settings import EvalSettings
    from repeat_scaling.train import state as state_lib

    fields = {f.name for f in dataclasses.fields(EvalSettings)}
    recorded = {k: v for k, v in dict(config.get("eval", {}) or {}).items() if k in fields}
    try:
        settings = EvalSettings.from_overrides(recorded)
    except ValueError as e:
        raise CompileCheckError(str(e)) from None
    lengths_by_feature, _ = _feature_spec(config, model_cfg)
    mesh = sharding.make_mesh({"data": -1}, devices=devices)  # = evaluator.eval_mesh(0)
    graphdef, a_params = state_lib.abstract_params(model_cfg, mesh)
    runner = ModelRunner(state_lib.merge(graphdef, a_params), model_cfg, mesh)
    rows = settings.batch_size
    dec = lengths_by_feature["decoder_target_tokens"]
    zeros = np.zeros((rows, dec), np.int32)
    if model_cfg.arch == "encoder_decoder":
        enc = np.zeros((rows, lengths_by_feature["encoder_input_tokens"]), np.int32)
        feats = encdec_features(enc, zeros, zeros.astype(np.float32))
    else:
        feats = decoder_features(zeros, zeros.astype(np.float32))
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
