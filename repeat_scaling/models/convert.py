"""Import/export T5 v1.1 weights: Hugging Face (safetensors / pytorch_model.bin) and T5X.

All conversions go through a *canonical* flat dict ``name -> np.ndarray`` in this suite's
shapes, with per-layer names (``encoder/layers_3/self_attention/query`` [d, H, dk]), so
scanned (stacked) and unrolled models convert alike.

* Hugging Face ``T5ForConditionalGeneration`` (T5 v1.1: ``feed_forward_proj="gated-gelu"``,
  ``tie_word_embeddings=False``): PyTorch Linear weights are [out, in] (transposed), the
  relative bias lives in block 0 as [buckets, heads]. ``export_hf_t5`` writes
  ``config.json`` + ``model.safetensors`` that ``from_pretrained`` loads; given the real
  vocabulary size it drops the padded rows of the embedding and the output projection
  (the import pads them again with zeros).
* T5X checkpoints (``t5x/examples/t5`` parameter names, kernels flattened to
  [d, H*dk] / [H*dk, d]): either an orbax PyTree checkpoint directory (T5X with orbax)
  or a legacy T5X directory (msgpack ``checkpoint`` file + tensorstore zarr arrays).
  Both hold ``target/<param path>``.

torch / transformers are not needed except to read ``pytorch_model.bin`` (imported lazily).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import numpy as np
from flax import nnx

from repeat_scaling.models.config import ModelConfig, padded_vocab_size

Canonical = dict[str, np.ndarray]

_ATTN = ("query", "key", "value", "out")
_HF_ATTN = {"query": "q", "key": "k", "value": "v", "out": "o"}


class ConversionError(ValueError):
    """A checkpoint that does not fit the expected T5 v1.1 layout."""


# ----------------------------------------------------------------------------------------
# Model <-> canonical dict
# ----------------------------------------------------------------------------------------
def _check_convertible(cfg: ModelConfig) -> None:
    if cfg.arch != "encoder_decoder":
        raise ConversionError(f"only encoder_decoder (T5) models convert; got arch={cfg.arch!r}")
    if cfg.is_moe or cfg.param_share or cfg.attention_only:
        raise ConversionError(
            f"model {cfg.name!r} uses MoE/ParamShare/attention_only; only dense T5 v1.1 converts"
        )


def _check_canonical(cfg: ModelConfig) -> None:
    if cfg.param_share:
        raise ConversionError(
            f"model {cfg.name!r} shares layer weights (param_share=True); "
            "per-layer conversion needs param_share=False"
        )


def _layer_key(path: tuple[str, ...], scanned: bool) -> tuple[str, int | None, str]:
    """(stack, layer index or None for stacked, rest) for a layer param path."""
    stack = path[0]
    if scanned:
        return stack, None, "/".join(path[3:])
    return stack, int(path[3]), "/".join(path[4:])


def model_to_canonical(model: nnx.Module) -> Canonical:
    """Per-layer numpy arrays of a model (any arch; not ParamShare)."""
    cfg: ModelConfig = model.cfg
    _check_canonical(cfg)
    out: Canonical = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        path = tuple(str(p) for p in path)
        arr = np.asarray(jax.device_get(var.get_value()))
        if len(path) > 2 and path[1] == "layers":
            stack, i, rest = _layer_key(path, cfg.scan_layers)
            if i is None:
                for j in range(arr.shape[0]):
                    out[f"{stack}/layers_{j}/{rest}"] = arr[j]
            else:
                out[f"{stack}/layers_{i}/{rest}"] = arr
        else:
            out["/".join(path)] = arr
    return out


def canonical_to_model(cfg: ModelConfig, canon: Canonical) -> nnx.Module:
    """Build ``cfg``'s model and fill it from a canonical dict (every param must be given)."""
    from repeat_scaling.models import build

    _check_canonical(cfg)
    model = nnx.eval_shape(lambda: build(cfg, nnx.Rngs(0)))  # shapes only, then fill
    used = set()
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        path = tuple(str(p) for p in path)
        shape = tuple(var.get_value().shape)
        if len(path) > 2 and path[1] == "layers":
            stack, i, rest = _layer_key(path, cfg.scan_layers)
            idx = range(shape[0]) if i is None else [i]
            keys = [f"{stack}/layers_{j}/{rest}" for j in idx]
        else:
            keys = ["/".join(path)]
        missing = [k for k in keys if k not in canon]
        if missing:
            raise ConversionError(f"checkpoint lacks parameter {missing[0]!r}")
        arrs = [np.asarray(canon[k], np.float32) for k in keys]
        value = (
            np.stack(arrs)
            if (len(path) > 2 and path[1] == "layers" and cfg.scan_layers)
            else arrs[0]
        )
        if value.shape != shape:
            raise ConversionError(
                f"parameter {keys[0]!r} has shape {value.shape}; expected {shape} for {cfg.name!r}"
            )
        var.set_value(jax.numpy.asarray(value, dtype=var.get_value().dtype))
        used.update(keys)
    extra = sorted(set(canon) - used)
    if extra:
        raise ConversionError(f"checkpoint has unexpected parameter {extra[0]!r}")
    return model


