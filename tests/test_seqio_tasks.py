"""seqio Tasks for C4 built through the seqio API from the prepared TFDS directory."""

import numpy as np
import pytest

seqio = pytest.importorskip("seqio")
from repeat_scaling.data import objectives, seqio_tasks, span_corruption, ul2_denoisers  # noqa: E402
from repeat_scaling.data.vocab import load_vocab_info  # noqa: E402

BYTE_VOCAB = 359


@pytest.fixture(scope="module")
def tasks(shared_data):
    return seqio_tasks.register_c4_tasks(
        "byte",
        tfds_data_dir=str(shared_data / "c4-tfds-minimal" / "c4" / "en" / "3.1.0"),
        prefix="t",
    )


def _examples(name, lengths, n=4):
    ds = seqio.get_mixture_or_task(name).get_dataset(
        lengths, split="validation", shuffle=False, seed=0, use_cached=False
    )
    return list(ds.take(n).as_numpy_iterator())


def _merge(inputs, targets):
    """Undo span corruption: put each target span back at its sentinel in the inputs."""
    spans, cur = {}, None
    for t in targets[:-1]:
        if t >= BYTE_VOCAB - 100:
            cur = int(t)
            spans[cur] = []
        else:
            spans[cur].append(int(t))
    out = []
    for t in inputs[:-1]:
        out.extend(spans[int(t)] if t >= BYTE_VOCAB - 100 else [int(t)])
    return out


def test_random_spans_helper_matches_t5():
    assert seqio_tasks.random_spans_helper(512, 0.15, 3.0) == (568, 114)


def test_span_corruption(tasks, shared_data):
    assert "t_span_corruption" in tasks and "t_ul2" in tasks
    examples = _examples("t_span_corruption", {"inputs": 128, "targets": 40})
    tokens_length, _ = seqio_tasks.random_spans_helper(128, 0.15, 3.0)
    for ex in examples:
        inputs, targets = ex["inputs"], ex["targets"]
        assert len(inputs) == 128 and inputs[-1] == 1 and targets[-1] == 1
        sentinels = inputs[inputs >= BYTE_VOCAB - 100]
        # Sentinels count down from the end of the vocabulary: 358, 357, ...
        np.testing.assert_array_equal(sentinels, BYTE_VOCAB - 1 - np.arange(len(sentinels)))
        np.testing.assert_array_equal(targets[targets >= BYTE_VOCAB - 100], sentinels)
        merged = _merge(inputs, targets)
        assert len(merged) == tokens_length
        noise = len(targets) - 1 - len(sentinels)
        assert noise == round(0.15 * tokens_length)
    # Consecutive segments of the concatenated corpus: the first starts the first document.
    first = _merge(examples[0]["inputs"], examples[0]["targets"])
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(shared_data / "c4-tfds-minimal/c4/en/3.1.0"))
    ds = builder.as_dataset(split="validation", shuffle_files=False)
    text = next(iter(tfds.as_numpy(ds.take(1))))["text"]
    assert bytes(t - 3 for t in first[:20]) == text[:20]


def test_prefix_and_causal_lm_and_ul2(tasks):
    for ex in _examples("t_prefix_lm", {"inputs": 64, "targets": 64}):
        assert len(ex["inputs"]) + len(ex["targets"]) == 64 + 2  # one segment split, two EOS
    for ex in _examples("t_causal_lm", {"targets": 64}):
        assert ex["targets"].shape == (64,) and 1 not in ex["targets"]
    starts = set()
    for ex in _examples("t_ul2", {"inputs": 128, "targets": 128}, n=12):
        assert ex["inputs"][0] in MODE_IDS.values()  # one extra id, not the paradigm's text
        starts.add(int(ex["inputs"][0]))
    assert len(starts) >= 2  # a mixture of denoisers


# The native objective's scheme: R [NLU], X [NLG], S [S2S] are the three lowest extra ids.
VOCAB = load_vocab_info("byte")
MODE_IDS = {n: ul2_denoisers.mode_token_id(VOCAB, n) for n in "RXS"}


def _undo(inputs, targets):
    """Tokens and noise mask of a span-corrupted example (without mode token and EOS)."""
    spans, cur = {}, None
    for t in targets[:-1]:
        if t >= BYTE_VOCAB - 100:
            cur = int(t)
            spans[cur] = []
        else:
            spans[cur].append(int(t))
    tokens, mask = [], []
    for t in inputs[1:-1]:
        piece = spans[int(t)] if t >= BYTE_VOCAB - 100 else [int(t)]
        tokens += piece
        mask += [t >= BYTE_VOCAB - 100] * len(piece)
    return np.array(tokens, np.int32), np.array(mask)


def test_ul2_mode_ids_are_the_native_ones():
    assert MODE_IDS == {"R": 259, "X": 260, "S": 261}  # [NLU], [NLG], [S2S]
    assert [n for n, _ in seqio_tasks.ul2_denoisers()] == list(seqio_tasks.UL2_TASKS)
    rates = [d.rate for _, d in seqio_tasks.ul2_denoisers()]
    assert rates == [d["rate"] for d in ul2_denoisers.default_ul2_denoisers()]
    # The TF op and the native op make the same example from the same tokens and mask.
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 259, size=(1, 90)).astype(np.int32)
    for name, density, span in (("R", 0.15, 3.0), ("X", 0.5, 8.0)):
        u = rng.random((1, span_corruption.span_uniforms_needed(90, density, span)))
        mask = span_corruption.noise_mask_batch(u, 90, density, span)
        i, t = span_corruption.span_corrupt_batch(tokens, mask, VOCAB, MODE_IDS[name])
        tf_ex = seqio_tasks.corrupt(tokens[0], mask[0], BYTE_VOCAB, MODE_IDS[name])
        np.testing.assert_array_equal(np.append(tf_ex["inputs"].numpy(), 1), i[0])
        np.testing.assert_array_equal(np.append(tf_ex["targets"].numpy(), 1), t[0])


def test_ul2_tasks_make_the_native_example(tasks):
    """Each seqio UL2 task's example, rebuilt by the native objective from the same text
    and the same noise mask (span denoisers) or split point (S): identical, id for id."""
    native = objectives.make_objective(
        "ul2", VOCAB, "encoder_decoder", inputs_length=128, targets_length=128
    )
    for name, d in seqio_tasks.ul2_denoisers():
        mode = MODE_IDS[d.name]
        assert native.mode_token(d) == mode
        for ex in _examples(f"t_ul2_{name}", {"inputs": 128, "targets": 128}, n=2):
            inputs, targets = ex["inputs"], ex["targets"]
            assert inputs[0] == mode and inputs[-1] == 1 and targets[-1] == 1
            assert not np.isin(inputs[1:], list(MODE_IDS.values())).any()
            assert not np.isin(targets, list(MODE_IDS.values())).any()
            if d.is_span:
                tokens, mask = _undo(inputs, targets)
                i, t = span_corruption.span_corrupt_batch(tokens[None], mask[None], VOCAB, mode)
            else:
                tokens = np.concatenate([inputs[1:-1], targets[:-1]]).astype(np.int32)
                i, t = native._split_example(tokens, d, len(targets) - 1)
                i, t = i[None], t[None]
            np.testing.assert_array_equal(i[0], inputs)
            np.testing.assert_array_equal(t[0], targets)
