"""Token store: sharded memory-mapped random access, manifest, atomic commit, bad stores."""

import json
import os

import numpy as np
import pytest

from repeat_scaling.data.store import StoreError, StoreWriter, TokenStore
from repeat_scaling.data.vocab import VocabInfo, load_vocab_info


def _write(tmp_path, docs, vocab=None, shard_tokens=7, name="store"):
    vocab = vocab or load_vocab_info("byte")
    w = StoreWriter(str(tmp_path / name), vocab, shard_tokens=shard_tokens)
    for split in ("train", "validation"):
        sw = w.split_writer(split)
        for d in docs:
            sw.write(np.append(d, 1))
    return w.commit({"source": {"spec": "test"}})


def test_random_access_across_shards(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 359, size=rng.integers(1, 20)) for _ in range(30)]
    flat = np.concatenate([np.append(d, 1) for d in docs])
    store = _write(tmp_path, docs)
    sp = store.split("train")
    assert (sp.num_tokens, sp.num_documents, sp.dtype) == (len(flat), 30, np.uint16)
    assert store.manifest["splits"]["train"]["tokens"] == len(flat)
    assert len(store.manifest["splits"]["train"]["shards"]) == -(-len(flat) // 7)
    for start in range(len(flat)):
        for length in (0, 1, 6, 7, 8, 23):
            if start + length <= len(flat):
                np.testing.assert_array_equal(
                    sp.tokens(start, length), flat[start : start + length]
                )
    np.testing.assert_array_equal(
        sp.document_offsets[:3], [0, len(docs[0]) + 1, len(docs[0]) + len(docs[1]) + 2]
    )
    np.testing.assert_array_equal(sp.document(4), np.append(docs[4], 1))
    with pytest.raises(IndexError, match=r"tokens\(\d+, 2\) out of range"):
        sp.tokens(len(flat) - 1, 2)
    with pytest.raises(IndexError):
        sp.tokens(-1, 1)
    sp.verify()
    assert not sp.tokens(0, 3).flags.writeable  # a view into the read-only map


def test_uint32_for_large_vocab(tmp_path):
    big = VocabInfo(kind="sentencepiece", path="/x.model", sha256="ab" * 32, vocab_size=70_000)
    store = _write(tmp_path, [np.array([65_535, 69_999, 5])], vocab=big, shard_tokens=1 << 20)
    sp = store.split("validation")
    assert sp.dtype == np.uint32
    assert sp.tokens(0, 4).tolist() == [65_535, 69_999, 5, 1]


def test_vocab_mismatch_and_broken_stores(tmp_path):
    store = _write(tmp_path, [np.array([5, 6, 7])])
    other = VocabInfo(kind="sentencepiece", path="/v.model", sha256="cd" * 32, vocab_size=32_100)
    with pytest.raises(
        StoreError, match=r"prepared with vocabulary byte .* but sentencepiece /v.model"
    ):
        TokenStore(store.path, expect_vocab=other)
    TokenStore(store.path, expect_vocab="byte").check_vocab(load_vocab_info("byte"))
    with pytest.raises(StoreError, match="does not exist; run repeat_scaling.prepare"):
        TokenStore(tmp_path / "nope")
    with pytest.raises(StoreError, match="has no split 'test'"):
        store.split("test")
    shard = os.path.join(
        store.path, "train", store.manifest["splits"]["train"]["shards"][0]["file"]
    )
    with open(shard, "ab") as f:
        f.write(b"\x00\x00")
    with pytest.raises(StoreError, match=r"has 10 bytes, expected 8; re-run prepare"):
        TokenStore(store.path).split("train").tokens(0, 1)
    manifest = json.loads(open(os.path.join(store.path, "manifest.json")).read())
    manifest["format_version"] = 99
    with open(os.path.join(store.path, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    with pytest.raises(StoreError, match="format_version 99, expected 1"):
        TokenStore(store.path)


def test_uncommitted_writer_leaves_no_store(tmp_path):
    w = StoreWriter(str(tmp_path / "s"), load_vocab_info("byte"))
    w.split_writer("train").write(np.array([4, 1]))
    assert not (tmp_path / "s").exists()
    assert [p.name for p in tmp_path.iterdir()][0].startswith("s.partial-")
    w.abort()
    assert list(tmp_path.iterdir()) == []
