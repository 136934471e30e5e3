"""Probes on a 2-layer attention-only decoder whose weights are set by construction.

Residual stream (d_model 256) = [token one-hot (128 dims) | previous-token one-hot (128)].
Layer 1 head 0 is a previous-token head: the T5 relative position bias (one table shared
by all layers of the stack) puts +40 on distance 1, and its OV circuit copies the token
subspace into the previous-token subspace. Layer 2 head 1 is an induction head by
K-composition: its query reads the current token, its key reads the previous-token
subspace written by layer 1, so it attends to the tokens that FOLLOWED earlier occurrences
of the current token; its OV circuit copies the attended token to the logits. Head 0 of
layer 2 inherits the shared previous-token bias (no OV); layer 1 head 1 is all zeros.
"""

import jax
import numpy as np
import pytest
from flax import nnx

from repeat_scaling import models
from repeat_scaling.eval import probes
from repeat_scaling.models.config import ModelConfig

V, D, H, K = 128, 256, 2, 128


@pytest.fixture(scope="module")
def handbuilt():
    cfg = ModelConfig(
        arch="decoder_only",
        vocab_size=V,
        d_model=D,
        d_ff=0,
        num_heads=H,
        head_dim=K,
        num_encoder_layers=0,
        num_decoder_layers=2,
        position="relative",
        attention_only=True,
        name="attn2_handbuilt",
    )
    model = models.build(cfg, nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    p = jax.tree.map(lambda a: np.zeros(a.shape, np.float32), nnx.to_pure_dict(state))
    eye = np.eye(V, dtype=np.float32)
    p["token_embedder"]["embedding"][:, :V] = eye  # token t -> e_t
    p["decoder"]["decoder_norm"]["scale"][:] = 1.0
    p["decoder"]["logits_dense"]["kernel"][:V, :] = eye  # logits read the token subspace
    p["decoder"]["relpos_bias"]["rel_embedding"][0, 1] = 40.0  # head 0: distance 1
    lay = p["decoder"]["layers"]["layers"]
    lay["pre_self_attention_layer_norm"]["scale"][:] = 1.0
    att = lay["self_attention"]
    # Layer 1, head 0: OV copies token subspace -> previous-token subspace (x 1/16 undoes
    # the RMSNorm gain 16 of a one-hot in 256 dims, so the residual becomes e_t + e_{V+p}).
    att["value"][0, :V, 0, :] = eye
    att["out"][0, 0, :, V:] = eye / 16.0
    # Layer 2, head 1: query = current token, key = previous token (K-composition).
    att["query"][1, :V, 1, :] = eye
    att["key"][1, V:, 1, :] = eye
    att["value"][1, :V, 1, :] = eye
    att["out"][1, 1, :, :V] = eye
    nnx.replace_by_pure_dict(state, p)
    nnx.update(model, state)
    return cfg, model


def _attention(model, tokens):
    tokens = np.asarray(tokens, np.int32)
    targets = np.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)
    _, attn = model(tokens, targets, return_attention=True)
    return [np.asarray(a) for a in attn]


def test_induction_head_scores_high_only_where_built(handbuilt):
    cfg, model = handbuilt
    counts = np.ones(V, np.int64)
    counts[3:] += np.arange(V - 3)
    cand = probes.probe_candidates(counts)
    seqs = probes.repeated_random_sequences(cand, num_sequences=10, period=25, repeats=4)
    attn = _attention(model, seqs)
    pm = probes.prefix_matching_scores(attn, period=25)
    assert pm.shape == (2, 2)
    assert pm[1, 1] > 0.95, pm
    others = np.delete(pm.ravel(), 3)
    assert (others < 0.1).all(), pm


def test_previous_token_head_scores_high_only_where_built(handbuilt):
    cfg, model = handbuilt
    rng = np.random.default_rng(1)
    text = rng.integers(3, V, size=(6, 64))  # arbitrary token text
    text[:, 0] = 0
    pt = probes.previous_token_scores(_attention(model, text))
    assert pt[0, 0] > 0.95 and pt[1, 0] > 0.95, pt  # head 0 of both layers (shared bias)
    assert pt[0, 1] < 0.2 and pt[1, 1] < 0.2, pt


def test_copying_score_from_ov_circuit(handbuilt):
    from repeat_scaling.eval.copying import copying_scores_of

    cfg, model = handbuilt
    cs = np.asarray(copying_scores_of(model, cfg, np.arange(3, 100), vocab_size=V))
    assert cs.shape == (2, 2)
    assert cs[1, 1] > 0.9, cs  # the induction head copies what it attends to
    assert (np.delete(cs.ravel(), 3) < -0.9).all(), cs  # others raise no token's logit
