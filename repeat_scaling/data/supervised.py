"""The ``supervised`` objective: (inputs, targets) examples of a downstream "pairs" store.

A pairs store (:func:`repeat_scaling.prepare_tasks.prepare_task_store`, layout in
:mod:`repeat_scaling.data.downstream`) holds one example per chunk of
``raw_length = I + T + 1`` tokens: the inputs + EOS 0-padded to ``I``, the targets + EOS
0-padded to ``T``, then the store's document EOS. :class:`PairsLayout` reads that layout
from the store manifest and cuts chunks back into their parts; the objective turns them
into model features with no randomness (the seed and slots are accepted and ignored, so
repeated chunks are identical examples):

- ``encoder_decoder``: ``encoder_input_tokens`` = the inputs (EOS included) padded to
  ``inputs_length``; ``decoder_target_tokens`` = the targets (EOS included) padded to
  ``targets_length``, ``decoder_input_tokens`` = those shifted right starting with 0, loss
  weights 1 on the targets. ``inputs_length`` / ``targets_length`` default to the store's
  ``I`` / ``T`` and may not be smaller (nothing is ever truncated here).
- ``decoder_only``: exactly the prefix-LM layout of the other objectives
  (:func:`repeat_scaling.data.features.layout_examples`): the sequence is the inputs
  stripped of their padding (so ending with EOS) followed by the targets, 0-padded to
  ``length`` (default and minimum ``I + T``); loss only on the targets;
  ``decoder_causal_attention`` = 1 on the inputs and one position beyond. A greedy decoder
  given the stripped inputs as its prompt therefore continues exactly where training
  teaches the targets to start.

``pack=True`` adds segment ids and positions (one example per row; nothing is packed
together). Imports numpy only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from repeat_scaling.data.features import ARCHS, ObjectiveError, layout_examples
from repeat_scaling.data.vocab import EOS_ID, VocabInfo


@dataclasses.dataclass(frozen=True)
class PairsLayout:
    """Where the parts of a pairs-store chunk lie: ``[0, I)`` inputs, ``[I, I+T)`` targets."""

    inputs_length: int
    targets_length: int
    task: str = ""

    @property
    def raw_length(self) -> int:
        return self.inputs_length + self.targets_length + 1

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any] | None) -> PairsLayout:
        """The layout recorded in a store manifest (one-line error when it has none)."""
        pairs = (manifest or {}).get("pairs")
        if not isinstance(pairs, dict):
            spec = ((manifest or {}).get("source") or {}).get("spec")
            raise ObjectiveError(
                f"objective 'supervised' needs a pairs store (prepare --task=...), but the "
                f"store of {spec!r} has no 'pairs' layout in its manifest"
            )
        return cls(int(pairs["inputs_length"]), int(pairs["targets_length"]), pairs.get("task", ""))

    def split(self, chunks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``chunks [n, raw_length]`` -> ``(inputs [n, I], li [n], targets [n, T], lt [n])``.

        ``li`` / ``lt`` count each part's tokens up to and including its EOS; the arrays
        are 0 after that (int32). Raises when a chunk is not a pairs example (a part or the
        chunk's end lacks its EOS: a misaligned chunk or another kind of store).
        """
        chunks = np.asarray(chunks)
        if chunks.ndim != 2 or chunks.shape[1] != self.raw_length:
            raise ObjectiveError(
                f"chunks shape {chunks.shape} must be [n, raw_length={self.raw_length}]"
            )
        chunks = chunks.astype(np.int32)
        ins = chunks[:, : self.inputs_length]
        tgs = chunks[:, self.inputs_length : -1]
        lengths = []
        for name, part in (("inputs", ins), ("targets", tgs)):
            is_eos = part == EOS_ID
            ok = is_eos.any(axis=1) & (chunks[:, -1] == EOS_ID)
            if not ok.all():
                r = int(np.flatnonzero(~ok)[0])
                raise ObjectiveError(
                    f"row {r} is not a pairs example: its {name} part (or the chunk's end) has "
                    f"no EOS; is this a pairs store with inputs_length={self.inputs_length}, "
                    f"targets_length={self.targets_length}?"
                )
            n_tok = is_eos.argmax(axis=1) + 1
            lengths.append(n_tok)
            part[np.arange(part.shape[1]) >= n_tok[:, None]] = 0
        return ins, lengths[0], tgs, lengths[1]


