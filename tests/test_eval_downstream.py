"""Downstream evaluation: SQuAD-official metrics, settings, and a real end-to-end check
(a learnable built-in task, trained with the real trainer, scored on generated text)."""

import os
import pathlib
import subprocess
import sys

import pytest

from repeat_scaling import config_files
from repeat_scaling.eval import downstream as ds

REPO = pathlib.Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------
# SQuAD v1.1 official metrics (values worked out by hand from evaluate-v1.1.py's rules).
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Denver Broncos", "denver broncos"),
        ("  Santa   Clara,\tCalifornia. ", "santa clara california"),
        ("an apple a day", "apple day"),
        ("banana and theory", "banana and theory"),  # only whole-word articles go
        ("Levi's Stadium!", "levis stadium"),
        ("A", ""),
        ("$1.5 billion", "15 billion"),
    ],
)
def test_normalize_answer(text, expected):
    assert ds.normalize_answer(text) == expected


def test_exact_match_and_f1_official_examples():
    # Super Bowl 50 (SQuAD dev): the three reference answers of one question.
    answers = ["Denver Broncos", "Denver Broncos", "Denver Broncos"]
    assert ds.max_over_ground_truths(ds.exact_match_score, "the Denver Broncos", answers) == 1
    assert ds.max_over_ground_truths(ds.f1_score, "the Denver Broncos", answers) == 1
    # One extra token: precision 2/3, recall 1 -> F1 0.8, EM 0.
    assert ds.f1_score("Denver Broncos team", "Denver Broncos") == pytest.approx(0.8)
    assert ds.exact_match_score("Denver Broncos team", "Denver Broncos") == 0
    # Partial overlap: pred {santa, clara}, truth {levis, stadium, in, santa, clara,
    # california}: P = 1, R = 2/6 -> F1 = 0.5.
    assert ds.f1_score("Santa Clara", "Levi's Stadium in Santa Clara, California") == (
        pytest.approx(0.5)
    )
    # Repeated tokens count by multiplicity (Counter intersection).
    assert ds.f1_score("the the cat cat cat", "cat") == pytest.approx(2 * (1 / 3) / (1 + 1 / 3))
    # No overlap, empty prediction, article-only prediction: 0.
    assert ds.f1_score("Carolina Panthers", "Denver Broncos") == 0
    assert ds.f1_score("", "Denver Broncos") == 0
    assert ds.f1_score("the", "Denver Broncos") == 0
    # Max over answers picks the best reference for each metric separately.
    refs = ["Gold Coast", "the golden anniversary", "golden"]
    assert ds.max_over_ground_truths(ds.exact_match_score, "Golden", refs) == 1
    assert ds.max_over_ground_truths(ds.f1_score, "golden anniversary!", refs) == 1
    assert ds.max_over_ground_truths(ds.f1_score, "x", []) == 0


def test_score_aggregates_em_f1_accuracy():
    refs = [
        {"targets": "Denver Broncos", "answers": ["Denver Broncos", "Broncos"]},
        {"targets": "positive", "answers": ["positive"]},
        {"targets": "Santa Clara", "answers": ["Santa Clara", "Levi's Stadium"]},
        {"targets": "negative"},  # no answers: the targets text is the answer
    ]
    preds = ["Broncos", "Positive.", "Levi's", "positive"]
    out = ds.score(preds, refs)
    # EM: 1, 1, 0, 0; F1: 1, 1, 2*(1*0.5)/1.5 = 2/3, 0; accuracy (vs targets): 0, 1, 0, 0.
    assert out["downstream_examples"] == 4
    assert out["downstream_em"] == pytest.approx(0.5)
    assert out["downstream_f1"] == pytest.approx((1 + 1 + 2 / 3) / 4)
    assert out["downstream_accuracy"] == pytest.approx(0.25)
    empty = ds.score([], [])
    assert empty["downstream_examples"] == 0 and empty["downstream_em"] is None
    with pytest.raises(ds.DownstreamError, match="2 predictions for 1 references"):
        ds.score(["a", "b"], refs[:1])


