"""Trainer integration tests on the built-in corpus with tiny models.

In-process (8 virtual CPU devices): config validation, sharded init == unsharded init,
gradient accumulation == one big batch, NaN stop, learning below the unigram entropy.
As subprocesses: kill -9 / SIGTERM resume is bit-exact, CLI errors are one line.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repeat_scaling import config_files, sharding
from repeat_scaling.train import checkpointing, loop, optimizers
from repeat_scaling.train import config as config_lib
from repeat_scaling.train import state as state_lib
from repeat_scaling.train import step as step_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
demo = config_files.load_module(REPO / "configs" / "demo.py")


def tiny_config(store_dir, arg="dec", **overrides):
    c = demo.get_config(arg)
    c.data.store = str(store_dir)
    c.data.source = ""
    if arg == "dec":
        c.data.length = 64
    else:
        c.data.inputs_length = 64
    c.train.batch_size = 8
    c.train.steps = 12
    c.train.log_every = 1
    c.train.checkpoint_every = 4
    c.train.progress_bar = "off"
    for k, v in overrides.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c


def overrides_argv(**overrides):
    return [f"--config.{k}={v}" for k, v in overrides.items()]


# ----------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train.batch_size": 6}, "not divisible by the data-parallel size 8"),
        ({"mesh.ici.data": 3}, "uses 3 devices, but 8 exist"),
        ({"data.objective": "span_corruption"}, "does not fit model.arch='decoder_only'"),
        ({"data.repeated_fraction": 1.5}, "data.repeated_fraction=1.5; expected a fraction"),
        ({"train.grad_accum": 3}, "train.grad_accum=3; expected a divisor"),
        ({"train.optimizer.name": "sgd"}, "train.optimizer.name='sgd'"),
        ({"model.dropout_rate": 1.5}, "dropout_rate=1.5"),
        ({"data.length": 0}, "data.length=0; expected > 0"),
    ],
)
def test_validation_errors(store_dir, overrides, message):
    c = tiny_config(store_dir, **overrides)
    with pytest.raises(
        config_lib.ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")
    ) as e:
        config_lib.validate(c, num_devices=8)
    assert "\n" not in str(e.value)


def test_unknown_key_and_store_errors(store_dir, tmp_path):
    c = tiny_config(store_dir)
    c.train.stpes = 3
    with pytest.raises(config_lib.ConfigError, match="unknown config key 'train.stpes'"):
        config_lib.validate(c, num_devices=8)
    c = tiny_config(tmp_path / "missing")
    with pytest.raises(config_lib.ConfigError, match="not a prepared token store"):
        loop.train(c, tmp_path / "w")
    # A missing store whose vocabulary file is missing too: one line, nothing built.
    c = tiny_config(tmp_path / "missing", **{"data.source": "builtin"})
    c.data.vocab = str(tmp_path / "nowhere" / "spm.model")
    with pytest.raises(config_lib.ConfigError) as e:
        loop.train(c, tmp_path / "w")
    assert "is not prepared and cannot be built here: data.vocab=" in str(e.value)
    assert "\n" not in str(e.value) and not (tmp_path / "missing").exists()
    c = tiny_config(store_dir, **{"model.vocab_size": 256})
    with pytest.raises(config_lib.ConfigError, match="smaller than the store's vocabulary"):
        loop.train(c, tmp_path / "w")


def run_cli(workdir, store_dir, *args, env=None, wait=True):
    cmd = [
        sys.executable,
        "-m",
        "repeat_scaling.train",
        "--config=configs/demo.py",
        f"--workdir={workdir}",
        f"--config.data.store={store_dir}",
        "--config.data.source=",
        "--config.data.length=64",
        "--config.train.batch_size=8",
        "--config.train.log_every=1",
        "--config.train.progress_bar=off",
        *args,
    ]
    full_env = {**os.environ, **(env or {})}
    if wait:
        return subprocess.run(
            cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=300
        )
    return subprocess.Popen(
        cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_cpu_fused_attention_without_a_compiler_is_one_line(store_dir, tmp_path):
    """The trainer with model.attention_impl='cpu_fused' where its kernel cannot be built
    (no compiler, empty cache): one error line naming the setting and the compiler."""
    env = {"CXX": "/nonexistent/c++", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    r = run_cli(tmp_path / "w", store_dir, "--config.model.attention_impl=cpu_fused", env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (
        "error: model.attention_impl='cpu_fused' needs a C++ compiler: '/nonexistent/c++' "
        "(No such file or directory); set $CXX or use attention_impl='einsum'"
    )


def test_cli_error_is_one_line(store_dir, tmp_path):
    r = run_cli(tmp_path / "w", store_dir, "--config.train.batch_size=12")
    assert r.returncode == 1
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "data-parallel size 8" in err[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    r = run_cli(tmp_path / "w", store_dir, "--config.train.stpes=3")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: bad command line: stpes")


# ----------------------------------------------------------------------------------
# State and step
# ----------------------------------------------------------------------------------
def test_sharded_init_equals_unsharded_init(store_dir):
    c = tiny_config(store_dir)
    cfg = config_lib.validate(c, num_devices=8)
    tx, _ = optimizers.make_optimizer(c.train.optimizer, 10)
    mesh8 = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    mesh1 = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    s8, info8 = state_lib.create_train_state(cfg, tx, mesh8, seed=3)
    s1, _ = state_lib.create_train_state(cfg, tx, mesh1, seed=3)
    sharded = [x for x in jax.tree.leaves(s8["params"]) if not x.sharding.is_fully_replicated]
    assert sharded, "expected some parameters sharded over fsdp/tensor"
    for a, b in zip(jax.tree.leaves(s8), jax.tree.leaves(s1), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for x, sh in zip(jax.tree.leaves(s8), jax.tree.leaves(info8.shardings), strict=True):
        assert x.sharding.is_equivalent_to(sh, x.ndim)


def _batch(store_dir, c, cfg, n_steps=1):
    store, objective, plan = loop.open_data(c, cfg)
    from repeat_scaling.data.batcher import Batcher

    b = Batcher(store.split("train"), plan, objective, int(c.train.batch_size), int(c.seed))
    try:
        return b.batch(0)
    finally:
        b.close()


def test_grad_accumulation_equals_big_batch(store_dir):
    c = tiny_config(store_dir)
    c.train.batch_size = 16
    cfg = config_lib.validate(c, num_devices=8)
    tx, sched = optimizers.make_optimizer(c.train.optimizer, 10)
    mesh = sharding.make_mesh({"data": 4, "fsdp": 2})
    rows = _batch(store_dir, c, cfg)
    batch = loop.to_global(rows, sharding.batch_sharding(mesh))
    state, info = state_lib.create_train_state(cfg, tx, mesh, seed=0)
    results = []
    for k in (1, 4):
        fn = step_lib.make_train_step(info, cfg, tx, sched, seed=0, grad_accum=k, z_loss=1e-4)
        new, m = fn(jax.tree.map(jnp.copy, state), batch)  # the step donates its input
        results.append((jax.device_get(new["params"]), jax.device_get(m)))
    (p1, m1), (p4, m4) = results
    for key in ("loss", "z_loss", "accuracy", "grad_norm"):
        assert m4[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-6), key
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_nan_stops_with_clear_error_and_keeps_last_good_checkpoint(store_dir, tmp_path):
    c = tiny_config(store_dir, **{"train.checkpoint_every": 1, "train.steps": 8})
    c.train.optimizer.learning_rate = 1e38  # the first update overflows the parameters
    with pytest.raises(
        loop.NonFiniteLossError, match=r"non-finite loss/gradient at step (\d+)"
    ) as e:
        loop.train(c, tmp_path)
    bad_step = int(str(e.value).split("at step ")[1].split()[0])
    ck = checkpointing.Checkpointer(tmp_path, save_every=1)
    latest = ck.latest_step()
    ck.close()
    assert latest is not None and latest < bad_step
    _, params, step = checkpointing.restore_params(tmp_path)
    assert step == latest
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def _unigram_entropy(tokens: np.ndarray) -> float:
    counts = np.bincount(tokens.astype(np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


@pytest.mark.parametrize("arg, steps, lr", [("dec", 200, 1e-2), ("t5", 300, 3e-3)])
def test_learns_well_below_unigram_entropy(store_dir, tmp_path, arg, steps, lr):
    c = tiny_config(store_dir, arg, **{"train.steps": steps, "train.checkpoint_every": 0})
    c.train.log_every = 10
    c.train.batch_size = 16
    c.train.optimizer.learning_rate = lr
    c.train.eval_every = steps // 2
    c.train.eval_batches = 1
    c.train.optimizer.warmup_steps = 10
    summary = loop.train(c, tmp_path)
    # Unigram entropy of the training targets (what a model without context achieves).
    cfg = config_lib.validate(c, num_devices=8)
    rows = _batch(store_dir, c, cfg)
    w = rows["decoder_loss_weights"] > 0
    h = _unigram_entropy(rows["decoder_target_tokens"][w])
    lines = [json.loads(x) for x in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    final = np.mean([x["loss"] for x in lines[-3:]])
    assert summary["final_step"] == steps and lines[-1]["step"] == steps
    assert final < 0.8 * h, (final, h)
    evals = [json.loads(x) for x in (tmp_path / "train" / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [steps // 2, steps] and evals[-1]["loss"] < h
    assert lines[-1]["tokens_per_s"] > 0 and lines[-1]["tokens_seen"] == steps * 16 * (
        64
        if arg == "dec"
        else json.loads((tmp_path / "config.json").read_text())["derived"]["tokens_per_step"] // 16
    )


# ----------------------------------------------------------------------------------
# Exact resume after kill -9 and SIGTERM (subprocesses)
# ----------------------------------------------------------------------------------
def _losses(workdir) -> dict[int, float]:
    path = pathlib.Path(workdir) / "train" / "metrics.jsonl"
    out = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                d = json.loads(line)
            except ValueError:
                continue
            out[d["step"]] = d["loss"]
    return out


def _wait_for_step(proc, workdir, step, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if max(_losses(workdir), default=0) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early: {proc.stderr.read()[-3000:]}")
        time.sleep(0.02)
    raise AssertionError("timed out waiting for the trainer")


def test_kill9_and_sigterm_resume_bit_exact(store_dir, tmp_path):
    # The compilation cache in its default place (no variable names one): the restarts
    # load the reference run's programs from it.
    env = {
        "REPEAT_SCALING_COMPILATION_CACHE": "",
        "JAX_COMPILATION_CACHE_DIR": "",
        "XDG_CACHE_HOME": str(tmp_path / "xdg"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    args = ("--config.train.steps=40", "--config.train.checkpoint_every=5", "--config.train.keep=2")
    ref = run_cli(tmp_path / "ref", store_dir, *args, env=env)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert any((tmp_path / "xdg" / "repeat_scaling" / "jax").iterdir())
    want = _losses(tmp_path / "ref")
    assert sorted(want) == list(range(1, 41))

    work = tmp_path / "run"
    # 1) kill -9 in the middle of the run (async saves may be in flight).
    p = run_cli(work, store_dir, *args, env=env, wait=False)
    _wait_for_step(p, work, 12)
    p.kill()
    p.wait()
    # 2) restart, then SIGTERM: it must save where it is and exit 143.
    p = run_cli(work, store_dir, *args, env=env, wait=False)
    _wait_for_step(p, work, 23)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err[-3000:]
    steps = checkpointing.Checkpointer(work, save_every=5).all_steps()
    assert "preempted" in err and max(steps) >= 23
    # 3) kill -9 right after a checkpoint boundary, then finish.
    p = run_cli(work, store_dir, *args, env=env, wait=False)
    _wait_for_step(p, work, 30)
    p.send_signal(signal.SIGKILL)
    p.wait()
    r = run_cli(work, store_dir, *args, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    got = _losses(work)
    assert sorted(got) == list(range(1, 41))
    mismatched = {s: (got[s], want[s]) for s in want if got[s] != want[s]}
    assert not mismatched, mismatched