class SupervisedObjective:
    """See the module docstring. Build with :func:`make_supervised_objective`.

    Attributes (the interface of :class:`repeat_scaling.data.objectives.Objective`):
      name ("supervised"), arch, vocab, pack, layout (:class:`PairsLayout`), raw_length,
      inputs_length / targets_length (encoder_decoder) or length (decoder_only),
      feature_lengths, tokens_per_example, denoisers (empty).
    """

    name = "supervised"

    def __init__(
        self,
        vocab: VocabInfo,
        arch: str,
        layout: PairsLayout,
        *,
        inputs_length: int | None = None,
        targets_length: int | None = None,
        length: int | None = None,
        pack: bool = False,
    ):
        if arch not in ARCHS:
            raise ObjectiveError(f"unknown arch {arch!r}; expected one of {ARCHS}")
        self.vocab, self.arch, self.layout, self.pack = vocab, arch, layout, bool(pack)
        self.denoisers: list = []
        self.raw_length = layout.raw_length
        store = f"the pairs store of task {layout.task!r}"
        if arch == "encoder_decoder":
            if length:
                raise ObjectiveError("option length applies to decoder_only, not encoder_decoder")
            self.inputs_length = _length(
                "inputs_length", inputs_length, layout.inputs_length, store
            )
            self.targets_length = _length(
                "targets_length", targets_length, layout.targets_length, store
            )
            self.length = None
            self.feature_lengths = {
                "encoder_input_tokens": self.inputs_length,
                "decoder_input_tokens": self.targets_length,
                "decoder_target_tokens": self.targets_length,
                "decoder_loss_weights": self.targets_length,
            }
            if self.pack:
                self.feature_lengths.update(
                    encoder_segment_ids=self.inputs_length,
                    encoder_positions=self.inputs_length,
                    decoder_segment_ids=self.targets_length,
                    decoder_positions=self.targets_length,
                )
            self.tokens_per_example = self.inputs_length + self.targets_length
        else:
            if inputs_length or targets_length:
                raise ObjectiveError(
                    "options inputs_length/targets_length apply to encoder_decoder; "
                    "decoder_only takes length"
                )
            need = layout.inputs_length + layout.targets_length
            self.length = _length("length", length, need, store)
            self.inputs_length = self.targets_length = None
            names = [
                "decoder_input_tokens",
                "decoder_target_tokens",
                "decoder_loss_weights",
                "decoder_segment_ids",
                "decoder_positions",
                "decoder_causal_attention",
            ]
            self.feature_lengths = dict.fromkeys(names, self.length)
            self.tokens_per_example = self.length

    def __call__(self, chunks: np.ndarray, slots: np.ndarray, seed: int) -> dict[str, np.ndarray]:
        """``chunks [n, raw_length]`` -> ``n`` rows of features (``slots``/``seed`` unused)."""
        chunks = np.asarray(chunks)
        slots = np.asarray(slots)
        if slots.shape != (chunks.shape[0],):
            raise ObjectiveError(f"slots shape {slots.shape} must be [{chunks.shape[0]}]")
        ins, li, tgs, lt = self.layout.split(chunks)
        return layout_examples(
            ins,
            li,
            tgs,
            lt,
            arch=self.arch,
            inputs_length=self.inputs_length,
            targets_length=self.targets_length,
            length=self.length,
            pack=self.pack,
        )


def _length(name: str, value: int | None, minimum: int, store: str) -> int:
    """``value`` (None/0 = ``minimum``) checked to hold every example of the store."""
    if value is None or value == 0:
        return int(minimum)
    if not isinstance(value, int | np.integer) or isinstance(value, bool):
        raise ObjectiveError(f"{name}={value!r} must be an integer")
    if value < minimum:
        raise ObjectiveError(
            f"{name}={value} is too short for {store}, whose examples need up to {minimum} "
            f"tokens; set {name} >= {minimum} (or 0 for exactly that)"
        )
    return int(value)


def make_supervised_objective(
    vocab: VocabInfo, arch: str, *, store_manifest: dict[str, Any] | None = None, **options: Any
) -> SupervisedObjective:
    """The ``supervised`` objective for a pairs store (``store_manifest`` = its manifest).

    Options: ``inputs_length`` / ``targets_length`` (encoder_decoder) or ``length``
    (decoder_only), each 0/None for the store's own; ``pack``. Others are an error.
    """
    allowed = {"inputs_length", "targets_length", "length", "pack"}
    unknown = set(options) - allowed
    if unknown:
        raise ObjectiveError(
            f"unknown options {sorted(unknown)} for objective 'supervised'; expected "
            f"{sorted(allowed | {'store_manifest'})}"
        )
    if store_manifest is None:
        raise ObjectiveError(
            "objective 'supervised' needs store_manifest (the pairs store's manifest)"
        )
    layout = PairsLayout.from_manifest(store_manifest)
    if not isinstance(vocab, VocabInfo):
        raise ObjectiveError(f"vocab must be a VocabInfo, got {type(vocab).__name__}")
    return SupervisedObjective(vocab, arch, layout, **options)