def test_settings_overrides_and_errors():
    s = ds.DownstreamSettings.from_overrides(
        {"downstream_examples": "64", "batch_size": 8, "downstream_use_cache": "false"}
    )
    assert (s.examples, s.batch_size, s.use_cache, s.split) == (64, 8, False, "validation")
    with pytest.raises(ds.DownstreamError, match="unknown downstream setting 'downstream_x'"):
        ds.DownstreamSettings.from_overrides({"downstream_x": 1})
    with pytest.raises(ds.DownstreamError, match="downstream_examples='many'; expected an int"):
        ds.DownstreamSettings.from_overrides({"downstream_examples": "many"})
    with pytest.raises(ds.DownstreamError, match="downstream_batch_size=0; expected an int >= 1"):
        ds.DownstreamSettings(batch_size=0)
    with pytest.raises(ds.DownstreamError, match="downstream_use_cache='maybe'"):
        ds.DownstreamSettings.from_overrides({"use_cache": "maybe"})


def test_pairs_layout_of_manifest():
    assert ds.pairs_layout({"splits": {}}) is None
    lay = ds.pairs_layout({"pairs": {"task": "squad", "inputs_length": 8, "targets_length": 4}})
    assert (lay.task, lay.raw_length) == ("squad", 13)
    with pytest.raises(ds.DownstreamError, match="malformed"):
        ds.pairs_layout({"pairs": {"task": "squad"}})
    with pytest.raises(ds.DownstreamError, match="bad lengths"):
        ds.pairs_layout({"pairs": {"task": "squad", "inputs_length": 0, "targets_length": 4}})


# ----------------------------------------------------------------------------------------
# Real end-to-end check: prepare builtin_task:copy_word, train a tiny T5 with the real
# trainer (objective "supervised"), evaluate with the real evaluator.
# ----------------------------------------------------------------------------------------

SMALL = dict(
    batch_size=8,
    test_batches=1,
    memorisation_examples=8,
    copy_examples=8,
    random_repeat_examples=8,
    icl_examples=8,
    probe_sequences=8,
    frequency_tokens=100_000,
)
COPY_TASK = "builtin_task:copy_word:max_words=64"
COPY_STEPS = 40


def _demo_config(arg: str):
    return config_files.load(f"{REPO}/configs/demo.py:{arg}")


@pytest.fixture(scope="module")
def copy_store(tmp_path_factory):
    """The pairs store of COPY_TASK (byte vocabulary, inputs 16, targets 12 tokens)."""
    from repeat_scaling.prepare_tasks import prepare_task_store

    store = tmp_path_factory.mktemp("copy_store") / "copy_word"
    prepare_task_store(
        COPY_TASK, "byte", store, inputs_length=16, targets_length=12, log=lambda m: None
    )
    return store


@pytest.fixture(scope="module")
def copy_run(copy_store, tmp_path_factory):
    """A tiny T5 trained for COPY_STEPS steps on 64 copy_word examples: (store, workdir).

    f = 1, E = 24: the run sees 53 of the 61 training words, 24 times each, i.e. it
    memorises them (the check is the evaluator's decode -> detokenise -> score path, not
    generalisation of a 2-layer model trained for seconds). Measured: EM 0.80 on the 61
    training words (untrained: 0.0); ~40 s of CPU in all, mostly compilation.
    """
    from repeat_scaling.train import loop

    store = copy_store
    c = _demo_config("t5")
    c.data.store, c.data.source = str(store), ""
    c.data.objective = "supervised"
    c.data.inputs_length, c.data.targets_length = 16, 12
    c.data.repeated_fraction, c.data.repeated_epochs = 1.0, 24
    c.train.steps = COPY_STEPS
    c.train.batch_size = 32
    c.train.checkpoint_every = COPY_STEPS
    c.train.log_every = COPY_STEPS
    c.train.progress_bar = "off"
    c.train.optimizer.learning_rate = 1e-2
    c.train.optimizer.warmup_steps = 10
    work = tmp_path_factory.mktemp("copy_run") / "run"
    loop.train(c, work)
    return store, work


