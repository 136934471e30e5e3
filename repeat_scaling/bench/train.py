"""Training-step throughput: ``python -m repeat_scaling.bench train [--config=...] [--dtypes=...]``.

For each config x compute dtype, builds the train state on all local devices, feeds a
random batch of the config's shapes (as the peers in ../shared/bench do: random init,
random tokens), runs ``--warmup`` steps, then times ``--steps`` steps and prints one
JSON line with the median step time. Steps run as the trainer runs them:
``train.steps_per_call`` (resolved like the trainer: 0 = auto) steps per compiled call
on stacked batches; the step time is the median call time / steps per call
(``--set train.steps_per_call=1`` measures one step per call):

* ``tokens_per_s``: all processed tokens (encoder + decoder for encoder-decoder);
* ``model_tflops_per_s``: model training FLOPs (3 x forward, REFERENCE.md section 5,
  from ``models.sizes.flops_per_token``) per second;
* ``peak_tflops``: the best of a few large square matmuls in the compute dtype, measured
  in the same run on the same devices; ``mfu`` = model TFLOP/s / peak.

Defaults: both peer configs (``configs/bench.py:t5_peer`` and ``:gpt_peer``) in float32
and bfloat16.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

from repeat_scaling import cli, config_files
from repeat_scaling.errors import first_line
from repeat_scaling.models.config import DTYPES

DEFAULT_CONFIGS = ("configs/bench.py:t5_peer", "configs/bench.py:gpt_peer")


def _override(config: Any, item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep:
        raise ValueError(f"--set={item!r}; expected KEY=VALUE")
    *path, last = key.split(".")
    node = config
    for p in path:
        node = node[p]
    old = node[last]
    node[last] = type(old)(value) if not isinstance(old, bool) else value.lower() in ("1", "true")


def measure_peak_tflops(dtype: str, sizes=(1024, 2048), reps: int = 5) -> float:
    """Best TFLOP/s of a square matmul in ``dtype`` (median over ``reps`` calls)."""
    import jax
    import jax.numpy as jnp

    best = 0.0
    for n in sizes:
        k1, k2 = jax.random.split(jax.random.key(0))
        a = jax.random.normal(k1, (n, n), jnp.float32).astype(dtype)
        b = jax.random.normal(k2, (n, n), jnp.float32).astype(dtype)
        f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=x.dtype))
        f(a, b).block_until_ready()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            f(a, b).block_until_ready()
            times.append(time.perf_counter() - t)
        best = max(best, 2 * n**3 / statistics.median(times) / 1e12)
    return best


def synthetic_batch(config: Any, model_cfg: Any, seed: int = 0) -> dict[str, Any]:
    """Random features with the config's shapes (unpacked, no padding)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    B = int(config.train.batch_size)
    V = int(model_cfg.vocab_size) - 128  # stay clear of padding rows

    def toks(L):
        return rng.integers(3, V, size=(B, L), dtype=np.int32)

    if model_cfg.arch == "encoder_decoder":
        Li, Lt = int(config.data.inputs_length), int(config.data.targets_length)
        targets = toks(Lt)
        return {
            "encoder_input_tokens": toks(Li),
            "decoder_target_tokens": targets,
            "decoder_input_tokens": np.concatenate(
                [np.zeros((B, 1), np.int32), targets[:, :-1]], 1
            ),
            "decoder_loss_weights": np.ones((B, Lt), np.float32),
        }
    L = int(config.data.length)
    targets = toks(L)
    return {
        "decoder_target_tokens": targets,
        "decoder_input_tokens": np.concatenate([np.zeros((B, 1), np.int32), targets[:, :-1]], 1),
        "decoder_loss_weights": np.ones((B, L), np.float32),
        "decoder_segment_ids": np.ones((B, L), np.int32),
        "decoder_positions": np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)).copy(),
    }


