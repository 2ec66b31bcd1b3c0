"""rnn_jax: SimpleRNN, LSTM and GRU as pure JAX functions, the Keras char-RNN tutorial, BPTT tools."""

from rnn_jax.cells import (
    CELLS,
    Cell,
    LSTMCarry,
    add_bias,
    glorot_uniform,
    gru,
    identity,
    lstm,
    orthogonal,
    simple_rnn,
)
from rnn_jax.checkpoint import CheckpointError, latest_step, restore_checkpoint, save_checkpoint
from rnn_jax.data import TextError, Vocabulary, Windows, clean_text, get_window_batch, load_text, make_windows
from rnn_jax.losses import accuracy, masked_mean, softmax_cross_entropy
from rnn_jax.models import Model, dense, dense_init, rnn_classifier
from rnn_jax.sample import make_sampler
from rnn_jax.scan import unroll
from rnn_jax.train import (
    NonFiniteLossError,
    TrainState,
    create_train_state,
    fit,
    make_epoch,
    make_evaluate,
    make_train_step,
    rmsprop,
)
from rnn_jax.convert import from_torch, to_torch
from rnn_jax.gradients import (
    carry_gradient_norms,
    carry_gradients,
    jacobian_norms,
    saturation,
    step_jacobians,
)
from rnn_jax.parallel import make_mesh, shard_batch
from rnn_jax.tasks import (
    Task,
    TrainCurves,
    adding_baseline,
    adding_batch,
    adding_problem,
    copy_baseline,
    copy_batch,
    copy_task,
    make_task_trainer,
    task_model,
)
from rnn_jax.topologies import (
    Layer,
    SequenceGenerator,
    bidirectional,
    encoder_decoder,
    exact_match,
    masked_accuracy,
    masked_cross_entropy,
    one_to_many,
    recurrent,
    sequence_classifier,
    sequence_mask,
    sequence_tagger,
    stacked,
)
