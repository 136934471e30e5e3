"""The pure train step: ``(state, batch) -> (state, metrics)``, compiled once.

Everything the step does is a function of the state (which holds the step number) and
the batch of that step, so resuming from a checkpoint reproduces an uninterrupted run
bit for bit:

* dropout key = ``fold_in(fold_in(key(seed), 1), step)``, then ``fold_in(., microbatch)``;
* staged dropout: ``dropout_scale = step >= dropout_start_step`` (a traced 0/1 float,
  so switching dropout on never recompiles);
* gradient accumulation: the global batch of B rows is split into k microbatches
  (row r goes to microbatch r % k, so every device keeps working on its own rows) and
  the gradients are summed in a ``lax.scan``. Every microbatch's loss is normalised by
  the token weight of the WHOLE batch, so k microbatches give the same update as one
  big batch (up to float rounding);
* loss = cross-entropy (with label smoothing) + z-loss, both summed over target tokens
  and divided by the batch's total loss weight, + the model's auxiliary losses (MoE
  load balancing, router z-loss; already scaled by their coefficients).

Attention clamps (``interventions``, :mod:`repeat_scaling.models.interventions`) are
passed to ``models.forward`` with the traced step counter, so one compilation serves the
steps inside and outside every clamp's window. The eval step never clamps.

Metrics (float32 scalars): ``loss`` (cross-entropy per target token, without z-loss),
``z_loss``, ``aux_loss``, ``total_loss`` (what is differentiated), ``accuracy``,
``grad_norm`` (global norm before clipping), ``learning_rate`` (used by this update),
``weight_sum`` (target tokens), ``finite`` (1.0 when loss and gradients are finite).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from repeat_scaling import models, sharding
from repeat_scaling.models import losses
from repeat_scaling.models.config import ModelConfig
from repeat_scaling.train import state as state_lib

TARGETS = "decoder_target_tokens"
WEIGHTS = "decoder_loss_weights"

# XLA:CPU options for the compiled steps. XLA 0.10 hands dots AND the elementwise /
# reduction fusions around them to YNNPACK; on the training step (softmax backward,
# gelu backward, the relative-bias gradient reduction) the latter ran ~20% of the step
# slower than XLA's own loop emitters on a 2-core AVX-512 CPU. Keep YNNPACK for dots.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


@functools.cache
def _cpu_options_supported() -> bool:
    """Whether this jaxlib's XLA:CPU knows CPU_COMPILER_OPTIONS (an experimental flag)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=CPU_COMPILER_OPTIONS)(
            jnp.float32(0)
        ).block_until_ready()
    except Exception:  # an unknown option is an XlaRuntimeError / ValueError by version
        return False
    return True


def compiler_options(mesh: Mesh) -> dict[str, str] | None:
    """Per-jit XLA options for ``mesh``'s platform (None when there are none)."""
    platform = mesh.devices.flat[0].platform
    if platform == "cpu" and _cpu_options_supported():
        return dict(CPU_COMPILER_OPTIONS)
    return None


def uses_dropout(cfg: ModelConfig) -> bool:
    return any(
        float(getattr(cfg, f, 0.0)) > 0
        for f in ("dropout_rate", "attention_dropout_rate", "droppath_rate")
    )