def _pad_vocab(arr: np.ndarray, axis: int, size: int) -> np.ndarray:
    pad = size - arr.shape[axis]
    if pad == 0:
        return arr
    widths = [(0, 0)] * arr.ndim
    widths[axis] = (0, pad)
    return np.pad(arr, widths)


# ----------------------------------------------------------------------------------------
# Hugging Face
# ----------------------------------------------------------------------------------------
def config_from_hf(hf: dict[str, Any], name: str = "hf_t5") -> ModelConfig:
    """ModelConfig from a Hugging Face T5 config.json dict (T5 v1.1 only)."""
    proj = hf.get("feed_forward_proj", "relu")
    if proj != "gated-gelu":
        raise ConversionError(f"feed_forward_proj={proj!r}; expected 'gated-gelu' (T5 v1.1)")
    # T5 v1.1 does not rescale decoder outputs. transformers < 5 says so with
    # tie_word_embeddings=False; transformers >= 5 with scale_decoder_outputs=False (and
    # then always ties lm_head to the embedding when no lm_head.weight is stored).
    scaled = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True))
    if scaled:
        raise ConversionError(
            "config rescales decoder outputs (tie_word_embeddings=True / "
            "scale_decoder_outputs=True); expected a T5 v1.1 config"
        )
    eps = hf.get("layer_norm_epsilon", 1e-6)
    if abs(eps - 1e-6) > 1e-12:
        raise ConversionError(f"layer_norm_epsilon={eps}; expected 1e-06")
    n_enc = hf["num_layers"]
    return ModelConfig(
        arch="encoder_decoder",
        name=name,
        vocab_size=padded_vocab_size(hf["vocab_size"]),
        d_model=hf["d_model"],
        d_ff=hf["d_ff"],
        num_heads=hf["num_heads"],
        head_dim=hf["d_kv"],
        num_encoder_layers=n_enc,
        num_decoder_layers=hf.get("num_decoder_layers") or n_enc,
        relative_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_max_distance=hf.get("relative_attention_max_distance", 128),
        position="relative",
    )


