"""Running one model for the evaluator: jitted per-token loss, accuracy and attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from repeat_scaling import models, sharding
from repeat_scaling.models import losses
from repeat_scaling.models.config import ModelConfig


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
