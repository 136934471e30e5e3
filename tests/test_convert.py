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


# ----------------------------------------------------------------------------------------
# Export of a run (python -m repeat_scaling.export)
# ----------------------------------------------------------------------------------------
BYTE_IDS = 359  # the byte vocabulary's real size (the model pads it to 384)


@pytest.fixture(scope="module")
def t5_run(tmp_path_factory):
    """A t5_tiny run trained 1 step (span corruption, built-in corpus, byte vocabulary)."""
    from test_train_loop import tiny_config

    from repeat_scaling.prepare import prepare_store
    from repeat_scaling.train import loop

    store = tmp_path_factory.mktemp("store") / "builtin-byte"
    prepare_store("builtin", "byte", str(store), progress=False, log=lambda *_: None)
    work = tmp_path_factory.mktemp("t5_run")
    loop.train(tiny_config(store, "t5", **{"train.steps": 1, "train.checkpoint_every": 1}), work)
    return work


def _load_quietly(path, **kw):
    """``from_pretrained`` with every Python warning and transformers log line captured."""
    import logging
    import warnings

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = transformers.utils.logging.get_logger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = transformers.T5ForConditionalGeneration.from_pretrained(str(path), **kw)
    finally:
        logger.removeHandler(handler)
    msgs = [str(w.message) for w in caught] + [
        r.getMessage() for r in records if r.levelno >= logging.WARNING
    ]
    return model.eval(), msgs


def test_export_cli_hf_real_vocab_loads_in_transformers(t5_run, tmp_path, capsys):
    from repeat_scaling import export
    from repeat_scaling.train import checkpointing, init_from

    out = tmp_path / "hf"
    assert export.main([f"--workdir={t5_run}", f"--out={out}"]) == 0
    assert "step 1 as hf" in capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == BYTE_IDS and config["tie_word_embeddings"] is False
    assert json.loads((out / "export.json").read_text())["embedding_rows"] == BYTE_IDS

    hf, msgs = _load_quietly(out, tie_word_embeddings=False)
    assert msgs == []  # no warning, no transformers log line
    assert hf.shared.weight.shape[0] == hf.lm_head.weight.shape[0] == BYTE_IDS
    assert hf.config.scale_decoder_outputs is False
    suite, _, _ = checkpointing.restore_params(t5_run)
    assert suite.cfg.vocab_size == 384
    rs = np.random.RandomState(1)
    enc, tgt = rs.randint(2, BYTE_IDS, (2, 24)), rs.randint(2, BYTE_IDS, (2, 12))
    enc[1, 16:] = 0
    dec = np.concatenate([np.zeros((2, 1), np.int64), tgt[:, :-1]], axis=1)
    ref = _ours(suite, enc, dec, tgt)[..., :BYTE_IDS]
    np.testing.assert_allclose(_hf_logits(hf, enc, dec), ref, atol=1e-4)
    # A plain from_pretrained gives the same model; transformers 5 only logs that the
    # untied lm_head differs from the embedding (its T5Config always asks to tie them).
    plain, msgs = _load_quietly(out)
    assert all("tie_word_embeddings=False" in m for m in msgs), msgs
    if int(transformers.__version__.split(".")[0]) >= 5:
        assert len(msgs) == 1  # the capture sees transformers' log lines
    np.testing.assert_allclose(_hf_logits(plain, enc, dec), ref, atol=1e-4)

    # The reverse import pads the vocabulary again: the run's parameters, exactly.
    cfg, back = convert.load_hf_t5(out, scan_layers=suite.cfg.scan_layers)
    assert cfg.vocab_size == 384
    want, got = convert.model_to_canonical(suite), convert.model_to_canonical(back)
    assert set(got) == set(want)
    emb, head = "token_embedder/embedding", "decoder/logits_dense/kernel"
    np.testing.assert_array_equal(got[emb][:BYTE_IDS], want[emb][:BYTE_IDS])
    np.testing.assert_array_equal(got[head][:, :BYTE_IDS], want[head][:, :BYTE_IDS])
    assert not got[emb][BYTE_IDS:].any() and not got[head][:, BYTE_IDS:].any()
    for k in set(got) - {emb, head}:
        np.testing.assert_array_equal(got[k], want[k])
    init_from.resolve(str(out), -1, suite.cfg)  # fine-tuning from the export is accepted


def test_export_t5x_reads_back(t5_run, tmp_path):
    from repeat_scaling import export
    from repeat_scaling.train import checkpointing

    rec = export.export(str(t5_run), str(tmp_path / "t5x"), fmt="t5x", step=1)
    assert rec["step"] == 1 and rec["embedding_rows"] == 384
    suite, _, _ = checkpointing.restore_params(t5_run)
    loaded = convert.load_t5x_checkpoint(tmp_path / "t5x", suite.cfg)
    want = convert.model_to_canonical(suite)
    for k, v in convert.model_to_canonical(loaded).items():
        np.testing.assert_array_equal(v, want[k])


def test_export_cli_errors_are_one_line(t5_run, tmp_path, capsys):
    from repeat_scaling import export
    from repeat_scaling.models import sizes

    bare = tmp_path / "bare"  # a run's record without checkpoints
    bare.mkdir()
    (bare / "config.json").write_text((t5_run / "config.json").read_text())
    dec = tmp_path / "dec"
    dec.mkdir()
    d = json.loads((t5_run / "config.json").read_text())
    d["model"] = sizes.get("dec_tiny").to_dict()
    (dec / "config.json").write_text(json.dumps(d))
    out = str(tmp_path / "out")
    cases = [
        ([f"--workdir={tmp_path}/nope"], "does not exist; expected a training workdir"),
        ([f"--workdir={bare}"], "has no committed checkpoint"),
        ([f"--workdir={t5_run}", "--format=onnx"], "--format='onnx'; expected one of hf, t5x"),
        ([f"--workdir={t5_run}", "--step=7"], "--step=7 is not a committed checkpoint"),
        ([f"--workdir={t5_run}", "--step=x"], "argument --step: invalid int value: 'x'"),
        ([f"--workdir={dec}"], "only encoder_decoder (T5) models convert"),
        ([f"--workdir={t5_run}", f"--out={t5_run}"], "exists and is not an empty directory"),
    ]
    for argv, message in cases:
        argv = argv if any(a.startswith("--out") for a in argv) else [*argv, f"--out={out}"]
        try:
            code = export.main(argv)
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err
        assert code == 1 and err.startswith("error: ") and message in err, (argv, err)
        assert err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_export_hf_drops_padded_rows_and_import_pads_again(tmp_path):
    from repeat_scaling.models import build, sizes

    cfg = sizes.get("t5_tiny").replace(vocab_size=512, scan_layers=False)
    model = build(cfg, nnx.Rngs(0))
    convert.export_hf_t5(cfg, model, tmp_path, vocab_size=500)
    from safetensors.numpy import load_file

    sd = load_file(str(tmp_path / "model.safetensors"))
    assert sd["shared.weight"].shape == sd["lm_head.weight"].shape == (500, 64)
    cfg2, back = convert.load_hf_t5(tmp_path, scan_layers=False)
    assert cfg2.vocab_size == 512
    want, got = convert.model_to_canonical(model), convert.model_to_canonical(back)
    np.testing.assert_array_equal(
        got["token_embedder/embedding"][:500], want["token_embedder/embedding"][:500]
    )
    assert not got["token_embedder/embedding"][500:].any()
    with pytest.raises(convert.ConversionError, match="vocab_size=513; expected 1..512"):
        convert.export_hf_t5(cfg, model, tmp_path / "x", vocab_size=513)