def hf_to_canonical(cfg: ModelConfig, sd: dict[str, np.ndarray]) -> Canonical:
    """Canonical dict from a HF T5 state dict (numpy arrays)."""
    d, h, k = cfg.d_model, cfg.num_heads, cfg.head_dim

    def get(key: str) -> np.ndarray:
        if key not in sd:
            raise ConversionError(f"Hugging Face state dict lacks {key!r}")
        return np.asarray(sd[key], np.float32)

    def attn(prefix: str, out_prefix: str, c: Canonical) -> None:
        for name in _ATTN:
            w = get(f"{prefix}.{_HF_ATTN[name]}.weight")
            c[f"{out_prefix}/{name}"] = (
                w.T.reshape(h, k, d) if name == "out" else w.T.reshape(d, h, k)
            )

    def mlp(prefix: str, out_prefix: str, c: Canonical) -> None:
        for name in ("wi_0", "wi_1", "wo"):
            c[f"{out_prefix}/{name}"] = get(f"{prefix}.DenseReluDense.{name}.weight").T

    c: Canonical = {}
    v = cfg.vocab_size
    c["token_embedder/embedding"] = _pad_vocab(get("shared.weight"), 0, v)
    head = "lm_head.weight" if "lm_head.weight" in sd else "shared.weight"  # tied (HF >= 5)
    c["decoder/logits_dense/kernel"] = _pad_vocab(get(head).T, 1, v)
    for stack in ("encoder", "decoder"):
        rel = get(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        c[f"{stack}/relpos_bias/rel_embedding"] = rel.T
        c[f"{stack}/{stack}_norm/scale"] = get(f"{stack}.final_layer_norm.weight")
    for i in range(cfg.num_encoder_layers):
        p, o = f"encoder.block.{i}.layer", f"encoder/layers_{i}"
        attn(f"{p}.0.SelfAttention", f"{o}/self_attention", c)
        c[f"{o}/pre_self_attention_layer_norm/scale"] = get(f"{p}.0.layer_norm.weight")
        mlp(f"{p}.1", f"{o}/mlp", c)
        c[f"{o}/pre_mlp_layer_norm/scale"] = get(f"{p}.1.layer_norm.weight")
    for i in range(cfg.num_decoder_layers):
        p, o = f"decoder.block.{i}.layer", f"decoder/layers_{i}"
        attn(f"{p}.0.SelfAttention", f"{o}/self_attention", c)
        c[f"{o}/pre_self_attention_layer_norm/scale"] = get(f"{p}.0.layer_norm.weight")
        attn(f"{p}.1.EncDecAttention", f"{o}/encoder_decoder_attention", c)
        c[f"{o}/pre_cross_attention_layer_norm/scale"] = get(f"{p}.1.layer_norm.weight")
        mlp(f"{p}.2", f"{o}/mlp", c)
        c[f"{o}/pre_mlp_layer_norm/scale"] = get(f"{p}.2.layer_norm.weight")
    return c


def canonical_to_hf(cfg: ModelConfig, c: Canonical) -> dict[str, np.ndarray]:
    """HF T5 state dict (numpy, contiguous) from a canonical dict."""
    d, hk = cfg.d_model, cfg.num_heads * cfg.head_dim
    sd: dict[str, np.ndarray] = {}

    def attn(prefix: str, src: str) -> None:
        for name in _ATTN:
            w = c[f"{src}/{name}"]
            w2 = w.reshape(hk, d) if name == "out" else w.reshape(d, hk)
            sd[f"{prefix}.{_HF_ATTN[name]}.weight"] = w2.T

    def mlp(prefix: str, src: str) -> None:
        for name in ("wi_0", "wi_1", "wo"):
            sd[f"{prefix}.DenseReluDense.{name}.weight"] = c[f"{src}/{name}"].T

    emb = c["token_embedder/embedding"]
    sd["shared.weight"] = emb
    sd["encoder.embed_tokens.weight"] = emb
    sd["decoder.embed_tokens.weight"] = emb
    sd["lm_head.weight"] = c["decoder/logits_dense/kernel"].T
    for stack in ("encoder", "decoder"):
        sd[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = c[
            f"{stack}/relpos_bias/rel_embedding"
        ].T
        sd[f"{stack}.final_layer_norm.weight"] = c[f"{stack}/{stack}_norm/scale"]
    for i in range(cfg.num_encoder_layers):
        p, o = f"encoder.block.{i}.layer", f"encoder/layers_{i}"
        attn(f"{p}.0.SelfAttention", f"{o}/self_attention")
        sd[f"{p}.0.layer_norm.weight"] = c[f"{o}/pre_self_attention_layer_norm/scale"]
        mlp(f"{p}.1", f"{o}/mlp")
        sd[f"{p}.1.layer_norm.weight"] = c[f"{o}/pre_mlp_layer_norm/scale"]
    for i in range(cfg.num_decoder_layers):
        p, o = f"decoder.block.{i}.layer", f"decoder/layers_{i}"
        attn(f"{p}.0.SelfAttention", f"{o}/self_attention")
        sd[f"{p}.0.layer_norm.weight"] = c[f"{o}/pre_self_attention_layer_norm/scale"]
        attn(f"{p}.1.EncDecAttention", f"{o}/encoder_decoder_attention")
        sd[f"{p}.1.layer_norm.weight"] = c[f"{o}/pre_cross_attention_layer_norm/scale"]
        mlp(f"{p}.2", f"{o}/mlp")
        sd[f"{p}.2.layer_norm.weight"] = c[f"{o}/pre_mlp_layer_norm/scale"]
    return {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}


def _vocab_rows(cfg: ModelConfig, vocab_size: int | None) -> int:
    """The embedding rows to export: ``vocab_size`` (the real vocabulary) or all of them."""
    if vocab_size is None:
        return cfg.vocab_size
    if not 0 < int(vocab_size) <= cfg.vocab_size:
        raise ConversionError(
            f"vocab_size={vocab_size}; expected 1..{cfg.vocab_size} (model {cfg.name!r} has "
            f"{cfg.vocab_size} embedding rows)"
        )
    return int(vocab_size)


def hf_config_dict(cfg: ModelConfig, vocab_size: int | None = None) -> dict[str, Any]:
    """Hugging Face T5Config fields for ``cfg`` (T5 v1.1); ``vocab_size``: the real one."""
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "vocab_size": _vocab_rows(cfg, vocab_size),
        "d_model": cfg.d_model,
        "d_kv": cfg.head_dim,
        "d_ff": cfg.d_ff,
        "num_layers": cfg.num_encoder_layers,
        "num_decoder_layers": cfg.num_decoder_layers,
        "num_heads": cfg.num_heads,
        "relative_attention_num_buckets": cfg.relative_buckets,
        "relative_attention_max_distance": cfg.relative_max_distance,
        "dropout_rate": cfg.dropout_rate,
        "layer_norm_epsilon": 1e-6,
        "initializer_factor": 1.0,
        "feed_forward_proj": "gated-gelu",
        "is_encoder_decoder": True,
        "tie_word_embeddings": False,
        "use_cache": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
    }


def _read_hf_weights(path: str) -> dict[str, np.ndarray]:
    st = os.path.join(path, "model.safetensors")
    pt = os.path.join(path, "pytorch_model.bin")
    if os.path.exists(st):
        from safetensors.numpy import load_file

        return load_file(st)
    if os.path.exists(pt):
        import torch  # lazily: only for the PyTorch pickle format

        sd = torch.load(pt, map_location="cpu", weights_only=True)
        return {k: v.detach().float().numpy() for k, v in sd.items()}
    raise ConversionError(f"{path!r} holds neither model.safetensors nor pytorch_model.bin")


def load_hf_t5(path: str | os.PathLike, **overrides: Any) -> tuple[ModelConfig, nnx.Module]:
    """Load a HF T5 v1.1 directory (config.json + weights) into (config, model).

    ``overrides`` are ModelConfig fields to change (e.g. scan_layers=False, dtype=...).
    """
    path = os.fspath(path)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise ConversionError(f"{path!r} has no config.json (expected a Hugging Face T5 dir)")
    with open(cfg_path, encoding="utf-8") as f:
        hf = json.load(f)
    cfg = config_from_hf(hf, name=os.path.basename(os.path.normpath(path)) or "hf_t5")
    if overrides:
        cfg = cfg.replace(**overrides)
    canon = hf_to_canonical(cfg, _read_hf_weights(path))
    return cfg, canonical_to_model(cfg, canon)


def export_hf_t5(
    cfg: ModelConfig, model: nnx.Module, path: str | os.PathLike, vocab_size: int | None = None
) -> None:
    """Write ``config.json`` + ``model.safetensors`` in the Hugging Face T5 layout.

    ``vocab_size``: the real vocabulary size (the store's, e.g. 359 for the byte
    vocabulary); the padded rows above it are dropped, so HF ``generate`` can only emit
    ids the vocabulary has. None keeps every row of the model (``cfg.vocab_size``).

    transformers >= 5 always ties T5's ``lm_head`` to the embedding in its config (the
    stored ``tie_word_embeddings=False`` becomes ``scale_decoder_outputs=False``), so a
    plain ``from_pretrained`` of this untied T5 v1.1 keeps both weights but logs that they
    differ; ``from_pretrained(path, tie_word_embeddings=False)`` loads it silently.
    """
    from safetensors.numpy import save_file

    path = os.fspath(path)
    _check_convertible(cfg)
    rows = _vocab_rows(cfg, vocab_size)
    sd = canonical_to_hf(cfg, model_to_canonical(model))
    for key in ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        sd[key] = np.ascontiguousarray(sd[key][:rows])
    sd["lm_head.weight"] = np.ascontiguousarray(sd["lm_head.weight"][:rows])
    os.makedirs(path, exist_ok=True)
    save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config_dict(cfg, rows), f, indent=2)


