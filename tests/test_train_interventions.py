"""Attention clamps (``config.interventions``) inside the compiled train step.

A 2-layer attention-only model (``attn2_tiny``) on the built-in corpus, 6 steps, with a
previous-token clamp on layer 0 head 1 during steps [2, 4). Compared with the unclamped
run (same seed, same batches): identical losses before the window, different inside it;
resuming mid-window reproduces the uninterrupted clamped run bit for bit; resuming after
the window without the clamp gives the same losses as the clamped run (it is off there).
"""

import json
import shutil
import subprocess
import sys

import pytest
from test_train_loop import REPO, tiny_config

from repeat_scaling.train import config as config_lib
from repeat_scaling.train import loop

CLAMP = {"kind": "previous_token", "layer": 0, "head": 1, "start_step": 2, "end_step": 4}


def attn2_config(store_dir, interventions=()):
    c = tiny_config(store_dir, **{"train.steps": 6, "train.checkpoint_every": 2, "train.keep": 10})
    c.model = config_lib.model_fields("attn2_tiny")
    c.model.vocab_size = 384
    c.interventions = tuple(interventions)
    return c


def _losses(workdir):
    lines = (workdir / "train" / "metrics.jsonl").read_text().splitlines()
    return {d["step"]: d["loss"] for d in map(json.loads, lines)}


def _copy_without(src, dst, drop_steps):
    shutil.copytree(src, dst)
    for s in drop_steps:
        shutil.rmtree(dst / "checkpoints" / str(s))


def test_clamp_acts_only_in_its_window_and_resumes_exactly(store_dir, tmp_path):
    free, clamped = tmp_path / "free", tmp_path / "clamped"
    loop.train(attn2_config(store_dir), free)
    loop.train(attn2_config(store_dir, [CLAMP]), clamped)
    a, b = _losses(free), _losses(clamped)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    # Logged step n is the update from state step n-1: steps 0, 1 precede the window.
    assert [b[n] for n in (1, 2)] == [a[n] for n in (1, 2)]
    assert all(abs(b[n] - a[n]) > 1e-4 for n in (3, 4)), (a, b)

    recorded = json.loads((clamped / "config.json").read_text())
    assert recorded["interventions"] == [CLAMP]
    assert recorded["derived"]["interventions"] == [CLAMP | {"stack": "decoder"}]

    # Resume in the middle of the window (from step 2): bit-exact.
    mid = tmp_path / "resume_mid"
    _copy_without(clamped, mid, (4, 6))
    assert loop.train(attn2_config(store_dir, [CLAMP]), mid)["resumed_from"] == 2
    assert _losses(mid) == b

    # The window ends at step 4: a clamp that never ends gives the same updates 3 and 4,
    # then other ones (the compiled step switched the windowed clamp off at step 4).
    longer = tmp_path / "longer"
    loop.train(attn2_config(store_dir, [CLAMP | {"end_step": 100}]), longer)
    c = _losses(longer)
    assert [c[n] for n in (1, 2, 3, 4)] == [b[n] for n in (1, 2, 3, 4)]
    assert all(abs(c[n] - b[n]) > 1e-6 for n in (5, 6)), (b, c)

    # Resuming without the clamp would change what the run trained: refused, naming it.
    after = tmp_path / "resume_after"
    _copy_without(clamped, after, (6,))
    with pytest.raises(
        config_lib.ConfigError, match=r"interventions: \[\{.*\}\] \(recorded\) vs \[\]"
    ):
        loop.train(attn2_config(store_dir), after)
    assert (after / "checkpoints" / "4").is_dir()


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"kind": "previous_token", "layer": 0, "head": 9}, r"interventions\[0\].head=9"),
        ({"kind": "bogus", "layer": 0, "head": 0}, r"interventions\[0\].kind='bogus'"),
        ({"kind": "ablate", "layer": 2, "head": 0}, r"interventions\[0\].layer=2"),
        (
            {"kind": "ablate", "layer": 0, "head": 0, "start_step": 5, "end_step": 5},
            r"interventions\[0\].end_step=5",
        ),
    ],
)
def test_bad_spec_is_one_line_error(store_dir, tmp_path, spec, message):
    c = attn2_config(store_dir, [spec])
    with pytest.raises(config_lib.ConfigError, match=message) as e:
        loop.train(c, tmp_path / "w")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "w").exists()


def test_cli_bad_spec(store_dir, tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "repeat_scaling.train",
            "--config=configs/demo.py",
            f"--workdir={tmp_path / 'w'}",
            f"--config.data.store={store_dir}",
            "--config.data.source=",
            "--config.interventions=({'kind': 'ablate', 'layer': 0, 'head': 7},)",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (
        "error: interventions[0].head=7; expected a head in [0, 4)"
    )
