"""Context-length rules of the metrics (documented in repeat_scaling/eval/metrics.py)."""

import numpy as np
import pytest

from repeat_scaling.eval import features, metrics
from repeat_scaling.eval.settings import EvalSettings


def test_copy_layout_fits_k_copies_in_context():
    assert metrics.copy_layout(2048, 11, 16) == (11, 186)  # the paper's 11 copies
    assert metrics.copy_layout(64, 11, 16) == (4, 16)  # k shrinks to keep passages >= 16
    assert metrics.copy_layout(20, 11, 16) == (2, 10)
    k, p = metrics.copy_layout(512, 11, 16)
    assert k * p <= 512 and k == 11


def test_icl_and_probe_positions():
    assert metrics.icl_positions(512) == (50, 500)
    assert metrics.icl_positions(128) == (50, 127)
    assert metrics.icl_positions(64) == (31, 63)
    with pytest.raises(ValueError, match=">= 3 tokens"):
        metrics.icl_positions(2)
    assert metrics.probe_layout(512, 25, 4) == (25, 4)
    assert metrics.probe_layout(64, 25, 4) == (25, 2)
    assert metrics.probe_layout(24, 25, 4) == (11, 2)


def test_feature_builders_follow_t5x_conventions():
    t = np.array([[5, 6, 7, 0]])
    f = features.decoder_features(t, np.ones_like(t))
    np.testing.assert_array_equal(f["decoder_input_tokens"], [[0, 5, 6, 7]])
    np.testing.assert_array_equal(f["decoder_loss_weights"], [[1, 1, 1, 0]])
    np.testing.assert_array_equal(f["decoder_segment_ids"], [[1, 1, 1, 0]])
    e = features.encdec_features(np.array([[9, 1]]), t, np.ones_like(t))
    np.testing.assert_array_equal(e["decoder_input_tokens"], [[0, 5, 6, 7]])


def test_settings_overrides_are_validated():
    s = EvalSettings.from_overrides({"batch_size": "4", "probe_exclude_fraction": "0.02"})
    assert s.batch_size == 4 and s.probe_exclude_fraction == 0.02
    with pytest.raises(ValueError, match="batch_size=0"):
        EvalSettings(batch_size=0)
    with pytest.raises(ValueError, match="copy_repeats=1"):
        EvalSettings(copy_repeats=1)
    with pytest.raises(ValueError, match="expected an int"):
        EvalSettings.from_overrides({"seed": "x"})
