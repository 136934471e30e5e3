"""Loss functions: T5X weighted cross entropy with z-loss and label smoothing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repeat_scaling.models import losses


def _ref(logits, targets, weights, z, s):
    """Literal T5X compute_weighted_cross_entropy (one-hot soft targets) in numpy."""
    v = logits.shape[-1]
    conf = 1.0 - s
    low = (1.0 - conf) / (v - 1)
    norm = -(conf * np.log(conf) + (v - 1) * low * np.log(low + 1e-20))
    soft = np.full(logits.shape, low)
    np.put_along_axis(soft, targets[..., None], conf, axis=-1)
    lz = np.log(np.exp(logits).sum(-1))
    loss = -(soft * (logits - lz[..., None])).sum(-1) + z * lz**2 - norm
    return (loss * weights).sum(), (z * lz**2 * weights).sum(), weights.sum()


@pytest.mark.parametrize("z,s", [(0.0, 0.0), (1e-4, 0.0), (1e-4, 0.1), (0.0, 0.2)])
def test_cross_entropy_matches_t5x_formula(z, s):
    rs = np.random.RandomState(0)
    logits = rs.randn(2, 5, 11).astype(np.float64)
    targets = rs.randint(0, 11, (2, 5))
    weights = (rs.rand(2, 5) > 0.3).astype(np.float64)
    got = losses.cross_entropy(
        jnp.asarray(logits, jnp.float32),
        jnp.asarray(targets),
        jnp.asarray(weights, jnp.float32),
        z_loss=z,
        label_smoothing=s,
    )
    for g, r in zip(got, _ref(logits, targets, weights, z, s), strict=True):
        assert float(g) == pytest.approx(float(r), rel=1e-5, abs=1e-5)


def test_per_token_loss_accuracy_and_errors():
    logits = jnp.asarray([[[5.0, 0.0, 0.0], [0.0, 0.0, 5.0]]])
    targets = jnp.asarray([[0, 1]])
    ptl = losses.per_token_loss(logits, targets)
    np.testing.assert_allclose(ptl, -jax.nn.log_softmax(logits)[0, [0, 1], [0, 1]][None], rtol=1e-6)
    assert float(losses.token_accuracy(logits, targets)) == 0.5
    assert float(losses.token_accuracy(logits, targets, jnp.asarray([[1.0, 0.0]]))) == 1.0
    loss, _, w = losses.cross_entropy(logits, targets)
    assert float(w) == 2 and float(loss) == pytest.approx(float(ptl.sum()), rel=1e-6)
    with pytest.raises(ValueError, match="label_smoothing=1.0"):
        losses.cross_entropy(logits, targets, label_smoothing=1.0)


def test_argmax_hits_equals_argmax_with_ties_and_nans():
    """``argmax_hits`` answers ``argmax(logits) == target`` exactly: the first maximum
    wins among ties, and a NaN counts as the maximum (jnp.argmax's conventions)."""
    k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
    logits = jnp.round(jax.random.normal(k1, (6, 40, 9)) * 2) / 2  # many ties
    targets = jax.random.randint(k2, (6, 40), 0, 9)
    # Half of the targets at the argmax, some at a later tie of it.
    am = jnp.argmax(logits, -1)
    targets = jnp.where(jax.random.uniform(k3, targets.shape) < 0.5, am, targets)
    logits = logits.at[0, :5, 4].set(jnp.nan)  # NaN rows: before / at / after the target
    logits = logits.at[1, :5, 2:4].set(jnp.nan)
    logits = logits.at[2, 0, :].set(jnp.nan)
    logits = logits.at[3, 0, :].set(-jnp.inf)
    want = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    got = jax.jit(losses.argmax_hits)(logits, targets)
    assert got.dtype == jnp.float32 and got.shape == targets.shape
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert 0 < float(want.mean()) < 1
    ties = np.asarray(jnp.sum(logits == jnp.max(logits, -1, keepdims=True), -1) > 1)
    assert ties.sum() > 10  # the case that distinguishes "first maximum" from "a maximum"
