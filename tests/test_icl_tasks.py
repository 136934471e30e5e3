"""The ICL lab's bursty task, its store writer, the 'icl' objective and the ICL metrics."""

import json
import os

import numpy as np
import pytest

from repeat_scaling.data import icl_tasks as T
from repeat_scaling.data.icl_objective import IclObjective
from repeat_scaling.data.icl_store import prepare_icl_store, write_sequence_store
from repeat_scaling.data.objectives import make_objective
from repeat_scaling.data.store import StoreError, TokenStore

SMALL = {"K": 16, "N": 4, "B": 2, "L": 4, "novel_classes": 8, "unseen_classes": 4}
SMALL.update(train=64, validation=16, eval=32)


def _task(**kw):
    return T.BurstyTask({**SMALL, **kw}, seed=3)


def _split(seq):
    """items [n, N+1], labels [n, N+1] (0-based) of token rows."""
    return seq[:, 0::2], seq[:, 1::2] - T.FIRST_LABEL


def test_params_and_spec_errors():
    assert T.parse_spec("icl_bursty:K=8, N=4") == ("icl_bursty", {"K": "8", "N": "4"})
    with pytest.raises(T.IclTaskError, match="expected one of"):
        T.parse_spec("icl_nope:K=3")
    with pytest.raises(T.IclTaskError, match="key=value"):
        T.parse_spec("icl_bursty:K")
    for bad, match in [
        ({"Q": 1}, "unknown icl_bursty parameter 'Q'"),
        ({"K": "x"}, "K='x'; expected a number"),
        ({"N": 2.5}, "expected an integer"),
        ({"B": 3}, "B=3; expected a divisor of N=4"),
        ({"p_C": 1.5}, "p_C=1.5; expected a probability"),
        ({"L": 1}, "L=1"),
    ]:
        with pytest.raises(T.IclTaskError, match=match) as e:
            T.bursty_params({**SMALL, **bad})
        assert "\n" not in str(e.value)


def test_token_layout_and_sequence_kinds():
    task = _task(p_C=0.5, p_B=1.0)
    first, K, P = task.first_item_token, task.K, task.P
    label_of = {first + k: T.FIRST_LABEL + int(task.labels[k]) for k in range(K)}
    assert task.vocab_size == 3 + 4 + (16 + 8 + 4)
    # Training mixture: bursty trained-class rows carry fixed labels; novel rows are
    # novel-pool classes; every context class appears B=2 times and holds the query.
    seq = T.token_sequences(task, "train", 400, seed=1)
    assert seq.shape == (400, 10)
    items, labels = _split(seq)
    assert ((labels >= 0) & (labels < 4)).all()
    novel = items[:, 0] >= first + K
    assert 0.35 < novel.mean() < 0.65  # p_C = 0.5
    for row_items, row_labels, is_novel in zip(items, labels, novel):
        ctx, q = row_items[:-1], row_items[-1]
        values, counts = np.unique(ctx, return_counts=True)
        assert (counts == 2).all() and q in values
        mapping = {}
        for it, lab in zip(row_items, row_labels):
            assert mapping.setdefault(it, lab) == lab  # one label per class in a sequence
        if is_novel:
            assert ((row_items >= first + K) & (row_items < first + K + P)).all()
            assert len(set(mapping.values())) == len(mapping)  # distinct labels
        else:
            assert all(label_of[i] == lab + T.FIRST_LABEL for i, lab in mapping.items())
    # Deterministic in the seed, different across seeds.
    assert np.array_equal(seq, T.token_sequences(task, "train", 400, seed=1))
    assert not np.array_equal(seq, T.token_sequences(task, "train", 400, seed=2))


