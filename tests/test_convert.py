"""Checkpoint conversion: Hugging Face T5 v1.1 parity and round trips, T5X directories."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from repeat_scaling.models import convert  # noqa: E402

T5_KW = dict(
    vocab_size=256,
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_decoder_layers=3,
    num_heads=4,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
    dropout_rate=0.0,
)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random tiny HF T5 v1.1 (untied lm_head, as in the real checkpoints) on disk."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    config = transformers.T5Config(**T5_KW)
    model = transformers.T5ForConditionalGeneration(config).eval()
    # transformers >= 5 ties lm_head to the embedding; T5 v1.1 checkpoints have their own.
    model.lm_head.weight = torch.nn.Parameter(torch.randn(256, 32) * 0.3)
    path = tmp_path_factory.mktemp("hf_t5")
    tied = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")  # views of shared
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}
    save_file(sd, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(T5_KW | {"model_type": "t5"}))
    return path, model


def _inputs():
    rs = np.random.RandomState(0)
    enc = rs.randint(2, 256, (2, 40))
    enc[0, 25:] = 0  # encoder padding
    tgt = rs.randint(2, 256, (2, 30))
    tgt[1, 20:] = 0  # decoder padding
    dec = np.concatenate([np.zeros((2, 1), np.int64), tgt[:, :-1]], axis=1)
    return enc, dec, tgt


def _hf_logits(model, enc, dec):
    with torch.no_grad():
        return model(
            input_ids=torch.tensor(enc),
            attention_mask=torch.tensor(enc > 0),
            decoder_input_ids=torch.tensor(dec),
        ).logits.numpy()


def _ours(model, enc, dec, tgt):
    return np.asarray(
        nnx.jit(lambda m, a, b, c: m(a, b, c))(
            model, jnp.asarray(enc), jnp.asarray(dec), jnp.asarray(tgt)
        )
    )


def test_hf_parity_float32_with_padding(hf_dir):
    path, hf = hf_dir
    cfg, model = convert.load_hf_t5(path)
    assert (cfg.d_model, cfg.num_encoder_layers, cfg.num_decoder_layers) == (32, 2, 3)
    enc, dec, tgt = _inputs()
    ref, ours = _hf_logits(hf, enc, dec), _ours(model, enc, dec, tgt)
    valid = tgt > 0  # T5X masks decoder padding; compare the positions that count
    assert float(np.abs(ours - ref)[valid].max()) < 1e-4


def test_pytorch_bin_export_and_reimport_round_trip(hf_dir, tmp_path):
    path, hf = hf_dir
    cfg, model = convert.load_hf_t5(path, scan_layers=False)
    canon = convert.model_to_canonical(model)
    # Same weights from a pytorch_model.bin.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    torch.save(hf.state_dict(), bin_dir / "pytorch_model.bin")
    (bin_dir / "config.json").write_text((path / "config.json").read_text())
    _, from_bin = convert.load_hf_t5(bin_dir, scan_layers=False)
    for k, v in convert.model_to_canonical(from_bin).items():
        np.testing.assert_array_equal(v, canon[k])
    # Export -> re-import is exact, and the scanned layout converts alike.
    out = tmp_path / "export"
    convert.export_hf_t5(cfg, model, out)
    cfg2, back = convert.load_hf_t5(out)
    assert cfg2.replace(name=cfg.name, scan_layers=False) == cfg
    back_canon = convert.model_to_canonical(back)
    assert set(back_canon) == set(canon)
    for k, v in back_canon.items():
        np.testing.assert_array_equal(v, canon[k])
    # The exported state dict is a valid HF T5 state dict (strict load, same logits).
    from safetensors.torch import load_file

    fresh = transformers.T5ForConditionalGeneration(transformers.T5Config(**T5_KW)).eval()
    fresh.lm_head.weight = torch.nn.Parameter(torch.zeros(256, 32))
    fresh.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    enc, dec, _ = _inputs()
    np.testing.assert_allclose(_hf_logits(fresh, enc, dec), _hf_logits(hf, enc, dec), atol=1e-6)


def test_t5x_checkpoints_orbax_and_legacy(hf_dir, tmp_path):
    import orbax.checkpoint as ocp
    import tensorstore as ts
    from flax import serialization

    path, _ = hf_dir
    cfg, model = convert.load_hf_t5(path)
    canon = convert.model_to_canonical(model)
    flat = convert.canonical_to_t5x(cfg, canon)
    assert flat["encoder/layers_0/attention/query/kernel"].shape == (32, 32)
    assert flat["decoder/layers_2/encoder_decoder_attention/out/kernel"].shape == (32, 32)
    assert flat["encoder/layers_1/pre_attention_layer_norm/scale"].shape == (32,)
    assert flat["decoder/relpos_bias/rel_embedding"].shape == (4, 32)

    def nested(prefix_leaf):
        tree = {}
        for name, arr in flat.items():
            node = tree
            *parents, leaf = name.split("/")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = prefix_leaf(name, arr)
        return tree

    # T5X with orbax: a PyTree checkpoint holding target (params) and state.
    orbax_dir = tmp_path / "checkpoint_1000"
    ocp.PyTreeCheckpointer().save(
        orbax_dir, {"target": nested(lambda n, a: a), "state": {"step": np.int64(1000)}}
    )
    # Legacy T5X: msgpack tree with tensorstore (zarr) specs relative to the directory.
    legacy = tmp_path / "legacy" / "checkpoint_1000"
    legacy.mkdir(parents=True)

    def write_ts(name, arr):
        rel = "target." + name.replace("/", ".")
        spec = {
            "driver": "zarr",
            "kvstore": {"driver": "file", "path": rel},
            "metadata": {
                "shape": list(arr.shape),
                "chunks": list(arr.shape),
                "dtype": "<f4",
                "compressor": {"id": "gzip"},
            },
        }
        full = dict(spec, kvstore={"driver": "file", "path": str(legacy / rel)})
        ts.open(full, create=True, open=True).result().write(arr).result()
        return spec

    tree = {"target": nested(write_ts), "state": {"step": np.int64(1000)}}
    (legacy / "checkpoint").write_bytes(serialization.msgpack_serialize(tree))
    for ckpt in (orbax_dir, legacy):
        loaded = convert.load_t5x_checkpoint(ckpt, cfg)
        for k, v in convert.model_to_canonical(loaded).items():
            np.testing.assert_array_equal(v, canon[k])


def test_conversion_errors(hf_dir, tmp_path):
    with pytest.raises(convert.ConversionError, match="feed_forward_proj='relu'"):
        convert.config_from_hf(dict(T5_KW, feed_forward_proj="relu"))
    with pytest.raises(convert.ConversionError, match="no config.json"):
        convert.load_hf_t5(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(T5_KW))
    with pytest.raises(convert.ConversionError, match="neither model.safetensors"):
        convert.load_hf_t5(tmp_path)
    cfg, _ = convert.load_hf_t5(hf_dir[0])
    with pytest.raises(convert.ConversionError, match="param_share"):
        convert.canonical_to_model(cfg.replace(param_share=True), {})
    with pytest.raises(convert.ConversionError, match="no 'target'"):
        empty = tmp_path / "empty_ckpt"
        import orbax.checkpoint as ocp

        ocp.PyTreeCheckpointer().save(empty, {"state": {"step": np.int64(1)}})
        convert.load_t5x_checkpoint(empty, cfg)