def test_copy_word_end_to_end_em_above_untrained(copy_run):
    from flax import nnx

    from repeat_scaling import models
    from repeat_scaling.eval import evaluator, results
    from repeat_scaling.eval.settings import EvalSettings

    store, work = copy_run
    down = ds.DownstreamSettings(examples=64, batch_size=32, split="train")
    ev = evaluator.Evaluator(
        work, EvalSettings(**SMALL), evaluator.eval_mesh(1), downstream_settings=down
    )
    (rec,) = ev.run_all()
    assert rec["step"] == COPY_STEPS
    assert rec["downstream_examples"] == 61  # the train split has 61 words; cap 64
    # Plain-text probes are null on a pairs store; the token-level ones still run.
    assert all(rec[k] is None for k in evaluator.PLAIN_TEXT_METRICS)
    assert rec["test_loss"] is not None and rec["prefix_matching"] is not None
    trained = {k: rec[k] for k in ("downstream_em", "downstream_f1", "downstream_accuracy")}

    # The untrained model (same structure, fresh parameters) through the same compiled
    # decoder: the baseline the trained model must clearly beat.
    ev._runner.load(models.build(ev.run.model_cfg, nnx.Rngs(0)))
    untrained = ev.data()["downstream"].evaluate(ev._generator, prefix_lm=False)
    print(f"copy_word EM trained {trained} vs untrained {untrained['downstream_em']}")
    assert untrained["downstream_em"] <= 0.05
    assert trained["downstream_em"] >= untrained["downstream_em"] + 0.5
    assert trained["downstream_f1"] >= trained["downstream_em"]
    # copy_word: the label is the only answer, so accuracy equals EM.
    assert trained["downstream_accuracy"] == pytest.approx(trained["downstream_em"])
    sample = rec["downstream_samples"][0]
    assert set(sample) == {"prediction", "targets"} and sample["targets"].isalpha()
    (line,) = results.read_results(results.results_path(work))
    assert line["downstream_em"] == pytest.approx(trained["downstream_em"])


