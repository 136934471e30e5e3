"""T5X model features of (inputs, targets) examples, for each model architecture.

The objectives (:mod:`repeat_scaling.data.objectives`, :mod:`repeat_scaling.data.supervised`)
turn store chunks into (inputs, targets) examples; :func:`layout_examples` lays them out
as the features of the model's architecture. Imports numpy only.
"""

from __future__ import annotations

import numpy as np

#: The model architectures, each with its own feature layout.
ARCHS = ("encoder_decoder", "decoder_only")


class ObjectiveError(ValueError):
    """A bad objective configuration (one-line message)."""


def layout_examples(
    ins: np.ndarray,
    li: np.ndarray,
    tgs: np.ndarray,
    lt: np.ndarray,
    *,
    arch: str,
    inputs_length: int | None,
    targets_length: int | None,
    length: int | None,
    pack: bool,
) -> dict[str, np.ndarray]:
    """Features of one (inputs, targets) example per row, vectorised.

    Row ``r`` holds ``ins[r, :li[r]]`` and ``tgs[r, :lt[r]]`` (each ending with EOS).
    encoder_decoder: T5X features at ``inputs_length`` / ``targets_length`` (decoder inputs
    = targets shifted right from 0; segment ids and positions when ``pack``). decoder_only
    (T5X prefix LM): one sequence ``inputs ++ targets`` of ``length``, loss on the targets,
    ``decoder_causal_attention`` = 1 on the inputs and one position to their right.
    """
    n = ins.shape[0]
    if arch == "encoder_decoder":
        n_in, n_tg = inputs_length, targets_length
        enc = np.zeros((n, n_in), np.int32)
        enc[:, : min(n_in, ins.shape[1])] = ins[:, :n_in]
        dec_t = np.zeros((n, n_tg), np.int32)
        dec_t[:, : min(n_tg, tgs.shape[1])] = tgs[:, :n_tg]
        dec_i = np.zeros_like(dec_t)
        dec_i[:, 1:] = dec_t[:, :-1]
        out = {
            "encoder_input_tokens": enc,
            "decoder_input_tokens": dec_i,
            "decoder_target_tokens": dec_t,
            "decoder_loss_weights": (dec_t != 0).astype(np.float32),
        }
        if pack:
            ar_i, ar_t = np.arange(n_in), np.arange(n_tg)
            es = (ar_i < li[:, None]).astype(np.int32)
            ds = (ar_t < lt[:, None]).astype(np.int32)
            out.update(
                encoder_segment_ids=es,
                encoder_positions=(ar_i * es).astype(np.int32),
                decoder_segment_ids=ds,
                decoder_positions=(ar_t * ds).astype(np.int32),
            )
        return out
    S = length
    ar = np.arange(S)
    total = li + lt
    in_part = ar < li[:, None]
    t_idx = np.clip(ar[None, :] - li[:, None], 0, tgs.shape[1] - 1)
    seq = np.where(
        in_part,
        ins[:, np.clip(ar, 0, ins.shape[1] - 1)],
        np.take_along_axis(tgs, t_idx, axis=1),
    )
    valid = ar < total[:, None]
    seq = np.where(valid, seq, 0).astype(np.int32)
    dec_i = np.zeros_like(seq)
    dec_i[:, 1:] = seq[:, :-1]
    seg = valid.astype(np.int32)
    return {
        "decoder_input_tokens": dec_i,
        "decoder_target_tokens": seq,
        "decoder_loss_weights": (valid & ~in_part).astype(np.float32),
        "decoder_segment_ids": seg,
        "decoder_positions": (ar * seg).astype(np.int32),
        "decoder_causal_attention": ((ar <= li[:, None]) & valid).astype(np.int32),
    }
