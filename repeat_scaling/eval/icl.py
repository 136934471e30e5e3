"""In-context-learning metrics on the ICL lab's generated evaluation sets.

For a store prepared from ``icl_bursty:...`` (:mod:`repeat_scaling.data.icl_tasks`), every
metric is an accuracy at the QUERY position: the model's prediction is the argmax of its
logits over the ``L`` label tokens only (so 1/L is uniform chance), compared with the
query's target label:

- ``icl_accuracy``: ``eval_icl`` (novel classes, labels assigned in the context only).
  A model that only knows "the answer is one of the labels in the context" scores
  ``1 / (N/B)`` (``icl_context_chance``); > 0.9 needs real in-context learning.
- ``icl_unseen_accuracy``: ``eval_unseen`` (classes whose tokens never occur in training).
- ``icl_flipped_accuracy``: ``eval_flipped`` (trained classes, in-context labels shifted
  away from their true labels; the target is the in-context label).
- ``iwl_accuracy``: ``eval_iwl`` (in-weights: trained query class absent from the context;
  target = its fixed label).
- ``icl_query_loss``: mean cross-entropy (nats; softmax over the store's real vocabulary,
  the model's padded embedding rows excluded) of the query label on ``eval_icl``.

``icl_regression`` stores get :func:`repeat_scaling.data.icl_regression.token_metrics` on
their validation split instead (keys prefixed ``icl_regression_``).

Clamped runs: the model of a run trained with attention clamps depends on them, so pass
the run's ``interventions`` (and the checkpoint ``step``) to evaluate the model as it was
trained; :func:`icl_metrics` then also reports ``icl_accuracy_unclamped``.

Only jax/numpy and the project's models are imported (no tensorflow).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from repeat_scaling import models
from repeat_scaling.data.icl_objective import IclObjective

#: store split -> metric key
SPLIT_METRICS = {
    "eval_icl": "icl_accuracy",
    "eval_unseen": "icl_unseen_accuracy",
    "eval_flipped": "icl_flipped_accuracy",
    "eval_iwl": "iwl_accuracy",
}
BATCH = 256  # rows per forward (one compilation per model structure)

_COMPILED: dict[Any, Any] = {}


def _query_fn(graphdef, clamps: tuple, position: int):
    """Jitted ``(state, feats, step) -> logits at the query position [B, V]`` (cached)."""
    key = (graphdef, clamps, position)
    if key not in _COMPILED:

        def fn(state, feats, step):
            m = nnx.merge(graphdef, state)
            kw = {"interventions": clamps, "step": step} if clamps else {}
            logits, _ = models.forward(m, feats, deterministic=True, **kw)
            return logits[:, position]

        _COMPILED[key] = jax.jit(fn)
    return _COMPILED[key]


def query_logits(
    model: nnx.Module,
    objective: IclObjective,
    sequences: np.ndarray,
    *,
    interventions: tuple = (),
    step: int | None = None,
    position: int | None = None,
) -> np.ndarray:
    """Float32 logits [n, V] at ``position`` (default: the task's query target position)."""
    seq = np.asarray(sequences, np.int32)
    pos = int(objective.task["loss_positions"][-1] if position is None else position)
    graphdef, state = nnx.split(model)
    fn = _query_fn(graphdef, tuple(interventions), pos)
    out = []
    for s in range(0, len(seq), BATCH):
        part = seq[s : s + BATCH]
        n = len(part)
        if n < BATCH:  # pad to one shape: a single compilation
            part = np.concatenate([part, np.repeat(part[-1:], BATCH - n, axis=0)])
        feats = objective.features(part)
        st = jnp.asarray(0 if step is None else int(step), jnp.int32)
        out.append(np.asarray(jax.device_get(fn(state, feats, st)), np.float32)[:n])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _sequences(store, split: str, limit: int | None) -> np.ndarray:
    sp = store.split(split)
    L = int(store.manifest["icl_task"]["sequence_length"])
    n = sp.num_documents if limit is None else min(limit, sp.num_documents)
    return np.asarray(sp.tokens(0, n * (L + 1)), np.int32).reshape(n, L + 1)[:, :L]


def query_loss(logits: np.ndarray, targets: np.ndarray, vocab_size: int) -> float:
    """Mean cross-entropy (nats) of ``targets`` [n] under ``logits`` [n, V_padded].

    The softmax runs over the real vocabulary only (the first ``vocab_size`` columns):
    the model's padded embedding rows are not tokens and never enter the normaliser.
    """
    real = np.asarray(logits, np.float64)[:, : int(vocab_size)]
    top = real.max(-1)
    lse = np.log(np.exp(real - top[:, None]).sum(-1)) + top
    tgt = np.take_along_axis(real, np.asarray(targets, np.int64)[:, None], axis=1)[:, 0]
    return float(np.mean(lse - tgt))


def bursty_accuracies(
    model: nnx.Module,
    store,
    *,
    interventions: tuple = (),
    step: int | None = None,
    max_examples: int | None = None,
) -> dict[str, float]:
    """The accuracies of the module docstring for an ``icl_bursty`` store."""
    task = store.manifest["icl_task"]
    objective = IclObjective(task)
    labels = np.asarray(task["label_tokens"])
    q = int(task["loss_positions"][-1])
    out: dict[str, float] = {}
    for split in task.get("eval_splits", ()):
        seq = _sequences(store, split, max_examples)
        logits = query_logits(model, objective, seq, interventions=interventions, step=step)
        pred = labels[np.argmax(logits[:, labels], axis=-1)]
        out[SPLIT_METRICS[split]] = float(np.mean(pred == seq[:, q]))
        if split == "eval_icl":
            out["icl_query_loss"] = query_loss(logits, seq[:, q], store.vocab.vocab_size)
    out["icl_context_chance"] = 1.0 / (int(task["N"]) // int(task["B"]))
    return out


def icl_metrics(
    model: nnx.Module,
    model_cfg: Any,
    store,
    settings: Any = None,
    *,
    interventions: Any = None,
    step: int | None = None,
    max_examples: int | None = None,
) -> dict[str, float]:
    """ICL metrics of one checkpoint for a store with ``icl_task`` (``{}`` otherwise).

    Args:
      model: the restored NNX model (any mesh).
      model_cfg: its ModelConfig (clamp specs are validated against it).
      store: the run's :class:`~repeat_scaling.data.store.TokenStore`.
      settings: the evaluator's EvalSettings (unused: the eval sets are in the store).
      interventions: the run's clamp specs (``config.interventions``); evaluated as trained.
      step: the checkpoint step (decides which clamps are active; None: all).
      max_examples: cap on sequences per evaluation set (None: all of them).
    """
    del settings
    task = store.manifest.get("icl_task")
    if not task:
        return {}
    clamps: tuple = ()
    if interventions:
        from repeat_scaling.models import interventions as iv

        clamps = iv.parse(list(interventions), model_cfg)
    if task["name"] == "icl_bursty":
        out = bursty_accuracies(
            model, store, interventions=clamps, step=step, max_examples=max_examples
        )
        if clamps:
            plain = bursty_accuracies(model, store, max_examples=max_examples)
            out["icl_accuracy_unclamped"] = plain["icl_accuracy"]
        return out
    if task["name"] == "icl_regression":
        from repeat_scaling.data import icl_regression

        seq = _sequences(store, "validation", max_examples or 1024)
        logits = query_logits(
            model, IclObjective(task), seq, interventions=clamps, step=step,
            position=int(task.get("query_position", task["loss_positions"][-1])),
        )  # fmt: skip
        res = icl_regression.token_metrics(task, logits, seq)
        return {f"icl_regression_{k}": float(v) for k, v in res.items()}
    return {}
