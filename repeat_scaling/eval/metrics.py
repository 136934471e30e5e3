"""Metrics of one model (one checkpoint): losses, copying, in-context learning, probes.

All losses are natural-log cross-entropy in nats per target token, averaged over the
tokens that carry loss weight; accuracies are the fraction of those tokens whose argmax
prediction equals the target. "Position" is the 0-based index of a target token in its
sequence (decoder targets), i.e. the loss at position p predicts token p from the p
tokens before it.

Per architecture (``arch`` of the ModelConfig):

======================  ====================================  ==================================
metric                  decoder_only                          encoder_decoder (T5)
======================  ====================================  ==================================
test_loss / accuracy    held-out validation examples of the   same, i.e. the span-corruption
                        run's objective (causal / prefix LM)  loss on held-out data (Xue et al.)
repeated_loss           same objective on chunks of the       same
                        repeated subset
unique_seen_loss        same objective on unique chunks       same
                        already consumed at this step
copy_loss               loss on the last of k copies of a     encoder reads k-1 copies, the
                        held-out passage in one context       decoder writes the k-th; loss on it
random_repeat_loss      loss on the 2nd copy of a random      encoder reads the random sequence,
                        token sequence [R, R]                 decoder writes it again
loss_by_position,       causal LM loss per position on        span-corruption target positions
icl_score               held-out text of the full context     (decoder length is short)
prefix_matching         decoder self-attention on repeated    same, decoder self-attention
                        random tokens                         (encoder input = EOS only);
                                                              plus cross_prefix_matching_heads
previous_token          self-attention on held-out text       decoder self-attention on held-out
                                                              span-corruption targets
copying_score           OV circuit of every self-attention    decoder self-attention heads
                        head                                  (cross-attention reads encoder
                                                              states, not embeddings: not scored)
======================  ====================================  ==================================

Context-length rules (documented, recorded in the results where they matter):

- copy: with context ``C`` (decoder length; for T5 the encoder length holds k-1 copies),
  passage length ``p = C // k``; if ``p < copy_min_passage`` then ``k`` drops to
  ``max(2, C // copy_min_passage)``. The k actually used is ``copy_repeats_used``.
  Passages are the first ``p`` tokens of held-out documents at least ``p`` long (the
  paper's "first paragraph of a book"), else consecutive held-out chunks.
- random repeat: random sequence length ``n = min(random_repeat_length or C // 2, C // 2)``
  of tokens drawn uniformly (with replacement) from the probe candidates.
- ICL: late = min(icl_late (500), L - 1), early = min(icl_early (50), late // 2), recorded
  as ``icl_positions = [early, late]`` (with packed T5 targets, each moves down to the
  nearest position that has tokens).
- probes: period 25, 4 repeats, BOS first (101 tokens); when the context is shorter,
  repeats drop to fit (at least 2) and then the period shrinks.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from repeat_scaling import models, sharding
from repeat_scaling.eval import probes
from repeat_scaling.models import losses
from repeat_scaling.models.config import ModelConfig

PAD_ID, EOS_ID = 0, 1


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """Evaluator knobs (``--eval_config`` JSON or ``key=value,...`` overrides)."""

    batch_size: int = 8  # rows per evaluation batch (a multiple of the mesh's batch shards)
    test_batches: int = 4  # held-out batches for test loss/accuracy
    memorisation_examples: int = 32  # chunks for repeated_loss and unique_seen_loss each
    copy_repeats: int = 11  # k copies of a passage (Hernandez et al.)
    copy_min_passage: int = 16
    copy_examples: int = 8
    random_repeat_length: int = 0  # 0: half the context
    random_repeat_examples: int = 8
    icl_early: int = 50
    icl_late: int = 500
    icl_examples: int = 16
    probe_sequences: int = 10
    probe_period: int = 25
    probe_repeats: int = 4
    probe_exclude_fraction: float = 0.01
    previous_token_length: int = 128  # real-text window for the previous-token score
    frequency_tokens: int = 4_000_000  # train tokens counted for probe token frequencies
    seed: int = 0

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "probe_exclude_fraction":
                if not 0.0 <= v < 0.5:
                    raise ValueError(f"eval_config {f.name}={v!r}; expected a fraction in [0, 0.5)")
            elif f.name in ("random_repeat_length", "seed"):
                if not isinstance(v, int) or v < 0:
                    raise ValueError(f"eval_config {f.name}={v!r}; expected an int >= 0")
            elif not isinstance(v, int) or v < 1:
                raise ValueError(f"eval_config {f.name}={v!r}; expected an int >= 1")
        if self.copy_repeats < 2:
            raise ValueError(f"eval_config copy_repeats={self.copy_repeats}; expected >= 2")

    @classmethod
    def from_overrides(cls, d: dict[str, Any]) -> EvalSettings:
        names = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"unknown eval_config key {unknown[0]!r}; known: {sorted(names)}")
        kw = {}
        for k, v in d.items():
            want = float if k == "probe_exclude_fraction" else int
            try:
                kw[k] = want(v) if not isinstance(v, bool) else v
            except (TypeError, ValueError):
                what = "a float" if want is float else "an int"
                raise ValueError(f"eval_config {k}={v!r}; expected {what}") from None
        return cls(**kw)


# ----------------------------------------------------------------------------------------
# Running the model.
# ----------------------------------------------------------------------------------------


class ModelRunner:
    """Jitted per-token loss / accuracy / attention of one model on a mesh.

    ``model`` is an NNX module whose parameters are already placed on ``mesh`` (as
    ``repeat_scaling.train.checkpointing.restore_params`` returns it). Batches are put on
    the mesh's batch sharding when the row count divides it, else replicated.
    """

    def __init__(self, model: nnx.Module, cfg: ModelConfig, mesh: Mesh, rules=None):
        self.cfg = cfg
        self.mesh = mesh
        self.rules = sharding.DEFAULT_RULES if rules is None else rules
        self.graphdef, self.state = nnx.split(model)
        self._batch_sharding = sharding.batch_sharding(mesh, self.rules)
        self._replicated = NamedSharding(mesh, PartitionSpec())
        spec = self._batch_sharding.spec[0] if len(self._batch_sharding.spec) else None
        axes = () if spec is None else (spec if isinstance(spec, tuple) else (spec,))
        self.batch_shards = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        graphdef = self.graphdef

        def loss_fn(state, feats):
            m = nnx.merge(graphdef, state)
            logits, _ = models.forward(m, feats, deterministic=True)
            targets = feats["decoder_target_tokens"]
            tok_loss = losses.per_token_loss(logits, targets)
            correct = losses.argmax_hits(logits, targets)
            return tok_loss.astype(jnp.float32), correct

        def attn_fn(state, feats):
            m = nnx.merge(graphdef, state)
            return attention_of(m, cfg, feats)

        self._loss = jax.jit(loss_fn)
        self._attn = jax.jit(attn_fn)
        self.tokens_processed = 0

    def load(self, model: nnx.Module) -> None:
        """Swap in another checkpoint of the same model (compiled functions are reused)."""
        graphdef, state = nnx.split(model)
        if graphdef != self.graphdef:
            raise ValueError("ModelRunner.load: a model with a different structure")
        self.state = state

    def _put(self, feats: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        rows = next(iter(feats.values())).shape[0]
        s = self._batch_sharding if rows % self.batch_shards == 0 else self._replicated
        return {k: jax.device_put(np.asarray(v), s) for k, v in feats.items()}

    def _count(self, feats):
        self.tokens_processed += sum(
            int(np.asarray(feats[k]).size)
            for k in ("encoder_input_tokens", "decoder_input_tokens")
            if k in feats
        )

    def loss(self, feats: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Per-token loss [B, L] (nats) and correctness [B, L] (0/1), unweighted."""
        self._count(feats)
        with sharding.use_mesh(self.mesh, self.rules):
            out = self._loss(self.state, self._put(feats))
        return tuple(np.asarray(jax.device_get(x), np.float64) for x in out)

    def attention(self, feats: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
        """``{"self": [layers x [B,H,L,L]], "cross": [...] or []}`` attention weights."""
        self._count(feats)
        with sharding.use_mesh(self.mesh, self.rules):
            out = self._attn(self.state, self._put(feats))
        return jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), out)


