"""Optimisers: the Keras-default RMSprop, Adam and AdamW (nanoGPT's), a learning-rate schedule
with linear warmup and cosine decay, and global-norm clipping; every optimiser a run builds
comes from :func:`make_optimizer` or :func:`clipped`."""

import math

import jax
import jax.numpy as jnp
import optax

from rnn_jax.gradients import global_norm

OPTIMIZERS = ("rmsprop", "adam", "adamw")


def rmsprop(
    learning_rate: float = 1e-3,
    rho: float = 0.9,
    epsilon: float = 1e-7,
    eps_in_sqrt: bool = True,
    clip_norm: float | None = None,
) -> optax.GradientTransformation:
    """RMSprop with the Keras 3 defaults, optionally after global-norm clipping.

    ``v ← ρ v + (1-ρ) g²``; ``θ ← θ - lr · g / sqrt(v + ε)`` with ``v₀ = 0``, no momentum, not
    centred. ``eps_in_sqrt=True`` is Keras 3 (and optax's default placement);
    ``eps_in_sqrt=False`` gives ``g / (sqrt(v) + ε)``, the standalone Keras 2 of the tutorial's
    era and PyTorch (whose own defaults are lr 1e-2, α 0.99, ε 1e-8). Note optax's own
    ``rmsprop`` default ``eps=1e-8`` differs from Keras's ``1e-7``.
    """
    opt = optax.rmsprop(learning_rate, decay=rho, eps=epsilon, eps_in_sqrt=eps_in_sqrt)
    return clipped(opt, clip_norm)


def clipped(
    transformation: optax.GradientTransformation, clip_norm: float | jax.Array | None
) -> optax.GradientTransformation:
    """``transformation`` after :func:`clip_by_global_norm` at ``clip_norm``: every optimiser
    with clipping here is built by this function.

    Args:
      transformation: the optimiser, e.g. ``optax.adam(1e-3)`` or :func:`rmsprop`.
      clip_norm: None: no clipping, ``transformation`` alone. A Python number must be finite
        and > 0. An array is used as is, so it may be traced (vmapped over clipping settings);
        ``inf`` then passes every finite gradient unchanged.
    """
    if clip_norm is None:
        return transformation
    if isinstance(clip_norm, (int, float)) and not (clip_norm > 0 and math.isfinite(clip_norm)):
        raise ValueError(f"clip_norm={clip_norm} must be finite and > 0 (None: no clipping)")
    return optax.chain(clip_by_global_norm(clip_norm), transformation)


def clip_by_global_norm(max_norm: float | jax.Array) -> optax.GradientTransformation:
    """Scales the updates to global norm ``max_norm`` when theirs is larger (Pascanu et al. 2013).

    ``optax.clip_by_global_norm`` squares float32 entries: a gradient whose entries pass ~1.8e19
    has an infinite norm there, and every update is scaled by ``max_norm / inf = 0``: training
    freezes without a sign. Here the norm is :func:`rnn_jax.gradients.global_norm` (scaled before
    squaring), so a gradient of norm 1e25 is clipped to ``max_norm``, not zeroed. ``max_norm``
    may be traced (vmapped over settings); ``inf`` passes every finite gradient unchanged.
    """

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        g_norm = global_norm(updates)
        scale = jnp.where(g_norm > max_norm, max_norm / g_norm, 1.0)
        return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def learning_rate_schedule(
    peak: float,
    warmup_steps: int = 0,
    decay_steps: int | None = None,
    final_fraction: float = 0.1,
) -> float | optax.Schedule:
    """The learning rate by update: ``peak`` throughout (no warmup, no decay: a number), or
    nanoGPT's shape, built from optax's schedules.

    With ``t`` the updates done (optax's count, 0 at the first update): ``peak · t / W`` for
    ``t < W`` (linear warmup over ``W = warmup_steps``); then, with ``decay_steps = D``, cosine
    decay ``end + (peak - end) · (1 + cos(π (t - W) / (D - W))) / 2`` down to ``end =
    final_fraction · peak`` at ``t = D`` (``D`` counts the warmup, as nanoGPT's
    ``lr_decay_iters``), ``end`` after; without ``D``, ``peak`` after the warmup.
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps} must be >= 0")
    if decay_steps is not None and decay_steps <= warmup_steps:
        raise ValueError(
            f"decay_steps={decay_steps} must be larger than warmup_steps={warmup_steps}: it "
            "counts the warmup's updates too"
        )
    if not 0.0 <= final_fraction <= 1.0:
        raise ValueError(f"final_fraction={final_fraction} must be in [0, 1]")
    if decay_steps is not None:
        return optax.warmup_cosine_decay_schedule(
            0.0, peak, warmup_steps, decay_steps, end_value=peak * final_fraction
        )
    if warmup_steps:
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, warmup_steps), optax.constant_schedule(peak)],
            [warmup_steps],
        )
    return peak


def _matrices(params):
    """True for the parameters with two or more axes (kernels), False for biases, gains and
    other vectors: what nanoGPT decays."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(
    name: str = "rmsprop",
    learning_rate: float | optax.Schedule = 1e-3,
    *,
    rho: float = 0.9,
    beta1: float = 0.9,
    beta2: float = 0.999,
    epsilon: float = 1e-7,
    eps_in_sqrt: bool = True,
    weight_decay: float = 0.0,
    clip_norm: float | None = None,
) -> optax.GradientTransformation:
    """The optimiser called ``name`` (one of :data:`OPTIMIZERS`), after global-norm clipping.

    ``rmsprop``: :func:`rmsprop` (Keras 3, ``rho``, ``epsilon``, ``eps_in_sqrt``). ``adam``:
    ``optax.adam`` (``beta1``, ``beta2``, ``epsilon`` added to ``sqrt(v̂)`` as Keras and
    PyTorch do; Keras's default ε is 1e-7, PyTorch's 1e-8). ``adamw``: Adam with decoupled
    weight decay ``θ ← θ - lr · weight_decay · θ`` on the matrices only (kernels; not biases,
    gains or the LRU's vectors), as nanoGPT configures PyTorch's ``AdamW``. ``learning_rate``
    may be a schedule (:func:`learning_rate_schedule`).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer={name!r} is not one of {', '.join(OPTIMIZERS)}")
    if weight_decay < 0 or (weight_decay > 0 and name != "adamw"):
        raise ValueError(
            f"weight_decay={weight_decay} needs optimizer='adamw' and a value >= 0 (decoupled "
            "decay; Adam and RMSprop take none here)"
        )
    if name == "rmsprop":
        return rmsprop(learning_rate, rho, epsilon, eps_in_sqrt, clip_norm)
    if name == "adam":
        return clipped(optax.adam(learning_rate, beta1, beta2, epsilon), clip_norm)
    adamw = optax.adamw(
        learning_rate, beta1, beta2, epsilon, weight_decay=weight_decay, mask=_matrices
    )
    return clipped(adamw, clip_norm)
