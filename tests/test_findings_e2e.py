"""End to end: a 3-point mini-sweep is trained, evaluated and reported with findings."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

CONFIG = """
from repeat_scaling.train.config import adamw, default_config, model_fields

def get_config(arg=""):
    c = default_config()
    c.model = model_fields("dec_micro")
    c.data.source = "text:" + {text!r}
    c.data.vocab = "byte"
    c.data.store = {store!r}
    c.data.objective = "causal_lm"
    c.data.length = 32
    c.train.steps, c.train.batch_size, c.train.log_every = 8, 8, 4
    c.train.checkpoint_every, c.train.keep = 8, 1
    c.train.progress_bar = "off"
    adamw(c, lr=3e-3, warmup=2, schedule="cosine")
    c.eval.update(dict(test_batches=1, memorisation_examples=8, copy_examples=2,
                       random_repeat_examples=2, random_repeat_length=8, icl_examples=2,
                       probe_sequences=2, frequency_tokens=10000))
    c.sweep = [{{"data.repeated_fraction": 0.0, "data.repeated_epochs": 1}},
               {{"data.repeated_fraction": 0.5, "data.repeated_epochs": 2}},
               {{"data.repeated_fraction": 0.5, "data.repeated_epochs": 4}},
               {{"data.repeated_fraction": 0.5, "data.repeated_epochs": 8}}]
    return c
"""


@pytest.mark.slow
def test_mini_sweep_report_writes_findings(tmp_path, shared_data):
    cfg = tmp_path / "mini.py"
    text = shared_data / "tinyshakespeare" / "input.txt"
    cfg.write_text(CONFIG.format(text=str(text), store=str(tmp_path / "store")))
    root, out = tmp_path / "root", tmp_path / "report"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device each
    cmd = [sys.executable, "launch/submit.py", f"--config={cfg}", f"--root={root}",
           "--parallel=2", "--eval_mode=after"]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    # The evaluator took its settings from the run's recorded config.eval.
    for run in root.iterdir():
        last = json.loads((run / "eval" / "results.jsonl").read_text().splitlines()[-1])
        assert last["step"] == 8 and last["random_repeat_length"] == 8
    report = subprocess.run(
        [sys.executable, "-m", "repeat_scaling.report", f"--runs={root}/*", f"--out={out}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report.returncode == 0, report.stderr
    found = json.loads((out / "findings.json").read_text())["findings"]
    kinds = {f["kind"]: f for f in found}
    assert {"double_descent", "memorisation", "effective_size"} <= set(kinds)
    for f in found:
        assert set(f) == {"kind", "family", "verdict", "statement", "numbers", "runs"}
        assert f["verdict"] in ("reproduced", "not reproduced", "not enough runs")
    dd = kinds["double_descent"]
    assert dd["numbers"]["epochs"] == [2.0, 4.0, 8.0]
    assert dd["numbers"]["baseline_loss"] > 0
    assert dd["family"].startswith("dec_micro, causal_lm, f=0.5")
    assert sorted(dd["runs"]) == sorted(p.name for p in root.iterdir())
    # One model size: no effective size can be fitted.
    assert kinds["effective_size"]["verdict"] == "not enough runs"
    text = (out / "report.md").read_text()
    assert text.index("## Findings") < text.index("## What is missing")
    assert "| double descent | dec_micro, causal_lm, f=0.5 |" in text
