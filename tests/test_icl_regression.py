"""In-context linear regression (von Oswald et al. 2022): tasks, the linear self-attention
model and its gradient-descent construction, the trained-vs-GD comparison (the issue's
"must show": within 10% on held-out tasks), and the token version on the normal trainer."""

import json
import math
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from repeat_scaling import config_files
from repeat_scaling.data import icl_regression as R
from repeat_scaling.models import linear_attention as lsa

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------
def test_batches_are_seeded_and_follow_the_task_distribution():
    a, b = R.train_batch(3, 7, 256, 4, 6), R.train_batch(3, 7, 256, 4, 6)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.w, b.w)
    assert not np.array_equal(a.x, R.train_batch(3, 8, 256, 4, 6).x)
    assert not np.array_equal(a.x, R.train_batch(4, 7, 256, 4, 6).x)
    h = R.heldout_tasks(3, 256, 4, 6)
    assert not np.array_equal(h.w, a.w) and not np.array_equal(h.w, R.eta_fit_tasks(3, 256, 4, 6).w)
    assert a.x.shape == (256, 7, 4) and a.y.shape == (256, 7) and a.w.shape == (256, 4)
    np.testing.assert_allclose(a.y, np.einsum("bnd,bd->bn", a.x, a.w), rtol=1e-5, atol=1e-6)
    assert a.x.min() >= -1 and a.x.max() <= 1
    e = a.tokens
    assert e.shape == (256, 7, 5) and np.all(e[:, -1, -1] == 0)
    np.testing.assert_array_equal(e[:, :-1, -1], a.y[:, :-1])
    np.testing.assert_array_equal(a.target, a.y[:, -1])
    big = R.train_batch(0, 0, 20_000, 3, 1)
    assert abs(np.var(big.y) - 3 / 3) < 0.05  # Var(y) = d / 3
    with pytest.raises(ValueError, match="d=0 must be a positive integer"):
        R.train_batch(0, 0, 4, 0, 3)


def test_optimal_eta_minimises_the_gd_loss():
    b = R.eta_fit_tasks(0, 4000, 3, 8)

    def loss(eta, steps):
        return np.mean((R.gd_predict(b, eta, steps) - b.target) ** 2)

    for steps in (1, 2):
        eta = R.optimal_eta(b, steps)
        assert eta > 0
        for f in (0.9, 1.1):
            assert loss(eta, steps) < loss(f * eta, steps)
    # One GD step from 0 is eta * mean_i y_i x_i . x_q.
    a = np.einsum("bn,bnd,bd->b", b.y[:, :-1], b.x[:, :-1], b.x[:, -1]) / 8
    np.testing.assert_allclose(R.gd_predict(b, 0.7), 0.7 * a, rtol=1e-4, atol=1e-6)
    # Least squares recovers w exactly when n >= d (noise-free).
    np.testing.assert_allclose(R.least_squares_predict(b), b.target, atol=1e-4)


# ----------------------------------------------------------------------------------------
# Model and the GD construction
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("layers, heads", [(1, 1), (3, 2)])
def test_gd_construction_computes_gradient_descent(layers, heads):
    b = R.heldout_tasks(1, 64, 4, 9)
    model = lsa.gd_model(lsa.LSAConfig(d=4, num_layers=layers, num_heads=heads), eta=0.8)
    pred = np.asarray(model.predict(jnp.asarray(b.tokens)))
    np.testing.assert_allclose(pred, R.gd_predict(b, 0.8, layers), rtol=1e-4, atol=1e-5)
    if layers == 1:
        # d y_hat / d x_q of one GD step is eta * mean_i y_i x_i (the learned w_1).
        sens = np.asarray(lsa.query_sensitivity(model, jnp.asarray(b.tokens)))
        w1 = 0.8 * np.einsum("bn,bnd->bd", b.y[:, :-1], b.x[:, :-1]) / 9
        np.testing.assert_allclose(sens, w1, rtol=1e-4, atol=1e-5)


def test_lsa_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"LSAConfig.d=0 must be a positive integer"):
        lsa.LSAConfig(d=0)
    model = lsa.gd_model(lsa.LSAConfig(d=3), eta=1.0)
    with pytest.raises(ValueError, match=r"expected \[batch, n \+ 1, 4\]"):
        model.predict(jnp.zeros((2, 5, 3)))


