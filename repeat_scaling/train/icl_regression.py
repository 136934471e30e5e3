"""Train a linear self-attention model on in-context linear regression and compare it with
the one-step gradient-descent construction (von Oswald et al. 2022).

    python -m repeat_scaling.train.icl_regression \\
        --config=configs/icl_linear_regression.py:demo --workdir=DIR

What it does:

1. Fits the GD step size ``eta`` on ``eval.eta_tasks`` training-distribution tasks (closed
   form for one step, line search for ``K`` steps: ``data.icl_regression.optimal_eta``).
2. Trains :class:`~repeat_scaling.models.linear_attention.LinearTransformer` with Adam on
   fresh tasks every step (batch of step s = a pure function of ``(seed, s)``), with the
   paper's loss ``1/(2B) sum (y_hat - y_q)^2``, in one jitted step.
3. Compares the trained model and the GD construction (``K = model.num_layers`` GD steps) on
   ``eval.tasks`` held-out tasks: both losses and their ratio, the cosine similarity of their
   predictions (across tasks), the mean per-task cosine similarity of their sensitivities
   ``d y_hat / d x_q`` (the paper's "model cos"), and the zero / least-squares baselines.

The main trainer's pieces do the rest: ``optimizers.make_optimizer`` (:data:`ADAM`),
``run_files`` (file names, atomic JSON), ``metrics.truncate_jsonl`` + ``workdir_io``'s JSONL
appender, ``Checkpointer`` and ``cli`` (one-line errors, ``--library_logs``) with
``--compilation_cache``. The lab's own: model, tasks, the loop around them, the comparison.

Workdir: ``config.json`` (the resolved config), ``train/metrics.jsonl`` (one JSON line per
logged step: step, loss, learning_rate, and ``heldout_loss`` every ``train.eval_every``),
``checkpoints/<step>/`` (``extra`` holds ``eta``) and ``comparison.json`` (the result, also
printed as one JSON line on stdout). Bad input (a flag, a config value, a workdir that
already holds a run): one line ``error: ...`` on stderr, exit 1.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from repeat_scaling import run_files, workdir_io
from repeat_scaling.data import icl_regression as data
from repeat_scaling.errors import first_line
from repeat_scaling.models import linear_attention as lsa
from repeat_scaling.train import metrics, optimizers
from repeat_scaling.train.checkpointing import Checkpointer, CheckpointError
from repeat_scaling.train.config import ConfigError  # a bad config value, as the trainer's


def default_config() -> ml_collections.ConfigDict:
    """Every key of the experiment, with the paper's single-layer setting as default."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = ml_collections.ConfigDict({"d": 10, "n": 10})
    c.model = ml_collections.ConfigDict({"num_layers": 1, "num_heads": 1, "init_scale": 0.5})
    c.train = ml_collections.ConfigDict(
        {
            "steps": 5000,
            "batch_size": 2048,
            "learning_rate": 1e-3,
            "warmup_steps": 0,
            "log_every": 100,
            "eval_every": 1000,  # held-out loss during training (0: off)
        }
    )
    c.eval = ml_collections.ConfigDict(
        {"tasks": 10_000, "eta_tasks": 100_000, "sensitivity_tasks": 1000, "tolerance": 0.10}
    )
    return c


def validate(c: Any) -> None:
    """Check the config before compiling anything; raises :class:`ConfigError`."""
    positive = {
        "task.d": c.task.d,
        "task.n": c.task.n,
        "model.num_layers": c.model.num_layers,
        "model.num_heads": c.model.num_heads,
        "train.steps": c.train.steps,
        "train.batch_size": c.train.batch_size,
        "train.log_every": c.train.log_every,
        "eval.tasks": c.eval.tasks,
        "eval.eta_tasks": c.eval.eta_tasks,
        "eval.sensitivity_tasks": c.eval.sensitivity_tasks,
    }
    for k, v in positive.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{k}={v!r} must be a positive integer")
    for k, v in {"train.warmup_steps": c.train.warmup_steps, "train.eval_every": c.train.eval_every}.items():  # fmt: skip
        if not isinstance(v, int) or v < 0:
            raise ConfigError(f"{k}={v!r} must be an integer >= 0")
    for k, v in {"train.learning_rate": c.train.learning_rate, "model.init_scale": c.model.init_scale}.items():  # fmt: skip
        if not isinstance(v, int | float) or not v > 0:
            raise ConfigError(f"{k}={v!r} must be a number > 0")
    if not 0 < c.eval.tolerance < 1:
        raise ConfigError(f"eval.tolerance={c.eval.tolerance!r} must be in (0, 1)")


def _model_cfg(c: Any) -> lsa.LSAConfig:
    return lsa.LSAConfig(
        d=int(c.task.d),
        num_layers=int(c.model.num_layers),
        num_heads=int(c.model.num_heads),
        init_scale=float(c.model.init_scale),
    )


