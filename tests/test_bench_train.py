"""The training benchmark: its configs and the JSON line it prints."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from repeat_scaling import config_files
from repeat_scaling.models import sizes
from repeat_scaling.train import config as config_lib

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "arg,params,tokens",
    [
        ("t5_peer", (25.8e6, 26.0e6), 8 * (512 + 114)),  # ../shared/bench/README.md: 25.9M
        ("gpt_peer", (20.6e6, 20.7e6), 8 * 512),
        ("t5_base", (2.2e8, 2.6e8), 128 * (512 + 114)),
        ("d1b", (1.0e9, 1.5e9), 16 * 2048),
    ],
)
def test_bench_configs_validate_with_the_intended_sizes(arg, params, tokens):
    config = config_files.load(str(ROOT / f"configs/bench.py:{arg}"))
    config_lib.validate(config, num_devices=1)
    n = sizes.count_params(config_lib.model_config(config))["trainable"]
    assert params[0] <= n <= params[1], n
    lengths = (
        config.data.inputs_length + config.data.targets_length
        if config.data.objective == "span_corruption"
        else config.data.length
    )
    assert config.train.batch_size * lengths == tokens


def test_bench_configs_reject_an_unknown_name():
    with pytest.raises(ValueError, match="expected one of"):
        config_files.load(str(ROOT / "configs/bench.py:t5_huge"))


def test_bench_train_prints_consistent_measurements():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "repeat_scaling.bench",
            "train",
            "--config=configs/demo.py",
            "--dtypes=float32",
            "--steps=2",
            "--warmup=1",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("{")]
    r = json.loads(line)
    assert r["num_devices"] == 8 and r["model"] == "dec_tiny" and r["steps"] == 2
    assert r["tokens_per_step"] == r["batch_size"] * r["lengths"]["decoder"]
    assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["step_time_s"])
    assert r["model_tflops_per_s"] == pytest.approx(
        r["model_gflop_per_step"] / 1e3 / r["step_time_s"]
    )
    assert r["peak_tflops"] > 0
    assert r["mfu"] == pytest.approx(r["model_tflops_per_s"] / r["peak_tflops"])
    assert 0 < r["mfu"] < 1.5 and r["loss"] > 0