# ----------------------------------------------------------------------------------------
# The must-show: a trained single LSA layer matches one step of GD on held-out tasks.
# ----------------------------------------------------------------------------------------
def _cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "repeat_scaling.train.icl_regression", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_trained_lsa_matches_one_gd_step(tmp_path):
    wd = tmp_path / "run"
    p = _cli(
        "--config=configs/icl_linear_regression.py:demo",
        f"--workdir={wd}",
        "--config.train.steps=300",
        "--config.train.eval_every=0",
        "--config.eval.eta_tasks=20000",
        "--config.eval.tasks=2000",
        "--config.eval.sensitivity_tasks=500",
    )
    assert p.returncode == 0, p.stderr[-2000:]
    printed = json.loads(p.stdout.strip().splitlines()[-1])
    result = json.loads((wd / "comparison.json").read_text())
    assert printed == result
    assert result["d"] == 5 and result["n"] == 10 and result["steps"] == 300
    # Within 10% of the GD construction, and far better than predicting 0.
    assert abs(result["loss_ratio"] - 1) < 0.10 and result["within_tolerance"], result
    assert result["loss_gd"] < 0.5 * result["loss_zero_predictor"], result
    assert result["prediction_cosine"] > 0.99 and result["sensitivity_cosine_mean"] > 0.99, result
    lines = [json.loads(x) for x in (wd / "train" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 300 and lines[-1]["loss"] < lines[0]["loss"]

    from repeat_scaling.train.icl_regression import ConfigError, default_config, load_trained, run

    with pytest.raises(ConfigError, match="already holds a run; choose another --workdir"):
        run(default_config(), wd)

    model, eta, step = load_trained(wd)
    assert step == 300 and eta == pytest.approx(result["eta"], rel=1e-6)
    tasks = R.heldout_tasks(0, 2000, 5, 10)
    pred = np.asarray(model.predict(jnp.asarray(tasks.tokens)), np.float64)
    loss = 0.5 * np.mean((pred - tasks.target) ** 2)
    assert loss == pytest.approx(result["loss_trained"], rel=1e-4)


@pytest.mark.parametrize(
    "arg, expected",
    [
        ("--config.train.learning_rate=-1.0", "error: train.learning_rate=-1.0 must be a number > 0"),
        ("--config.train.stpes=3", 'error: bad command line: stpes Did you mean "steps" instead of "stpes"?'),
    ],
)  # fmt: skip
def test_cli_bad_input_is_one_line(tmp_path, arg, expected):
    p = _cli("--config=configs/icl_linear_regression.py:demo", f"--workdir={tmp_path}", arg)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1] == expected, p.stderr


def test_lab_optimizer_is_adam_with_linear_warmup():
    """The shared make_optimizer config gives exactly optax.adam on the warm-up schedule."""
    import optax

    from repeat_scaling.train.icl_regression import _optimizer, default_config

    c = default_config()
    c.train.learning_rate, c.train.warmup_steps = 3e-3, 4
    tx, schedule = _optimizer(c)
    ref = optax.adam(optax.linear_schedule(0.0, 3e-3, 4))
    rng = np.random.default_rng(0)
    p = {"w": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)}
    p_ref, s, s_ref = p, tx.init(p), ref.init(p)
    for step in range(7):
        g = {"w": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)}
        u, s = tx.update(g, s, p)
        u_ref, s_ref = ref.update(g, s_ref, p_ref)
        p, p_ref = optax.apply_updates(p, u), optax.apply_updates(p_ref, u_ref)
        np.testing.assert_array_equal(np.asarray(p["w"]), np.asarray(p_ref["w"]))
        assert float(schedule(step)) == float(optax.linear_schedule(0.0, 3e-3, 4)(step))


# ----------------------------------------------------------------------------------------
# Token version
# ----------------------------------------------------------------------------------------
def test_token_task_layout_and_determinism():
    params = {"d": "2", "n": "5", "x_bins": "8", "y_bins": "12", "train": "300", "validation": 50}
    splits, vocab, task = R.token_task(params, seed=4)
    again, _, task2 = R.token_task(params, seed=4)
    other, _, _ = R.token_task(params, seed=5)
    L = 6 * 3
    assert vocab == 3 + 8 + 12 and task == task2
    assert splits["train"].shape == (300, L) and splits["validation"].shape == (50, L)
    assert splits["train"].dtype == np.int32
    np.testing.assert_array_equal(splits["train"], again["train"])
    assert not np.array_equal(splits["train"], other["train"])
    assert task["name"] == "icl_regression" and task["sequence_length"] == L
    assert task["loss_positions"] == [L - 1] and task["label_positions"] == [2, 5, 8, 11, 14, 17]
    seq = splits["train"]
    y_pos = np.asarray(task["label_positions"])
    x_pos = np.setdiff1d(np.arange(L), y_pos)
    assert seq[:, x_pos].min() >= 3 and seq[:, x_pos].max() <= 10  # x ids 3..10
    assert seq[:, y_pos].min() >= 11 and seq[:, y_pos].max() <= 22  # y ids 11..22
    # Every sequence is ONE linear function of the dequantised x (up to y's bin width).
    q = R.ValueQuantiser(8, 12, task["y_max"])
    xs = q.x_value(seq[:, x_pos] - 3).reshape(300, 6, 2)
    ys = q.y_token_value(seq[:, y_pos])
    inside = np.all(np.abs(ys) < task["y_max"] - q.y_max / 12, axis=1)  # unclipped rows
    w = np.stack([np.linalg.lstsq(xs[i], ys[i], rcond=None)[0] for i in range(300)])
    resid = np.abs(np.einsum("bnd,bd->bn", xs, w) - ys)[inside]
    assert resid.max() < 2 * task["y_max"] / 12  # within about one y bin
    pooled, _, _ = R.token_task({**params, "num_tasks": 3}, seed=4)
    assert len(np.unique(pooled["train"][:, [2, 5, 8]], axis=0)) < 300  # few distinct w


