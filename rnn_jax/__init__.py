"""rnn_jax: SimpleRNN, LSTM and GRU as pure JAX functions, the Keras char-RNN tutorial, BPTT."""

from rnn_jax.batches import Batches, generated, in_order, shuffled_epoch, with_replacement
from rnn_jax.cells import (
    CELLS,
    Activations,
    Cell,
    LSTMCarry,
    add_bias,
    custom_cell,
    exp_rnn,
    glorot_uniform,
    gru,
    identity,
    indrnn,
    lstm,
    modrelu,
    orthogonal,
    simple_rnn,
)
from rnn_jax.checkpoint import (
    CheckpointError,
    Checkpoints,
    DamagedCheckpointError,
    latest_step,
    newest_intact,
    restore_checkpoint,
    save_checkpoint,
)
from rnn_jax.convert import from_torch, to_torch
from rnn_jax.data import (
    CORPORA,
    Corpus,
    Streams,
    TextError,
    Vocabulary,
    Windows,
    clean_text,
    corpus_path,
    get_window_batch,
    load_text,
    make_streams,
    make_windows,
    read_corpus,
    stream_batch,
)
from rnn_jax.gradients import (
    carry_gradient_norms,
    carry_gradients,
    global_norm,
    jacobian_norms,
    saturation,
    step_jacobians,
)
from rnn_jax.linear import LinearRecurrence, LRUCarry, lru, min_gru, min_lstm
from rnn_jax.loop import NonFiniteLossError, fit
from rnn_jax.losses import (
    accuracy,
    exact_match,
    masked_accuracy,
    masked_cross_entropy,
    masked_mean,
    sequence_cross_entropy,
    sequence_mask,
    softmax_cross_entropy,
    squared_error,
)
from rnn_jax.metrics import Sums
from rnn_jax.models import (
    Layer,
    Model,
    bidirectional,
    dense,
    dense_init,
    language_model,
    recurrent,
    sequence_classifier,
    sequence_tagger,
    stacked,
)
from rnn_jax.optim import (
    OPTIMIZERS,
    clip_by_global_norm,
    clipped,
    learning_rate_schedule,
    make_optimizer,
    rmsprop,
)
from rnn_jax.parallel import make_mesh, shard_batch
from rnn_jax.rundir import Interrupted, Position, RunDir, open_run, read_history
from rnn_jax.sample import make_sampler, make_stateful_sampler
from rnn_jax.scan import ScanType, unroll
from rnn_jax.seq2seq import SequenceGenerator, encoder_decoder, one_to_many
from rnn_jax.sweep import TrainCurves, make_task_trainer
from rnn_jax.synthetic import (
    Task,
    adding_baseline,
    adding_batch,
    adding_problem,
    copy_baseline,
    copy_batch,
    copy_task,
)
from rnn_jax.train import (
    Trainer,
    TrainState,
    apply_update,
    create_train_state,
    make_evaluate,
    make_train_step,
    make_trainer,
    scan_updates,
)
from rnn_jax.workdir import WorkdirBusy, WorkdirError, lock_workdir, read_log
