"""Downstream (text-to-text) evaluation on GENERATED outputs: exact match, F1, accuracy.

A run trained on a *pairs* store (``prepare --task=...``; manifest key ``"pairs"``) is
scored by greedy-decoding the answers of held-out examples and comparing the detokenised
text with the references, the way Xue et al. (2023) report SQuAD after fine-tuning.

Store layout (written by :mod:`repeat_scaling.data.downstream`): example ``c`` of a split
is store chunk ``c`` of ``raw_length = inputs_length + targets_length + 1`` tokens:
``inputs + EOS`` 0-padded to ``inputs_length``, then ``targets + EOS`` 0-padded to
``targets_length``, then the store's document EOS. The references
(``<split>.references.jsonl``: ``index``, ``inputs``, ``targets``, ``answers``) hold the
texts; ``answers`` lists every acceptable answer (SQuAD) or the one label (classification).

Generation (:class:`Generator`): ``repeat_scaling.models.decoding.greedy_decode``,
jitted once per batch shape and reused across checkpoints (only the parameters change).

- encoder-decoder: ``encoder_input_tokens`` = the inputs part as stored (the supervised
  objective feeds exactly this), the decoder starts from id 0;
- decoder-only: ``prompt_tokens`` = the inputs part (``inputs + EOS``, right-padded with
  0), decoded as the prefix LM of the ``supervised`` objective (bidirectional prefix when
  the run's features carry ``decoder_causal_attention``, else a causal prompt).

The generated ids keep the first EOS and are 0 after it; they are detokenised with the
TF-free :class:`repeat_scaling.data.vocab.Encoder` (pad/EOS skipped).

Metrics (all fractions in [0, 1], averaged over examples; SQuAD's official script reports
the same numbers x 100):

- ``downstream_em``: SQuAD v1.1 official exact match after answer normalisation
  (lower case, punctuation and the articles a/an/the removed, whitespace collapsed), the
  maximum over the reference answers;
- ``downstream_f1``: SQuAD v1.1 official token F1 on normalised whitespace tokens, maximum
  over the answers;
- ``downstream_accuracy``: classification accuracy, i.e. normalised exact match with the
  example's ``targets`` text (the label; for SQuAD the first answer, so it is <= EM);
- ``downstream_examples``: the number of examples scored (the first N of the split).

This module never imports tensorflow, seqio or tfds.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import string
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from repeat_scaling import sharding
from repeat_scaling.data.batcher import read_chunks
from repeat_scaling.data.supervised import PairsLayout
from repeat_scaling.data.vocab import Encoder

RECORD_KEYS = (
    "downstream_em",
    "downstream_f1",
    "downstream_accuracy",
    "downstream_examples",
)


class DownstreamError(ValueError):
    """A pairs store or downstream setting that cannot be used (one-line message)."""


# ----------------------------------------------------------------------------------------
# SQuAD v1.1 official metrics (evaluate-v1.1.py), on strings.
# ----------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation, drop a/an/the, collapse spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match_score(prediction: str, ground_truth: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def f1_score(prediction: str, ground_truth: str) -> float:
    """SQuAD token F1 between normalised whitespace tokens (0.0 without overlap)."""
    pred = normalize_answer(prediction).split()
    truth = normalize_answer(ground_truth).split()
    common = collections.Counter(pred) & collections.Counter(truth)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred)
    recall = same / len(truth)
    return 2 * precision * recall / (precision + recall)


def max_over_ground_truths(metric_fn, prediction: str, ground_truths: Sequence[str]) -> float:
    """The best score of ``prediction`` against any reference answer (0.0 without one)."""
    return max((metric_fn(prediction, gt) for gt in ground_truths), default=0.0)


def score(predictions: Sequence[str], references: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Record fields from predicted texts and their references (``targets``, ``answers``).

    Returns :data:`RECORD_KEYS` (metrics None when there is no example).
    """
    if len(predictions) != len(references):
        raise DownstreamError(
            f"{len(predictions)} predictions for {len(references)} references; expected equal"
        )
    n = len(predictions)
    if n == 0:
        return {k: (0 if k == "downstream_examples" else None) for k in RECORD_KEYS}
    em = f1 = acc = 0.0
    for pred, ref in zip(predictions, references):
        answers = list(ref.get("answers") or [ref["targets"]])
        em += max_over_ground_truths(exact_match_score, pred, answers)
        f1 += max_over_ground_truths(f1_score, pred, answers)
        acc += exact_match_score(pred, ref["targets"])
    return {
        "downstream_em": em / n,
        "downstream_f1": f1 / n,
        "downstream_accuracy": acc / n,
        "downstream_examples": n,
    }