@pytest.mark.parametrize(
    "params, message",
    [
        ({"dd": 3}, r"unknown parameter\(s\) \['dd'\]"),
        ({"d": "two"}, "d='two' is not a valid int"),
        ({"n": 0}, "n=0 must be >= 1"),
        ({"y_max": -1}, "y_max=-1.0 must be >= 0"),
    ],
)
def test_token_task_rejects_bad_params(params, message):
    with pytest.raises(ValueError, match=message):
        R.token_task(params, seed=0)


def test_token_version_trains_with_the_normal_trainer(tmp_path):
    """prepare_store('icl_regression:...') -> the ICL lab's store -> the normal trainer."""
    icl_tasks = pytest.importorskip("repeat_scaling.data.icl_tasks")
    del icl_tasks
    cfg_file = config_files.load_module(REPO / "configs" / "icl_linear_regression.py")

    from repeat_scaling.data.store import TokenStore
    from repeat_scaling.train import loop

    c = cfg_file.get_config("tokens")
    c.data.store = str(tmp_path / "store")
    c.data.source = cfg_file.token_spec({**cfg_file.TOKEN_TASK, "train": 4000, "validation": 64})
    c.train.steps, c.train.batch_size = 60, 32
    c.train.log_every, c.train.checkpoint_every, c.train.eval_every = 10, 0, 0
    c.train.optimizer.warmup_steps = 10
    c.train.progress_bar = "off"
    summary = loop.train(c, tmp_path / "w")
    store = TokenStore(str(tmp_path / "store"))
    task = store.manifest["icl_task"]
    assert task["name"] == "icl_regression" and task["sequence_length"] == c.data.length == 18
    assert store.vocab.spec == "tokens:51" and store.split("train").num_documents == 4000
    lines = [json.loads(x) for x in (tmp_path / "w" / "train" / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    assert summary["final_step"] == 60 and [x["step"] for x in lines][-1] == 60
    # Loss on the y-tokens falls from near-uniform over the padded vocabulary to below a
    # uniform guess among the 32 y bins.
    assert lines[0]["loss"] > math.log(32) > lines[-1]["loss"], [x["loss"] for x in lines]


def test_token_metrics_score_the_query_prediction():
    splits, vocab, task = R.token_task({"d": 2, "n": 8, "validation": 400}, seed=1)
    seq = splits["validation"]
    perfect = np.zeros((len(seq), vocab))
    perfect[np.arange(len(seq)), seq[:, -1]] = 100.0
    m = R.token_metrics(task, perfect, seq)
    assert m["query_accuracy"] == 1.0 and m["query_within_one_bin"] == 1.0
    assert m["query_mse"] < 1e-12 and m["query_mse_argmax"] == 0.0
    uniform = R.token_metrics(task, np.zeros((len(seq), vocab)), seq)
    # Uniform over the symmetric y bins predicts 0 on average: the zero predictor's error.
    assert uniform["query_mse"] == pytest.approx(uniform["zero_mse"], rel=1e-9)
    assert uniform["least_squares_mse"] < 0.05 * uniform["zero_mse"]
    with pytest.raises(ValueError, match="expected 'icl_regression'"):
        R.token_metrics({"name": "icl_bursty"}, perfect, seq)


def test_config_file_args():
    cfg_file = config_files.load_module(REPO / "configs" / "icl_linear_regression.py")

    c = cfg_file.get_config("paper,layers=3,heads=2")
    assert (c.task.d, c.task.n, c.model.num_layers, c.model.num_heads) == (10, 10, 3, 2)
    t = cfg_file.get_config("tokens_attn2")
    assert t.data.objective == "icl" and t.model.attention_only and t.data.length == 18
    assert t.train.steps * t.train.batch_size <= cfg_file.TOKEN_TASK["train"]
    with pytest.raises(ValueError, match="unknown arg depth=2"):
        cfg_file.get_config("demo,depth=2")
    with pytest.raises(ValueError, match=r"icl_linear_regression.py:big; expected one of"):
        cfg_file.get_config("big")
