"""prepare: store contents, seeded order, idempotence, workers, CLI, crash safety."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from repeat_scaling.data.sources import parse_source
from repeat_scaling.data.store import StoreError, TokenStore
from repeat_scaling.data.vocab import Encoder
from repeat_scaling.prepare import prepare_store


def _decoded_docs(store, split, encoder):
    sp = store.split(split)
    return [encoder.decode(sp.document(i)[:-1]) for i in range(sp.num_documents)]


def test_builtin_byte_store_roundtrip_and_idempotence(tmp_path):
    messages = []
    t0 = time.time()
    store = prepare_store("builtin", "byte", tmp_path / "b", progress=False, log=messages.append)
    assert time.time() - t0 < 30
    src = parse_source("builtin")
    enc = Encoder("byte")
    for split in ("train", "validation"):
        sp = store.split(split)
        texts = [t for _, t in src.documents(split)]
        m = store.manifest["splits"][split]
        assert (m["documents"], m["tokens"]) == (sp.num_documents, sp.num_tokens)
        assert sp.num_documents == len(texts)
        assert sp.num_tokens == sum(len(t.encode()) + 1 for t in texts)
        bounds = np.append(sp.document_offsets, sp.num_tokens)
        eos_positions = np.flatnonzero(sp.tokens(0, sp.num_tokens) == 1)
        np.testing.assert_array_equal(eos_positions, bounds[1:] - 1)  # one EOS ends each doc
        decoded = _decoded_docs(store, split, enc)
        assert sorted(decoded) == sorted(texts)
        if split == "train":
            assert decoded != texts  # shuffled by the seeded hash, not source order
    assert (
        store.manifest["vocab"]["kind"] == "byte" and store.manifest["source"]["spec"] == "builtin"
    )

    manifest_mtime = os.stat(tmp_path / "b" / "manifest.json").st_mtime_ns
    again = prepare_store("builtin", "byte", tmp_path / "b", progress=False, log=messages.append)
    assert "up to date" in messages[-1] and "nothing to do" in messages[-1]
    assert os.stat(tmp_path / "b" / "manifest.json").st_mtime_ns == manifest_mtime
    assert again.manifest == store.manifest

    with pytest.raises(StoreError, match="different inputs .* pass --overwrite"):
        prepare_store(
            "builtin", "byte", tmp_path / "b", seed=1, progress=False, log=messages.append
        )
    reseeded = prepare_store(
        "builtin", "byte", tmp_path / "b", seed=1, overwrite=True, progress=False
    )
    assert reseeded.manifest["options"]["seed"] == 1
    assert _decoded_docs(reseeded, "validation", enc) != _decoded_docs(
        store, "validation", enc
    ) or (store.split("validation").num_documents < 2)
    assert sorted(_decoded_docs(reseeded, "train", enc)) == sorted(
        _decoded_docs(store, "train", enc)
    )
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(StoreError, match="exists and is not a token store"):
        prepare_store("builtin", "byte", tmp_path / "junk", progress=False)


def test_sentencepiece_workers_give_identical_store(shared_data, tmp_path):
    from repeat_scaling.train_vocab import train_vocab

    glob = f"{shared_data}/c4-en-sample/c4-*.sample-*.json.gz"
    model = train_vocab(f"json:{glob}", 300, tmp_path / "v.model", max_docs=100)
    kw = {"max_docs": 120, "progress": False, "chunk_docs": 16, "log": lambda m: None}
    one = prepare_store(f"json:{glob}", model.path, tmp_path / "w1", num_workers=1, **kw)
    two = prepare_store(f"json:{glob}", model.path, tmp_path / "w2", num_workers=2, **kw)
    assert one.vocab == two.vocab and one.vocab.vocab_size == 400
    for split in ("train", "validation"):
        a, b = one.split(split), two.split(split)
        assert a.num_documents == 120
        np.testing.assert_array_equal(a.tokens(0, a.num_tokens), b.tokens(0, b.num_tokens))
    # Every stored document is exactly the encoding of one source document, plus EOS.
    src = parse_source(f"json:{glob}", max_docs=120)
    texts = [t for _, t in src.documents("train")]
    expected = {tuple(ids) for ids in Encoder(model.path).encode_batch(texts)}
    train = one.split("train")
    stored = {tuple(train.document(i)[:-1].tolist()) for i in range(train.num_documents)}
    assert stored == expected
    with pytest.raises(StoreError, match="prepared with vocabulary sentencepiece"):
        TokenStore(one.path, expect_vocab="byte")


def _run_cli(args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "repeat_scaling.prepare", *args],
        capture_output=True,
        text=True,
        **kw,
    )


def test_cli_config_idempotence_and_bad_input(shared_data, tmp_path):
    cfg = tmp_path / "cfg.py"
    cfg.write_text(
        "import ml_collections\n\n"
        "def get_config():\n"
        "    return ml_collections.ConfigDict(dict(\n"
        f"        source='text:{shared_data}/tinystories/*.txt',\n"
        "        text_separator='<|endoftext|>', validation_docs=100, vocab='unused'))\n"
    )
    out = tmp_path / "stories"
    args = [f"--config={cfg}", "--vocab=byte", f"--out={out}", "--noprogress"]
    first = _run_cli(args)
    assert first.returncode == 0, first.stderr
    store = TokenStore(out)
    assert store.manifest["splits"]["validation"]["documents"] == 100
    assert store.manifest["source"]["spec"].startswith("text:")
    second = _run_cli(args)
    assert second.returncode == 0 and "up to date" in second.stderr

    bad = _run_cli(
        [f"--source=json:{tmp_path}/none/*.json.gz", "--vocab=byte", f"--out={tmp_path}/x"]
    )
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        f"error: source 'json:{tmp_path}/none/*.json.gz': the glob '{tmp_path}/none/*.json.gz' "
        "matches no files"
    ]
    bad_vocab = _run_cli(["--source=builtin", f"--vocab={cfg}", f"--out={tmp_path}/x"])
    assert bad_vocab.returncode == 1 and "not a loadable SentencePiece model" in bad_vocab.stderr
    assert "Traceback" not in bad_vocab.stderr


def test_killed_prepare_leaves_no_store_and_is_cleaned_up(tmp_path):
    out = tmp_path / "synth"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "repeat_scaling.prepare",
            "--source=synthetic:num_docs=30000",
            "--vocab=byte",
            f"--out={out}",
            "--noprogress",
        ],
        stderr=subprocess.DEVNULL,
    )
    # Kill hard once tokens are being written (the scratch file of the train split grows).
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        scratch = list(tmp_path.glob("synth.partial-*/_scratch/train.raw"))
        if scratch and scratch[0].stat().st_size > 0:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "prepare finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    partials = [p for p in tmp_path.iterdir() if p.name.startswith("synth.partial-")]
    assert len(partials) == 1
    with pytest.raises(StoreError, match="does not exist"):
        TokenStore(out)
    store = prepare_store("synthetic:num_docs=50", "byte", out, progress=False, log=lambda m: None)
    assert store.split("train").num_documents + store.split("validation").num_documents == 50
    assert [p.name for p in tmp_path.iterdir()] == ["synth"]  # the stale partial is removed