def make_loss_fn(
    graphdef: Any,
    cfg: ModelConfig,
    *,
    z_loss: float,
    label_smoothing: float,
    deterministic: bool,
    interventions: tuple = (),
) -> Callable:
    """``loss_fn(params, extra, batch, rng, dropout_scale, norm, aux_scale, step)``.

    Returns ``(loss, stats)``; ``step`` (traced int32) only matters with ``interventions``.
    """
    clamp = {"interventions": tuple(interventions)} if interventions else None

    def loss_fn(params, extra, batch, rng, dropout_scale, norm, aux_scale, step=None):
        model = state_lib.merge(graphdef, params, extra)
        logits, aux = models.forward(
            model,
            batch,
            deterministic=deterministic,
            dropout_rng=None if deterministic else rng,
            dropout_scale=dropout_scale,
            **({**clamp, "step": step} if clamp else {}),
        )
        targets = batch[TARGETS]
        weights = batch[WEIGHTS].astype(jnp.float32)
        loss_sum, z_sum, w_sum = losses.cross_entropy(
            logits, targets, weights, z_loss=z_loss, label_smoothing=label_smoothing
        )
        aux_total = sum(aux.values()) if aux else jnp.zeros((), jnp.float32)
        # losses.cross_entropy follows T5X: loss_sum already includes the z-loss term.
        total = loss_sum / norm + aux_total * aux_scale
        stats = {
            "ce_sum": loss_sum - z_sum,
            "z_sum": z_sum,
            "w_sum": w_sum,
            "aux": aux_total * aux_scale,
            "correct": losses.correct_count(logits, targets, weights)[0],
        }
        return total, stats

    return loss_fn


def make_train_step(
    info: state_lib.StateInfo,
    cfg: ModelConfig,
    tx: optax.GradientTransformation,
    schedule: Callable,
    *,
    seed: int,
    grad_accum: int = 1,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    dropout_start_step: int = 0,
    rules: Any = sharding.DEFAULT_RULES,
    jit: bool = True,
    interventions: tuple = (),
    steps_per_call: int = 1,
) -> Callable:
    """Build the train step; with ``jit`` it is compiled with explicit shardings.

    ``interventions``: parsed attention clamps applied while their window holds the step.
    ``steps_per_call`` > 1: the function takes that many batches stacked on a leading
    axis (sharded by :func:`stacked_sharding`), runs the steps in a ``lax.scan`` and
    returns every step's metrics stacked (same per-step computation as one step per call).
    """
    mesh: Mesh = info.mesh
    deterministic = not uses_dropout(cfg)
    loss_fn = make_loss_fn(
        info.graphdef,
        cfg,
        z_loss=z_loss,
        label_smoothing=label_smoothing,
        deterministic=deterministic,
        interventions=interventions,
    )
    grad_fn = jax.grad(loss_fn, has_aux=True)
    base_key = state_lib.dropout_base_key(seed)
    batch_sh = sharding.batch_sharding(mesh, rules)
    k = int(grad_accum)

    def train_step(state, batch):
        step = state["step"]
        params, extra = state["params"], state["extra"]
        norm = jnp.maximum(jnp.sum(batch[WEIGHTS].astype(jnp.float32)), 1.0)
        dropout_scale = (step >= dropout_start_step).astype(jnp.float32)
        rng = jax.random.fold_in(base_key, step)
        if k == 1:
            grads, stats = grad_fn(
                params, extra, batch, jax.random.fold_in(rng, 0), dropout_scale, norm, 1.0, step
            )
        else:

            def split(x):
                x = x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1)
                if mesh.size > 1:
                    x = jax.lax.with_sharding_constraint(x, stacked_sharding(batch_sh))
                return x

            micro = jax.tree.map(split, batch)

            def body(carry, xs):
                i, mb = xs
                g, st = grad_fn(
                    params,
                    extra,
                    mb,
                    jax.random.fold_in(rng, i),
                    dropout_scale,
                    norm,
                    1.0 / k,
                    step,
                )
                g_acc, st_acc = carry
                return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, st_acc, st)), None

            zeros_g = jax.tree.map(jnp.zeros_like, params)
            zeros_st = {
                n: jnp.zeros((), jnp.float32)
                for n in ("ce_sum", "z_sum", "w_sum", "aux", "correct")
            }
            (grads, stats), _ = jax.lax.scan(body, (zeros_g, zeros_st), (jnp.arange(k), micro))

        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        w = jnp.maximum(stats["w_sum"], 1.0)
        loss = stats["ce_sum"] / w
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        metrics = {
            "loss": loss,
            "z_loss": stats["z_sum"] / w,
            "aux_loss": stats["aux"],
            "total_loss": (stats["ce_sum"] + stats["z_sum"]) / w + stats["aux"],
            "accuracy": stats["correct"] / w,
            "grad_norm": grad_norm,
            "learning_rate": jnp.asarray(schedule(step), jnp.float32),
            "weight_sum": stats["w_sum"],
            "finite": finite.astype(jnp.float32),
        }
        new_state = {
            "step": step + 1,
            "params": new_params,
            "opt_state": opt_state,
            "extra": extra,
        }
        return new_state, metrics

    fn, in_batch_sh = train_step, batch_sh
    if steps_per_call > 1:
        fn, in_batch_sh = functools.partial(jax.lax.scan, train_step), stacked_sharding(batch_sh)
    if not jit:
        return fn
    replicated = NamedSharding(mesh, PartitionSpec())
    compiled = jax.jit(
        fn,
        in_shardings=(info.shardings, in_batch_sh),
        out_shardings=(info.shardings, replicated),
        donate_argnums=(0,),
        compiler_options=compiler_options(mesh),
    )

    def run(state, batch):
        with sharding.use_mesh(mesh, rules):
            return compiled(state, batch)

    run.lower = lambda state, batch: _lower(compiled, mesh, rules, state, batch)  # type: ignore[attr-defined]
    return run