#: Adam with optax's defaults as a main-trainer ``train.optimizer`` (``adamw`` without weight
#: decay is the same update) and the ``constant`` schedule (after a linear warm-up from 0).
ADAM = dict(name="adamw", b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, clip_norm=0.0)
CONSTANT = dict(schedule="constant", decay_steps=0, end_learning_rate_fraction=1.0)


def _optimizer(c: Any) -> tuple[optax.GradientTransformation, optimizers.Schedule]:
    lr, warmup = float(c.train.learning_rate), int(c.train.warmup_steps)
    opt = {**ADAM, **CONSTANT, "learning_rate": lr, "warmup_steps": warmup}
    return optimizers.make_optimizer(opt, int(c.train.steps))


def _state(step, params, opt_state, eta) -> dict[str, Any]:
    """The checkpointed state (``Checkpointer``'s layout; ``extra`` holds ``eta``)."""
    return {"step": step, "params": params, "opt_state": opt_state, "extra": {"eta": eta}}


def _cosine(a: np.ndarray, b: np.ndarray, axis: int | None = None) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    num = np.sum(a * b, axis=axis)
    den = np.linalg.norm(a, axis=axis) * np.linalg.norm(b, axis=axis)
    return num / np.maximum(den, 1e-30)


def compare(
    trained: lsa.LinearTransformer,
    gd: lsa.LinearTransformer,
    tasks: data.RegressionBatch,
    sensitivity_tasks: int,
    tolerance: float,
) -> dict[str, Any]:
    """Losses (paper's 1/2 mean squared error), ratio and cosine similarities on ``tasks``."""
    tokens = jnp.asarray(tasks.tokens)
    target = tasks.target.astype(np.float64)
    p_tr = np.asarray(jax.jit(lambda t: trained.predict(t))(tokens), np.float64)
    p_gd = np.asarray(jax.jit(lambda t: gd.predict(t))(tokens), np.float64)
    loss_tr = float(0.5 * np.mean((p_tr - target) ** 2))
    loss_gd = float(0.5 * np.mean((p_gd - target) ** 2))
    ns = min(sensitivity_tasks, len(target))
    s_tr = np.asarray(lsa.query_sensitivity(trained, tokens[:ns]))
    s_gd = np.asarray(lsa.query_sensitivity(gd, tokens[:ns]))
    ratio = loss_tr / loss_gd
    return {
        "heldout_tasks": len(target),
        "loss_trained": loss_tr,
        "loss_gd": loss_gd,
        "loss_ratio": ratio,
        "within_tolerance": bool(abs(ratio - 1.0) <= tolerance),
        "tolerance": tolerance,
        "prediction_cosine": float(_cosine(p_tr, p_gd)),
        "prediction_diff_l2": float(np.sqrt(np.mean((p_tr - p_gd) ** 2))),
        "sensitivity_tasks": ns,
        "sensitivity_cosine_mean": float(np.mean(_cosine(s_tr, s_gd, axis=-1))),
        "loss_zero_predictor": float(0.5 * np.mean(target**2)),
        "loss_least_squares": float(
            0.5 * np.mean((data.least_squares_predict(tasks) - target) ** 2)
        ),
    }


