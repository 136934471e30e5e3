"""seqio Tasks for C4 built through the seqio API from the prepared TFDS directory."""

import numpy as np
import pytest

seqio = pytest.importorskip("seqio")
from repeat_scaling.data import seqio_tasks  # noqa: E402

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
        text = bytes(int(t) - 3 for t in ex["inputs"][:5]).decode()
        assert text in ("[NLU]", "[NLG]", "[S2S]")
        starts.add(text)
    assert len(starts) >= 2  # a mixture of denoisers
