"""Optimisers and the learning-rate schedule against float64 hand computations of their
equations: nanoGPT's warmup and cosine decay, Adam and AdamW (decay on the kernels only)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rnn_jax import optim


def _schedule64(t, peak, warmup, decay, final):
    """nanoGPT's shape in optax's count: t updates done."""
    if t < warmup:
        return peak * t / warmup
    if decay is None:
        return peak
    end = peak * final
    if t >= decay:
        return end
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (decay - warmup)))


@pytest.mark.parametrize(
    "warmup, decay", [(10, 100), (0, 50), (7, None), (1, 2)], ids=["both", "decay", "warmup", "min"]
)
def test_schedule_is_warmup_then_cosine_to_the_final_fraction(warmup, decay):
    peak, final = 3e-3, 0.1
    schedule = optim.learning_rate_schedule(peak, warmup, decay, final)
    for t in [0, 1, 2, 5, 9, 10, 11, 30, 54, 99, 100, 101, 500]:
        want = _schedule64(t, peak, warmup, decay, final)
        assert float(schedule(t)) == pytest.approx(want, rel=1e-5, abs=1e-12), t


def test_no_warmup_no_decay_is_the_number_itself():
    assert optim.learning_rate_schedule(1e-3) == 1e-3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(warmup_steps=10, decay_steps=10), r"decay_steps=10 must be larger than warmup"),
        (dict(warmup_steps=-1), r"warmup_steps=-1 must be >= 0"),
        (dict(decay_steps=5, final_fraction=1.5), r"final_fraction=1.5 must be in \[0, 1\]"),
    ],
)
def test_bad_schedules_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        optim.learning_rate_schedule(1e-3, **kwargs)


def _adam64(params, grads_seq, lrs, b1, b2, eps, weight_decay, decayed):
    """Adam(W) in float64 from its equations (bias-corrected moments, ε outside the root;
    decoupled decay θ ← θ - lr·wd·θ on the decayed leaves)."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, (grads, lr) in enumerate(zip(grads_seq, lrs, strict=True), start=1):
        for k in p:
            g = np.asarray(grads[k], np.float64)
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g**2
            update = (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + eps)
            if weight_decay and decayed[k]:
                update = update + weight_decay * p[k]
            p[k] = p[k] - lr * update
    return p


@pytest.mark.parametrize("name, weight_decay", [("adam", 0.0), ("adamw", 0.1)])
def test_adam_and_adamw_follow_their_equations_with_a_schedule(name, weight_decay):
    rng = np.random.default_rng(0)
    params = {
        "kernel": rng.normal(size=(3, 4)).astype(np.float32),
        "bias": rng.normal(size=(4,)).astype(np.float32),
    }
    grads_seq = [
        {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
        for _ in range(6)
    ]
    peak, warmup, decay = 1e-2, 2, 5
    schedule = optim.learning_rate_schedule(peak, warmup, decay, 0.1)
    opt = optim.make_optimizer(
        name, schedule, beta1=0.9, beta2=0.99, epsilon=1e-8, weight_decay=weight_decay
    )
    state, p = opt.init(jax.tree.map(jnp.asarray, params)), jax.tree.map(jnp.asarray, params)
    for grads in grads_seq:
        updates, state = opt.update(jax.tree.map(jnp.asarray, grads), state, p)
        p = optax.apply_updates(p, updates)
    lrs = [_schedule64(t, peak, warmup, decay, 0.1) for t in range(6)]
    want = _adam64(
        params, grads_seq, lrs, 0.9, 0.99, 1e-8, weight_decay, {"kernel": True, "bias": False}
    )
    for k in params:
        np.testing.assert_allclose(np.asarray(p[k]), want[k], rtol=1e-5, atol=1e-7)
    if weight_decay:  # decay on the bias too would be another result
        other = _adam64(
            params, grads_seq, lrs, 0.9, 0.99, 1e-8, weight_decay, {"kernel": True, "bias": True}
        )
        assert np.max(np.abs(other["bias"] - want["bias"])) > 1e-6


def test_rmsprop_by_name_is_the_keras_rmsprop():
    """make_optimizer('rmsprop') is rmsprop(), update for update."""
    params = {"w": jnp.arange(4.0)}
    grads = {"w": jnp.asarray([0.5, -1.0, 2.0, 0.0])}
    a, b = optim.make_optimizer("rmsprop", 1e-2, clip_norm=1.0), optim.rmsprop(1e-2, clip_norm=1.0)
    ua, _ = a.update(grads, a.init(params), params)
    ub, _ = b.update(grads, b.init(params), params)
    np.testing.assert_array_equal(ua["w"], ub["w"])


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("sgd", {}, r"optimizer='sgd' is not one of rmsprop, adam, adamw"),
        ("adam", dict(weight_decay=0.1), r"weight_decay=0.1 needs optimizer='adamw'"),
        ("rmsprop", dict(weight_decay=0.1), r"weight_decay=0.1 needs optimizer='adamw'"),
        ("adamw", dict(weight_decay=-0.1), r"weight_decay=-0.1 needs optimizer='adamw' and a"),
    ],
)
def test_bad_optimizers_are_refused(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        optim.make_optimizer(name, 1e-3, **kwargs)
