"""The 'supervised' objective on real pairs stores: features of both archs, the exact
prefix-LM layout of the other objectives, the trainer's plan/batcher path, errors."""

import subprocess
import sys

import numpy as np
import pytest

from repeat_scaling.data import downstream
from repeat_scaling.data.objectives import Objective, ObjectiveError, make_objective
from repeat_scaling.data.pipeline import Batcher, build_plan, chunk_batches
from repeat_scaling.data.supervised import PairsLayout
from repeat_scaling.data.vocab import Encoder
from repeat_scaling.prepare_tasks import prepare_task_store


@pytest.fixture(scope="module")
def reverse_store(tmp_path_factory):
    return prepare_task_store(
        "builtin_task:reverse_word:max_words=400",
        "byte",
        tmp_path_factory.mktemp("rev") / "store",
        inputs_length=20,
        targets_length=10,
        log=lambda m: None,
    )


def test_layout_roundtrip_and_encoder_decoder_features(reverse_store):
    enc = Encoder("byte")
    layout = PairsLayout.from_manifest(reverse_store.manifest)
    assert (layout.inputs_length, layout.targets_length, layout.raw_length) == (20, 10, 31)
    val = reverse_store.split("validation")
    refs = downstream.load_references(reverse_store.path, "validation")
    n = len(refs)
    chunks = val.tokens(0, n * 31).reshape(n, 31)
    ins, li, tgs, lt = layout.split(chunks)
    for r, ref in enumerate(refs):
        assert enc.decode(ins[r, : li[r]]) == ref["inputs"] and ins[r, li[r] - 1] == 1
        assert enc.decode(tgs[r, : lt[r]]) == ref["targets"] and not ins[r, li[r] :].any()
    obj = make_objective(
        "supervised", reverse_store.vocab, "encoder_decoder",
        store_manifest=reverse_store.manifest, inputs_length=24, pack=True,
    )  # fmt: skip
    assert obj.raw_length == 31 and obj.tokens_per_example == 24 + 10
    (f,) = chunk_batches(val, np.arange(n), obj, n, seed=0)
    assert {k: v.shape[1] for k, v in f.items()} == obj.feature_lengths
    np.testing.assert_array_equal(f["encoder_input_tokens"][:, :20], ins)
    assert not f["encoder_input_tokens"][:, 20:].any()
    np.testing.assert_array_equal(f["decoder_target_tokens"], tgs)
    np.testing.assert_array_equal(f["decoder_input_tokens"][:, 1:], tgs[:, :-1])
    assert not f["decoder_input_tokens"][:, 0].any()
    np.testing.assert_array_equal(f["decoder_loss_weights"], (tgs != 0).astype(np.float32))
    np.testing.assert_array_equal(f["encoder_segment_ids"].sum(1), li)
    np.testing.assert_array_equal(f["decoder_segment_ids"].sum(1), lt)
    # No randomness: every slot and seed gives the same features.
    (g,) = chunk_batches(val, np.arange(n), obj, n, seed=7)
    assert all(np.array_equal(f[k], g[k]) for k in f)


def test_decoder_only_is_exactly_the_prefix_lm_layout(reverse_store):
    obj = make_objective(
        "supervised", reverse_store.vocab, "decoder_only", store_manifest=reverse_store.manifest
    )
    assert obj.length == 30 and obj.feature_lengths["decoder_causal_attention"] == 30
    train = reverse_store.split("train")
    chunks = train.tokens(0, 16 * 31).reshape(16, 31)
    f = obj(chunks, np.arange(16), 0)
    ins, li, tgs, lt = obj.layout.split(chunks)
    # The prefix-LM objective lays out the same (inputs, targets) parts identically.
    prefix = Objective("prefix_lm", reverse_store.vocab, "decoder_only", length=30)
    expected = prefix._layout(ins, li, tgs, lt)
    assert f.keys() == expected.keys()
    assert all(np.array_equal(f[k], expected[k]) for k in f)
    # And by hand: prompt = the stripped inputs (ending with EOS), then the targets.
    for r in range(16):
        seq = ins[r, : li[r]].tolist() + tgs[r, : lt[r]].tolist()
        assert f["decoder_target_tokens"][r].tolist() == seq + [0] * (30 - len(seq))
        assert f["decoder_causal_attention"][r].tolist() == [1] * (li[r] + 1) + [0] * (
            30 - li[r] - 1
        )
        w = f["decoder_loss_weights"][r]
        assert not w[: li[r]].any() and w[li[r] : li[r] + lt[r]].all() and w.sum() == lt[r]
    longer = make_objective(
        "supervised", reverse_store.vocab, "decoder_only",
        store_manifest=reverse_store.manifest, length=40,
    )  # fmt: skip
    g = longer(chunks, np.arange(16), 0)
    assert all(np.array_equal(g[k][:, :30], f[k]) and not g[k][:, 30:].any() for k in f)


