"""Greedy decoding: KV-cached == uncached token for token, and == teacher-forced argmax."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from repeat_scaling.models import build, forward, sizes
from repeat_scaling.models.decoding import greedy_decode, teacher_forced_features

DEC = sizes.get("dec_tiny").replace(d_model=32, d_ff=64, head_dim=8)
T5 = sizes.get("t5_tiny").replace(d_model=32, d_ff=64, head_dim=8)
N = 7  # decode length


@functools.cache
def _model(cfg, seed=0):
    return build(cfg, nnx.Rngs(seed))


def _prompt(seed=0, b=3, p=6):
    """Right-padded prompts of lengths 4, 2 and 6."""
    x = np.random.RandomState(seed).randint(2, 300, (b, p)).astype(np.int32)
    x[0, 4:] = 0
    x[1, 2:] = 0
    return x


def _both(model, feats, **kw):
    a = np.asarray(greedy_decode(model, feats, max_decode_length=N, **kw))
    b = np.asarray(greedy_decode(model, feats, max_decode_length=N, use_cache=False, **kw))
    assert a.shape == (len(next(iter(feats.values()))), N) and a.dtype == np.int32
    np.testing.assert_array_equal(a, b)
    return a


_argmax = nnx.jit(lambda m, f: jnp.argmax(forward(m, f)[0], -1))


def _check_teacher_forced(model, prompt, out, prefix_lm):
    feats, lengths = teacher_forced_features(prompt, out, prefix_lm)
    am = np.asarray(_argmax(model, feats))
    for r, p in enumerate(lengths):
        np.testing.assert_array_equal(am[r, p : p + N], out[r])


@pytest.mark.parametrize("position", ["rope", "relative"])
def test_decoder_only_cached_equals_uncached_and_teacher_forced(position):
    model = _model(DEC.replace(position=position))
    prompt = _prompt()
    outs = {}
    for prefix_lm in (True, False):
        outs[prefix_lm] = _both(model, {"prompt_tokens": prompt}, prefix_lm=prefix_lm)
        _check_teacher_forced(model, prompt, outs[prefix_lm], prefix_lm)
    # Rows decode independently: permuting the batch permutes the outputs.
    perm = [2, 0, 1]
    np.testing.assert_array_equal(_both(model, {"prompt_tokens": prompt[perm]}), outs[True][perm])


def test_encoder_decoder_cached_equals_uncached_and_teacher_forced():
    model = _model(T5)
    enc = _prompt(1)
    out = _both(model, {"encoder_input_tokens": enc})
    dec_in = np.zeros_like(out)
    dec_in[:, 1:] = out[:, :-1]
    am = _argmax(model, {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in})
    np.testing.assert_array_equal(np.asarray(am), out)


def test_eos_stops_rows_and_zero_fills():
    model = _model(DEC)
    prompt = _prompt(2)
    free = np.asarray(greedy_decode(model, {"prompt_tokens": prompt}, max_decode_length=N))
    eos = int(free[0, 2])  # a token row 0 emits at step 2: use it as EOS
    out = _both(model, {"prompt_tokens": prompt}, eos_id=eos)
    for r in range(len(out)):
        hits = np.flatnonzero(free[r] == eos)
        stop = hits[0] + 1 if hits.size else N
        np.testing.assert_array_equal(out[r, :stop], free[r, :stop])
        assert (out[r, stop:] == 0).all()
    assert out[0, 2] == eos and (out[0, 3:] == 0).all()


@pytest.mark.parametrize(
    "cfg",
    [
        # MoE with ample capacity (capacity_factor >= num_experts / top_k): nothing dropped.
        DEC.replace(num_experts=4, top_k=2, capacity_factor=2.0, moe_every=2),
        DEC.replace(num_decoder_layers=3, param_share=True, remat_policy="full"),
        DEC.replace(position="relative", scan_layers=False, attention_impl="xla"),
    ],
    ids=["moe_scan", "param_share", "unrolled_xla"],
)
def test_cached_equals_uncached_other_stacks(cfg):
    out = _both(_model(cfg), {"prompt_tokens": _prompt(3)})
    assert len({tuple(r) for r in out}) == 3  # rows differ: a real decode


def test_vocab_restriction_and_bad_input():
    model = _model(DEC)
    out = greedy_decode(model, {"prompt_tokens": _prompt()}, max_decode_length=N, vocab_size=10)
    assert int(out.max()) < 10
    with pytest.raises(ValueError, match=r"features\['prompt_tokens'\]"):
        greedy_decode(model, {"decoder_input_tokens": _prompt()}, max_decode_length=3)
    with pytest.raises(ValueError, match="max_decode_length=0"):
        greedy_decode(model, {"prompt_tokens": _prompt()}, max_decode_length=0)
    with pytest.raises(ValueError, match="vocab_size=9999"):
        greedy_decode(model, {"prompt_tokens": _prompt()}, max_decode_length=3, vocab_size=9999)