# ----------------------------------------------------------------------------------------
# Settings and the pairs layout.
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DownstreamSettings:
    """Downstream evaluation knobs (evaluate flags ``--downstream_*``).

    ``examples``: the first N examples of ``split`` are scored (0 = skip downstream
    evaluation); ``batch_size``: rows per generation batch (rounded up to a multiple of the
    mesh's batch shards); ``max_decode_length``: generated tokens (0 = the store's
    ``targets_length``); ``use_cache``: KV-cache decoding (False = the reference path).
    """

    examples: int = 256
    batch_size: int = 32
    max_decode_length: int = 0
    split: str = "validation"
    use_cache: bool = True

    def __post_init__(self):
        for name, low in (("examples", 0), ("batch_size", 1), ("max_decode_length", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise DownstreamError(f"downstream_{name}={v!r}; expected an int >= {low}")
        if not isinstance(self.split, str) or not self.split:
            raise DownstreamError(f"downstream_split={self.split!r}; expected a split name")

    @classmethod
    def from_overrides(cls, d: dict[str, Any]) -> DownstreamSettings:
        """Settings from ``{"downstream_examples": "64", ...}`` (prefix optional)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw: dict[str, Any] = {}
        for key, value in d.items():
            name = key.removeprefix("downstream_")
            if name not in names:
                known = sorted(f"downstream_{n}" for n in names)
                raise DownstreamError(f"unknown downstream setting {key!r}; known: {known}")
            if name == "split":
                kw[name] = str(value)
            elif name == "use_cache":
                kw[name] = _to_bool(f"downstream_{name}", value)
            else:
                try:
                    kw[name] = int(value)
                except (TypeError, ValueError):
                    raise DownstreamError(f"downstream_{name}={value!r}; expected an int") from None
        return cls(**kw)


def _to_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise DownstreamError(f"{key}={value!r}; expected true or false")


def pairs_layout(manifest: dict[str, Any]) -> PairsLayout | None:
    """The pairs layout of a store manifest (:class:`repeat_scaling.data.supervised.
    PairsLayout`), or None when the store is not a pairs store."""
    if not manifest.get("pairs"):
        return None
    try:
        layout = PairsLayout.from_manifest(manifest)
    except (KeyError, TypeError, ValueError) as e:
        raise DownstreamError(f"store manifest 'pairs' entry is malformed ({e})") from None
    if layout.inputs_length < 1 or layout.targets_length < 1:
        raise DownstreamError(f"store manifest 'pairs' has bad lengths {manifest['pairs']}")
    return layout


def read_examples(split, layout: PairsLayout, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``(inputs [n, inputs_length], targets [n, targets_length])`` int32 of the first
    ``n = min(count, available)`` examples of a pairs-store split."""
    available = split.num_tokens // layout.raw_length
    n = min(int(count), available)
    if n < 1:
        raise DownstreamError(
            f"pairs split has {split.num_tokens} tokens, fewer than one example "
            f"({layout.raw_length} tokens)"
        )
    try:
        inputs, _, targets, _ = layout.split(read_chunks(split, np.arange(n), layout.raw_length))
    except ValueError as e:
        raise DownstreamError(str(e)) from None
    return inputs, targets


def load_split_references(
    store_dir: str, split_name: str, targets: np.ndarray, encoder: Encoder
) -> list[dict[str, Any]]:
    """References of the first ``len(targets)`` examples, by example index.

    From ``repeat_scaling.data.downstream.load_references`` (the texts written at
    preparation). Where the store has no references file, the detokenised stored targets
    are the single answer.
    """
    from repeat_scaling.data.downstream import load_references, references_path

    refs: dict[int, dict[str, Any]] = {}
    if os.path.isfile(references_path(store_dir, split_name)):
        refs = {int(r["index"]): r for r in load_references(store_dir, split_name)}
    out = []
    for i, row in enumerate(targets):
        r = refs.get(i)
        if r is None:
            text = encoder.decode(row)
            r = {"index": i, "targets": text, "answers": [text]}
        out.append(r)
    return out


# ----------------------------------------------------------------------------------------
# Generation.
# ----------------------------------------------------------------------------------------


class Generator:
    """Batched greedy decoding of one model on a mesh, jitted once per shape.

    Built on a :class:`repeat_scaling.eval.runner.ModelRunner` (its graph, current
    parameters, mesh and batch placement), so ``runner.load(model)`` for the next
    checkpoint reuses the compiled decoder. ``vocab_size``: the store's real vocabulary
    size; the argmax never picks the embedding table's padding rows beyond it.
    """

    def __init__(self, runner, *, eos_id: int = 1, vocab_size: int | None = None):
        from repeat_scaling.models import decoding

        self.runner = runner
        self.eos_id = int(eos_id)
        self.vocab_size = None if vocab_size is None else int(vocab_size)
        self._fns: dict[tuple, Any] = {}
        self._decoding = decoding

    def _fn(self, length: int, use_cache: bool, prefix_lm: bool):
        key = (length, use_cache, prefix_lm)
        if key not in self._fns:
            graphdef, decoding, eos = self.runner.graphdef, self._decoding, self.eos_id
            vocab_size = self.vocab_size

            def decode(state, feats):
                model = nnx.merge(graphdef, state)
                return decoding.greedy_decode(
                    model,
                    feats,
                    max_decode_length=length,
                    eos_id=eos,
                    use_cache=use_cache,
                    prefix_lm=prefix_lm,
                    vocab_size=vocab_size,
                )

            self._fns[key] = jax.jit(decode)
        return self._fns[key]

    def generate(
        self,
        inputs: np.ndarray,
        *,
        max_decode_length: int,
        batch_size: int,
        use_cache: bool = True,
        prefix_lm: bool = True,
    ) -> np.ndarray:
        """Generated ids int32 [n, max_decode_length] for stored inputs [n, Li] (see the
        module docstring for the per-architecture features). The last batch is padded
        with ``[EOS]`` rows, so every batch has one shape."""
        r = self.runner
        shards = max(1, int(r.batch_shards))
        bs = -(-int(batch_size) // shards) * shards
        inputs = np.asarray(inputs, np.int32)
        key = "encoder_input_tokens" if r.cfg.arch == "encoder_decoder" else "prompt_tokens"
        fn = self._fn(int(max_decode_length), bool(use_cache), bool(prefix_lm))
        out = []
        for start in range(0, len(inputs), bs):
            part = inputs[start : start + bs]
            batch = np.zeros((bs, inputs.shape[1]), np.int32)
            batch[:, 0] = self.eos_id
            batch[: len(part)] = part
            with sharding.use_mesh(r.mesh, r.rules):
                ids = fn(r.state, r._put({key: batch}))
            out.append(np.asarray(jax.device_get(ids), np.int32)[: len(part)])
        return np.concatenate(out, axis=0)


def check_split(store, settings: DownstreamSettings) -> None:
    """One-line error unless the store has the settings' split."""
    if settings.split not in store.split_names:
        raise DownstreamError(
            f"downstream_split={settings.split!r}; the store has {store.split_names}"
        )


class DownstreamTask:
    """The scored examples of a pairs store (read once) and their evaluation per model.

    ``encoder_length``: the run's encoder input length (encoder-decoder; the stored
    inputs are 0-padded or truncated to it), 0 to keep the store's ``inputs_length``.
    """

    def __init__(self, store, settings: DownstreamSettings, encoder_length: int = 0):
        layout = pairs_layout(store.manifest)
        if layout is None:
            raise DownstreamError(f"store {store.path} has no 'pairs' layout in its manifest")
        check_split(store, settings)
        self.layout, self.settings = layout, settings
        self.encoder = Encoder(store.vocab)
        inputs, targets = read_examples(store.split(settings.split), layout, settings.examples)
        if encoder_length and encoder_length != inputs.shape[1]:
            fitted = np.zeros((len(inputs), encoder_length), np.int32)
            w = min(encoder_length, inputs.shape[1])
            fitted[:, :w] = inputs[:, :w]
            inputs = fitted
        self.inputs = inputs
        self.references = load_split_references(
            str(store.path), settings.split, targets, self.encoder
        )

    def evaluate(
        self, generator: Generator, *, prefix_lm: bool = True, samples: int = 3
    ) -> dict[str, Any]:
        """Generate, detokenise and score (:data:`RECORD_KEYS`), plus
        ``downstream_samples``: the first ``samples`` (prediction, targets) pairs."""
        s = self.settings
        ids = generator.generate(
            self.inputs,
            max_decode_length=s.max_decode_length or self.layout.targets_length,
            batch_size=s.batch_size,
            use_cache=s.use_cache,
            prefix_lm=prefix_lm,
        )
        predictions = [self.encoder.decode(row) for row in ids]
        out = score(predictions, self.references)
        out["downstream_samples"] = [
            {"prediction": p, "targets": r["targets"]}
            for p, r in zip(predictions[:samples], self.references)
        ]
        return out
