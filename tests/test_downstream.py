"""Downstream tasks -> pairs stores: TFDS (mock_data) squad / glue/sst2, local JSONL, builtin
word tasks, the CLI, idempotence and one-line errors."""

import json
import subprocess
import sys

import numpy as np
import pytest

from repeat_scaling.data import downstream
from repeat_scaling.data.store import StoreError
from repeat_scaling.data.vocab import Encoder
from repeat_scaling.prepare_tasks import prepare_task_store

QUIET = {"log": lambda m: None}


def _parts(store, split, c):
    """Example c of a pairs store split -> (inputs ids, targets ids), EOS and padding cut."""
    p = store.manifest["pairs"]
    chunk = store.split(split).tokens(c * p["raw_length"], p["raw_length"])
    assert chunk[-1] == 1  # the store's document EOS
    ins, tgs = chunk[: p["inputs_length"]], chunk[p["inputs_length"] : -1]
    cut = lambda x: x[: int(np.argmax(x == 1))].tolist()  # noqa: E731 - up to the first EOS
    return cut(ins), cut(tgs)


def _check_store(store, enc, split):
    """Every example is the encoding of its reference (truncated as recorded)."""
    p = store.manifest["pairs"]
    refs = downstream.load_references(store.path, split)
    sp = store.split(split)
    assert sp.num_documents == len(refs) == p["examples"][split]
    assert sp.num_tokens == len(refs) * p["raw_length"]
    assert [r["index"] for r in refs] == list(range(len(refs)))
    cut_in = cut_tg = 0
    for r in refs:
        ins, tgs = _parts(store, split, r["index"])
        full_in, full_tg = enc.encode(r["inputs"]).tolist(), enc.encode(r["targets"]).tolist()
        assert (
            ins == full_in[: p["inputs_length"] - 1] and tgs == full_tg[: p["targets_length"] - 1]
        )
        cut_in += len(full_in) >= p["inputs_length"]
        cut_tg += len(full_tg) >= p["targets_length"]
    assert (cut_in, cut_tg) == (p["truncated_inputs"][split], p["truncated_targets"][split])
    return refs


def test_tfds_squad_and_sst2_with_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    from repeat_scaling.data.pipeline import chunk_batches, make_objective

    enc = Encoder("byte")
    with tfds.testing.mock_data(num_examples=6):
        squad = prepare_task_store(
            "squad", "byte", tmp_path / "squad", inputs_length=48, targets_length=16,
            tfds_data_dir=str(tmp_path / "tfds"), **QUIET,
        )  # fmt: skip
        sst2 = prepare_task_store(
            "glue/sst2", "byte", tmp_path / "sst2", inputs_length=64, targets_length=12,
            tfds_data_dir=str(tmp_path / "tfds"), max_examples=4, **QUIET,
        )  # fmt: skip
    p = squad.manifest["pairs"]
    assert (p["task"], p["inputs_length"], p["targets_length"], p["raw_length"]) == (
        "squad", 48, 16, 65,
    )  # fmt: skip
    for split in ("train", "validation"):
        refs = _check_store(squad, enc, split)
        assert len(refs) + squad.manifest["source"]["stats"].get(f"{split}_skipped", 0) == 6
        for r in refs:
            assert r["inputs"].startswith("question: ") and " context: " in r["inputs"]
            assert r["targets"] == r["answers"][0] and len(r["answers"]) >= 1
    assert sum(p["truncated_inputs"].values()) > 0  # mock contexts overflow 48 bytes
    for split in ("train", "validation"):
        refs = _check_store(sst2, enc, split)
        assert len(refs) == 4  # max_examples
        assert all(r["inputs"].startswith("sst2 sentence: ") for r in refs)
        assert {r["targets"] for r in refs} <= {"negative", "positive"}
        assert all(r["answers"] == [r["targets"]] for r in refs)

    # Both architectures' features of the squad store.
    val = squad.split("validation")
    n = val.num_documents
    ed = make_objective("supervised", squad.vocab, "encoder_decoder", store_manifest=squad.manifest)
    do = make_objective("supervised", squad.vocab, "decoder_only", store_manifest=squad.manifest)
    assert ed.raw_length == do.raw_length == 65 and do.length == 64
    (fe,) = chunk_batches(val, np.arange(n), ed, n, 0)
    (fd,) = chunk_batches(val, np.arange(n), do, n, 0)
    for c in range(n):
        ins, tgs = _parts(squad, "validation", c)
        assert fe["encoder_input_tokens"][c].tolist() == ins + [1] + [0] * (47 - len(ins))
        assert fe["decoder_target_tokens"][c].tolist() == tgs + [1] + [0] * (15 - len(tgs))
        seq = ins + [1] + tgs + [1]
        assert fd["decoder_target_tokens"][c].tolist() == seq + [0] * (64 - len(seq))
        w = fd["decoder_loss_weights"][c]
        assert w[: len(ins) + 1].sum() == 0 and w.sum() == len(tgs) + 1