def test_eval_sets():
    task = _task()
    first, K, P = task.first_item_token, task.K, task.P
    icl = _split(T.token_sequences(task, "eval_icl", 64, 0))[0]
    assert ((icl >= first + K) & (icl < first + K + P)).all()
    unseen = _split(T.token_sequences(task, "eval_unseen", 64, 0))[0]
    assert (unseen >= first + K + P).all()
    items, labels = _split(T.token_sequences(task, "eval_flipped", 64, 0))
    true = task.labels[items - first]
    assert (items < first + K).all() and (labels != true).all()
    assert all(q in ctx for q, ctx in zip(items[:, -1], items[:, :-1]))
    items, labels = _split(T.token_sequences(task, "eval_iwl", 64, 0))
    assert (labels == task.labels[items - first]).all()
    assert all(q not in ctx for q, ctx in zip(items[:, -1], items[:, :-1]))
    with pytest.raises(T.IclTaskError, match="sequence kind 'bogus'"):
        T.token_sequences(task, "bogus", 4, 0)


def test_zipf_continuous_and_quantisation():
    task = _task(alpha=1.5, p_B=0.0, p_C=0.0, K=32)
    items, _, classes = T.continuous_sequences(task, "train", 2000, seed=0)
    assert items.shape == (2000, 5, task.p["D"])
    counts = np.bincount(classes.ravel(), minlength=32)
    assert counts[0] > 3 * counts[5] > 0  # Zipfian frequencies
    # eps = 0: items are exactly the class means and quantise to the class's token.
    clean = _task(eps=0.0)
    items, _, classes = T.continuous_sequences(clean, "eval_icl", 50, seed=0)
    expect = clean.means[classes] / np.sqrt(1.0)
    np.testing.assert_allclose(items, expect)
    assert (clean.quantise(items) == clean.first_item_token + classes).all()
    # E exemplars per class: with noise, items spread over their class's exemplar tokens.
    noisy = _task(eps=0.5, E=4)
    items, _, classes = T.continuous_sequences(noisy, "eval_icl", 200, seed=0)
    tok = noisy.quantise(items) - noisy.first_item_token
    assert np.mean(tok // 4 == classes) > 0.9
    assert len(np.unique(tok[classes == classes[0, 0]] % 4)) > 1


def test_store_round_trip_idempotent_and_objective(tmp_path):
    out = tmp_path / "icl"
    logs = []
    spec = "icl_bursty:" + ",".join(f"{k}={v}" for k, v in SMALL.items())
    from repeat_scaling.prepare import prepare_store

    store = prepare_store(spec, "tokens", str(out), seed=5, log=logs.append)
    task = store.manifest["icl_task"]
    assert task["name"] == "icl_bursty" and task["sequence_length"] == 10
    assert task["loss_positions"] == [9] and task["label_positions"] == [1, 3, 5, 7, 9]
    assert store.vocab.spec == f"tokens:{3 + 4 + 28}"
    expect = T.bursty_token_task(SMALL, 5)[0]
    for name in ("train", "validation", *T.EVAL_SPLITS):
        sp = store.split(name)
        assert sp.num_documents == len(expect[name])
        assert np.array_equal(sp.document(3)[:-1], expect[name][3])  # chunk c = sequence c
        assert sp.document(3)[-1] == 1
    mtime = os.path.getmtime(out / "manifest.json")
    assert prepare_store(spec, "tokens", str(out), seed=5, log=logs.append).path == str(out)
    assert os.path.getmtime(out / "manifest.json") == mtime and "up to date" in logs[-1]
    with pytest.raises(StoreError, match="different task"):
        prepare_store(spec, "tokens", str(out), seed=6)
    prepare_store(spec, "tokens", str(out), seed=6, overwrite=True)
    assert TokenStore(str(out)).manifest["icl_task"]["seed"] == 6

    ob = make_objective(
        "icl", store.vocab, "decoder_only", store_manifest=store.manifest, length=10, pack=False
    )
    assert ob.raw_length == 11 and ob.tokens_per_example == 10
    chunks = np.stack([store.split("train").tokens(c * 11, 11) for c in range(3)])
    f = ob(chunks, np.arange(3), 0)
    assert np.array_equal(f["decoder_target_tokens"], chunks[:, :10])
    assert (f["decoder_input_tokens"][:, 0] == 0).all()
    assert np.array_equal(f["decoder_input_tokens"][:, 1:], chunks[:, :9])
    assert f["decoder_loss_weights"].sum(1).tolist() == [1.0] * 3
    assert f["decoder_loss_weights"][:, 9].tolist() == [1.0] * 3
    all_lab = make_objective(
        "icl", store.vocab, "decoder_only", store_manifest=store.manifest, all_labels=True
    )
    assert all_lab(chunks, np.arange(3), 0)["decoder_loss_weights"][0, 1::2].tolist() == [1] * 5
    for kw, match in [
        (dict(arch="encoder_decoder"), "decoder_only"),
        (dict(length=12), "data.length=12; expected the ICL task's sequence_length=10"),
        (dict(pack=True), "pack=True"),
        (dict(store_manifest={"vocab": {}}), "no 'icl_task'"),
    ]:
        args = dict(arch="decoder_only", store_manifest=store.manifest) | kw
        arch = args.pop("arch")
        with pytest.raises(ValueError, match=match):
            make_objective("icl", store.vocab, arch, **args)


def test_write_sequence_store_checks(tmp_path):
    task = {"name": "toy", "sequence_length": 3, "loss_positions": [2]}
    ok = {"train": np.array([[3, 4, 5]]), "validation": np.array([[5, 4, 3]])}
    s = write_sequence_store(tmp_path / "s", ok, 6, task)
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["icl_task"] == task
    assert s.split("validation").document(0).tolist() == [5, 4, 3, 1]
    for splits, t, match in [
        ({"train": ok["train"]}, task, "needs a 'validation' split"),
        ({**ok, "train": np.array([[3, 4]])}, task, r"shape \(1, 2\)"),
        ({**ok, "train": np.array([[3, 4, 9]])}, task, r"ids in \[3, 9\]"),
        (ok, {**task, "loss_positions": [3]}, "outside"),
        (ok, {"name": "toy"}, "sequence_length"),
    ]:
        with pytest.raises(T.IclTaskError, match=match):
            write_sequence_store(tmp_path / "bad", splits, 6, t)


def test_objective_names_the_missing_positions_key():
    task = {"name": "toy", "sequence_length": 3, "loss_positions": [2]}
    assert IclObjective(task).loss_positions.tolist() == [2]
    with pytest.raises(T.IclTaskError, match="'toy' has no 'label_positions'.*all_labels=True"):
        IclObjective(task, all_labels=True)
    del task["loss_positions"]
    with pytest.raises(T.IclTaskError, match="'toy' has no 'loss_positions'.*all_labels=False"):
        IclObjective(task)


def test_clamp_label_survives_malformed_interventions():
    from repeat_scaling.report.icl import clamp_label
    from repeat_scaling.report.runs import Run

    def label(specs):
        return clamp_label(Run("/x", config={"interventions": specs}))

    good = {"kind": "previous_token", "layer": 0, "head": 1}
    assert label([]) == "no clamp"
    assert label([{**good, "start_step": 5}]) == "clamp previous_token L0H1 [5, -1)"
    assert label([good, {"kind": "previous_token"}]) == "clamp previous_token L0H1, (unreadable)"
    for bad in ([{**good, "layer": "zero"}], ["previous_token"], [None], "previous_token"):
        assert label(bad) == "clamp (unreadable)"


def test_icl_metrics_on_a_tiny_model(tmp_path):
    from flax import nnx

    from repeat_scaling import models
    from repeat_scaling.eval import icl
    from repeat_scaling.models import sizes

    store = prepare_icl_store(
        "icl_bursty:" + ",".join(f"{k}={v}" for k, v in SMALL.items()), tmp_path / "s"
    )
    cfg = sizes.get("attn2_tiny").replace(vocab_size=128)
    model = models.build(cfg, nnx.Rngs(0))
    out = icl.icl_metrics(model, cfg, store, None)
    assert set(out) == {
        "icl_accuracy",
        "icl_unseen_accuracy",
        "icl_flipped_accuracy",
        "iwl_accuracy",
        "icl_query_loss",
        "icl_context_chance",
    }
    assert out["icl_context_chance"] == 0.5 and out["icl_query_loss"] > 0
    # The accuracy is the argmax over the label tokens at the query position.
    task = store.manifest["icl_task"]
    seq = icl._sequences(store, "eval_flipped", None)
    feats = IclObjective(task).features(seq)
    logits = np.asarray(models.forward(model, feats)[0])[:, 9, 3:7]
    assert out["icl_flipped_accuracy"] == pytest.approx(np.mean(logits.argmax(-1) + 3 == seq[:, 9]))
    # The query loss normalises over the store's real vocabulary, not the padded rows.
    seq = icl._sequences(store, "eval_icl", None)
    full = np.asarray(models.forward(model, IclObjective(task).features(seq))[0], np.float64)
    real = full[:, 9, : store.vocab.vocab_size]
    assert store.vocab.vocab_size < full.shape[-1]
    lse = np.log(np.exp(real).sum(-1))
    expected = np.mean(lse - real[np.arange(len(seq)), seq[:, 9]])
    assert out["icl_query_loss"] == pytest.approx(expected, rel=1e-4)
    clamp = [{"kind": "previous_token", "layer": 0, "head": 0}]
    clamped = icl.icl_metrics(model, cfg, store, None, interventions=clamp, step=0)
    assert clamped["icl_accuracy_unclamped"] == out["icl_accuracy"]
    assert clamped["icl_query_loss"] != out["icl_query_loss"]
    assert icl.icl_metrics(model, cfg, type("S", (), {"manifest": {}})(), None) == {}
    from repeat_scaling.report.icl import transition_step

    assert transition_step([0, 25, 50, 75], [0.5, 0.95, 0.8, 0.97]) == 75
    assert transition_step([0, 25], [0.5, 0.6]) is None


def test_report_figure_marks_transitions(tmp_path):
    import csv

    from repeat_scaling.report import icl as report_icl
    from repeat_scaling.report.runs import Run

    def run(name, clamp, accs):
        config = {"model": {"name": "attn2_tiny"}, "data": {"objective": "icl"}}
        config["interventions"] = clamp
        results = [
            {
                "step": 25 * (i + 1),
                "icl_accuracy": a,
                "iwl_accuracy": 0.1,
                "icl_context_chance": 0.5,
            }
            for i, a in enumerate(accs)
        ]
        return Run(str(tmp_path / name), config=config, results=results)

    clamp = [{"kind": "previous_token", "layer": 0, "head": 0}]
    runs = [
        run("free", [], [0.5, 0.5, 0.52, 0.7, 0.95, 0.99]),
        run("clamped", clamp, [0.5, 0.93, 0.97, 0.99, 1.0, 1.0]),
        Run(str(tmp_path / "lm"), config={"model": {}}, results=[{"step": 1, "test_loss": 2.0}]),
    ]
    assert report_icl.figures(runs[2:], str(tmp_path)) == []
    (fig,) = report_icl.figures(runs, str(tmp_path))
    assert fig.png == "icl_transition.png" and (tmp_path / fig.png).stat().st_size > 10_000
    with open(tmp_path / "icl_transition.csv") as f:
        rows = list(csv.DictReader(f))
    t = {(r["clamp"], r["metric"]): r["transition_step"] for r in rows}
    assert t[("no clamp", "icl_accuracy")] == "125"
    assert t[("clamp previous_token L0H0", "icl_accuracy")] == "50"
    assert len(rows) == 2 * 6 * 2  # icl_accuracy and iwl_accuracy per checkpoint per run


def test_regression_store_dispatch_and_metrics(tmp_path):
    from flax import nnx

    from repeat_scaling import models
    from repeat_scaling.eval import icl
    from repeat_scaling.models import sizes

    store = prepare_icl_store("icl_regression:train=64,validation=32", tmp_path / "r")
    task = store.manifest["icl_task"]
    assert task["name"] == "icl_regression" and store.vocab.kind == "tokens"
    L = task["sequence_length"]
    assert store.split("train").num_documents == 64
    assert store.split("train").num_tokens == 64 * (L + 1)
    cfg = sizes.get("attn2_tiny").replace(vocab_size=128)
    out = icl.icl_metrics(models.build(cfg, nnx.Rngs(0)), cfg, store, None)
    assert 0.0 <= out["icl_regression_query_accuracy"] <= 1.0
    assert out["icl_regression_query_mse"] > 0
