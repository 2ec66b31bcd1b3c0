"""The training loop: :func:`fit` runs a :class:`rnn_jax.train.Trainer` over an opened run
directory (resume, train, report, save), on the host, around the compiled engine."""

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

from rnn_jax.metrics import Sums
from rnn_jax.rundir import Interrupted, Position, RunDir
from rnn_jax.train import Trainer, TrainState


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss or gradient; the last good checkpoint is kept."""


def _boundaries(pass_steps: int, iteration_steps: int | None, epochs: int, call: int):
    """``next_stop(step) -> step``: where the call starting at ``step`` ends, and
    ``iteration_end(step) -> step``: where the iteration holding ``step`` ends.

    Iterations are ``epochs`` whole passes, or (``iteration_steps``) that many updates cut at
    pass ends; a call is at most ``call`` updates and never crosses a pass's or an iteration's
    end, so its sizes are few (each one compiled once)."""

    def iteration_end(step: int) -> int:
        if iteration_steps is None:
            length = epochs * pass_steps
            return (step // length + 1) * length
        start = step - step % pass_steps
        within = step % pass_steps
        return start + min((within // iteration_steps + 1) * iteration_steps, pass_steps)

    def next_stop(step: int) -> int:
        pass_end = step - step % pass_steps + pass_steps
        return min(step + call, pass_end, iteration_end(step))

    return next_stop, iteration_end


def _call_sizes(next_stop, pass_steps: int, epochs: int, first: int) -> set[int]:
    """Every call size a run starting at step ``first`` meets: those of the rest of its pass
    and of the next ``epochs`` passes (every pass has the same boundaries from its start)."""
    sizes, step = set(), first
    period_end = first - first % pass_steps + pass_steps * (1 + epochs)
    while step < period_end:
        stop = next_stop(step)
        sizes.add(stop - step)
        step = stop
    return sizes


def fit(
    state: TrainState,
    trainer: Trainer,
    data: Any,
    run: RunDir,
    *,
    iterations: int,
    epochs_per_iteration: int = 1,
    steps_per_iteration: int | None = None,
    on_iteration: Callable[[int, TrainState, dict], dict] | None = None,
    stop: Callable[[dict], bool] | None = None,
    best: Callable[[dict], float] | None = None,
    steps_per_call: int | None = None,
    checkpoint_every: int | None = None,
    progress_seconds: float | None = None,
    max_train_seconds: float | None = None,
    interrupted: Callable[[], bool] | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[TrainState, list[dict]]:
    """The training loop over an opened run directory: resume, train, report, save.

    ``run`` (:func:`rnn_jax.rundir.open_run`) holds the lock, the resumed checkpoint and the
    metrics so far. An iteration is ``epochs_per_iteration`` passes of ``trainer``
    (:func:`make_trainer`), or ``steps_per_iteration`` updates (cut short at a pass's end),
    run as compiled calls of at most ``steps_per_call`` updates; then
    ``on_iteration(iteration, state, metrics)`` (evaluation, samples), whose dict joins the
    iteration's metrics; the row is logged and the state checkpointed (indexed by
    ``state.step``). Everything random is drawn from ``state.key`` and the place in the pass
    is ``state.step``'s, so a resumed run ends bit-identical to an uninterrupted one.

    Between calls: a progress line (steps, examples/s, loss so far, ETA) once
    ``progress_seconds`` have passed since the last; a checkpoint of the position (with the
    iteration's metric sums so far) once ``checkpoint_every`` updates have passed since the
    last checkpoint; once ``interrupted()`` is true, a checkpoint and
    :class:`~rnn_jax.rundir.Interrupted`; once the training seconds of the whole run (its
    earlier rows' included) reach ``max_train_seconds``, the iteration ends there: reported,
    logged (``"stopped": "max_train_seconds"``), checkpointed, and training ends. The calls
    are compiled first (:meth:`Trainer.compile`): the first row gets ``compile_seconds``, and
    every row's ``seconds`` are training alone; ``examples`` counts the examples (weights) its
    updates saw, and its metrics are means over them (:meth:`rnn_jax.metrics.Sums.means`).
    An iteration whose updates left every parameter as it was (each update underflowed in
    float32) is said so in a line.

    Args:
      stop: ``metrics -> bool``, asked after every iteration (and of the last one a resumed
        run finds): true ends training there, e.g. once a target is met.
      best: ``metrics -> score`` (lower is better, e.g. the held-out loss): the state of the
        iteration with the lowest score so far is kept apart (:meth:`RunDir.save_best`).
      steps_per_call: the most updates per compiled call (None: a whole pass per call).
      checkpoint_every: updates between checkpoints inside an iteration (None: at iteration
        ends only), counted at call boundaries.
      progress_seconds: seconds between progress lines inside an iteration (None: none).
      max_train_seconds: the training seconds after which the run ends cleanly (None: none).
      interrupted: asked at every call boundary (e.g. the command line's Ctrl-C and SIGTERM).
      log: where the resume, compile, progress and warning lines go (default absl logging).

    Raises:
      NonFiniteLossError: a loss or gradient was NaN or infinite; nothing after the last
        checkpoint is saved, so the last good checkpoint stays the latest.
      Interrupted: ``interrupted()`` became true; the position is checkpointed.

    Returns:
      ``(state, history)``: the final state and one dict per iteration, those of an earlier
      run that this one resumed included.
    """
    for name, value in (
        ("steps_per_call", steps_per_call),
        ("checkpoint_every", checkpoint_every),
        ("steps_per_iteration", steps_per_iteration),
    ):
        if value is not None and value < 1:
            raise ValueError(f"{name}={value} must be a positive number of steps, or None")
    log = logging.info if log is None else log
    asked = interrupted or (lambda: False)
    state, position = run.restore(state), run.position
    spent = sum(row["seconds"] for row in run.history) + position.seconds
    if run.history and stop is not None and stop(run.history[-1]):
        log(f"the stop condition holds at iteration {position.iteration}: nothing to do")
        return state, run.history
    if position.iteration >= iterations:
        if run.resumed is not None:
            log(
                f"all {iterations} iterations are done (the checkpoint in {run.checkpoint_dir} "
                f"is at iteration {position.iteration}): nothing to do; raise iterations to "
                "train further"
            )
        return state, run.history
    if max_train_seconds is not None and spent >= max_train_seconds:
        log(
            f"the run has trained {spent:.0f} s of max_train_seconds={max_train_seconds:g}: "
            "nothing to do; raise max_train_seconds to train further"
        )
        return state, run.history
    pass_steps = trainer.num_steps
    call = min(steps_per_call or pass_steps, pass_steps)
    next_stop, iteration_end = _boundaries(
        pass_steps, steps_per_iteration, epochs_per_iteration, call
    )
    step = int(state.step)
    begin = step  # where the iteration began: here, or at the last row of a resumed one
    if position.sums is not None:
        begin = run.history[-1]["step"] if run.history else 0
    if run.resumed is not None:
        log(_resume_line(position, run, (begin, step, iteration_end(step)), iterations))
    sizes = _call_sizes(next_stop, pass_steps, epochs_per_iteration, step)
    compile_seconds = trainer.compile(state, data, sizes)
    log(f"compiled the training steps in {compile_seconds:.1f} s")
    scores = [best(row) for row in run.history] if best is not None else []

    for iteration in range(position.iteration + 1, iterations + 1):
        before = state.params
        sums = None if position.sums is None else Sums.from_dict(position.sums)
        seconds, last_line, end = position.seconds, time.perf_counter(), iteration_end(step)
        first, first_seconds, budget_spent = step, seconds, False
        while step < end:
            count = next_stop(step) - step
            tic = time.perf_counter()
            state, part = trainer.run(state, data, step % pass_steps, count)
            part = jax.device_get(part)
            seconds += time.perf_counter() - tic
            if not part.finite:
                raise NonFiniteLossError(_nonfinite_message(iteration, part, run))
            sums, step = part if sums is None else sums.merge(part), step + count
            budget_spent = max_train_seconds is not None and spent + seconds >= max_train_seconds
            if step == end or budget_spent:
                break
            position = Position(iteration - 1, 0, step % pass_steps, sums.as_dict(), seconds)
            stopping = asked()  # asked once a boundary
            if stopping or (
                checkpoint_every is not None and step - (run.last_saved or 0) >= checkpoint_every
            ):
                run.save(state, position)
            if stopping:
                raise Interrupted(run.last_saved if run.path is not None else None)
            if progress_seconds is not None and time.perf_counter() - last_line >= (
                progress_seconds
            ):
                rate = (step - first) / max(seconds - first_seconds, 1e-9)  # this process's
                log(_progress_line(iteration, sums, seconds, (begin, step, end), rate))
                last_line = time.perf_counter()
        metrics = {k: v.tolist() for k, v in sums.means().items() if k not in Sums.STATUS}
        metrics = {"iteration": iteration, "step": step, **metrics, "seconds": seconds}
        metrics["examples"] = float(sums.examples)
        spent += seconds
        if budget_spent:
            metrics["stopped"] = "max_train_seconds"
        if compile_seconds is not None:
            metrics["compile_seconds"], compile_seconds = compile_seconds, None
        if _unchanged(before, state.params):
            log(
                f"iteration {iteration}: no parameter changed in its {int(sums.examples)} "
                "examples' updates: each update underflowed in float32 (a learning rate or "
                "clip_norm too small for float32?)"
            )
        if on_iteration is not None:
            metrics.update(on_iteration(iteration, state, metrics))
        if best is not None:
            score = best(metrics)
            if not scores or score < min(scores):
                run.save_best(state, metrics)
            scores.append(score)
        row = run.log(metrics)
        position, begin = Position(iteration), step
        run.save(state, position)
        if budget_spent:
            log(
                f"iteration {iteration}: max_train_seconds={max_train_seconds:g} reached after "
                f"{spent:.1f} s of training, at step {step}; the run ends here (checkpointed)"
            )
            break
        if stop is not None and stop(row):
            break
        if asked() and iteration < iterations:
            raise Interrupted(run.last_saved if run.path is not None else None)
    return state, run.history


@jax.jit
def _unchanged(before, after) -> jax.Array:
    """True when no entry of any array differs."""
    same = [jnp.all(a == b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))]
    return jnp.all(jnp.stack(same))


def _duration(seconds: float) -> str:
    seconds = max(round(seconds), 0)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _resume_line(position: Position, run: RunDir, steps: tuple[int, int, int], iterations: int):
    begin, step, end = steps
    where = f"iteration {position.iteration} done"
    if step > begin:
        where += f", {step - begin} of {end - begin} steps into the next"
    return (
        f"resuming from step {run.resumed} in {run.checkpoint_dir} ({where}); training up to "
        f"iteration {iterations}"
    )


def _progress_line(
    iteration: int, sums: Sums, seconds: float, steps: tuple[int, int, int], steps_per_second
) -> str:
    """``steps``: the step the iteration began at, the step now and its last step."""
    begin, step, end = steps
    rate = float(sums.examples) / max(seconds, 1e-9)
    left = (end - step) / max(steps_per_second, 1e-9)
    return (
        f"iteration {iteration}: {step - begin}/{end - begin} steps "
        f"({100 * (step - begin) / (end - begin):.0f}%), {rate:.0f} examples/s, loss so far "
        f"{float(sums.totals['loss']) / float(sums.examples):.4f}, iteration ETA {_duration(left)}"
    )


def _nonfinite_message(iteration: int, sums: Sums, run: RunDir) -> str:
    """What happened (which quantity, which step), what is kept, and what helps."""
    step = int(sums.nonfinite_step)
    at = f"at step {step}" if step >= 0 else "in this epoch"
    if bool(sums.nonfinite_loss):
        what = f"the loss became NaN or infinite {at} (the parameters diverged)"
        advice = "lower the learning rate"
    else:
        what = f"the gradient became NaN or infinite {at} while the loss was finite"
        advice = "clip the gradient norm (clip_norm), or lower the learning rate"
    if run.path is None:
        kept = "nothing is saved without a workdir"
    elif run.last_saved is not None:
        kept = f"the last good checkpoint, step {run.last_saved} in {run.checkpoint_dir}, is kept"
    else:
        kept = "no checkpoint had been written yet"
    return (
        f"iteration {iteration}: {what}; stopped without saving after it, {kept}. "
        f"To go on, {advice}."
    )