def attention_of(model, cfg: ModelConfig, feats: dict[str, jax.Array]) -> dict[str, list]:
    """Attention weights of the decoder (self) and cross-attention, per layer."""
    if cfg.arch == "decoder_only":
        _, attn = model(
            feats["decoder_input_tokens"],
            feats.get("decoder_target_tokens"),
            decoder_segment_ids=feats.get("decoder_segment_ids"),
            decoder_positions=feats.get("decoder_positions"),
            deterministic=True,
            return_attention=True,
        )
        return {"self": list(_self_attention_layers(attn)), "cross": []}
    _, attn = model(
        feats["encoder_input_tokens"],
        feats["decoder_input_tokens"],
        feats.get("decoder_target_tokens"),
        deterministic=True,
        return_attention=True,
    )
    return _split_encdec_attention(attn)


def _self_attention_layers(attn) -> list:
    """Per-layer self-attention arrays from the model's return_attention output."""
    out = []
    for layer in attn:
        out.append(layer[0] if isinstance(layer, (tuple, list)) else layer)
    return out


def _split_encdec_attention(attn: dict) -> dict[str, list]:
    """Decoder self / cross attention from an encoder-decoder return_attention dict
    (keys "encoder", "decoder_self", "decoder_cross")."""
    return {"self": list(attn["decoder_self"]), "cross": list(attn["decoder_cross"])}


