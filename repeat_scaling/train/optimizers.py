"""Optimisers and learning-rate schedules (optax).

Two families, as in the papers this suite reproduces:

* ``adafactor`` with the T5 defaults (factored second moments, decay rate 0.8, update
  clipping at RMS 1.0, updates scaled by the parameter RMS, no momentum) and the T5
  ``rsqrt`` schedule: ``lr(step) = learning_rate / sqrt(max(step, warmup_steps))``
  (T5: learning_rate 1.0 and warmup 10k, i.e. 0.01 constant for 10k steps, then inverse
  square root).
* ``adamw`` with linear warmup to ``learning_rate`` followed by cosine, linear or no
  decay to ``end_learning_rate_fraction * learning_rate`` at ``decay_steps``.

Both accept global-norm gradient clipping (``clip_norm`` > 0) and weight decay.
Weight decay is decoupled (AdamW style, scaled by the learning rate for ``adamw``;
Adafactor's own ``weight_decay_rate``) and applied only to parameters with at least
two dimensions (matrices and embeddings, not norm scales).

Steps are counted from 0: ``lr(0)`` is the rate used by the first update.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adafactor", "adamw")
SCHEDULES = ("rsqrt", "cosine", "linear", "constant")

Schedule = Callable[[jax.Array | int], jax.Array]


def make_schedule(opt: Mapping[str, Any], total_steps: int) -> Schedule:
    """Learning rate as a function of the (0-based) step.

    ``opt`` holds ``learning_rate``, ``schedule``, ``warmup_steps``, ``decay_steps``
    (0 means ``total_steps``) and ``end_learning_rate_fraction``.
    """
    name = opt["schedule"]
    peak = float(opt["learning_rate"])
    warmup = int(opt["warmup_steps"])
    decay_steps = int(opt["decay_steps"]) or int(total_steps)
    end = peak * float(opt["end_learning_rate_fraction"])

    if name == "rsqrt":
        # T5: constant learning_rate / sqrt(warmup) during warmup, then 1/sqrt(step).
        def rsqrt(step):
            step = jnp.asarray(step, jnp.float32)
            return peak * jax.lax.rsqrt(jnp.maximum(step, jnp.maximum(warmup, 1.0)))

        return rsqrt

    if name == "constant":
        if not warmup:
            return optax.constant_schedule(peak)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)],
            boundaries=[warmup],
        )
    if name == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=peak,
            warmup_steps=warmup,
            decay_steps=max(decay_steps, warmup + 1),
            end_value=end,
        )
    if name == "linear":
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, peak, max(warmup, 1)),
                optax.linear_schedule(peak, end, max(decay_steps - warmup, 1)),
            ],
            boundaries=[warmup],
        )
    raise ValueError(f"train.optimizer.schedule={name!r}, expected one of {SCHEDULES}")


def _decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay (rank >= 2)."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(
    opt: Mapping[str, Any], total_steps: int
) -> tuple[optax.GradientTransformation, Schedule]:
    """Build ``(optax transformation, schedule)`` from the ``train.optimizer`` config."""
    name = opt["name"]
    schedule = make_schedule(opt, total_steps)
    weight_decay = float(opt["weight_decay"])
    chain: list[optax.GradientTransformation] = []
    if float(opt["clip_norm"]) > 0:
        chain.append(optax.clip_by_global_norm(float(opt["clip_norm"])))
    if name == "adafactor":
        threshold = float(opt["adafactor_clipping_threshold"])
        momentum = float(opt["adafactor_momentum"]) or None
        chain.append(
            optax.adafactor(
                learning_rate=schedule,
                decay_rate=float(opt["adafactor_decay_rate"]),
                multiply_by_parameter_scale=bool(opt["adafactor_multiply_by_parameter_scale"]),
                clipping_threshold=threshold if threshold > 0 else None,
                momentum=momentum,
                factored=bool(opt["adafactor_factored"]),
                weight_decay_rate=weight_decay if weight_decay > 0 else None,
                weight_decay_mask=_decay_mask if weight_decay > 0 else None,
            )
        )
    elif name == "adamw":
        chain.append(
            optax.adamw(
                learning_rate=schedule,
                b1=float(opt["b1"]),
                b2=float(opt["b2"]),
                eps=float(opt["eps"]),
                weight_decay=weight_decay,
                mask=_decay_mask,
            )
        )
    else:
        raise ValueError(f"train.optimizer.name={name!r}, expected one of {OPTIMIZERS}")
    return optax.chain(*chain), schedule
