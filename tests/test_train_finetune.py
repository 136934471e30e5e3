"""Fine-tuning (``config.init_from``): from a run's checkpoint and from a Hugging Face T5.

Tiny models on the built-in corpus and the shared C4 sample. The demo optimiser warms up
linearly from a learning rate of 0, so the first fine-tuning update is exactly zero: the
fine-tuned run's step-1 parameters must equal the source parameters bit for bit, while
the optimizer state and the schedule start fresh.
"""

import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from test_train_loop import tiny_config

from repeat_scaling import run_files, sharding
from repeat_scaling.train import checkpointing, init_from, loop, optimizers
from repeat_scaling.train import config as config_lib
from repeat_scaling.train import state as state_lib


@pytest.fixture(scope="module")
def source_run(store_dir, tmp_path_factory):
    """A decoder-only run pre-trained 4 steps (causal LM, built-in corpus), ckpts 2 and 4."""
    work = tmp_path_factory.mktemp("pretrain")
    c = tiny_config(store_dir, **{"train.steps": 4, "train.checkpoint_every": 2})
    loop.train(c, work)
    return work


def _flat(tree):
    return {
        "/".join(str(getattr(k, "key", k)) for k in kp): np.asarray(x)
        for kp, x in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
    }


def _restore_full(workdir, c, step):
    cfg = config_lib.validate(c, num_devices=8)
    tx, _ = optimizers.make_optimizer(c.train.optimizer, int(c.train.steps))
    info = state_lib.abstract_state(cfg, tx, sharding.make_mesh({"data": -1}))
    ck = checkpointing.Checkpointer(workdir, save_every=1, read_only=True)
    try:
        return ck.restore(step, info.abstract)
    finally:
        ck.close()


def _finetune_config(store, **overrides):
    """Fine-tune: prefix LM (another objective) on the given store, 2 steps, ckpt each."""
    c = tiny_config(store, **{"train.steps": 2, "train.checkpoint_every": 1, **overrides})
    c.data.objective = "prefix_lm"
    return c