# ----------------------------------------------------------------------------------------
# Feature builders for hand-made sequences.
# ----------------------------------------------------------------------------------------


def shift_right(targets: np.ndarray) -> np.ndarray:
    """T5X decoder inputs: targets shifted right by one, starting with 0."""
    out = np.zeros_like(targets)
    out[:, 1:] = targets[:, :-1]
    return out


def decoder_features(targets: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Decoder-only features for full-causal sequences ``targets`` [B, L] (0 = padding)."""
    targets = np.asarray(targets, np.int32)
    real = (targets > 0).astype(np.int32)
    b, n = targets.shape
    return {
        "decoder_input_tokens": shift_right(targets),
        "decoder_target_tokens": targets,
        "decoder_loss_weights": (np.asarray(weights, np.float32) * real).astype(np.float32),
        "decoder_segment_ids": real,
        "decoder_positions": np.broadcast_to(np.arange(n, dtype=np.int32), (b, n)).copy(),
    }


def encdec_features(
    inputs: np.ndarray, targets: np.ndarray, weights: np.ndarray
) -> dict[str, np.ndarray]:
    """Encoder-decoder features (unpacked) from inputs [B, Li] and targets [B, Lt]."""
    targets = np.asarray(targets, np.int32)
    return {
        "encoder_input_tokens": np.asarray(inputs, np.int32),
        "decoder_input_tokens": shift_right(targets),
        "decoder_target_tokens": targets,
        "decoder_loss_weights": (np.asarray(weights, np.float32) * (targets > 0)).astype(
            np.float32
        ),
    }


def _pad_rows(rows: Sequence[np.ndarray], length: int) -> np.ndarray:
    out = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r[:length]
    return out


def _batched(n: int, batch_size: int):
    for s in range(0, n, batch_size):
        yield slice(s, min(n, s + batch_size))


# ----------------------------------------------------------------------------------------
# Aggregation helpers.
# ----------------------------------------------------------------------------------------


def _weights(feats) -> np.ndarray:
    if "decoder_loss_weights" in feats:
        return np.asarray(feats["decoder_loss_weights"], np.float64)
    return (np.asarray(feats["decoder_target_tokens"]) > 0).astype(np.float64)


def weighted_loss(
    runner: ModelRunner, batches: Sequence[dict]
) -> tuple[float | None, float | None]:
    """Token-weighted mean loss and accuracy over batches (None when no weighted token)."""
    tot_l = tot_c = tot_w = 0.0
    for feats in batches:
        loss, correct = runner.loss(feats)
        w = _weights(feats)
        tot_l += float((loss * w).sum())
        tot_c += float((correct * w).sum())
        tot_w += float(w.sum())
    if tot_w <= 0:
        return None, None
    return tot_l / tot_w, tot_c / tot_w


def loss_by_position(runner: ModelRunner, batches: Sequence[dict]) -> list[float | None]:
    """Mean loss per target position over weighted tokens (None where no token counts).

    The position is ``decoder_positions`` when the batch is packed, else the row index.
    """
    sums = counts = None
    for feats in batches:
        loss, _ = runner.loss(feats)
        w = _weights(feats)
        b, n = loss.shape
        if "decoder_segment_ids" in feats and "decoder_positions" in feats:
            pos = np.asarray(feats["decoder_positions"], np.int64)
        else:
            pos = np.broadcast_to(np.arange(n), (b, n))
        if sums is None:
            sums, counts = np.zeros(n), np.zeros(n)
        np.add.at(sums, pos.ravel(), (loss * w).ravel())
        np.add.at(counts, pos.ravel(), w.ravel())
    if sums is None:
        return []
    return [float(s / c) if c > 0 else None for s, c in zip(sums, counts)]


def icl_positions(length: int, early: int = 50, late: int = 500) -> tuple[int, int]:
    """(early, late) positions for the ICL score in a context of ``length`` targets."""
    if length < 3:
        raise ValueError(f"ICL score needs a context of >= 3 tokens, got {length}")
    lt = min(late, length - 1)
    return min(early, lt // 2), lt


# ----------------------------------------------------------------------------------------
# Real-text sources.
# ----------------------------------------------------------------------------------------


def text_rows(split, length: int, count: int, start: int = 0) -> np.ndarray:
    """``count`` consecutive chunks of ``length`` tokens from a split (fewer if short)."""
    count = min(count, max(0, (split.num_tokens - start) // length))
    if count <= 0:
        raise ValueError(
            f"split has {split.num_tokens} tokens; need >= {start + length} for {length}-token rows"
        )
    return np.stack([np.asarray(split.tokens(start + i * length, length)) for i in range(count)])


def passages(split, length: int, count: int) -> np.ndarray:
    """First ``length`` tokens of held-out documents at least that long (else chunks)."""
    offsets = np.asarray(getattr(split, "document_offsets", np.zeros(0, np.int64)), np.int64)
    out = []
    if offsets.size:
        ends = np.append(offsets[1:], split.num_tokens)
        for s, e in zip(offsets, ends):
            if e - s - 1 >= length:  # document body without its EOS
                out.append(np.asarray(split.tokens(int(s), length)))
                if len(out) == count:
                    break
    if len(out) < count:
        extra = text_rows(split, length, count - len(out), start=0)
        out.extend(list(extra))
    return np.stack(out).astype(np.int32)


# ----------------------------------------------------------------------------------------
# The metrics.
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Lengths:
    """Sequence lengths of a run: decoder targets; encoder inputs for T5 (else 0)."""

    decoder: int
    encoder: int = 0

    @classmethod
    def of(cls, cfg: ModelConfig, feature_lengths: dict[str, int]) -> Lengths:
        dec = int(feature_lengths["decoder_target_tokens"])
        enc = int(feature_lengths.get("encoder_input_tokens", 0))
        if cfg.arch == "encoder_decoder" and enc <= 0:
            raise ValueError("encoder_decoder run without an encoder_input_tokens length")
        return cls(dec, enc)


def copy_layout(context: int, k: int, min_passage: int) -> tuple[int, int]:
    """(k used, passage length) for k copies in ``context`` tokens (rule in module doc)."""
    p = context // k
    if p < min_passage:
        k = max(2, context // min_passage)
        p = context // k
    if p < 1:
        raise ValueError(f"context of {context} tokens cannot hold {k} copies of a passage")
    return k, p


def copy_loss(runner, cfg, lengths: Lengths, heldout, s: EvalSettings) -> dict[str, Any]:
    """Loss on the last copy of a held-out passage repeated k times in context."""
    if cfg.arch == "decoder_only":
        k, p = copy_layout(lengths.decoder, s.copy_repeats, s.copy_min_passage)
        psg = passages(heldout, p, s.copy_examples)
        rows = np.tile(psg, (1, k))
        targets = _pad_rows(list(rows), lengths.decoder)
        weights = np.zeros_like(targets, np.float32)
        weights[:, (k - 1) * p : k * p] = 1.0
        batches = [
            decoder_features(targets[sl], weights[sl])
            for sl in _batched(len(targets), s.batch_size)
        ]
    else:
        # Encoder holds k-1 copies (+EOS); the decoder writes the k-th copy.
        k, p = copy_layout(lengths.encoder - 1, s.copy_repeats - 1, s.copy_min_passage)
        k += 1
        p = min(p, lengths.decoder)
        psg = passages(heldout, p, s.copy_examples)
        enc = _pad_rows([np.append(np.tile(r, k - 1), EOS_ID) for r in psg], lengths.encoder)
        dec = _pad_rows(list(psg), lengths.decoder)
        w = (dec > 0).astype(np.float32)
        batches = [
            encdec_features(enc[sl], dec[sl], w[sl]) for sl in _batched(len(dec), s.batch_size)
        ]
    loss, _ = weighted_loss(runner, batches)
    return {"copy_loss": loss, "copy_repeats_used": k, "copy_passage_length": p}


def random_repeat_loss(runner, cfg, lengths: Lengths, candidates, s: EvalSettings):
    """Loss on the second copy of a random token sequence."""
    rng = np.random.default_rng([s.seed, 0x5EED])
    if cfg.arch == "decoder_only":
        half = lengths.decoder // 2
        n = min(s.random_repeat_length or half, half)
        seqs = rng.choice(candidates, size=(s.random_repeat_examples, n))
        targets = _pad_rows(list(np.tile(seqs, (1, 2))), lengths.decoder)
        weights = np.zeros_like(targets, np.float32)
        weights[:, n : 2 * n] = 1.0
        batches = [
            decoder_features(targets[sl], weights[sl])
            for sl in _batched(len(targets), s.batch_size)
        ]
    else:
        cap = min(lengths.encoder - 1, lengths.decoder)
        n = min(s.random_repeat_length or cap, cap)
        seqs = rng.choice(candidates, size=(s.random_repeat_examples, n))
        enc = _pad_rows([np.append(r, EOS_ID) for r in seqs], lengths.encoder)
        dec = _pad_rows(list(seqs), lengths.decoder)
        w = (dec > 0).astype(np.float32)
        batches = [
            encdec_features(enc[sl], dec[sl], w[sl]) for sl in _batched(len(dec), s.batch_size)
        ]
    loss, _ = weighted_loss(runner, batches)
    return {"random_repeat_loss": loss, "random_repeat_length": n}


def icl_and_position_loss(runner, cfg, lengths: Lengths, heldout, test_batches, s):
    """Loss by position and the ICL score (loss at the late minus the early position)."""
    if cfg.arch == "decoder_only":
        rows = text_rows(heldout, lengths.decoder, s.icl_examples)
        w = np.ones_like(rows, np.float32)
        batches = [decoder_features(rows[sl], w[sl]) for sl in _batched(len(rows), s.batch_size)]
    else:
        batches = test_batches
    lbp = loss_by_position(runner, batches)
    early, late = icl_positions(len(lbp), s.icl_early, s.icl_late)
    # Packed rows may leave late positions without any token: use the nearest position
    # below that has one (recorded in icl_positions).
    valid = [i for i, v in enumerate(lbp) if v is not None]
    below = [i for i in valid if i <= late]
    icl = None
    if below:
        late = below[-1]
        early = min(early, late // 2)
        early_ok = [i for i in valid if i <= early]
        if early_ok and early_ok[-1] < late:
            early = early_ok[-1]
            icl = lbp[late] - lbp[early]
    return {"loss_by_position": lbp, "icl_score": icl, "icl_positions": [early, late]}


def probe_layout(context: int, period: int, repeats: int) -> tuple[int, int]:
    """(period, repeats) of probe sequences fitting ``context`` (BOS + period*repeats)."""
    while repeats > 2 and 1 + period * repeats > context:
        repeats -= 1
    if 1 + period * repeats > context:
        period = (context - 1) // repeats
    if period < 2:
        raise ValueError(f"context of {context} tokens too short for probe sequences")
    return period, repeats


def probe_scores(runner, cfg, lengths: Lengths, heldout, candidates, test_batches, s):
    """Prefix-matching, previous-token (and T5 cross prefix-matching) scores per head."""
    period, repeats = probe_layout(lengths.decoder, s.probe_period, s.probe_repeats)
    seqs = probes.repeated_random_sequences(
        candidates, s.probe_sequences, period, repeats, seed=s.seed
    )
    # seqs[:, 0] is BOS = decoder start id, so the probe sequence IS the decoder input.
    targets = _pad_rows([np.append(r[1:], r[-1]) for r in seqs], lengths.decoder)
    dec_in = shift_right(targets)
    dec_in[:, : seqs.shape[1]] = seqs
    out: dict[str, Any] = {"probe_period": period, "probe_repeats": repeats}
    pm = []
    for sl in _batched(len(seqs), s.batch_size):
        if cfg.arch == "decoder_only":
            f = decoder_features(targets[sl], np.ones_like(targets[sl], np.float32))
        else:
            enc = np.zeros((sl.stop - sl.start, lengths.encoder), np.int32)
            enc[:, 0] = EOS_ID
            f = encdec_features(enc, targets[sl], np.ones_like(targets[sl], np.float32))
        f["decoder_input_tokens"] = dec_in[sl]
        att = runner.attention(f)["self"]
        n = seqs.shape[1]
        pm.append(
            (
                probes.prefix_matching_scores([a[:, :, :n, :n] for a in att], period),
                sl.stop - sl.start,
            )
        )
    out["prefix_matching_heads"] = _weighted_mean(pm)

    # Previous-token score on real text.
    pt = []
    if cfg.arch == "decoder_only":
        n = min(lengths.decoder, s.previous_token_length)
        rows = text_rows(heldout, n, s.probe_sequences)
        for sl in _batched(len(rows), s.batch_size):
            f = decoder_features(rows[sl], np.ones_like(rows[sl], np.float32))
            att = runner.attention(f)["self"]
            pt.append((probes.previous_token_scores(att, f["decoder_segment_ids"]), 1.0))
    else:
        for f in test_batches[:2]:
            att = runner.attention(f)["self"]
            qmask = (np.asarray(f["decoder_target_tokens"]) > 0).astype(np.float64)
            pt.append((probes.previous_token_scores(att, qmask), float(qmask.sum())))
    out["previous_token_heads"] = _weighted_mean(pt)

    if cfg.arch == "encoder_decoder":
        n = min(lengths.encoder - 1, lengths.decoder)
        rng = np.random.default_rng([s.seed, 0xC2055])
        rows = (
            np.stack(
                [rng.choice(candidates, size=n, replace=False) for _ in range(s.probe_sequences)]
            )
            if candidates.size >= n
            else rng.choice(candidates, size=(s.probe_sequences, n))
        )
        enc = _pad_rows([np.append(r, EOS_ID) for r in rows], lengths.encoder)
        dec = _pad_rows(list(rows), lengths.decoder)
        cp = []
        for sl in _batched(len(rows), s.batch_size):
            f = encdec_features(enc[sl], dec[sl], np.ones_like(dec[sl], np.float32))
            att = runner.attention(f)["cross"]
            if att:
                cp.append((probes.cross_prefix_matching_scores(att, n), sl.stop - sl.start))
        out["cross_prefix_matching_heads"] = _weighted_mean(cp) if cp else None
    return out


def _weighted_mean(parts) -> list | None:
    if not parts:
        return None
    tot = sum(w for _, w in parts)
    return (sum(np.asarray(a) * w for a, w in parts) / tot).tolist()


# ----------------------------------------------------------------------------------------
# Copying score from the model's weights.
# ----------------------------------------------------------------------------------------


def _np(x) -> np.ndarray:
    return np.asarray(jax.device_get(x[...] if hasattr(x, "value") else x), np.float64)


def ov_weights(model, cfg: ModelConfig) -> dict[str, Any]:
    """Embedding, unembedding, final-norm scale and per-layer (pre-norm scale, value,
    output) of the decoder self-attention, read from the module (any layer-stack mode:
    scanned, unrolled list, ParamShare, MoE groups)."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    dec = params["decoder"]
    stack = model.decoder.layers  # models.layers.LayerStack
    tree = dec["layers"]["layers"]
    if stack.mode == "list":
        units = [tree[k] for k in sorted(tree, key=int)]
    elif stack.mode == "shared":
        units = [tree] * stack.num_units
    else:  # scan: leading "layers" axis on every leaf
        units = [
            jax.tree.map(lambda a, i=i: np.asarray(jax.device_get(a))[i], tree)
            for i in range(stack.num_units)
        ]

    def one(layer):
        return (
            _np(layer["pre_self_attention_layer_norm"]["scale"]),
            _np(layer["self_attention"]["value"]),
            _np(layer["self_attention"]["out"]),
        )

    layers = []
    for u in units:
        if stack.group > 1:
            layers.extend(one(u["layers"][j]) for j in sorted(u["layers"], key=int))
        else:
            layers.append(one(u))
    return {
        "embedding": _np(params["token_embedder"]["embedding"]),
        "unembedding": _np(dec["logits_dense"]["kernel"]),
        "final_scale": _np(dec["decoder_norm"]["scale"]),
        "layers": layers,
    }


def copying_scores_of(
    model, cfg: ModelConfig, token_ids: np.ndarray, vocab_size: int | None = None
) -> list[list[float]]:
    """``[layers][heads]`` OV copying scores of the decoder self-attention heads.

    ``vocab_size``: the real (unpadded) vocabulary size; logits of padding ids are ignored.
    """
    w = ov_weights(model, cfg)
    out = []
    for pre, value, output in w["layers"]:
        out.append(
            probes.copying_scores(
                w["embedding"],
                value,
                output,
                w["unembedding"],
                token_ids,
                pre_scale=pre,
                final_scale=w["final_scale"],
                vocab_size=vocab_size,
            ).tolist()
        )
    return out


# ----------------------------------------------------------------------------------------
# Everything for one checkpoint.
# ----------------------------------------------------------------------------------------


def evaluate_model(
    runner: ModelRunner,
    model,
    cfg: ModelConfig,
    lengths: Lengths,
    *,
    test_batches: Sequence[dict],
    repeated_batches: Sequence[dict] | None,
    unique_seen_batches: Sequence[dict] | None,
    heldout,
    candidates: np.ndarray,
    settings: EvalSettings,
    vocab_size: int | None = None,
) -> dict[str, Any]:
    """All metrics of one model as a results.jsonl record (without step / token counts)."""
    t0 = time.perf_counter()
    tokens0 = runner.tokens_processed
    s = settings
    rec: dict[str, Any] = {}
    rec["test_loss"], rec["test_accuracy"] = weighted_loss(runner, test_batches)
    rec["repeated_loss"], rec["repeated_accuracy"] = (
        weighted_loss(runner, repeated_batches) if repeated_batches else (None, None)
    )
    rec["unique_seen_loss"], rec["unique_seen_accuracy"] = (
        weighted_loss(runner, unique_seen_batches) if unique_seen_batches else (None, None)
    )
    rec.update(copy_loss(runner, cfg, lengths, heldout, s))
    rec.update(random_repeat_loss(runner, cfg, lengths, candidates, s))
    rec.update(icl_and_position_loss(runner, cfg, lengths, heldout, test_batches, s))
    rec.update(probe_scores(runner, cfg, lengths, heldout, candidates, test_batches, s))
    try:
        rec["copying_score_heads"] = copying_scores_of(model, cfg, candidates, vocab_size)
    except (KeyError, TypeError, IndexError, ValueError) as e:  # unknown parameter layout
        rec["copying_score_heads"] = None
        rec["copying_score_error"] = f"{type(e).__name__}: {e}"
    rec["prefix_matching"] = probes.head_max(rec["prefix_matching_heads"])
    rec["previous_token"] = probes.head_max(rec["previous_token_heads"])
    rec["copying_score"] = probes.head_max(rec["copying_score_heads"])
    if cfg.arch == "encoder_decoder":
        rec["cross_prefix_matching"] = probes.head_max(rec.get("cross_prefix_matching_heads"))
    rec["eval_time_s"] = time.perf_counter() - t0
    rec["eval_tokens"] = runner.tokens_processed - tokens0
    return rec
