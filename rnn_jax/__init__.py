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