def test_finetune_from_run_starts_from_source_params(source_run, c4_byte_store, tmp_path):
    c = _finetune_config(c4_byte_store.path)
    c.init_from = str(source_run)
    work = tmp_path / "ft"
    summary = loop.train(c, work)
    assert summary["final_step"] == 2 and summary["resumed_from"] == 0

    # Step 1 params == the source's latest checkpoint (step 4): lr(0) = 0 under warmup.
    _, src, step = checkpointing.restore_params(source_run)
    assert step == 4
    _, ft1, _ = checkpointing.restore_params(work, 1)
    src, ft1 = _flat(src), _flat(ft1)
    assert src.keys() == ft1.keys()
    for k in src:
        np.testing.assert_array_equal(ft1[k], src[k], err_msg=k)
    # ... and the source really is trained (differs from a fresh init with this seed).
    cfg = config_lib.validate(c, num_devices=8)
    fresh = _flat(nnx.to_pure_dict(nnx.state(_build(cfg, c.seed), nnx.Param)))
    assert any(not np.array_equal(fresh[k], src[k]) for k in src)

    # Fresh optimizer state and schedule: Adam's count is 1 after one update (the source
    # state would say 5), and the logged learning rate of step 1 is the warmup's 0.
    state = _restore_full(work, c, 1)
    counts = [
        int(x)
        for kp, x in jax.tree_util.tree_flatten_with_path(jax.device_get(state["opt_state"]))[0]
        if "count" in jax.tree_util.keystr(kp)
    ]
    assert counts and set(counts) == {1}, counts
    lines = [json.loads(x) for x in (work / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    assert lines[0]["learning_rate"] == 0.0 and lines[1]["learning_rate"] > 0.0

    # The record: init_from.json == config.json derived["init_from"].
    rec = json.loads((work / "init_from.json").read_text())
    src_cfg = json.loads((source_run / "config.json").read_text())
    assert rec == {
        "path": str(source_run.absolute()),
        "kind": "run",
        "step": 4,
        "model": src_cfg["model"],
        "source_config": src_cfg["data"],
        "vocab_check": f"same vocabulary as {src_cfg['data']['store']}",
    }
    derived = json.loads((work / "config.json").read_text())["derived"]
    assert derived["init_from"] == rec

    # Rerun: resumes from its own checkpoint (init_from ignored; the checkpoint
    # directory RUN/checkpoints/4 names the same source) ...
    c.init_from = str(source_run / "checkpoints" / "4")
    assert loop.train(c, work)["resumed_from"] == 2
    c.init_from = str(source_run)
    # ... but a different source than the recorded one is a one-line error.
    c.train.steps = 4
    c.init_step = 2
    with pytest.raises(config_lib.ConfigError, match="init_step=2 differs from step 4") as e:
        loop.train(c, work)
    assert "\n" not in str(e.value)
    c.init_step, c.init_from = -1, str(tmp_path)
    with pytest.raises(config_lib.ConfigError, match=f"init_from={tmp_path} differs from"):
        loop.train(c, work)


def _build(cfg, seed):
    from repeat_scaling import models

    return models.build(cfg, nnx.Rngs(state_lib.init_key(seed)))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"model.d_ff": 256},
            r"init_from=\S+ step 4: parameter decoder/layers/\S*mlp/wi\S* has shape "
            r"\(2, 64, 128\) there but \(2, 64, 256\) in this model",
        ),
        (
            {"model.vocab_size": 512},
            r"step 4: parameter decoder/logits_dense/kernel has shape \(64, 384\) there but "
            r"\(64, 512\) in this model",
        ),
        ({"init_step": 3}, r"init_step=3 is not a committed checkpoint of \S+: \[2, 4\]"),
        ({"model.scan_layers": False}, r"set --config.model.scan_layers=True"),
    ],
)
def test_mismatch_errors_write_nothing(source_run, store_dir, tmp_path, overrides, message):
    c = _finetune_config(store_dir, **overrides)
    c.init_from = str(source_run)
    work = tmp_path / "ft"
    with pytest.raises(config_lib.ConfigError, match=message) as e:
        loop.train(c, work)
    assert "\n" not in str(e.value)
    assert not work.exists()


def test_bad_sources(source_run, store_dir, tmp_path):
    c = _finetune_config(store_dir)
    work = tmp_path / "ft"
    c.init_from = str(tmp_path / "missing")
    with pytest.raises(config_lib.ConfigError, match="missing does not exist"):
        loop.train(c, work)
    empty = tmp_path / "no_ckpt"
    empty.mkdir()
    c.init_from = str(empty)
    with pytest.raises(config_lib.ConfigError, match="has no config.json"):
        loop.train(c, work)
    (empty / "config.json").write_text((source_run / "config.json").read_text())
    with pytest.raises(config_lib.ConfigError, match="has no committed checkpoint"):
        loop.train(c, work)
    c.init_from = str(source_run / "checkpoints" / "3")
    with pytest.raises(config_lib.ConfigError, match=r"init_step=3 is not a committed checkpoint"):
        loop.train(c, work)
    c.init_from, c.init_step = str(source_run / "checkpoints" / "2"), 4
    with pytest.raises(config_lib.ConfigError, match=r"init_step=4 contradicts init_from=\S+/2"):
        loop.train(c, work)
    c.init_from, c.init_step = "", 4
    with pytest.raises(config_lib.ConfigError, match="init_step=4; expected -1 when no"):
        loop.train(c, work)
    assert not work.exists()