def config_train_step(
    config: Any,
    info: state_lib.StateInfo,
    cfg: ModelConfig,
    tx: optax.GradientTransformation,
    schedule: Callable,
    *,
    rules: Any = sharding.DEFAULT_RULES,
    interventions: tuple = (),
    steps_per_call: int = 1,
) -> Callable:
    """The trainer's step for a training ``config``: :func:`make_train_step` with its
    ``seed`` and ``train.grad_accum`` / ``z_loss`` / ``label_smoothing`` /
    ``dropout_start_step`` (the TPU compile check and the benchmark build the same)."""
    tc = config.train
    return make_train_step(
        info,
        cfg,
        tx,
        schedule,
        seed=int(config.seed),
        grad_accum=int(tc.grad_accum),
        z_loss=float(tc.z_loss),
        label_smoothing=float(tc.label_smoothing),
        dropout_start_step=int(tc.dropout_start_step),
        rules=rules,
        interventions=interventions,
        steps_per_call=steps_per_call,
    )


def stacked_sharding(batch_sharding: NamedSharding) -> NamedSharding:
    """Sharding of batches stacked on a new leading (step) axis: that axis unsharded."""
    return NamedSharding(batch_sharding.mesh, PartitionSpec(None, *batch_sharding.spec))


def _lower(compiled, mesh, rules, state, batch):
    with sharding.use_mesh(mesh, rules):
        return compiled.lower(state, batch)


def make_eval_step(
    info: state_lib.StateInfo, cfg: ModelConfig, rules: Any = sharding.DEFAULT_RULES
) -> Callable:
    """``eval_step(params, extra, batch) -> {loss_sum, correct, weight_sum}`` (deterministic)."""
    mesh = info.mesh

    def eval_step(params, extra, batch):
        model = state_lib.merge(info.graphdef, params, extra)
        logits, _ = models.forward(model, batch, deterministic=True)
        weights = batch[WEIGHTS].astype(jnp.float32)
        loss_sum, z_sum, w_sum = losses.cross_entropy(logits, batch[TARGETS], weights)
        return {
            "loss_sum": loss_sum - z_sum,
            "correct": losses.correct_count(logits, batch[TARGETS], weights)[0],
            "weight_sum": w_sum,
        }

    compiled = jax.jit(
        eval_step,
        in_shardings=(
            info.shardings["params"],
            info.shardings["extra"],
            sharding.batch_sharding(mesh, rules),
        ),
        out_shardings=NamedSharding(mesh, PartitionSpec()),
        compiler_options=compiler_options(mesh),
    )

    def run(params, extra, batch):
        with sharding.use_mesh(mesh, rules):
            return compiled(params, extra, batch)

    return run