def train_lsa(c: Any, heldout: data.RegressionBatch, metrics_path: Any, log) -> tuple:
    """Adam on fresh tasks every step, logging to ``metrics_path``; ``(graphdef, params,
    opt_state)`` after ``train.steps`` steps. Stops with FloatingPointError on a non-finite
    logged loss."""
    d, n, seed = int(c.task.d), int(c.task.n), int(c.seed)
    model = lsa.LinearTransformer(_model_cfg(c), rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)
    tx, schedule = _optimizer(c)
    opt_state = tx.init(params)

    def loss_fn(p, tokens, target):
        return lsa.regression_loss(nnx.merge(graphdef, p).predict(tokens), target)

    @jax.jit
    def train_step(p, o, tokens, target):
        loss, grads = jax.value_and_grad(loss_fn)(p, tokens, target)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    eval_loss = jax.jit(loss_fn)
    h_tokens, h_target = jnp.asarray(heldout.tokens), jnp.asarray(heldout.target)
    steps, bs, eval_every = int(c.train.steps), int(c.train.batch_size), c.train.eval_every
    metrics.truncate_jsonl(metrics_path, 0)  # lines of an attempt that stopped early
    out = workdir_io.JsonlAppender(metrics_path)
    try:
        for step in range(steps):
            b = data.train_batch(seed, step, bs, d, n)
            params, opt_state, loss = train_step(params, opt_state, b.tokens, b.target)
            done = step + 1
            if done % c.train.log_every and done != steps:
                continue
            rec = {"step": done, "loss": float(loss), "learning_rate": float(schedule(step))}
            if eval_every and (done % eval_every == 0 or done == steps):
                rec["heldout_loss"] = float(eval_loss(params, h_tokens, h_target))
            if not np.isfinite(rec["loss"]):
                raise FloatingPointError(f"loss is {rec['loss']} at step {done}")
            out.write_line(json.dumps(rec))
            log(" ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))  # fmt: skip
    finally:
        out.close()
    return graphdef, params, opt_state


def run(config: Any, workdir: str | pathlib.Path, *, log=None) -> dict[str, Any]:
    """Train, checkpoint and compare; returns (and writes) the comparison result."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    validate(config)
    c = config
    d, n, seed, steps = int(c.task.d), int(c.task.n), int(c.seed), int(c.train.steps)
    workdir = workdir_io.workdir_path(workdir)
    if (workdir / run_files.CHECKPOINTS).is_dir() or (workdir / run_files.COMPARISON).exists():
        raise ConfigError(f"workdir {workdir} already holds a run; choose another --workdir")
    run_files.write_json(workdir / run_files.CONFIG, c.to_dict())
    mcfg = _model_cfg(c)

    t0 = time.time()
    eta = data.optimal_eta(data.eta_fit_tasks(seed, int(c.eval.eta_tasks), d, n), mcfg.num_layers)
    log(f"GD step size eta={eta:.5f} ({mcfg.num_layers} step(s), {c.eval.eta_tasks} tasks)")
    heldout = data.heldout_tasks(seed, int(c.eval.tasks), d, n)
    graphdef, params, opt_state = train_lsa(c, heldout, workdir / run_files.METRICS, log)
    train_s = time.time() - t0

    ckpt = Checkpointer(workdir, save_every=steps, keep=1, async_save=False)
    eta_arr = jnp.asarray(eta, jnp.float32)
    ckpt.save(_state(jnp.asarray(steps, jnp.int32), params, opt_state, eta_arr), force=True)
    ckpt.close()

    trained, gd = nnx.merge(graphdef, params), lsa.gd_model(mcfg, eta)
    result = {
        "experiment": "icl_linear_regression",
        "d": d,
        "n": n,
        "num_layers": mcfg.num_layers,
        "num_heads": mcfg.num_heads,
        "steps": steps,
        "batch_size": int(c.train.batch_size),
        "eta": eta,
        "train_seconds": round(train_s, 2),
        **compare(trained, gd, heldout, int(c.eval.sensitivity_tasks), float(c.eval.tolerance)),
    }
    run_files.write_json(workdir / run_files.COMPARISON, result)
    print(json.dumps(result), flush=True)
    return result


def load_trained(workdir: str | pathlib.Path) -> tuple[lsa.LinearTransformer, float, int]:
    """``(model, eta, step)`` restored from the latest checkpoint of a finished run."""
    workdir = workdir_io.workdir_path(workdir)
    c = ml_collections.ConfigDict(run_files.load_json(workdir / run_files.CONFIG))
    mcfg = _model_cfg(c)
    graphdef, a_params = nnx.split(
        nnx.eval_shape(lambda: lsa.LinearTransformer(mcfg, rngs=nnx.Rngs(0))), nnx.Param
    )
    a_params = nnx.to_pure_dict(a_params)
    ckpt = Checkpointer(workdir, save_every=1, read_only=True, async_save=False)
    step = ckpt.latest_step()
    if step is None:
        raise FileNotFoundError(f"no committed checkpoint under {workdir}/checkpoints")
    a_opt = jax.eval_shape(_optimizer(c)[0].init, a_params)
    i32, f32 = (jax.ShapeDtypeStruct((), t) for t in (jnp.int32, jnp.float32))
    state = ckpt.restore(step, _state(i32, a_params, a_opt, f32))
    ckpt.close()
    return nnx.merge(graphdef, state["params"]), float(state["extra"]["eta"]), int(step)


def main(argv: list[str] | None = None) -> None:
    """CLI: ``--config=configs/icl_linear_regression.py[:arg] --workdir=DIR``; starts up as
    ``python -m repeat_scaling.train`` does."""
    from absl import app, flags
    from ml_collections import config_flags

    from repeat_scaling import cli, compilation_cache, host_malloc

    host_malloc.configure()  # before jax starts XLA's thread pools
    config_flags.DEFINE_config_file("config", None, "configs/icl_linear_regression.py[:arg]")
    flags.DEFINE_string("workdir", None, "Run directory.")

    def _main(args: list[str]) -> None:
        cli.quiet_library_logs()
        compilation_cache.configure()  # before anything compiles
        if len(args) > 1:
            cli.fail(f"unexpected arguments {args[1:]}")
        if flags.FLAGS.config is None:
            cli.fail("--config is required (e.g. --config=configs/icl_linear_regression.py:demo)")
        if not flags.FLAGS.workdir:
            cli.fail("--workdir is required (the run directory)")
        try:
            run(flags.FLAGS.config, flags.FLAGS.workdir)
        except (ValueError, FloatingPointError, CheckpointError) as e:
            cli.fail(first_line(e))

    app.run(_main, argv=argv, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    main()
