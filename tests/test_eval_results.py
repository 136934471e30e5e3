"""eval/results.jsonl: append once per step, skip done steps, corrupt lines never fatal."""

import json

import numpy as np
import pytest

from repeat_scaling.eval import results


def test_append_skip_and_reopen(tmp_path):
    w = results.ResultsWriter(tmp_path)
    assert w.append({"step": 10, "test_loss": np.float32(2.5), "heads": np.zeros((2, 2))})
    assert not w.append({"step": 10, "test_loss": 9.0})  # done: skipped
    assert w.append({"step": 20, "test_loss": float("nan")})
    with pytest.raises(results.ResultsLockedError, match="another evaluator is writing"):
        results.ResultsWriter(tmp_path)  # a second evaluator while the first one runs
    w.close()
    again = results.ResultsWriter(tmp_path)  # a restarted evaluator
    assert again.done_steps == {10, 20}
    assert not again.append({"step": 20, "test_loss": 1.0})
    lines = results.results_path(tmp_path).read_text().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(x) for x in lines)
    assert first == {"step": 10, "test_loss": 2.5, "heads": [[0.0, 0.0], [0.0, 0.0]]}
    assert second["test_loss"] is None  # NaN -> null (strict JSON)
    with pytest.raises(ValueError, match="integer 'step'"):
        w.append({"step": "3"})


def test_corrupt_and_truncated_lines_reported_not_fatal(tmp_path):
    path = results.results_path(tmp_path)
    path.parent.mkdir(parents=True)
    # A good line, garbage, a line without step, a duplicate, and a tail truncated by a kill.
    path.write_text('{"step": 1, "x": 1}\nnot json\n{"x": 2}\n{"step": 1, "x": 3}\n{"step": 2, "x"')
    warnings = []
    w = results.ResultsWriter(tmp_path, warn=warnings.append)
    assert w.done_steps == {1}
    assert len(warnings) == 4
    assert "results.jsonl:2: corrupt results line skipped" in warnings[0]
    assert "without an integer 'step'" in warnings[1]
    assert "duplicate record for step 1" in warnings[2]
    assert "results.jsonl:5: corrupt" in warnings[3]
    # Step 2 was never completely written, so it is evaluated again, on its own line.
    assert w.append({"step": 2, "x": 4})
    recs = results.read_results(path, warn=warnings.append)
    assert [(r["step"], r["x"]) for r in recs] == [(1, 1), (2, 4)]
    assert path.read_text().endswith('{"step":2,"x":4}\n')


def test_evaluation_imports_no_tensorflow():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import repeat_scaling.evaluate, repeat_scaling.eval.evaluator, repeat_scaling.bench.eval\n"
        "from repeat_scaling.eval import copying, features, metrics, probes, results, runner\n"
        "from repeat_scaling.eval import settings\n"
        "import repeat_scaling.train.loop, repeat_scaling.data.pipeline  # used by Run.load\n"
        "bad = [m for m in ('tensorflow', 'seqio', 'tensorflow_datasets') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