def test_trainer_data_path_plan_and_batcher(reverse_store):
    obj = make_objective(
        "supervised", reverse_store.vocab, "encoder_decoder", store_manifest=reverse_store.manifest
    )
    train = reverse_store.split("train")
    plan = build_plan(train, obj, 5, 8, 0.5, 4, seed=0)
    assert plan.num_chunks == train.num_documents == 380  # chunk c == example c
    batcher = Batcher(train, plan, obj, 8, seed=0)
    layout = obj.layout
    for step in (0, 4):
        batch = batcher.batch(step)
        chunks, _, _ = plan.chunks(np.arange(step * 8, step * 8 + 8))
        for r, c in enumerate(chunks):
            ins, li, tgs, lt = layout.split(train.document(int(c))[None])
            np.testing.assert_array_equal(batch["encoder_input_tokens"][r], ins[0])
            np.testing.assert_array_equal(batch["decoder_target_tokens"][r], tgs[0])


def test_supervised_errors(reverse_store, c4_byte_store):
    m, v = reverse_store.manifest, reverse_store.vocab
    with pytest.raises(ObjectiveError, match="needs store_manifest"):
        make_objective("supervised", v, "encoder_decoder")
    with pytest.raises(ObjectiveError, match="needs a pairs store .* no 'pairs' layout"):
        make_objective("supervised", v, "decoder_only", store_manifest=c4_byte_store.manifest)
    with pytest.raises(ObjectiveError, match=r"inputs_length=12 is too short .* up to 20 tokens"):
        make_objective("supervised", v, "encoder_decoder", store_manifest=m, inputs_length=12)
    with pytest.raises(ObjectiveError, match=r"targets_length=9 is too short"):
        make_objective("supervised", v, "encoder_decoder", store_manifest=m, targets_length=9)
    with pytest.raises(ObjectiveError, match=r"length=29 is too short .* up to 30 tokens"):
        make_objective("supervised", v, "decoder_only", store_manifest=m, length=29)
    with pytest.raises(ObjectiveError, match=r"unknown options \['noise_density'\]"):
        make_objective("supervised", v, "decoder_only", store_manifest=m, noise_density=0.2)
    with pytest.raises(ObjectiveError, match="decoder_only takes length"):
        make_objective("supervised", v, "decoder_only", store_manifest=m, inputs_length=20)
    obj = make_objective("supervised", v, "decoder_only", store_manifest=m)
    plain = c4_byte_store.split("train").tokens(0, 2 * 31).reshape(2, 31)
    with pytest.raises(ObjectiveError, match="row 0 is not a pairs example"):
        obj(plain, np.arange(2), 0)
    with pytest.raises(ObjectiveError, match=r"must be \[n, raw_length=31\]"):
        obj(plain[:, :30], np.arange(2), 0)


def test_supervised_and_downstream_import_no_jax_or_tensorflow():
    code = (
        "import sys; import repeat_scaling.data.supervised, repeat_scaling.data.downstream;"
        "bad = [m for m in ('jax', 'tensorflow', 'seqio', 'tensorflow_datasets') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
