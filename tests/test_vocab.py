"""Vocabulary facts and TF-free encoders, checked against seqio on real C4 text."""

import gzip
import json
import subprocess
import sys

import numpy as np
import pytest

from repeat_scaling.data import vocab as vocab_lib
from repeat_scaling.data.vocab import Encoder, VocabError, VocabInfo, load_vocab_info


def _c4_texts(shared_data, n=20):
    path = shared_data / "c4-en-sample" / "c4-validation.sample-1000.json.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for _, line in zip(range(n), f)]


@pytest.fixture(scope="module")
def sp_model(shared_data, tmp_path_factory):
    from repeat_scaling.train_vocab import train_vocab

    out = tmp_path_factory.mktemp("vocab") / "small.model"
    glob = str(shared_data / "c4-en-sample" / "c4-train.*.json.gz")
    return train_vocab(f"json:{glob}", 400, out, max_docs=150)


def test_byte_info_and_sentinels():
    info = load_vocab_info("byte")
    assert (info.kind, info.vocab_size, info.extra_ids) == ("byte", 359, 100)
    assert (info.pad_id, info.eos_id, info.unk_id) == (0, 1, 2)
    assert info.sentinel(0) == 358 and info.sentinel(99) == 259
    assert info.token_dtype == np.uint16
    assert VocabInfo.from_dict(info.to_dict()) == info
    with pytest.raises(VocabError, match="sentinel index 100"):
        info.sentinel(100)


def test_byte_encoder_matches_seqio(shared_data):
    texts = _c4_texts(shared_data) + ["naïve café 日本語 😀", ""]
    seqio_vocab = vocab_lib.seqio_vocabulary("byte")
    assert seqio_vocab.vocab_size == 359
    enc = Encoder("byte")
    for text, ids in zip(texts, enc.encode_batch(texts)):
        assert ids.tolist() == list(seqio_vocab.encode(text))
        assert enc.decode(ids) == text


def test_sentencepiece_encoder_matches_seqio(shared_data, sp_model):
    assert sp_model.kind == "sentencepiece" and sp_model.vocab_size == 400 + 100
    assert len(sp_model.sha256) == 64
    seqio_vocab = vocab_lib.seqio_vocabulary(sp_model)
    assert seqio_vocab.vocab_size == sp_model.vocab_size
    # Sentinel text maps to the same (counting-down) id in both encoders.
    texts = _c4_texts(shared_data) + ["fill the <extra_id_0> and <extra_id_7> gaps"]
    enc = Encoder(sp_model.path)
    for text, ids in zip(texts, enc.encode_batch(texts)):
        assert ids.tolist() == list(seqio_vocab.encode(text))
    last = enc.encode("a <extra_id_0> b").tolist()
    assert sp_model.sentinel(0) in last


def test_bad_vocab_specs(tmp_path):
    with pytest.raises(VocabError, match="neither 'byte' nor an existing"):
        load_vocab_info(str(tmp_path / "missing.model"))
    bad = tmp_path / "garbage.model"
    bad.write_bytes(b"\x00not a sentencepiece model\xff" * 10)
    with pytest.raises(VocabError, match="not a loadable SentencePiece model"):
        load_vocab_info(str(bad))
    with pytest.raises(VocabError, match="must be 'byte'"):
        load_vocab_info("")
    with pytest.raises(VocabError, match="vocab kind"):
        VocabInfo(kind="bpe", path=None, sha256=None, vocab_size=10)


def test_train_eval_modules_import_without_tensorflow():
    code = (
        "import sys\n"
        "import repeat_scaling.data.vocab, repeat_scaling.data.store, repeat_scaling.data.sources\n"
        "import repeat_scaling.prepare, repeat_scaling.train_vocab\n"
        "bad = [m for m in ('tensorflow', 'seqio', 'tensorflow_datasets') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
