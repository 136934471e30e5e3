"""In-context linear regression (von Oswald et al. 2022, "Transformers learn in-context by
gradient descent"): seeded task generators, and the token-sequence version.

The task: a sequence holds ``n`` context pairs ``(x_i, y_i)`` and a query ``x_q`` of one
linear function ``y = w . x``, with ``x ~ U(-1, 1)^d`` and ``w ~ N(0, I_d)`` drawn afresh for
every sequence; the model must predict ``y_q = w . x_q`` from the context alone. Units: x, y
and w are plain real numbers; ``Var(y) = d / 3``.

Continuous version (the linear self-attention experiment, repeat_scaling/models/
linear_attention.py): :func:`train_batch` (a pure function of ``(seed, step)``) and
:func:`heldout_tasks` (a separate random stream: never equal to a training batch) return a
:class:`RegressionBatch` with the paper's token layout ``e_i = (x_i, y_i)`` and the query token
``(x_q, 0)``.

Token version (the normal trainer, ``data.objective="icl"``): :func:`token_task` quantises x
and y into value tokens and writes fixed-length sequences (the scheme is documented there).
Everything here is numpy; nothing imports jax or tensorflow.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

# Random streams (first words of the numpy SeedSequence entropy after the seed).
_TRAIN_STREAM, _HELDOUT_STREAM, _ETA_STREAM = 0, 1, 2
_TOK_TRAIN_STREAM, _TOK_VALID_STREAM, _TOK_POOL_STREAM = 10, 11, 12

#: First id of the value tokens (0, 1, 2 are pad / eos / unk).
FIRST_VALUE_ID = 3


@dataclasses.dataclass(frozen=True)
class RegressionBatch:
    """A batch of regression tasks (numpy float32).

    Attributes:
      x: [batch, n + 1, d] inputs; row ``n`` is the query.
      y: [batch, n + 1] targets ``w . x`` (row ``n`` is the query's target ``y_q``).
      w: [batch, d] the task vectors.
    """

    x: np.ndarray
    y: np.ndarray
    w: np.ndarray

    @property
    def num_context(self) -> int:
        return self.x.shape[1] - 1

    @property
    def tokens(self) -> np.ndarray:
        """[batch, n + 1, d + 1] the paper's tokens ``(x_i, y_i)``; the query's y slot is 0."""
        e = np.concatenate([self.x, self.y[..., None]], axis=-1)
        e[:, -1, -1] = 0.0
        return e.astype(np.float32)

    @property
    def target(self) -> np.ndarray:
        """[batch] the query targets ``y_q``."""
        return self.y[:, -1]


def _check_sizes(d: int, n: int, batch: int) -> None:
    for name, v in (("d", d), ("n", n), ("batch", batch)):
        if not isinstance(v, int | np.integer) or v < 1:
            raise ValueError(f"{name}={v!r} must be a positive integer")


def sample_tasks(rng: np.random.Generator, batch: int, d: int, n: int) -> RegressionBatch:
    """``batch`` tasks from ``rng``: ``x ~ U(-1, 1)^d``, ``w ~ N(0, I_d)``, ``y = w . x``."""
    _check_sizes(d, n, batch)
    w = rng.standard_normal((batch, d)).astype(np.float32)
    x = rng.uniform(-1.0, 1.0, (batch, n + 1, d)).astype(np.float32)
    y = np.einsum("bnd,bd->bn", x, w).astype(np.float32)
    return RegressionBatch(x=x, y=y, w=w)


def train_batch(seed: int, step: int, batch: int, d: int, n: int) -> RegressionBatch:
    """The training batch of ``step``: a pure function of ``(seed, step)``."""
    return sample_tasks(np.random.default_rng([_TRAIN_STREAM, seed, step]), batch, d, n)


def heldout_tasks(seed: int, num: int, d: int, n: int) -> RegressionBatch:
    """``num`` held-out tasks (a stream no training batch uses)."""
    return sample_tasks(np.random.default_rng([_HELDOUT_STREAM, seed]), num, d, n)


def eta_fit_tasks(seed: int, num: int, d: int, n: int) -> RegressionBatch:
    """``num`` training-distribution tasks for fitting the GD step size (not held out)."""
    return sample_tasks(np.random.default_rng([_ETA_STREAM, seed]), num, d, n)


# --------------------------------------------------------------------------------------
# Reference predictors (numpy): explicit gradient descent and least squares.
# --------------------------------------------------------------------------------------
def gd_predict(b: RegressionBatch, eta: float, steps: int = 1) -> np.ndarray:
    """[batch] prediction at the query after ``steps`` GD steps from ``w = 0`` on the context.

    The loss is ``L(w) = 1/(2n) sum_i (w . x_i - y_i)^2``, so one step is
    ``w <- w - eta * 1/n sum_i (w . x_i - y_i) x_i``.
    """
    xc, yc, xq = b.x[:, :-1].astype(np.float64), b.y[:, :-1].astype(np.float64), b.x[:, -1]
    w = np.zeros(b.w.shape, np.float64)
    for _ in range(steps):
        resid = np.einsum("bnd,bd->bn", xc, w) - yc
        w = w - eta * np.einsum("bn,bnd->bd", resid, xc) / xc.shape[1]
    return np.einsum("bd,bd->b", w, xq)


def optimal_eta_one_step(b: RegressionBatch) -> float:
    """The step size minimising the mean squared query error of ONE GD step on ``b``.

    One step from 0 predicts ``eta * a`` with ``a = 1/n sum_i y_i x_i . x_q``, so the
    squared error is a quadratic in eta with minimiser ``sum(a y_q) / sum(a^2)``
    (closed form least squares).
    """
    a = gd_predict(b, 1.0, 1)
    yq = b.target.astype(np.float64)
    return float(np.dot(a, yq) / np.dot(a, a))


def optimal_eta(b: RegressionBatch, steps: int = 1) -> float:
    """The GD step size minimising the mean squared query error of ``steps`` GD steps.

    One step: closed form (:func:`optimal_eta_one_step`). More steps: the error is a
    polynomial in eta; a bounded scalar line search (scipy ``minimize_scalar``) on
    ``[0, 2 * eta_1]`` after a coarse grid picks the basin.
    """
    eta1 = optimal_eta_one_step(b)
    if steps == 1:
        return eta1
    from scipy.optimize import minimize_scalar

    yq = b.target.astype(np.float64)

    def loss(eta: float) -> float:
        return float(np.mean((gd_predict(b, eta, steps) - yq) ** 2))

    grid = np.linspace(0.0, 2.0 * eta1, 41)[1:]
    best = grid[int(np.argmin([loss(e) for e in grid]))]
    h = grid[1] - grid[0]
    res = minimize_scalar(loss, bounds=(max(best - h, 1e-9), best + h), method="bounded")
    return float(res.x)


def least_squares_predict(b: RegressionBatch, ridge: float = 1e-6) -> np.ndarray:
    """[batch] the (near-)least-squares prediction ``x_q . (X^T X + ridge I)^-1 X^T y``."""
    xc, yc = b.x[:, :-1].astype(np.float64), b.y[:, :-1].astype(np.float64)
    d = xc.shape[-1]
    gram = np.einsum("bnd,bne->bde", xc, xc) + ridge * np.eye(d)
    w = np.linalg.solve(gram, np.einsum("bnd,bn->bd", xc, yc)[..., None])[..., 0]
    return np.einsum("bd,bd->b", w, b.x[:, -1].astype(np.float64))


# --------------------------------------------------------------------------------------
# Token-sequence version for the normal trainer.
# --------------------------------------------------------------------------------------
TOKEN_DEFAULTS: dict[str, Any] = {
    "d": 2,  # input dimension
    "n": 8,  # context pairs per sequence
    "x_bins": 16,  # value tokens for x (uniform bins over [-1, 1])
    "y_bins": 32,  # value tokens for y (uniform bins over [-y_max, y_max])
    "y_max": 0.0,  # 0: sqrt(3 d), i.e. 3 standard deviations of y
    "train": 20_000,  # training sequences
    "validation": 2_000,  # validation sequences (fresh tasks, never in the train pool)
    "num_tasks": 0,  # 0: a fresh w per training sequence; else a pool of this many w
}


def _parse_token_params(params: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(params) - set(TOKEN_DEFAULTS))
    if unknown:
        raise ValueError(
            f"icl_regression: unknown parameter(s) {unknown}; expected some of "
            f"{sorted(TOKEN_DEFAULTS)}"
        )
    out = dict(TOKEN_DEFAULTS)
    for k, v in params.items():
        kind = type(TOKEN_DEFAULTS[k])
        try:
            out[k] = kind(v)
            if kind is int and float(v) != int(out[k]):
                raise ValueError
        except (TypeError, ValueError):
            raise ValueError(f"icl_regression: {k}={v!r} is not a valid {kind.__name__}") from None
    for k in ("d", "n", "x_bins", "y_bins", "train", "validation"):
        if out[k] < 1:
            raise ValueError(f"icl_regression: {k}={out[k]} must be >= 1")
    if out["num_tasks"] < 0:
        raise ValueError(f"icl_regression: num_tasks={out['num_tasks']} must be >= 0")
    if out["y_max"] < 0:
        raise ValueError(f"icl_regression: y_max={out['y_max']} must be >= 0 (0: automatic)")
    if out["y_max"] == 0:
        out["y_max"] = math.sqrt(3.0 * out["d"])
    return out


@dataclasses.dataclass(frozen=True)
class ValueQuantiser:
    """Uniform bins for x over [-1, 1] and for y over [-y_max, y_max] (y clipped).

    Token ids: x bin k -> ``3 + k``; y bin k -> ``3 + x_bins + k``; vocab_size =
    ``3 + x_bins + y_bins``. A bin decodes to its centre.
    """

    x_bins: int
    y_bins: int
    y_max: float

    @property
    def y_first_id(self) -> int:
        return FIRST_VALUE_ID + self.x_bins

    @property
    def vocab_size(self) -> int:
        return FIRST_VALUE_ID + self.x_bins + self.y_bins

    def x_bin(self, x: np.ndarray) -> np.ndarray:
        k = np.floor((np.asarray(x) + 1.0) / 2.0 * self.x_bins).astype(np.int64)
        return np.clip(k, 0, self.x_bins - 1)

    def x_value(self, k: np.ndarray) -> np.ndarray:
        return -1.0 + (np.asarray(k) + 0.5) * 2.0 / self.x_bins

    def y_bin(self, y: np.ndarray) -> np.ndarray:
        k = np.floor((np.asarray(y) + self.y_max) / (2.0 * self.y_max) * self.y_bins)
        return np.clip(k.astype(np.int64), 0, self.y_bins - 1)

    def y_value(self, k: np.ndarray) -> np.ndarray:
        return -self.y_max + (np.asarray(k) + 0.5) * 2.0 * self.y_max / self.y_bins

    def y_token_value(self, token: np.ndarray) -> np.ndarray:
        """Decode y-token ids back to the bin centres (for evaluating regression error)."""
        return self.y_value(np.asarray(token) - self.y_first_id)


def _token_sequences(
    rng: np.random.Generator,
    num: int,
    p: dict[str, Any],
    q: ValueQuantiser,
    pool: np.ndarray | None,
) -> np.ndarray:
    d, n = p["d"], p["n"]
    if pool is None:
        w = rng.standard_normal((num, d))
    else:
        w = pool[rng.integers(0, len(pool), num)]
    xk = q.x_bin(rng.uniform(-1.0, 1.0, (num, n + 1, d)))
    y = np.einsum("bnd,bd->bn", q.x_value(xk), w)  # y of the DEQUANTISED x: exact given tokens
    yk = q.y_bin(y)
    seq = np.concatenate([FIRST_VALUE_ID + xk, (q.y_first_id + yk)[..., None]], axis=-1)
    return seq.reshape(num, (n + 1) * (d + 1)).astype(np.int32)


def token_task(params: dict[str, Any], seed: int) -> tuple[dict[str, np.ndarray], int, dict]:
    """Token sequences of in-context linear regression for the normal trainer.

    Scheme: x components are quantised into ``x_bins`` uniform bins over [-1, 1] (ids
    ``3 .. 3 + x_bins - 1``); ``y = w . x_hat`` is computed from the bin CENTRES ``x_hat`` (so
    the target is an exact linear function of what the model sees), clipped to
    ``[-y_max, y_max]`` and quantised into ``y_bins`` uniform bins (ids ``3 + x_bins ..``).
    The x and y ids are disjoint, so a token says which slot it fills. A sequence is
    ``x_1 (d tokens), y_1, ..., x_n, y_n, x_q, y_q``: length ``L = (n + 1)(d + 1)``, no
    BOS/EOS. ``loss_positions`` is ``[L - 1]`` (the query's y-token) and ``label_positions``
    all y-token positions (the ``icl`` objective's ``all_labels=True`` trains on every pair,
    i.e. also with shorter contexts); the causal-LM target at position p is token p,
    predicted from tokens < p (repeat_scaling/data/icl_objective.py, ``IclObjective``).

    Args:
      params: the ``icl_regression:k=v,...`` parameters (strings or numbers; see
        ``TOKEN_DEFAULTS``); unknown keys are an error.
      seed: the data seed (train, validation and the task pool use separate streams;
        validation tasks always draw a fresh w, never from the training pool).

    Returns:
      ``(splits, vocab_size, task)``: ``{"train": [train, L], "validation": [validation, L]}``
      int32, the vocabulary size (ids 0..2 reserved), and the task description for the
      store manifest (``name``, the parsed parameters, ``seed``, ``sequence_length``,
      ``loss_positions``, ``label_positions``, ``query_position`` and the x / y token id
      ranges ``[first, last]``).
    """
    p = _parse_token_params(dict(params))
    q = ValueQuantiser(p["x_bins"], p["y_bins"], p["y_max"])
    pool = None
    if p["num_tasks"]:
        pool = np.random.default_rng([_TOK_POOL_STREAM, seed]).standard_normal(
            (p["num_tasks"], p["d"])
        )
    train = _token_sequences(
        np.random.default_rng([_TOK_TRAIN_STREAM, seed]), p["train"], p, q, pool
    )
    valid = _token_sequences(
        np.random.default_rng([_TOK_VALID_STREAM, seed]), p["validation"], p, q, None
    )
    d, n = p["d"], p["n"]
    length = (n + 1) * (d + 1)
    y_positions = [(i + 1) * (d + 1) - 1 for i in range(n + 1)]
    task = {
        "name": "icl_regression",
        **p,
        "seed": int(seed),
        "sequence_length": length,
        "loss_positions": [length - 1],
        "label_positions": y_positions,
        "query_position": length - 1,
        "x_token_ids": [FIRST_VALUE_ID, FIRST_VALUE_ID + p["x_bins"] - 1],
        "y_token_ids": [q.y_first_id, q.vocab_size - 1],
    }
    return {"train": train, "validation": valid}, q.vocab_size, task


# --------------------------------------------------------------------------------------
# Scoring the token version (the task's metric functions, like a seqio Task's metric_fns).
# --------------------------------------------------------------------------------------
def quantiser_of(task: dict[str, Any]) -> ValueQuantiser:
    """The :class:`ValueQuantiser` of a ``token_task`` description (a store's ``icl_task``)."""
    if task.get("name") != "icl_regression":
        raise ValueError(f"icl_task name {task.get('name')!r}; expected 'icl_regression'")
    return ValueQuantiser(int(task["x_bins"]), int(task["y_bins"]), float(task["y_max"]))


def decode_sequences(task: dict[str, Any], sequences: np.ndarray) -> RegressionBatch:
    """Token sequences [B, L] -> the dequantised tasks (bin centres; ``w`` unknown: zeros)."""
    q = quantiser_of(task)
    d, n = int(task["d"]), int(task["n"])
    seq = np.asarray(sequences).reshape(len(sequences), n + 1, d + 1)
    x = q.x_value(seq[..., :d] - FIRST_VALUE_ID)
    y = q.y_token_value(seq[..., d])
    return RegressionBatch(x=x, y=y, w=np.zeros((len(seq), d)))


def token_metrics(
    task: dict[str, Any], query_logits: np.ndarray, sequences: np.ndarray
) -> dict[str, float]:
    """Scores of a model's prediction of the query's y-token.

    Args:
      task: the store's ``icl_task`` (from :func:`token_task`).
      query_logits: [B, V] logits at the position that predicts the query's y-token (the
        causal-LM output at ``query_position``); only the y-token ids are considered.
      sequences: [B, L] the evaluated sequences (their last token is the target).

    Returns:
      ``query_accuracy`` (exact y bin), ``query_within_one_bin``, ``query_mse`` (squared
      error of the probability-weighted mean of the y-bin centres, in y units),
      ``query_mse_argmax`` (of the most likely bin's centre), and the references
      ``zero_mse`` (predicting 0) and ``least_squares_mse`` (least squares on the
      dequantised context, then quantised: a strong reference, not a bound, since the
      context's y values carry quantisation error).
    """
    q = quantiser_of(task)
    seq = np.asarray(sequences)
    logits = np.asarray(query_logits, np.float64)[:, q.y_first_id : q.vocab_size]
    target_bin = seq[:, -1] - q.y_first_id
    centres = q.y_value(np.arange(q.y_bins))
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    best = logits.argmax(-1)
    y_true = centres[target_bin]
    b = decode_sequences(task, seq)
    ls = q.y_value(q.y_bin(least_squares_predict(b, ridge=1e-6)))
    return {
        "query_accuracy": float(np.mean(best == target_bin)),
        "query_within_one_bin": float(np.mean(np.abs(best - target_bin) <= 1)),
        "query_mse": float(np.mean((p @ centres - y_true) ** 2)),
        "query_mse_argmax": float(np.mean((centres[best] - y_true) ** 2)),
        "zero_mse": float(np.mean(y_true**2)),
        "least_squares_mse": float(np.mean((ls - y_true) ** 2)),
    }