# ----------------------------------------------------------------------------------------
# T5X
# ----------------------------------------------------------------------------------------
_T5X_LAYER = re.compile(r"^(encoder|decoder)/layers_(\d+)/(.+)$")
_T5X_RENAME = {  # T5X sub-path -> canonical sub-path (per layer)
    "attention": "self_attention",  # encoder
    "pre_attention_layer_norm": "pre_self_attention_layer_norm",  # encoder
}


def t5x_to_canonical(cfg: ModelConfig, params: dict[str, np.ndarray]) -> Canonical:
    """Canonical dict from flat T5X params ``{"encoder/layers_0/attention/query/kernel": ...}``."""
    d, h, k = cfg.d_model, cfg.num_heads, cfg.head_dim
    c: Canonical = {}
    for name, arr in params.items():
        arr = np.asarray(arr, np.float32)
        m = _T5X_LAYER.match(name)
        if m:
            stack, i, rest = m.groups()
            parts = rest.split("/")
            if stack == "encoder" and parts[0] in _T5X_RENAME:
                parts[0] = _T5X_RENAME[parts[0]]
            if parts[-1] in ("kernel", "scale"):
                leaf = parts.pop()
            else:
                raise ConversionError(f"unexpected T5X parameter {name!r}")
            if parts[-1] in _ATTN:
                arr = arr.reshape(h, k, d) if parts[-1] == "out" else arr.reshape(d, h, k)
            elif leaf == "scale":
                parts.append("scale")
            c[f"{stack}/layers_{i}/{'/'.join(parts)}"] = arr
        elif name == "token_embedder/embedding":
            c[name] = _pad_vocab(arr, 0, cfg.vocab_size)
        elif name == "decoder/logits_dense/kernel":
            c[name] = _pad_vocab(arr, 1, cfg.vocab_size)
        else:
            c[name] = arr
    return c


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(tree, dict):
        for key, val in tree.items():
            out.update(_flatten(val, f"{prefix}/{key}" if prefix else str(key)))
    else:
        out[prefix] = tree
    return out