def test_evaluate_cli_downstream_flag_errors(copy_run):
    _, work = copy_run
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    for flag, message in (
        ("--eval_config=downstream_examples=x", "downstream_examples='x'; expected an int"),
        ("--downstream_split=test", "downstream_split='test'; the store has"),
    ):
        p = subprocess.run(
            [sys.executable, "-m", "repeat_scaling.evaluate", f"--workdir={work}", flag],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert p.returncode == 1, p.stderr[-2000:]
        last = p.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and message in last, p.stderr[-2000:]
        assert "Traceback" not in p.stderr


def test_decoder_only_generation_follows_the_supervised_layout(copy_store):
    """Greedy answers of a decoder-only prefix LM, written back into a pairs chunk and fed
    through the ``supervised`` objective's features and ``forward``, are the argmax at
    every answer position: the generator's prompts match what training teaches."""
    import numpy as np
    from flax import nnx

    from repeat_scaling import models
    from repeat_scaling.data.pipeline import make_objective
    from repeat_scaling.data.store import TokenStore
    from repeat_scaling.eval import evaluator
    from repeat_scaling.eval.runner import ModelRunner
    from repeat_scaling.models.config import ModelConfig

    store = TokenStore(str(copy_store))
    cfg = ModelConfig.from_dict(_demo_config("dec").model.to_dict())
    model = models.build(cfg, nnx.Rngs(3))
    runner = ModelRunner(model, cfg, evaluator.eval_mesh(1))
    settings = ds.DownstreamSettings(examples=16, batch_size=8, split="validation")
    task = ds.DownstreamTask(store, settings)
    gen = ds.Generator(runner, vocab_size=store.vocab.vocab_size)
    lay = task.layout
    ids = gen.generate(task.inputs, max_decode_length=lay.targets_length - 1, batch_size=8)
    chunks = np.zeros((len(ids), lay.raw_length), np.int32)
    chunks[:, : lay.inputs_length] = task.inputs
    chunks[:, -1] = 1
    kept = []
    for r, row in enumerate(ids):
        stop = np.flatnonzero((row == 0) | (row == 1))
        n = int(stop[0]) if stop.size else len(row)
        kept.append(n)
        chunks[r, lay.inputs_length : lay.inputs_length + n] = row[:n]
        chunks[r, lay.inputs_length + n] = 1  # the answer's EOS
    obj = make_objective("supervised", store.vocab, "decoder_only", store_manifest=store.manifest)
    feats = obj(chunks, np.arange(len(ids)), 0)
    assert "decoder_causal_attention" in feats
    logits, _ = models.forward(model, feats)
    pred = np.asarray(logits[..., : store.vocab.vocab_size].argmax(-1))  # as the generator
    w = feats["decoder_loss_weights"]
    compared = 0
    for r, n in enumerate(kept):
        pos = np.flatnonzero(w[r] > 0)[:n]  # the answer's positions, before its EOS
        np.testing.assert_array_equal(pred[r, pos], ids[r, :n])
        compared += n
    assert compared >= 16  # the untrained model's answers are not all empty


# ----------------------------------------------------------------------------------------
# An ICL-lab store (synthetic token ids, vocabulary kind "tokens", no text form): a
# clamped run gets the probes like any other, plus the lab's metrics (issue 8).
# ----------------------------------------------------------------------------------------

ICL_TASK = (
    "icl_bursty:K=16,N=8,B=4,L=4,p_C=0.5,novel_classes=16,unseen_classes=8,"
    "train=2048,validation=256,eval=64"
)


def test_evaluator_on_a_clamped_icl_run(tmp_path):
    import numpy as np

    from repeat_scaling.eval import evaluator, results
    from repeat_scaling.eval.settings import EvalSettings
    from repeat_scaling.train import loop

    icl_bursty = config_files.load_module(REPO / "configs" / "icl_bursty.py")
    c = icl_bursty.get_config("demo_clamped")
    assert c.interventions  # previous-token clamp on layer 0, head 0
    c.data.source = ICL_TASK
    c.data.store = str(tmp_path / "icl_store")
    c.model.vocab_size = icl_bursty._vocab_size(ICL_TASK)
    c.train.steps, c.train.batch_size = 4, 16
    c.train.checkpoint_every = c.train.log_every = 4
    loop.train(c, tmp_path / "run")

    ev = evaluator.Evaluator(tmp_path / "run", EvalSettings(**SMALL), evaluator.eval_mesh(1))
    assert ev.run.store.vocab.kind == "tokens" and ev.icl_task is not None
    (rec,) = ev.run_all()
    for key in ("test_loss", "copy_loss", "random_repeat_loss", "icl_score"):
        assert np.isfinite(rec[key]), key
    for key in ("prefix_matching", "previous_token", "copying_score"):
        assert 0 <= rec[key] <= 1 or key == "copying_score", key
        assert len(rec[f"{key}_heads"]) == 2  # two layers
    assert not any(k.startswith("downstream_") for k in rec)
    # The lab's metrics, evaluated as trained (clamped) and also without the clamp.
    from repeat_scaling.eval.icl import SPLIT_METRICS

    icl = [*SPLIT_METRICS.values(), "icl_accuracy_unclamped"]
    assert all(0 <= rec[k] <= 1 for k in icl), {k: rec.get(k) for k in icl}
    (line,) = results.read_results(results.results_path(tmp_path / "run"))
    assert set(icl) <= set(line)


def test_downstream_task_reads_pairs_examples_and_references(copy_store, tmp_path):
    import shutil

    from repeat_scaling.data.store import TokenStore
    from repeat_scaling.data.vocab import Encoder

    store = TokenStore(str(copy_store))
    task = ds.DownstreamTask(store, ds.DownstreamSettings(examples=5, split="train"))
    enc = Encoder(store.vocab)
    assert task.inputs.shape == (5, 16)
    for row, ref in zip(task.inputs, task.references):
        assert enc.decode(row) == ref["inputs"] == f"copy: {ref['targets']}"
        assert row[len(ref["inputs"])] == 1 and not row[len(ref["inputs"]) + 1 :].any()
    # Without a references file the detokenised stored targets are the answers.
    bare = tmp_path / "bare"
    shutil.copytree(copy_store, bare)
    (bare / "train.references.jsonl").unlink()
    plain = ds.DownstreamTask(
        TokenStore(str(bare)), ds.DownstreamSettings(examples=5, split="train")
    )
    assert [r["answers"] for r in plain.references] == [[r["targets"]] for r in task.references]
    with pytest.raises(ds.DownstreamError, match="downstream_split='test'; the store has"):
        ds.DownstreamTask(store, ds.DownstreamSettings(split="test"))