def test_tfds_task_not_prepared_is_one_line_error(tmp_path):
    with pytest.raises(downstream.TaskError, match=r"tfds build squad --data_dir"):
        prepare_task_store(
            "squad", "byte", tmp_path / "s", inputs_length=8, targets_length=4,
            tfds_data_dir=str(tmp_path / "empty"), **QUIET,
        )  # fmt: skip
    assert not (tmp_path / "s").exists()


def test_pairs_jsonl_task_splits_and_idempotence(tmp_path):
    rows = [{"inputs": f"add {i} and {i}", "targets": str(2 * i)} for i in range(40)]
    rows[3]["answers"] = ["6", "six"]
    with open(tmp_path / "sums-train.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[:30])
    with open(tmp_path / "sums-validation.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[30:])
    spec = f"pairs_jsonl:{tmp_path}/sums-*.jsonl"
    messages = []
    store = prepare_task_store(
        spec, "byte", tmp_path / "st", inputs_length=16, targets_length=4, log=messages.append
    )
    train = _check_store(store, Encoder("byte"), "train")
    val = _check_store(store, Encoder("byte"), "validation")
    assert [r["inputs"] for r in train] == [r["inputs"] for r in rows[:30]]  # file order
    assert [r["targets"] for r in val] == [r["targets"] for r in rows[30:]]
    assert train[3]["answers"] == ["6", "six"] and train[4]["answers"] == ["8"]
    byte_ids = lambda text: [b + 3 for b in text.encode()]  # noqa: E731
    assert _parts(store, "train", 12) == (byte_ids("add 12 and 12"), byte_ids("24"))
    again = prepare_task_store(
        spec, "byte", tmp_path / "st", inputs_length=16, targets_length=4, log=messages.append
    )
    assert "nothing to do" in messages[-1] and again.manifest == store.manifest
    with pytest.raises(StoreError, match="different inputs .* pass --overwrite"):
        prepare_task_store(spec, "byte", tmp_path / "st", inputs_length=17, targets_length=4)
    # One file only: the carve-out makes the validation split (validation_docs of them).
    single = f"pairs_jsonl:{tmp_path}/sums-train.jsonl"
    carved = prepare_task_store(
        single, "byte", tmp_path / "c", inputs_length=16, targets_length=4, validation_docs=5,
        **QUIET,
    )  # fmt: skip
    assert carved.manifest["pairs"]["examples"] == {"train": 25, "validation": 5}


def test_task_errors(tmp_path):
    kw = {"inputs_length": 16, "targets_length": 8, **QUIET}
    with pytest.raises(downstream.TaskError, match="unknown task 'glue/nope'.*squad"):
        prepare_task_store("glue/nope", "byte", tmp_path / "a", **kw)
    with pytest.raises(downstream.TaskError, match="unknown builtin task 'spell'"):
        prepare_task_store("builtin_task:spell", "byte", tmp_path / "a", **kw)
    with pytest.raises(ValueError, match=r"inputs_length=1 must be an integer >= 2"):
        prepare_task_store("builtin_task:copy_word", "byte", tmp_path / "a",
                           inputs_length=1, targets_length=8)  # fmt: skip
    with pytest.raises(ValueError, match=r"targets_length=0 must be an integer >= 2"):
        prepare_task_store("builtin_task:copy_word", "byte", tmp_path / "a",
                           inputs_length=8, targets_length=0)  # fmt: skip
    with pytest.raises(ValueError, match="'tokens:64' has no text form"):
        prepare_task_store("builtin_task:copy_word", "tokens:64", tmp_path / "a", **kw)
    (tmp_path / "empty-train.jsonl").write_text("\n")
    (tmp_path / "empty-validation.jsonl").write_text(json.dumps({"inputs": "a", "targets": "b"}))
    with pytest.raises(downstream.TaskError, match="yielded no train examples"):
        prepare_task_store(f"pairs_jsonl:{tmp_path}/empty-*.jsonl", "byte", tmp_path / "a", **kw)
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob("a.partial-*"))
    (tmp_path / "bad.jsonl").write_text(2 * (json.dumps({"inputs": "a", "target": "b"}) + "\n"))
    with pytest.raises(downstream.TaskError, match='needs string fields "inputs" and "targets"'):
        prepare_task_store(f"pairs_jsonl:{tmp_path}/bad.jsonl", "byte", tmp_path / "a", **kw)
    with pytest.raises(downstream.TaskError, match="matches no files"):
        prepare_task_store(f"pairs_jsonl:{tmp_path}/none-*.jsonl", "byte", tmp_path / "a", **kw)
    with pytest.raises(downstream.TaskError, match="does not exist.*not a pairs store"):
        downstream.load_references(tmp_path, "train")


def test_builtin_word_tasks():
    copy = downstream.parse_task("builtin_task:copy_word")
    rev = downstream.parse_task("builtin_task:reverse_word:max_words=300,validation_words=20")
    train, val = list(copy.examples("train")), list(copy.examples("validation"))
    assert len(train) > 1500 and len(val) >= 50
    assert not {e.targets for e in train} & {e.targets for e in val}  # unseen words
    assert all(e.inputs == f"copy: {e.targets}" and 3 <= len(e.targets) <= 8 for e in train)
    rtrain, rval = list(rev.examples("train")), list(rev.examples("validation"))
    assert (len(rtrain), len(rval)) == (280, 20)
    assert all(e.inputs == f"reverse: {e.targets[::-1]}" for e in rtrain + rval)
    assert list(downstream.parse_task("builtin_task:copy_word").examples("validation")) == val
    up = downstream.parse_task("builtin_task:upper_word:min_len=5,max_len=5")
    assert all(e.targets == e.inputs[len("upper: ") :].upper() for e in up.examples("train"))


def test_cli_task(tmp_path):
    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "repeat_scaling.prepare", *args],
            capture_output=True, text=True,
        )  # fmt: skip

    with open(tmp_path / "qa.jsonl", "w") as f:
        f.writelines(json.dumps({"inputs": f"q{i}", "targets": f"a{i}"}) + "\n" for i in range(40))
    out = tmp_path / "qa"
    args = [f"--task=pairs_jsonl:{tmp_path}/qa.jsonl", "--vocab=byte", f"--out={out}"]
    r = cli(*args, "--inputs_length=16", "--targets_length=10", "--validation_docs=10")
    assert r.returncode == 0, r.stderr
    assert "train: 30 examples" in r.stderr and "validation: 10 examples" in r.stderr
    assert len(downstream.load_references(out, "validation")) == 10
    r = cli(*args, "--inputs_length=1", "--targets_length=10")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "error: inputs_length=1 must be an integer >= 2 (its EOS included)"
    ]
    r = cli(*args)
    assert r.returncode == 1 and "--inputs_length is required with --task" in r.stderr
    r = cli(*args, "--source=builtin", "--inputs_length=8", "--targets_length=8")
    assert r.returncode == 1 and "not both" in r.stderr