def _is_ts_spec(x: Any) -> bool:
    return isinstance(x, dict) and "driver" in x and ("kvstore" in x or "path" in x)


def _read_legacy_t5x(path: str) -> dict[str, Any]:
    """Legacy T5X: a msgpack tree (file ``checkpoint``) whose large leaves are tensorstore
    specs with paths relative to the checkpoint directory (zarr arrays beside it)."""
    import tensorstore as ts
    from flax import serialization

    with open(os.path.join(path, "checkpoint"), "rb") as f:
        tree = serialization.msgpack_restore(f.read())
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if _is_ts_spec(node):
            spec = dict(node)
            kv = dict(spec.get("kvstore") or {"driver": "file", "path": spec.pop("path")})
            if kv.get("driver") == "file" and not os.path.isabs(kv["path"]):
                kv["path"] = os.path.join(path, kv["path"])
            spec["kvstore"] = kv
            out[prefix] = ts.open(spec, open=True).result().read().result()
        elif isinstance(node, dict):
            for key, val in node.items():
                walk(val, f"{prefix}/{key}" if prefix else str(key))
        else:
            out[prefix] = node

    walk(tree, "")
    return out


def read_t5x_params(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Flat ``{param path: array}`` of the ``target`` tree of a T5X checkpoint directory."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise ConversionError(f"T5X checkpoint {path!r} is not a directory")
    legacy = os.path.join(path, "checkpoint")
    if os.path.isfile(legacy):
        flat = _read_legacy_t5x(path)
    else:
        import orbax.checkpoint as ocp

        tree = ocp.PyTreeCheckpointer().restore(path)
        flat = _flatten(tree)
    target = {
        k[len("target/") :]: np.asarray(v) for k, v in flat.items() if k.startswith("target/")
    }
    if not target:
        raise ConversionError(f"T5X checkpoint {path!r} has no 'target' parameters")
    return target


def load_t5x_checkpoint(path: str | os.PathLike, cfg: ModelConfig) -> nnx.Module:
    """Model for ``cfg`` with weights from a T5X checkpoint directory (T5 v1.1 names)."""
    _check_convertible(cfg)
    params = read_t5x_params(path)
    return canonical_to_model(cfg, t5x_to_canonical(cfg, params))


def canonical_to_t5x(cfg: ModelConfig, c: Canonical) -> dict[str, np.ndarray]:
    """Flat T5X param dict (kernels flattened as T5X stores them) from a canonical dict."""
    d, hk = cfg.d_model, cfg.num_heads * cfg.head_dim
    inv = {v: k for k, v in _T5X_RENAME.items()}
    out: dict[str, np.ndarray] = {}
    for name, arr in c.items():
        m = _T5X_LAYER.match(name)
        if not m:
            out[name] = arr
            continue
        stack, i, rest = m.groups()
        parts = rest.split("/")
        if stack == "encoder" and parts[0] in inv:
            parts[0] = inv[parts[0]]
        if parts[-1] in _ATTN:
            arr = arr.reshape(hk, d) if parts[-1] == "out" else arr.reshape(d, hk)
            parts.append("kernel")
        elif parts[-1] in ("wi_0", "wi_1", "wo"):
            parts.append("kernel")
        out[f"{stack}/layers_{i}/{'/'.join(parts)}"] = arr
    return out


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"a/b": x}`` -> ``{"a": {"b": x}}`` (the inverse of :func:`_flatten`)."""
    tree: dict[str, Any] = {}
    for name, leaf in flat.items():
        node = tree
        *parents, last = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return tree


def export_t5x(cfg: ModelConfig, model: nnx.Module, path: str | os.PathLike, step: int) -> None:
    """Write a T5X checkpoint directory (orbax PyTree: ``target`` params + ``state/step``).

    Parameter names and kernel shapes are T5X's (:func:`canonical_to_t5x`), with every
    embedding row of the model (T5X pads its vocabularies to a multiple of 128 too); it
    reads back with :func:`load_t5x_checkpoint` and the same ModelConfig. No optimizer
    state is written.
    """
    import orbax.checkpoint as ocp

    _check_convertible(cfg)
    flat = canonical_to_t5x(cfg, model_to_canonical(model))
    tree = {"target": _nest(flat), "state": {"step": np.int64(step)}}
    ocp.PyTreeCheckpointer().save(os.path.abspath(os.fspath(path)), tree)
