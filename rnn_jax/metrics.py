"""What a run of updates reports: metric sums that add up across the calls of one pass."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Sums(NamedTuple):
    """What a run of updates reports, as sums that add up over consecutive runs of one pass.

    The one home of a run's metrics: :func:`rnn_jax.train.scan_updates` reports its
    :meth:`means`, :meth:`rnn_jax.train.Trainer.run` the sums themselves, which
    :func:`rnn_jax.loop.fit` joins (:meth:`merge`) across the calls of an iteration and
    stores in mid-iteration checkpoints (:meth:`as_dict`). A pytree: ``jit`` returns it,
    ``vmap`` maps it, ``jax.device_get`` fetches it.

    Attributes:
      totals: ``{name: sum}``: ``loss`` and each statistic of the loss function, weighted sums
        over the examples seen.
      examples: the sum of the weights (the examples seen).
      grad_norm_max: the largest pre-clip global gradient norm.
      nonfinite_step: ``state.step`` after the first update whose loss or gradient was NaN or
        infinite; -1 when all were finite.
      nonfinite_loss: that update's loss was NaN or infinite (False when all were finite).
      nonfinite_gradient: that update's gradient was.
      step_loss: with ``trace`` only (else None): ``(steps,)``, each step's mean loss over
        its real examples, before its update.
      step_grad_norm: with ``trace`` only: ``(steps,)``, each step's pre-clip gradient norm.
    """

    totals: dict[str, jax.Array]
    examples: jax.Array
    grad_norm_max: jax.Array
    nonfinite_step: jax.Array
    nonfinite_loss: jax.Array
    nonfinite_gradient: jax.Array
    step_loss: jax.Array | None = None
    step_grad_norm: jax.Array | None = None

    # The entries of means() that say whether the run stayed finite; fit reports the others.
    STATUS = ("finite", "nonfinite_step", "nonfinite_loss", "nonfinite_gradient")

    @classmethod
    def of_updates(cls, per_step: dict, first_step, trace: bool) -> "Sums":
        """The sums of a scan of :func:`rnn_jax.train.apply_update`, whose per-step sums are
        ``per_step`` (leading axis: the steps) and whose state started at step ``first_step``."""
        totals = dict(per_step)
        grad_norms, examples = totals.pop("grad_norm"), totals.pop("examples")
        loss_ok, grad_ok = jnp.isfinite(totals["loss"]), jnp.isfinite(grad_norms)
        bad = jnp.argmin(loss_ok & grad_ok)  # the first False; 0 when there is none
        return cls(
            totals={k: jnp.sum(v) for k, v in totals.items()},
            examples=jnp.sum(examples),
            grad_norm_max=jnp.max(grad_norms),
            nonfinite_step=jnp.where(jnp.all(loss_ok & grad_ok), -1, first_step + bad + 1),
            nonfinite_loss=~loss_ok[bad],
            nonfinite_gradient=~grad_ok[bad],
            step_loss=totals["loss"] / jnp.maximum(examples, 1.0) if trace else None,
            step_grad_norm=grad_norms if trace else None,
        )

    @property
    def finite(self):
        """False when a loss or gradient was NaN or infinite."""
        return self.nonfinite_step < 0

    def merge(self, later: "Sums") -> "Sums":
        """These sums followed by ``later``'s, the next run of the same iteration (host NumPy
        values; float32 sums are added in float32). The first non-finite step is kept."""

        def add(a, b):
            return np.add(a, b, dtype=np.asarray(b).dtype)

        bad = later if self.finite else self
        traced = later.step_loss is not None
        return Sums(
            totals={k: add(self.totals[k], v) for k, v in later.totals.items()},
            examples=add(self.examples, later.examples),
            grad_norm_max=np.maximum(self.grad_norm_max, later.grad_norm_max),
            nonfinite_step=bad.nonfinite_step,
            nonfinite_loss=bad.nonfinite_loss,
            nonfinite_gradient=bad.nonfinite_gradient,
            step_loss=np.concatenate([self.step_loss, later.step_loss]) if traced else None,
            step_grad_norm=(
                np.concatenate([self.step_grad_norm, later.step_grad_norm]) if traced else None
            ),
        )

    def means(self) -> dict:
        """The metrics: each total as a mean over the examples seen, ``grad_norm_max``, the
        :attr:`STATUS` entries and, with ``trace``, ``step_loss`` and ``step_grad_norm``.
        Sorted by name, the order ``jit`` returns a dict in, wherever it is computed (inside
        ``jit`` or on host values)."""
        metrics = {**self.as_dict(), **{k: v / self.examples for k, v in self.totals.items()}}
        del metrics["examples"]
        return dict(sorted(metrics.items()))

    def as_dict(self) -> dict:
        """``{name: value}``, the totals beside the other fields and ``finite``: the form a
        mid-epoch checkpoint's meta holds (:meth:`from_dict` reads it back)."""
        rest = {k: v for k, v in self._asdict().items() if k != "totals" and v is not None}
        return {**self.totals, **rest, "finite": self.finite}

    @classmethod
    def from_dict(cls, flat: dict) -> "Sums":
        """The sums of :meth:`as_dict`'s form (``finite`` is read from ``nonfinite_step``)."""
        named = set(cls._fields) | {"finite"}
        return cls(
            totals={k: v for k, v in flat.items() if k not in named},
            **{k: flat.get(k) for k in cls._fields if k != "totals"},
        )
