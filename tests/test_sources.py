"""Every text source on real files from ../shared/data; bad inputs give one-line errors."""

import collections
import gzip
import json

import pytest

from repeat_scaling.data.sources import SourceError, parse_source


def _docs(source, split):
    return list(source.documents(split))


def test_json_c4_sample(shared_data):
    src = parse_source(f"json:{shared_data}/c4-en-sample/c4-*.sample-*.json.gz")
    train, val = _docs(src, "train"), _docs(src, "validation")
    assert (len(train), len(val)) == (2000, 1000)
    assert not src.carves_validation
    with gzip.open(shared_data / "c4-en-sample" / "c4-train.sample-2000.json.gz", "rt") as f:
        first = json.loads(f.readline())["text"]
    assert train[0] == ("c4-train.sample-2000.json.gz:1", first)
    assert src.stats["malformed_lines"] == 0
    assert _docs(src, "train") == train  # deterministic


def test_json_malformed_lines_policy(tmp_path):
    good = [json.dumps({"text": f"document number {i}", "id": i}) for i in range(300)]
    (tmp_path / "few.jsonl").write_text("\n".join(good[:150] + ["{broken", ""] + good[150:]) + "\n")
    src = parse_source(f"json:{tmp_path}/few.jsonl", validation_docs=10)
    assert len(_docs(src, "train")) == 290 and len(_docs(src, "validation")) == 10
    # Each line counted once, though the carve-out reads the source three times.
    assert src.stats["malformed_lines"] == 1 and src.stats["lines"] == 301
    (tmp_path / "many.jsonl").write_text("\n".join(good[:20] + ["not json"] * 3) + "\n")
    with pytest.raises(SourceError, match=r"3 of 23 JSON lines are malformed"):
        _docs(parse_source(f"json:{tmp_path}/many.jsonl"), "train")
    with pytest.raises(SourceError, match="string field 'body'"):
        _docs(parse_source(f"json:{tmp_path}/few.jsonl", text_field="body"), "train")


def test_bad_sources(tmp_path):
    with pytest.raises(SourceError, match="matches no files"):
        parse_source(f"json:{tmp_path}/nothing-*.json.gz")
    with pytest.raises(SourceError, match="unknown source 'csv:x'"):
        parse_source("csv:x")
    with pytest.raises(SourceError, match="source spec is empty"):
        parse_source("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(
        SourceError, match=r"latin1.txt: not valid UTF-8 \(byte b'\\xe9' at offset 3\)"
    ):
        _docs(parse_source(f"text:{tmp_path}/latin1.txt"), "train")
    (tmp_path / "one.txt").write_text("only one document here\n")
    with pytest.raises(SourceError, match="leaves no training documents"):
        _docs(parse_source(f"text:{tmp_path}/one.txt"), "validation")
    with pytest.raises(SourceError, match="unknown synthetic parameter 'colour'"):
        parse_source("synthetic:colour=red")


def test_text_separators(shared_data):
    stories = parse_source(
        f"text:{shared_data}/tinystories/*.txt", text_separator="<|endoftext|>", validation_docs=50
    )
    train, val = _docs(stories, "train"), _docs(stories, "validation")
    assert len(val) == 50 and len(train) + len(val) >= 2316
    assert not {d for d, _ in train} & {d for d, _ in val}
    assert all("<|endoftext|>" not in t for _, t in train[:100])
    # wiki.valid.* goes to validation, wiki.test.* to train; blank lines separate documents.
    wiki = parse_source(f"text:{shared_data}/wikitext-2/wiki.*.tokens")
    assert wiki.native_splits() == ("train", "validation")
    assert {d.split(":")[0] for d, _ in _docs(wiki, "validation")} == {"wiki.valid.tokens"}
    whole = parse_source(f"text:{shared_data}/tinyshakespeare/input.txt", text_separator="file")
    assert len(whole.native_splits()) == 1
    with pytest.raises(SourceError, match="leaves no training documents"):
        _docs(whole, "train")