def bench_one(spec: str, dtype: str, steps: int, warmup: int, sets: list[str]) -> dict[str, Any]:
    import jax
    import numpy as np

    from repeat_scaling import sharding
    from repeat_scaling.models import sizes
    from repeat_scaling.train import config as config_lib
    from repeat_scaling.train import loop, optimizers
    from repeat_scaling.train import state as state_lib
    from repeat_scaling.train import step as step_lib

    config = config_files.load(spec)
    for item in sets:
        _override(config, item)
    config.train.compute_dtype = dtype
    cfg = config_lib.validate(config, num_devices=jax.device_count())
    rows = synthetic_batch(config, cfg)
    if cfg.arch == "encoder_decoder":
        lengths = {
            "encoder": rows["encoder_input_tokens"].shape[1],
            "decoder": rows["decoder_target_tokens"].shape[1],
        }
    else:
        lengths = {"decoder": rows["decoder_target_tokens"].shape[1]}
    tokens_per_step = int(config.train.batch_size) * sum(lengths.values())
    flops_per_token = sizes.flops_per_token(cfg, lengths)["train"]
    k = config_lib.steps_per_call(config, tokens_per_step * flops_per_token)

    mesh = sharding.make_mesh(dict(config.mesh.ici))
    tx, schedule = optimizers.make_optimizer(config.train.optimizer, int(config.train.steps))
    state, info = state_lib.create_train_state(cfg, tx, mesh, int(config.seed))
    train_step = step_lib.config_train_step(config, info, cfg, tx, schedule, steps_per_call=k)
    batch_sh = sharding.batch_sharding(mesh)
    if k > 1:
        stacked = [synthetic_batch(config, cfg, seed=i) for i in range(k)]
        rows = {name: np.stack([b[name] for b in stacked]) for name in rows}
        batch_sh = step_lib.stacked_sharding(batch_sh)
    batch = loop.to_global(rows, batch_sh)
    calls, warmup_calls = -(-steps // k), -(-warmup // k)
    t0 = time.perf_counter()
    state, m = train_step(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    for _ in range(max(warmup_calls - 1, 0)):
        state, m = train_step(state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        state, m = train_step(state, batch)
        jax.block_until_ready(m)
        times.append((time.perf_counter() - t) / k)
    step_time = statistics.median(times)
    peak = measure_peak_tflops(dtype)
    tflops = tokens_per_step * flops_per_token / step_time / 1e12
    return {
        "benchmark": "train",
        "config": spec,
        "model": cfg.name,
        "dtype": dtype,
        "device_kind": jax.devices()[0].device_kind,
        "platform": jax.devices()[0].platform,
        "num_devices": jax.device_count(),
        "batch_size": int(config.train.batch_size),
        "lengths": lengths,
        "params": sizes.count_params(cfg)["total"],
        "tokens_per_step": tokens_per_step,
        "step_time_s": step_time,
        "step_time_min_s": min(times),
        "tokens_per_s": tokens_per_step / step_time,
        "model_tflops_per_s": tflops,
        "peak_tflops": peak,
        "mfu": tflops / peak if peak else None,
        "model_gflop_per_step": tokens_per_step * flops_per_token / 1e9,
        "compile_s": compile_s,
        "loss": float(np.asarray(m["loss"]).ravel()[-1]),
        "steps": steps,
        "steps_per_call": k,
        "timed_steps": calls * k,
    }


def main(argv: list[str]) -> None:
    from absl import flags

    fv = flags.FlagValues()
    flags.DEFINE_multi_string(
        "config", list(DEFAULT_CONFIGS), "Config file[:arg] (repeatable).", flag_values=fv
    )
    flags.DEFINE_list("dtypes", list(DTYPES), "Compute dtypes to measure.", flag_values=fv)
    flags.DEFINE_integer("steps", 20, "Timed steps (median reported).", flag_values=fv)
    flags.DEFINE_integer(
        "warmup", 3, "Untimed steps first (incl. the compiling one).", flag_values=fv
    )
    flags.DEFINE_multi_string("set", [], "Config override KEY=VALUE (repeatable).", flag_values=fv)
    try:
        fv(argv)
    except flags.Error as e:
        cli.fail(str(e))
    for dtype in fv.dtypes:
        if dtype not in DTYPES:
            cli.fail(f"--dtypes contains {dtype!r}; expected {' and/or '.join(DTYPES)}")
    for spec in fv.config:
        for dtype in fv.dtypes:
            try:
                result = bench_one(spec, dtype, fv.steps, fv.warmup, fv.set)
            except ValueError as e:
                cli.fail(first_line(e))
            print(json.dumps(result), flush=True)
