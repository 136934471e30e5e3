"""Token stores of the synthetic in-context-learning tasks (``icl_bursty:...``,
``icl_regression:...``; the tasks are :mod:`repeat_scaling.data.icl_tasks` and
:mod:`repeat_scaling.data.icl_regression`).

Store layout (:func:`write_sequence_store`, also used for ``icl_regression``): every
sequence is one document of exactly ``sequence_length`` tokens (plus its EOS), so store
chunk ``c`` with ``raw_length = sequence_length + 1`` is sequence ``c``. The manifest key
``icl_task`` records the task: ``name``, its parameters, ``sequence_length``,
``loss_positions`` (target positions of the query label: ``[2N + 1]``),
``label_positions`` (all label positions), ``label_tokens`` and ``eval_splits``.

Only numpy is needed here (no jax, no tensorflow).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from repeat_scaling import run_files
from repeat_scaling.data.icl_tasks import IclTaskError, bursty_token_task, parse_spec
from repeat_scaling.data.store import MANIFEST, StoreError, StoreWriter, TokenStore
from repeat_scaling.data.vocab import EOS_ID, load_vocab_info


def write_sequence_store(
    out_dir: str | os.PathLike,
    splits: dict[str, np.ndarray],
    vocab_size: int,
    task: dict[str, Any],
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
    source: dict[str, Any] | None = None,
) -> TokenStore:
    """Write fixed-length token sequences as a store (one document per sequence).

    Args:
      out_dir: the store directory.
      splits: split name -> int array [n, L] of token ids in ``[0, vocab_size)``; must
        contain "train" and "validation"; every split has the same ``L``.
      vocab_size: number of ids (the store's vocabulary is ``tokens:vocab_size``).
      task: the manifest's ``icl_task`` dict: must hold "name", "sequence_length" (= L) and
        "loss_positions" (target positions in ``[0, L)``).
      overwrite: replace an existing store written from a different task.
      source: the manifest's "source" block (default: ``{"spec": task name}``).

    Idempotent: an existing store with the same ``icl_task`` and vocabulary is returned
    untouched (a different one is an error unless ``overwrite``).
    """
    log = log or (lambda msg: None)
    out_dir = os.path.abspath(os.fspath(out_dir))
    for key in ("name", "sequence_length", "loss_positions"):
        if key not in task:
            raise IclTaskError(
                f"icl_task has no {key!r}; it needs name, sequence_length, loss_positions"
            )
    L = int(task["sequence_length"])
    for need in ("train", "validation"):
        if need not in splits:
            raise IclTaskError(f"ICL store needs a {need!r} split; got {sorted(splits)}")
    for name, arr in splits.items():
        arr = np.asarray(arr)
        if arr.ndim != 2 or arr.shape[1] != L:
            raise IclTaskError(
                f"split {name!r} has shape {arr.shape}; expected [n, sequence_length={L}]"
            )
        if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
            raise IclTaskError(
                f"split {name!r} has ids in [{arr.min()}, {arr.max()}]; expected [0, {vocab_size})"
            )
    bad = [q for q in task["loss_positions"] if not 0 <= int(q) < L]
    if bad:
        raise IclTaskError(f"loss_positions {bad} outside [0, sequence_length={L})")
    vocab = load_vocab_info(f"tokens:{int(vocab_size)}")
    task_json = json.loads(json.dumps(task, default=run_files.json_default))
    if os.path.exists(out_dir):
        if os.path.isfile(os.path.join(out_dir, MANIFEST)):
            existing = TokenStore(out_dir)
            if existing.manifest.get("icl_task") == task_json and existing.vocab.same_vocabulary(
                vocab
            ):
                log(f"prepare: {out_dir} is up to date (same ICL task); nothing to do")
                return existing
            if not overwrite:
                raise StoreError(
                    f"{out_dir} holds a store prepared from a different task "
                    f"({existing.manifest.get('source', {}).get('spec')!r}); "
                    "pass --overwrite or choose another --out"
                )
        elif os.listdir(out_dir):
            raise StoreError(
                f"--out {out_dir} exists and is not a token store; choose another --out"
            )
        else:
            os.rmdir(out_dir)
    writer = StoreWriter(out_dir, vocab)
    try:
        for name, arr in splits.items():
            arr = np.asarray(arr)
            docs = np.concatenate([arr, np.full((len(arr), 1), EOS_ID, arr.dtype)], axis=1)
            sw = writer.split_writer(name)
            sw.write(docs.reshape(-1), np.full(len(arr), L + 1, np.int64))
        manifest = {
            "source": source or {"spec": task["name"], "description": f"ICL task {task['name']}"},
            "icl_task": task_json,
        }
        store = writer.commit(manifest, overwrite=True)
    except BaseException:
        writer.abort()
        raise
    log(
        f"prepare: wrote ICL store {out_dir} ("
        + ", ".join(f"{k} {len(v)}" for k, v in splits.items())
        + f" sequences of {L} tokens, vocab tokens:{vocab_size})"
    )
    return store


def prepare_icl_store(
    spec: str,
    out_dir: str | os.PathLike,
    seed: int = 0,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> TokenStore:
    """Prepare the store of ``icl_bursty:k=v,...`` or ``icl_regression:k=v,...``."""
    name, raw = parse_spec(spec)
    if name == "icl_bursty":
        splits, vocab_size, task = bursty_token_task(raw, seed)
    else:
        from repeat_scaling.data import icl_regression

        splits, vocab_size, task = icl_regression.token_task(raw, int(seed))
    return write_sequence_store(
        out_dir,
        splits,
        vocab_size,
        task,
        overwrite=overwrite,
        log=log,
        source={"spec": spec, "description": f"synthetic ICL task {name}", "seed": int(seed)},
    )
