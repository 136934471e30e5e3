"""Pretraining objectives: raw store chunks -> T5X model features (numpy, no jax).

Every objective is a pure function of ``(chunks, slots, seed)``: example ``i`` draws its
randomness from ``numpy.random.Generator(Philox(key=(seed << 64) | slot_i))``, so each
repetition of a repeated chunk (a different slot) gets fresh noise, and any batch can be
rebuilt from the step number alone.

Objectives (``name``) and architectures (``arch``):

- ``span_corruption`` (T5 MLM; both archs): ``num_noise = round(L*density)`` clamped to
  ``[1, L-1]``, ``num_spans = max(round(num_noise/mean_span), 1)``; the ``L`` tokens are cut
  into alternating non-noise / noise spans (starting with non-noise) with a uniformly
  random segmentation; inputs keep the non-noise tokens and replace each noise span by
  one sentinel, targets are each sentinel followed by its span; EOS ends both. Sentinel
  ``k`` is extra id ``k`` = ``vocab_size - 1 - k`` (T5 ``random_spans_noise_mask`` and
  ``noise_span_to_unique_sentinel`` semantics; Python/TF round-half-to-even).
- ``ul2``: a mixture of denoisers (R/X = span corruption with their own density and span
  length, S = prefix LM), chosen per example at configurable rates; the inputs start with
  a mode token: ``[NLU]`` (R), ``[NLG]`` (X), ``[S2S]`` (S), which are the three LOWEST
  extra ids (``sentinel(extra_ids-1)``, ``(extra_ids-2)``, ``(extra_ids-3)``;
  :func:`mode_token_id`, which the seqio UL2 tasks use too) and are never used as
  sentinels (a configuration needing more sentinels than remain is an error).
- ``prefix_lm`` (both archs): split point uniform, inputs = prefix + EOS, targets =
  continuation + EOS.
- ``causal_lm`` (decoder-only): targets = the chunk, inputs = targets shifted right.

Decoder-only forms of the input/target objectives are T5X prefix LMs
(``PrefixLMFeatureConverter``): one sequence ``inputs ++ targets``, loss only on the
targets, ``decoder_causal_attention`` = 1 on the inputs and one position to their right.

Packing (``pack=True``): one slot still makes exactly one row. The chunk is split after
every EOS into its documents (each keeps its EOS as its own end-of-sequence; documents
with fewer than 2 tokens are merged into a neighbour), every document becomes its own
example with its own noise, and the examples are packed into the row with segment ids
``1..k`` and positions. If the packed examples of a chunk would overflow the row (only
possible for chunks made of many tiny documents, whose per-document sentinels and EOS
cost more than the whole chunk's), the row falls back to the unpacked form (one
example over the whole chunk, segment id 1). Each extra document costs about one EOS plus span
rounding per sequence, so with packing the raw length is chosen to fit the feature
lengths minus ``pack_slack`` (default 8) positions, and the default span-corruption
``targets_length`` is T5's rounded up to a multiple of 8 plus 8 (inputs 512 -> 128).
Without packing, the chunk's EOS tokens are
ordinary tokens (T5's concatenated-documents semantics) and every row holds one example.

This module holds the objective registry (``OBJECTIVES``, ``OBJECTIVE_ARCHS``,
:func:`make_objective`) and :class:`Objective`; its parts live in
:mod:`~repeat_scaling.data.span_corruption` (T5 noise masks and sentinels),
:mod:`~repeat_scaling.data.ul2_denoisers` (denoisers, mode tokens) and
:mod:`~repeat_scaling.data.slot_rng` (per-example randomness).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from repeat_scaling.data import packing
from repeat_scaling.data.features import ARCHS, ObjectiveError, layout_examples
from repeat_scaling.data.slot_rng import SlotRng
from repeat_scaling.data.span_corruption import (
    _check_span_params,
    _round,
    noise_counts,
    noise_mask_batch,
    span_corrupt_batch,
    span_corruption_lengths,
    span_uniforms_needed,
)
from repeat_scaling.data.ul2_denoisers import (
    NUM_MODE_TOKENS,
    Denoiser,
    default_ul2_denoisers,
    mode_token_id,
    parse_denoisers,
)
from repeat_scaling.data.vocab import VocabInfo

#: The objectives of :class:`Objective` (denoising and language modelling of store chunks).
CHUNK_OBJECTIVES = ("span_corruption", "ul2", "causal_lm", "prefix_lm")
#: The objectives whose factory reads the store's manifest (``store_manifest=``): the pairs
#: layout of ``supervised`` (:mod:`repeat_scaling.data.supervised`) and the task of ``icl``
#: (:mod:`repeat_scaling.data.icl_tasks`).
MANIFEST_OBJECTIVES = ("supervised", "icl")
#: Every objective :func:`make_objective` builds.
OBJECTIVES = (*CHUNK_OBJECTIVES, *MANIFEST_OBJECTIVES)
#: The model architectures a training run may pair with each objective.
OBJECTIVE_ARCHS = {
    "span_corruption": ("encoder_decoder",),
    "causal_lm": ("decoder_only",),
    "prefix_lm": ("encoder_decoder", "decoder_only"),
    "ul2": ("encoder_decoder", "decoder_only"),
    "supervised": ("encoder_decoder", "decoder_only"),
    "icl": ("decoder_only",),
}
PACK_SLACK = 8  # positions per sequence kept free for the per-document overhead of packing


class Objective:
    """A configured objective; see the module docstring. Build with :func:`make_objective`.

    Attributes:
      name, arch, vocab, pack: the configuration.
      raw_length: store tokens per chunk (one chunk per slot).
      feature_lengths: feature name -> row length.
      tokens_per_example: processed positions per row (sum over the model's sequences).
      denoisers: list of :class:`Denoiser` (one for span_corruption / prefix_lm).
    """

    def __init__(
        self,
        name: str,
        vocab: VocabInfo,
        arch: str,
        *,
        inputs_length: int | None = None,
        targets_length: int | None = None,
        length: int | None = None,
        noise_density: float = 0.15,
        mean_noise_span_length: float = 3.0,
        denoisers: Sequence[dict[str, Any]] | None = None,
        pack: bool = False,
        pack_slack: int = PACK_SLACK,
    ):
        if name not in CHUNK_OBJECTIVES:
            raise ObjectiveError(f"unknown objective {name!r}; expected one of {CHUNK_OBJECTIVES}")
        if arch not in ARCHS:
            raise ObjectiveError(f"unknown arch {arch!r}; expected one of {ARCHS}")
        if not isinstance(vocab, VocabInfo):
            raise ObjectiveError(f"vocab must be a VocabInfo, got {type(vocab).__name__}")
        self.name, self.vocab, self.arch, self.pack = name, vocab, arch, bool(pack)
        if not isinstance(pack_slack, int | np.integer) or pack_slack < 0:
            raise ObjectiveError(f"pack_slack={pack_slack!r} must be an integer >= 0")
        self.pack_slack = int(pack_slack) if self.pack else 0
        if name == "causal_lm" and arch != "decoder_only":
            raise ObjectiveError("objective 'causal_lm' needs arch='decoder_only'")
        if arch == "encoder_decoder":
            if not isinstance(inputs_length, int | np.integer) or inputs_length < 2:
                raise ObjectiveError(
                    f"inputs_length={inputs_length!r} must be an integer >= 2 for encoder_decoder"
                )
            if name == "span_corruption" and targets_length is None:
                _, targets_length = span_corruption_lengths(
                    int(inputs_length), noise_density, mean_noise_span_length
                )
                if pack:
                    # Room for the per-document EOS and span rounding of packed documents.
                    targets_length = -(-targets_length // 8) * 8 + 8
            if not isinstance(targets_length, int | np.integer) or targets_length < 2:
                raise ObjectiveError(
                    f"targets_length={targets_length!r} must be an integer >= 2 for encoder_decoder"
                )
            self.inputs_length, self.targets_length = int(inputs_length), int(targets_length)
            self.length = None
        else:
            if not isinstance(length, int | np.integer) or length < 2:
                raise ObjectiveError(f"length={length!r} must be an integer >= 2 for decoder_only")
            self.length = int(length)
            self.inputs_length = self.targets_length = None

        self.num_sentinels = vocab.extra_ids
        if name == "span_corruption":
            _check_span_params(noise_density, mean_noise_span_length)
            self.denoisers = [
                Denoiser("R", 1.0, noise_density, mean_noise_span_length, mode_token=False)
            ]
        elif name == "prefix_lm":
            self.denoisers = [Denoiser("S", 1.0, target_fraction=0.5, mode_token=False)]
        elif name == "ul2":
            self.denoisers = parse_denoisers(
                default_ul2_denoisers() if denoisers is None else denoisers
            )
            if vocab.extra_ids < NUM_MODE_TOKENS + 1:
                raise ObjectiveError(
                    f"ul2 needs >= {NUM_MODE_TOKENS + 1} extra ids, vocab has {vocab.extra_ids}"
                )
            self.num_sentinels = vocab.extra_ids - NUM_MODE_TOKENS
        else:
            self.denoisers = []
        if denoisers is not None and name != "ul2":
            raise ObjectiveError(f"option 'denoisers' only applies to 'ul2', not {name!r}")
        rates = np.array([d.rate for d in self.denoisers], dtype=np.float64)
        self._cum_rates = np.cumsum(rates / rates.sum()) if len(rates) else rates
        self.raw_length = self._compute_raw_length()
        for d in self.denoisers:
            if d.is_span:
                _, s = noise_counts(self.raw_length, d.noise_density, d.mean_noise_span_length)
                if s > self.num_sentinels:
                    raise ObjectiveError(
                        f"denoiser {d.describe()} needs {s} sentinels per example at raw length "
                        f"{self.raw_length} but only {self.num_sentinels} remain "
                        f"({vocab.extra_ids} extra ids"
                        + (
                            f", {NUM_MODE_TOKENS} reserved for mode tokens)"
                            if name == "ul2"
                            else ")"
                        )
                    )
        self.feature_lengths = self._feature_lengths()
        if arch == "encoder_decoder":
            self.tokens_per_example = self.inputs_length + self.targets_length
        else:
            self.tokens_per_example = self.length

    # ------------------------------------------------------------------ lengths
    def mode_token(self, d: Denoiser) -> int | None:
        """Mode token id of a denoiser (None when the objective uses none)."""
        if not d.mode_token:
            return None
        return mode_token_id(self.vocab, d.name)

    def _split_max_target(self, d: Denoiser, L: int) -> int:
        return max(1, min(L - 1, _round(2 * d.target_fraction * L)))

    def _example_lengths(self, d: Denoiser, L: int) -> tuple[int, int]:
        """Worst-case (inputs, targets) lengths of denoiser ``d`` on ``L`` raw tokens."""
        mode = 1 if d.mode_token else 0
        if d.is_span:
            n, s = noise_counts(L, d.noise_density, d.mean_noise_span_length)
            return mode + L - n + s + 1, n + s + 1
        # Split: continuation t in [1, t_max]; inputs longest at t=1, targets at t_max.
        return mode + L - 1 + 1, self._split_max_target(d, L) + 1

    def _fits(self, L: int) -> bool:
        if self.name == "causal_lm":
            return L <= self.length
        slack = self.pack_slack
        for d in self.denoisers:
            li, lt = self._example_lengths(d, L)
            if self.arch == "encoder_decoder":
                if li > self.inputs_length - slack or lt > self.targets_length - slack:
                    return False
            else:
                mode = 1 if d.mode_token else 0
                if d.is_span:
                    total = li + lt
                else:
                    total = mode + L + 2
                if total > self.length - slack:
                    return False
        return True

    def _compute_raw_length(self) -> int:
        if self.name == "causal_lm":
            return self.length
        if self.name == "span_corruption" and self.arch == "encoder_decoder" and not self.pack:
            d = self.denoisers[0]
            raw, _ = span_corruption_lengths(
                self.inputs_length, d.noise_density, d.mean_noise_span_length
            )
            if self._fits(raw):
                return raw
        limit = self.length if self.arch == "decoder_only" else self.inputs_length
        best = 0
        for L in range(2, 4 * limit + 8):
            if self._fits(L):
                best = L
            elif best:
                break
        if best < 2:
            what = (
                f"length={self.length}"
                if self.arch == "decoder_only"
                else f"inputs_length={self.inputs_length}, targets_length={self.targets_length}"
            )
            raise ObjectiveError(
                f"{what} too short for objective {self.name!r} ({self.arch}): no raw length >= 2 "
                "fits every denoiser"
            )
        return best

    def _feature_lengths(self) -> dict[str, int]:
        if self.arch == "encoder_decoder":
            i, t = self.inputs_length, self.targets_length
            f = {
                "encoder_input_tokens": i,
                "decoder_input_tokens": t,
                "decoder_target_tokens": t,
                "decoder_loss_weights": t,
            }
            if self.pack:
                f.update(
                    encoder_segment_ids=i,
                    encoder_positions=i,
                    decoder_segment_ids=t,
                    decoder_positions=t,
                )
            return f
        names = [
            "decoder_input_tokens",
            "decoder_target_tokens",
            "decoder_loss_weights",
            "decoder_segment_ids",
            "decoder_positions",
        ]
        if self.name != "causal_lm":
            names.append("decoder_causal_attention")
        return dict.fromkeys(names, self.length)

    # ------------------------------------------------------------------ examples
    def _choose(self, g: np.random.Generator) -> int:
        if len(self.denoisers) == 1:
            return 0
        return int(
            np.searchsorted(self._cum_rates, g.random(), side="right").clip(
                max=len(self.denoisers) - 1
            )
        )

    def choices(self, slots: np.ndarray, seed: int) -> np.ndarray:
        """Index into ``self.denoisers`` of the (first) example of each slot's row."""
        rng = SlotRng()
        return np.array([self._choose(rng.reset(seed, s)) for s in np.asarray(slots)], np.int64)

    def _example(self, tokens: np.ndarray, d: Denoiser, g: np.random.Generator):
        """One (inputs, targets) example from ``tokens`` (a document or a chunk)."""
        L = len(tokens)
        mode = self.mode_token(d)
        if d.is_span:
            u = g.random(span_uniforms_needed(L, d.noise_density, d.mean_noise_span_length))
            mask = noise_mask_batch(u[None], L, d.noise_density, d.mean_noise_span_length)
            i, t = span_corrupt_batch(tokens[None], mask, self.vocab, mode)
            return i[0], t[0]
        return self._split_example(tokens, d, int(g.integers(1, self._split_max_target(d, L) + 1)))

    def _split_example(self, tokens: np.ndarray, d: Denoiser, t: int):
        """Prefix-LM example: the last ``t`` tokens are the targets."""
        L, mode = len(tokens), self.mode_token(d)
        eos = np.array([self.vocab.eos_id], tokens.dtype)
        head = [np.array([mode], tokens.dtype)] if mode is not None else []
        return np.concatenate([*head, tokens[: L - t], eos]), np.concatenate([tokens[L - t :], eos])

    def __call__(self, chunks: np.ndarray, slots: np.ndarray, seed: int) -> dict[str, np.ndarray]:
        """``chunks [n, raw_length]`` of slots ``[n]`` -> exactly ``n`` rows of features."""
        chunks = np.asarray(chunks)
        slots = np.asarray(slots)
        if chunks.ndim != 2 or chunks.shape[1] != self.raw_length:
            raise ObjectiveError(
                f"chunks shape {chunks.shape} must be [n, raw_length={self.raw_length}]"
            )
        if slots.shape != (chunks.shape[0],):
            raise ObjectiveError(f"slots shape {slots.shape} must be [{chunks.shape[0]}]")
        chunks = chunks.astype(np.int32)
        if self.name == "causal_lm":
            return self._causal(chunks)
        if self.pack:
            return self._packed(chunks, slots, seed)
        return self._unpacked(chunks, slots, seed)

    # ------------------------------------------------------------------ causal LM
    def _causal(self, chunks: np.ndarray) -> dict[str, np.ndarray]:
        n, L = chunks.shape
        eos = self.vocab.eos_id
        if self.pack:
            # Segment k starts after the (k-1)th EOS; the last token never starts one.
            is_eos = chunks == eos
            starts = np.zeros_like(is_eos)
            starts[:, 0] = True
            starts[:, 1:] = is_eos[:, :-1]
            seg = np.cumsum(starts, axis=1).astype(np.int32)
            idx = np.broadcast_to(np.arange(L), (n, L))
            seg_start = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
            pos = (idx - seg_start).astype(np.int32)
        else:
            starts = np.zeros((n, L), bool)
            starts[:, 0] = True
            seg = np.ones((n, L), np.int32)
            pos = np.broadcast_to(np.arange(L, dtype=np.int32), (n, L)).copy()
        inputs = np.zeros_like(chunks)
        inputs[:, 1:] = chunks[:, :-1]
        inputs[starts] = 0
        return {
            "decoder_input_tokens": inputs,
            "decoder_target_tokens": chunks,
            "decoder_loss_weights": np.ones((n, L), np.float32),
            "decoder_segment_ids": seg,
            "decoder_positions": pos,
        }

    # ------------------------------------------------------------------ unpacked
    def _unpacked(self, chunks: np.ndarray, slots: np.ndarray, seed: int):
        n, L = chunks.shape
        rng = SlotRng()
        which = np.zeros(n, np.int64)
        draws: list[Any] = [None] * n
        needed = [
            span_uniforms_needed(L, d.noise_density, d.mean_noise_span_length) if d.is_span else 0
            for d in self.denoisers
        ]
        for r, slot in enumerate(slots):  # all of a row's draws, in order, from its own key
            g = rng.reset(seed, slot)
            k = which[r] = self._choose(g)
            d = self.denoisers[k]
            if d.is_span:
                draws[r] = g.random(needed[k])
            else:
                draws[r] = int(g.integers(1, self._split_max_target(d, L) + 1))
        li = np.zeros(n, np.int64)
        lt = np.zeros(n, np.int64)
        wi = max(self._example_lengths(d, L)[0] for d in self.denoisers)
        wt = max(self._example_lengths(d, L)[1] for d in self.denoisers)
        ins = np.zeros((n, wi), np.int32)
        tgs = np.zeros((n, wt), np.int32)
        for k, d in enumerate(self.denoisers):
            rows = np.flatnonzero(which == k)
            if not rows.size:
                continue
            if d.is_span:
                u = np.stack([draws[r] for r in rows])
                mask = noise_mask_batch(u, L, d.noise_density, d.mean_noise_span_length)
                i, t = span_corrupt_batch(chunks[rows], mask, self.vocab, self.mode_token(d))
                ins[rows, : i.shape[1]] = i
                tgs[rows, : t.shape[1]] = t
                li[rows], lt[rows] = i.shape[1], t.shape[1]
            else:
                for r in rows:
                    i, t = self._split_example(chunks[r], d, draws[r])
                    ins[r, : len(i)] = i
                    tgs[r, : len(t)] = t
                    li[r], lt[r] = len(i), len(t)
        return self._layout(ins, li, tgs, lt)

    def _layout(self, ins, li, tgs, lt) -> dict[str, np.ndarray]:
        """Vectorised layout of one example per row (lengths ``li``/``lt`` per row)."""
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

    # ------------------------------------------------------------------ packed
    def _packed(self, chunks: np.ndarray, slots: np.ndarray, seed: int):
        eos = self.vocab.eos_id
        rng = SlotRng()
        # 1. Per row, in order: split into documents, choose a denoiser and draw its noise.
        jobs: list[list[tuple[int, np.ndarray, Any]]] = []
        for chunk, slot in zip(chunks, slots):
            g = rng.reset(seed, slot)
            row = []
            for piece in packing.split_documents(chunk, eos):
                k = self._choose(g)
                d = self.denoisers[k]
                body = piece[:-1] if (piece[-1] == eos and len(piece) > 1) else piece
                if d.is_span:
                    m = span_uniforms_needed(len(body), d.noise_density, d.mean_noise_span_length)
                    draw = g.random(m)
                else:
                    draw = int(g.integers(1, self._split_max_target(d, len(body)) + 1))
                row.append((k, body, draw))
            jobs.append(row)
        # 2. Corrupt all documents of equal length and denoiser together (vectorised).
        results: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for r, row in enumerate(jobs):
            for p, (k, body, draw) in enumerate(row):
                d = self.denoisers[k]
                if d.is_span:
                    groups.setdefault((k, len(body)), []).append((r, p))
                else:
                    results[r, p] = self._split_example(body, d, draw)
        for (k, length), members in groups.items():
            d = self.denoisers[k]
            u = np.stack([jobs[r][p][2] for r, p in members])
            toks = np.stack([jobs[r][p][1] for r, p in members])
            mask = noise_mask_batch(u, length, d.noise_density, d.mean_noise_span_length)
            ins, tgs = span_corrupt_batch(toks, mask, self.vocab, self.mode_token(d))
            for (r, p), i, t in zip(members, ins, tgs):
                results[r, p] = (i, t)
        # 3. Pack; a row that would overflow falls back to one whole-chunk example.
        examples = [[results[r, p] for p in range(len(row))] for r, row in enumerate(jobs)]
        for r, ex in enumerate(examples):
            if self._overflows(ex):
                g = rng.reset(seed, slots[r])
                d = self.denoisers[self._choose(g)]
                examples[r] = [self._example(chunks[r], d, g)]
        return self._pack_layout(examples)

    def _overflows(self, examples) -> bool:
        li = sum(len(i) for i, _ in examples)
        lt = sum(len(t) for _, t in examples)
        if self.arch == "encoder_decoder":
            return li > self.inputs_length or lt > self.targets_length
        return li + lt > self.length

    def _pack_layout(self, examples) -> dict[str, np.ndarray]:
        """Vectorised layout of packed rows (``examples[r]`` = row r's (inputs, targets))."""
        if self.arch == "encoder_decoder":
            e = packing.pack_rows([[i for i, _ in ex] for ex in examples], self.inputs_length)
            d = packing.pack_rows([[t for _, t in ex] for ex in examples], self.targets_length)
            tgt, seg, pos = d["tokens"], d["segment_ids"], d["positions"]
            dec_in = np.zeros_like(tgt)
            dec_in[:, 1:] = tgt[:, :-1]
            dec_in[(pos == 0) | (seg == 0)] = 0  # every segment starts with 0
            return {
                "encoder_input_tokens": e["tokens"],
                "decoder_input_tokens": dec_in,
                "decoder_target_tokens": tgt,
                "decoder_loss_weights": (seg > 0).astype(np.float32),
                "encoder_segment_ids": e["segment_ids"],
                "encoder_positions": e["positions"],
                "decoder_segment_ids": seg,
                "decoder_positions": pos,
            }
        seqs = [[np.concatenate([i, t]) for i, t in ex] for ex in examples]
        in_len = np.array([len(i) for ex in examples for i, _ in ex] + [0], np.int64)
        p = packing.pack_rows(seqs, self.length)
        seq, seg, pos = p["tokens"], p["segment_ids"], p["positions"]
        li = in_len[p["example_index"]]  # index -1 (padding) reads the trailing 0
        real = seg > 0
        dec_in = np.zeros_like(seq)
        dec_in[:, 1:] = seq[:, :-1]
        dec_in[(pos == 0) | ~real] = 0
        return {
            "decoder_input_tokens": dec_in,
            "decoder_target_tokens": seq,
            "decoder_loss_weights": ((pos >= li) & real).astype(np.float32),
            "decoder_segment_ids": seg,
            "decoder_positions": pos,
            "decoder_causal_attention": ((pos <= li) & real).astype(np.int32),
        }


def make_objective(name: str, vocab: VocabInfo, arch: str, **options: Any) -> Objective:
    """Build an :class:`Objective`; unknown options are an error naming them.

    ``icl`` (fixed-length in-context-learning sequences, :mod:`repeat_scaling.data.icl_objective`)
    takes its own options; so does ``supervised`` (the (inputs, targets) examples of a
    downstream task's pairs store, :mod:`repeat_scaling.data.supervised`), which needs
    ``store_manifest``.
    """
    if name == "icl":
        from repeat_scaling.data.icl_objective import make_icl_objective

        return make_icl_objective(vocab, arch, **options)
    if name == "supervised":
        from repeat_scaling.data.supervised import make_supervised_objective

        return make_supervised_objective(vocab, arch, **options)
    allowed = {
        "inputs_length",
        "targets_length",
        "length",
        "noise_density",
        "mean_noise_span_length",
        "denoisers",
        "pack",
        "pack_slack",
    }
    unknown = set(options) - allowed
    if unknown:
        raise ObjectiveError(
            f"unknown objective options {sorted(unknown)}; expected {sorted(allowed)}"
        )
    return Objective(name, vocab, arch, **options)