def test_carve_out_is_deterministic(tmp_path):
    lines = [json.dumps({"text": f"text {i}"}) for i in range(100)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    val_a = {
        t
        for _, t in _docs(parse_source(f"json:{tmp_path}/a.jsonl", validation_docs=7), "validation")
    }
    assert len(val_a) == 7
    val_a2 = {
        t
        for _, t in _docs(parse_source(f"json:{tmp_path}/a.jsonl", validation_docs=7), "validation")
    }
    assert val_a == val_a2
    train_a = {
        t for _, t in _docs(parse_source(f"json:{tmp_path}/a.jsonl", validation_docs=7), "train")
    }
    assert len(train_a) == 93 and not (train_a & val_a)


def test_tfds_directory(shared_data):
    src = parse_source(f"tfds_dir:{shared_data}/c4-tfds-minimal/c4/en/3.1.0")
    train, val = _docs(src, "train"), _docs(src, "validation")
    assert (len(train), len(val)) == (1000, 200)
    assert train[0][0] == "train:0" and src.fingerprint()["splits"] == {
        "train": 1000,
        "validation": 200,
    }
    # Provenance: the same documents appear in the JSON sample.
    with gzip.open(shared_data / "c4-en-sample" / "c4-validation.sample-1000.json.gz", "rt") as f:
        json_val = {json.loads(line)["text"] for line in f}
    assert sum(t in json_val for _, t in val) == 200
    # The same data by TFDS name and version with a data_dir, as for the full C4.
    named = parse_source("tfds:c4/en:3.1.0", tfds_data_dir=str(shared_data / "c4-tfds-minimal"))
    assert _docs(named, "validation") == val
    with pytest.raises(SourceError, match="does not exist"):
        parse_source(f"tfds_dir:{shared_data}/no-such-dir")
    with pytest.raises(SourceError, match="expected tfds:NAME:VERSION"):
        parse_source("tfds:c4")


def test_builtin_corpus():
    src = parse_source("builtin")
    train, val = _docs(src, "train"), _docs(src, "validation")
    ids = [d for d, _ in train + val]
    texts = [t for _, t in train + val]
    assert len(ids) == len(set(ids)) and len(texts) == len(set(texts))  # deduplicated
    assert len(train) > 300 and 10 <= len(val) < len(train) // 10
    assert sum(map(len, texts)) > 1_000_000
    assert any(d.startswith("topic:") for d in ids) and "module:json" in ids
    assert _docs(parse_source("builtin"), "validation") == val  # stable across instances


def test_synthetic_language():
    src = parse_source("synthetic:num_docs=60,seed=3,doc_words=150,words=500")
    docs = _docs(src, "train") + _docs(src, "validation")
    assert len(docs) == 60
    again = parse_source("synthetic:num_docs=60,seed=3,doc_words=150,words=500")
    assert _docs(again, "train") == _docs(src, "train")
    other = parse_source("synthetic:num_docs=60,seed=4,doc_words=150,words=500")
    assert _docs(other, "train") != _docs(src, "train")
    # Zipfian unigrams: the most frequent word is far above the median.
    words = collections.Counter(w.strip(".").lower() for _, t in docs for w in t.split())
    freqs = sorted(words.values(), reverse=True)
    assert freqs[0] > 20 * freqs[len(freqs) // 2]
    # Bigram structure: successors of the commonest word concentrate on few words.
    seq = [src.generate_ids(d) for d in range(60)]
    top = collections.Counter(int(w) for s in seq for w in s).most_common(1)[0][0]
    nxt = collections.Counter(int(s[i + 1]) for s in seq for i in range(len(s) - 1) if s[i] == top)
    assert sum(c for _, c in nxt.most_common(8)) > 0.5 * sum(nxt.values())
    # Bursts: some 6-gram repeats inside a document.
    assert any(len({tuple(s[i : i + 6]) for i in range(len(s) - 5)}) < len(s) - 5 for s in seq)


def test_pystdlib_code_corpus(tmp_path):
    import sys
    import sysconfig

    from repeat_scaling.data.builtin_sources import pystdlib_files

    src = parse_source("pystdlib")
    train, val = _docs(src, "train"), _docs(src, "validation")
    ids = [d for d, _ in train]
    assert ids == sorted(ids) and len(train) > 500 and 10 <= len(val) < len(train) // 10
    assert "json/decoder.py" in {d for d, _ in train + val}
    assert not any(
        d.startswith("test/") or "/tests/" in d or "site-packages" in d for d, _ in train + val
    )
    root = sysconfig.get_paths()["stdlib"]
    doc = dict(train + val)["json/decoder.py"]
    with open(f"{root}/json/decoder.py", encoding="utf-8") as f:
        assert doc == f.read()  # the whole file, verbatim
    assert src.fingerprint()["python"] == sys.version
    assert src.stats["undecodable_files_skipped"] == 0
    capped = parse_source("pystdlib:max_docs=40")
    assert len(_docs(capped, "train")) + len(_docs(capped, "validation")) == 40
    assert capped.fingerprint() != src.fingerprint()
    with_tests = pystdlib_files(include_tests=True)
    assert len(with_tests) > len(pystdlib_files()) and any(
        r.startswith("test/") for r, _ in with_tests
    )
    with pytest.raises(SourceError, match="unknown pystdlib parameter 'colour'"):
        parse_source("pystdlib:colour=red")
    with pytest.raises(SourceError, match="tests must be 0 or 1|tests 0 or 1"):
        parse_source("pystdlib:tests=2")


def test_pystdlib_skips_undecodable_files(monkeypatch, tmp_path):
    from repeat_scaling.data import builtin_sources

    (tmp_path / "good.py").write_text("x = 1\n")
    (tmp_path / "bad.py").write_bytes(b"s = '\xe9'\n")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "good.py").write_text("cached = 1\n")
    monkeypatch.setattr(builtin_sources.sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    src = parse_source("pystdlib", validation_docs=1)
    assert [d for d, _ in src._iter_native("train")] == ["good.py"]
    assert src.stats["undecodable_files_skipped"] == 1


def test_pystdlib_and_pairs_stores_with_sentencepiece(tmp_path):
    import numpy as np

    from repeat_scaling.data.downstream import load_references
    from repeat_scaling.data.vocab import Encoder
    from repeat_scaling.prepare import prepare_store
    from repeat_scaling.prepare_tasks import prepare_task_store
    from repeat_scaling.train_vocab import train_vocab

    quiet = {"log": lambda m: None}
    vocab = train_vocab(
        "pystdlib:max_docs=40", 400, tmp_path / "py.model", max_docs=40, max_sentences=4000
    )
    store = prepare_store(
        "pystdlib:max_docs=40", vocab.path, tmp_path / "sp", progress=False, **quiet
    )
    byte = prepare_store("pystdlib:max_docs=40", "byte", tmp_path / "b", progress=False, **quiet)
    src = parse_source("pystdlib:max_docs=40")
    enc = Encoder(vocab.path)
    for split in ("train", "validation"):
        texts = [t for _, t in src.documents(split)]
        sp = store.split(split)
        assert sp.num_documents == byte.split(split).num_documents == len(texts)
        stored = {tuple(sp.document(i)[:-1].tolist()) for i in range(sp.num_documents)}
        assert stored == {tuple(ids) for ids in enc.encode_batch(texts)}
        assert byte.split(split).num_tokens == sum(len(t.encode()) + 1 for t in texts)
    assert store.split("train").num_tokens < byte.split("train").num_tokens / 2  # it compresses
    assert (
        store.manifest["source"]["fingerprint"]["python"]
        == byte.manifest["source"]["fingerprint"]["python"]
    )

    pairs = prepare_task_store(
        "builtin_task:copy_word:max_words=100", vocab.path, tmp_path / "pairs",
        inputs_length=12, targets_length=8, **quiet,
    )  # fmt: skip
    p = pairs.manifest["pairs"]
    refs = load_references(pairs.path, "train")
    for r in refs:
        row = pairs.split("train").document(r["index"])
        ins, tgs = row[: p["inputs_length"]], row[p["inputs_length"] : -1]
        want = enc.encode(r["targets"]).tolist()[: p["targets_length"] - 1]
        assert tgs[: int(np.argmax(tgs == 1))].tolist() == want
        assert ins[int(np.argmax(ins == 1)) :].tolist().count(1) == 1  # EOS then padding
