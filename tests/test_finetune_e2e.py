"""Fine-tuning after repeated pre-training, end to end (issue 9, "What it must show").

- The paper configs' fine-tuning stages expand onto the pre-training runs of the same
  sweep root (`init_from="{root}/<run>"`) and pass the trainer's validation.
- A tiny decoder-only model pre-trained on the built-in corpus at f = 0 and at f = 0.5,
  E = 64, each fine-tuned on the built-in Python code corpus (`pystdlib`), plus one run
  from scratch on that code: real trainer, real evaluator, real report; the comparison
  figure has one curve per pre-training setting plus the from-scratch one, all finite.
"""

import csv
import importlib.util
import pathlib

import pytest

from launch import sweeps

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config_module(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


STAGE_RUNS = {  # config -> (fine-tuned, from scratch) runs at demo / small / paper
    "hernandez2022": ((5, 1), (21, 3), (63, 7)),
    "xue2023": ((5, 1), (4, 1), (9, 1)),
}


@pytest.mark.parametrize("name", sorted(STAGE_RUNS))
def test_finetune_stages_point_at_the_pretraining_runs(name):
    config_lib = pytest.importorskip("repeat_scaling.train.config")
    module = _config_module(name)
    for scale, (n_ft, n_scratch) in zip(module.SCALES, STAGE_RUNS[name]):
        pretrain = {r.workdir for r in sweeps.expand(module.get_config(scale), "/r")}
        runs = sweeps.expand(module.get_config(f"finetune_{scale}"), "/r/")
        finetuned = [r for r in runs if r.config.init_from]
        assert (len(finetuned), len(runs) - len(finetuned)) == (n_ft, n_scratch), scale
        # Every init_from is a pre-training run of the same root, named in the run's tag.
        assert {r.config.init_from for r in finetuned} <= pretrain
        for r in finetuned:
            assert r.name.endswith("_ft_" + r.config.init_from.rsplit("/", 1)[-1])
            assert r.flags["init_from"] == r.config.init_from
        # No fine-tuning run reuses a pre-training run's directory.
        assert not {r.workdir for r in runs} & pretrain
        for r in runs:
            model = config_lib.validate(r.config)
            assert model.name == r.config.model.name
        if name == "hernandez2022":
            assert {r.config.data.source for r in runs} <= {"pystdlib", "pystdlib:tests=1"}
            assert {r.config.data.objective for r in runs} == {"causal_lm"}
        else:
            assert {r.config.data.objective for r in runs} == {"supervised"}


def test_root_template_and_init_from_tag():
    assert sweeps.resolve_root("{root}/a_f0_e1_s0", "gs://b/x/") == "gs://b/x/a_f0_e1_s0"
    assert sweeps.resolve_root(3, "/r") == 3
    assert sweeps.tag_for("init_from", "/r/d25m_f10_e100_s0/") == "ft_d25m_f10_e100_s0"
    with pytest.raises(sweeps.SweepError, match="empty name component"):
        sweeps.tag_for("init_from", "/r/?!/")


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
