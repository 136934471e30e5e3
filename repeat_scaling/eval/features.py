"""Hand-made evaluation sequences: T5X features, padded rows and held-out text rows."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from repeat_scaling.models.config import ModelConfig


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


def pad_rows(rows: Sequence[np.ndarray], length: int) -> np.ndarray:
    """Rows [len(rows), length] int32: each row truncated to ``length``, 0-padded."""
    out = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r[:length]
    return out


def batched(n: int, batch_size: int):
    """Slices of ``range(n)`` of at most ``batch_size`` rows each."""
    for s in range(0, n, batch_size):
        yield slice(s, min(n, s + batch_size))


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