def _relative_store_copy(source_run, store_dir, dest: pathlib.Path) -> pathlib.Path:
    """A copy of ``source_run`` whose config.json names its store relatively: "store"."""
    shutil.copytree(source_run, dest)
    shutil.copytree(store_dir, dest / "store")
    cfg = json.loads((dest / "config.json").read_text())
    cfg["data"]["store"] = "store"
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def test_vocab_check_resolves_a_relative_store_in_the_source_workdir(
    source_run, store_dir, tmp_path, monkeypatch
):
    """The source's relative data.store is looked up in its workdir; a gone store warns."""
    from repeat_scaling.data.store import TokenStore

    src = _relative_store_copy(source_run, store_dir, tmp_path / "src")
    monkeypatch.chdir(tmp_path)  # "store" does not exist here: only src/store does
    c = _finetune_config(store_dir)
    cfg, vocab = config_lib.validate(c, num_devices=8), TokenStore(store_dir).vocab
    logs = []
    source = init_from.resolve(str(src), -1, cfg, vocab, log=logs.append)
    assert source.record()["vocab_check"] == f"same vocabulary as {src / 'store'}" and not logs

    # The source store (found inside the workdir) was prepared with another vocabulary.
    manifest = json.loads((src / "store" / "manifest.json").read_text())
    manifest["vocab"] |= {"kind": "tokens", "extra_ids": 0, "path": None, "sha256": None}
    (src / "store" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(config_lib.ConfigError, match=r"step 4 was trained with vocabulary tokens"):
        init_from.resolve(str(src), -1, cfg, vocab, log=logs.append)

    # Store gone: not checked, said once on the log and kept in the record.
    shutil.rmtree(src / "store")
    source = init_from.resolve(str(src), -1, cfg, vocab, log=logs.append)
    note = source.record()["vocab_check"]
    assert note.startswith("not checked: its data.store is not readable here (tried ")
    assert str(src / "store") in note
    assert logs == [f"warning: init_from={src} step 4: vocabulary {note}"]


def _record(workdir: pathlib.Path, path: str, step: int = 4) -> pathlib.Path:
    workdir.mkdir(parents=True)
    (workdir / run_files.INIT_FROM).write_text(
        json.dumps({"path": path, "kind": "run", "step": step})
    )
    return workdir


def test_check_resume_compares_real_paths_and_run_names(source_run, tmp_path, monkeypatch):
    """Resuming from another directory (symlinks, relative roots, a moved sweep) is fine."""
    real = tmp_path / "real"
    shutil.copytree(source_run, real / "sweep" / "pre", ignore=shutil.ignore_patterns("train"))
    (real / "sweep" / "other").mkdir()
    os.symlink(real, tmp_path / "link")
    # Started as "sweep/pre" from tmp/link (the recorded path keeps the symlink) ...
    work = _record(real / "sweep" / "ft", str(tmp_path / "link" / "sweep" / "pre"))
    monkeypatch.chdir(real)  # ... resumed from the real directory: the same source.
    assert init_from.check_resume(work, "sweep/pre", -1)["step"] == 4
    assert init_from.check_resume(work, "sweep/pre/checkpoints/4", -1)["step"] == 4
    with pytest.raises(config_lib.ConfigError, match=r"init_step=2 differs from step 4"):
        init_from.check_resume(work, "sweep/pre/checkpoints/2", -1)
    with pytest.raises(config_lib.ConfigError, match=r"init_from=\S+/sweep/other differs from"):
        init_from.check_resume(work, "sweep/other", -1)

    # A sweep moved since it started: the recorded path is gone; the same run name resumes.
    moved = _record(real / "sweep" / "ft2", str(tmp_path / "old" / "sweep" / "pre"))
    assert init_from.check_resume(moved, "sweep/pre", -1)["step"] == 4
    with pytest.raises(config_lib.ConfigError, match="differs from") as e:
        init_from.check_resume(moved, "sweep/other", -1)
    assert "\n" not in str(e.value)

    # gs:// sources compare as URLs (no file system involved).
    gs = _record(tmp_path / "gs_ft", "gs://bkt/sweep/pre")
    assert init_from.check_resume(gs, "gs://bkt/sweep/pre/", -1)["path"] == "gs://bkt/sweep/pre"
    with pytest.raises(config_lib.ConfigError, match="init_from=gs://bkt/sweep/other differs"):
        init_from.check_resume(gs, "gs://bkt/sweep/other", -1)
    with pytest.raises(config_lib.ConfigError, match=f"init_from={real / 'sweep' / 'pre'} differs"):
        init_from.check_resume(gs, str(real / "sweep" / "pre"), -1)


def test_init_from_accepts_gs_urls_only(store_dir):
    c = _finetune_config(store_dir)
    c.init_from = "gs://bkt/sweep/pre"
    config_lib.validate(c, num_devices=8)
    c.init_from = "s3://bkt/sweep/pre"
    with pytest.raises(config_lib.ConfigError, match="init_from='s3://bkt/sweep/pre'; expected a"):
        config_lib.validate(c, num_devices=8)
    with pytest.raises(config_lib.ConfigError, match="expected gs://BUCKET/PATH"):
        init_from.normalize("gs://", -1)


def test_first_mismatch_orders_paths():
    here = {"a/x": (2, 3), "b/y": (4,)}
    assert init_from.first_mismatch(here, dict(here)) is None
    assert init_from.first_mismatch({"a/x": (2, 3)}, here) == (
        "parameter b/y with shape (4,) in this model does not exist there"
    )
    assert init_from.first_mismatch({"a/x": (2, 5), "b/y": (1,)}, here) == (
        "parameter a/x has shape (2, 5) there but (2, 3) in this model"
    )


# ----------------------------------------------------------------------------------
# Hugging Face T5
# ----------------------------------------------------------------------------------
def _hf_t5_dir(path: pathlib.Path, **kw) -> pathlib.Path:
    """A random HF T5 v1.1 of t5_tiny's shapes (vocab 384 = the padded byte vocab)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    config_kw = dict(
        vocab_size=384,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=0.0,
    )
    config_kw.update(kw)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**config_kw)).eval()
    model.lm_head.weight = torch.nn.Parameter(torch.randn(384, config_kw["d_model"]) * 0.3)
    tied = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}
    path.mkdir(parents=True)
    save_file(sd, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config_kw | {"model_type": "t5"}))
    return path


def test_finetune_from_hugging_face_t5(store_dir, tmp_path):
    from repeat_scaling.models import convert

    hf = _hf_t5_dir(tmp_path / "hf_t5")
    c = tiny_config(store_dir, "t5", **{"train.steps": 1, "train.checkpoint_every": 1})
    c.init_from = str(hf)
    work = tmp_path / "ft"
    loop.train(c, work)
    _, want = convert.load_hf_t5(hf)
    want = _flat(nnx.to_pure_dict(nnx.state(want, nnx.Param)))
    _, got, _ = checkpointing.restore_params(work, 1)
    got = _flat(got)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    rec = json.loads((work / "init_from.json").read_text())
    assert rec["kind"] == "huggingface" and rec["step"] is None and rec["source_config"] is None
    assert rec["vocab_check"] is None
    assert rec["path"] == str(hf) and rec["model"]["d_model"] == 64

    # Another size: the first differing parameter, nothing written; init_step refused.
    wide = _hf_t5_dir(tmp_path / "hf_wide", d_ff=96)
    c.init_from = str(wide)
    with pytest.raises(config_lib.ConfigError, match=r"\(Hugging Face T5\): parameter ") as e:
        loop.train(c, tmp_path / "ft2")
    assert "(2, 64, 96) there but (2, 64, 128) in this model" in str(e.value)
    c.init_from, c.init_step = str(hf), 5
    with pytest.raises(config_lib.ConfigError, match="init_step=5; expected -1 for a Hugging"):
        loop.train(c, tmp_path / "ft2")
    assert not (tmp_path / "ft2").exists()
