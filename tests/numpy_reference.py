"""Float64 NumPy references from DESIGN.md, the PyTorch docs and the tutorial (not our code)."""

import io

import numpy as np


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# --- Keras-layout cells (DESIGN.md §3) -------------------------------------------------------


def simple_rnn_step(p, h, x, activation="tanh"):
    """``h_t = act(x_t W + h_{t-1} U + b)``."""
    h, _ = simple_rnn_parts(p, h, x, activation)
    return h, h


def simple_rnn_parts(p, h, x, activation="tanh"):
    """The new ``h`` and the step's activations: its tanh units (none for relu)."""
    z = x @ p["kernel"] + h @ p["recurrent_kernel"] + p["bias"]
    if activation == "tanh":
        h = np.tanh(z)
        return h, {"gates": {}, "tanh": {"tanh": h}}
    return np.maximum(z, 0.0), {"gates": {}, "tanh": {}}


def lstm_step(p, carry, x):
    """Gate blocks i, f, c, o; carry ``(h, c)``."""
    carry, _ = lstm_parts(p, carry, x)
    return carry, carry[0]


def lstm_parts(p, carry, x):
    """The new ``(h, c)`` and the step's activations: gates i, f, o; tanh g and tanh(c_t)."""
    h, c = carry
    u = h.shape[-1]
    z = x @ p["kernel"] + h @ p["recurrent_kernel"] + p["bias"]
    i = sigmoid(z[:, 0 * u : 1 * u])
    f = sigmoid(z[:, 1 * u : 2 * u])
    g = np.tanh(z[:, 2 * u : 3 * u])
    o = sigmoid(z[:, 3 * u : 4 * u])
    c = f * c + i * g
    tanh_c = np.tanh(c)
    acts = {
        "gates": {"input_gate": i, "forget_gate": f, "output_gate": o},
        "tanh": {"candidate": g, "cell_tanh": tanh_c},
    }
    return (o * tanh_c, c), acts


def gru_step(p, h, x, reset_after=True):
    """Gate blocks z, r, h; ``bias (2, 3u)`` rows ``b_x, b_h`` when reset_after, else ``(3u,)``."""
    h, _ = gru_parts(p, h, x, reset_after)
    return h, h


def gru_parts(p, h, x, reset_after=True):
    """The new ``h`` and the step's activations: gates z (update), r (reset); tanh n."""
    u = h.shape[-1]
    W, U = p["kernel"], p["recurrent_kernel"]
    Wz, Wr, Wh = W[:, :u], W[:, u : 2 * u], W[:, 2 * u :]
    Uz, Ur, Uh = U[:, :u], U[:, u : 2 * u], U[:, 2 * u :]
    if reset_after:
        bx, bh = p["bias"][0], p["bias"][1]
        z = sigmoid(x @ Wz + bx[:u] + h @ Uz + bh[:u])
        r = sigmoid(x @ Wr + bx[u : 2 * u] + h @ Ur + bh[u : 2 * u])
        n = np.tanh(x @ Wh + bx[2 * u :] + r * (h @ Uh + bh[2 * u :]))
    else:
        b = p["bias"]
        z = sigmoid(x @ Wz + h @ Uz + b[:u])
        r = sigmoid(x @ Wr + h @ Ur + b[u : 2 * u])
        n = np.tanh(x @ Wh + (r * h) @ Uh + b[2 * u :])
    acts = {"gates": {"update_gate": z, "reset_gate": r}, "tanh": {"candidate": n}}
    return z * h + (1.0 - z) * n, acts


def keras_step(kind, p, carry, x, **options):
    if kind == "simple_rnn":
        return simple_rnn_step(p, carry, x, **options)
    if kind == "lstm":
        return lstm_step(p, carry, x)
    return gru_step(p, carry, x, **options)


def keras_activations(kind, p, carry, x, **options):
    """``{"gates": {name: σ outputs}, "tanh": {name: tanh outputs}}`` of one step."""
    parts = {"simple_rnn": simple_rnn_parts, "lstm": lstm_parts, "gru": gru_parts}[kind]
    return parts(p, carry, x, **options)[1]


def keras_initial_carry(kind, batch, units):
    zeros = np.zeros((batch, units))
    return (zeros, zeros.copy()) if kind == "lstm" else zeros


def run(step, carry, xs, reverse=False):
    """A Python loop over ``xs (batch, time, in)``: ``(final carry, ys (batch, time, units))``."""
    time = xs.shape[1]
    ys = [None] * time
    for t in reversed(range(time)) if reverse else range(time):
        carry, ys[t] = step(carry, xs[:, t])
    return carry, np.stack(ys, axis=1)


def dense(p, x):
    return x @ p["kernel"] + p["bias"]


def log_softmax(logits):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def cross_entropy(logits, labels):
    """Per-example categorical cross-entropy in nats for integer labels."""
    return -np.take_along_axis(log_softmax(logits), labels[:, None], axis=-1)[:, 0]


def rmsprop(params, grads_seq, lr, rho, eps, eps_in_sqrt):
    """RMSprop (DESIGN.md §2) over a sequence of gradients; ``v`` starts at 0."""
    v = {k: np.zeros_like(x) for k, x in params.items()}
    params = dict(params)
    for grads in grads_seq:
        for k, g in grads.items():
            v[k] = rho * v[k] + (1.0 - rho) * g**2
            denom = np.sqrt(v[k] + eps) if eps_in_sqrt else np.sqrt(v[k]) + eps
            params[k] = params[k] - lr * g / denom
    return params


# --- PyTorch nn.RNN / nn.LSTM / nn.GRU, from the equations in the PyTorch docs ---------------


def torch_rnn_cell(w_ih, w_hh, b_ih, b_hh, x, h):
    return np.tanh(x @ w_ih.T + b_ih + h @ w_hh.T + b_hh)


def torch_lstm_cell(w_ih, w_hh, b_ih, b_hh, x, hc):
    h, c = hc
    gates = x @ w_ih.T + b_ih + h @ w_hh.T + b_hh
    i, f, g, o = np.split(gates, 4, axis=-1)
    c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
    return sigmoid(o) * np.tanh(c), c


def torch_gru_cell(w_ih, w_hh, b_ih, b_hh, x, h):
    gi = x @ w_ih.T + b_ih
    gh = h @ w_hh.T + b_hh
    i_r, i_z, i_n = np.split(gi, 3, axis=-1)
    h_r, h_z, h_n = np.split(gh, 3, axis=-1)
    r = sigmoid(i_r + h_r)
    z = sigmoid(i_z + h_z)
    n = np.tanh(i_n + r * h_n)
    return (1.0 - z) * n + z * h


def torch_forward(kind, state_dict, xs, num_layers, bidirectional):
    """``nn.RNN/LSTM/GRU(batch_first=True)`` from zero state: ``(output (B, T, D·H), h_n)``.

    ``h_n`` is ``(num_layers · D, B, H)`` as in PyTorch (the LSTM's ``c_n`` is not returned).
    """
    cell = {"simple_rnn": torch_rnn_cell, "lstm": torch_lstm_cell, "gru": torch_gru_cell}[kind]
    batch, time = xs.shape[:2]
    layer_in, h_n = xs, []
    for k in range(num_layers):
        outs = []
        for suffix in ("", "_reverse") if bidirectional else ("",):
            w_ih = state_dict[f"weight_ih_l{k}{suffix}"]
            w_hh = state_dict[f"weight_hh_l{k}{suffix}"]
            b_ih = state_dict[f"bias_ih_l{k}{suffix}"]
            b_hh = state_dict[f"bias_hh_l{k}{suffix}"]
            hidden = w_hh.shape[1]
            state = np.zeros((batch, hidden))
            if kind == "lstm":
                state = (state, np.zeros((batch, hidden)))
            steps = range(time - 1, -1, -1) if suffix else range(time)
            out = np.zeros((batch, time, hidden))
            for t in steps:
                state = cell(w_ih, w_hh, b_ih, b_hh, layer_in[:, t], state)
                out[:, t] = state[0] if kind == "lstm" else state
            outs.append(out)
            h_n.append(state[0] if kind == "lstm" else state)
        layer_in = np.concatenate(outs, axis=-1)
    return layer_in, np.stack(h_n)


# --- The tutorial's text preparation and generation --------------------------------------------


def tutorial_clean(raw: bytes) -> str:
    """The tutorial's loop over a file opened in binary mode."""
    lines = []
    for line in io.BytesIO(raw):
        line = line.strip().lower()
        line = line.decode("ascii", "ignore")
        if len(line) == 0:
            continue
        lines.append(line)
    return " ".join(lines)


def tutorial_windows(text: str, seq_len: int, step: int):
    inputs, labels = [], []
    for i in range(0, len(text) - seq_len, step):
        inputs.append(text[i : i + seq_len])
        labels.append(text[i + seq_len])
    return inputs, labels


def greedy_rolling(predict, seed, num_chars):
    """The tutorial's generation: predict from the window, append the argmax, drop the first."""
    window, out = list(seed), []
    for _ in range(num_chars):
        nxt = int(np.argmax(predict(np.asarray(window))))
        out.append(nxt)
        window = window[1:] + [nxt]
    return out


# --- Cells for long memory (DESIGN.md §6) -------------------------------------------------------


def layer_norm(a, gain, shift, blocks=1, eps=1e-5):
    """Each of ``blocks`` equal slices of the last axis to mean 0, variance 1; then ``γ a + β``."""
    parts = np.split(a, blocks, axis=-1)
    normed = [
        (p - p.mean(-1, keepdims=True)) / np.sqrt(p.var(-1, keepdims=True) + eps) for p in parts
    ]
    return np.concatenate(normed, axis=-1) * gain + shift


def ln_lstm_parts(p, carry, x):
    """Ba, Kiros & Hinton (2016): ``z = LN(x W) + LN(h U) + b`` (LN per gate block i, f, c, o),
    ``c_t = f c + i g``, ``h_t = o tanh(LN(c_t))``; the new ``(h, c)`` and the activations."""
    h, c = carry
    u = h.shape[-1]
    z = (
        layer_norm(x @ p["kernel"], p["input_norm_scale"], p["input_norm_bias"], 4)
        + layer_norm(
            h @ p["recurrent_kernel"], p["recurrent_norm_scale"], p["recurrent_norm_bias"], 4
        )
        + p["bias"]
    )
    i, f = sigmoid(z[:, :u]), sigmoid(z[:, u : 2 * u])
    g, o = np.tanh(z[:, 2 * u : 3 * u]), sigmoid(z[:, 3 * u :])
    c = f * c + i * g
    tanh_c = np.tanh(layer_norm(c, p["cell_norm_scale"], p["cell_norm_bias"]))
    acts = {
        "gates": {"input_gate": i, "forget_gate": f, "output_gate": o},
        "tanh": {"candidate": g, "cell_tanh": tanh_c},
    }
    return (o * tanh_c, c), acts


def ln_lstm_step(p, carry, x):
    carry, _ = ln_lstm_parts(p, carry, x)
    return carry, carry[0]


def indrnn_pre_activation(p, h, x, bound=None):
    """Li et al. (2018): ``x W + u ⊙ h + b``, ``u`` clipped to ``[-bound, bound]``."""
    u = p["recurrent_kernel"] if bound is None else np.clip(p["recurrent_kernel"], -bound, bound)
    return x @ p["kernel"] + u * h + p["bias"]


def indrnn_step(p, h, x, bound=None):
    """``h_t = relu(x W + u ⊙ h + b)``."""
    h = np.maximum(indrnn_pre_activation(p, h, x, bound), 0.0)
    return h, h


def expm_skew(s):
    """``expm(S)`` of a real skew-symmetric ``S`` from the eigendecomposition of the Hermitian
    ``iS = V diag(μ) V^H``: ``expm(S) = V diag(e^{-iμ}) V^H`` (no Padé, unlike JAX's)."""
    mu, v = np.linalg.eigh(1j * s)
    return np.real((v * np.exp(-1j * mu)) @ v.conj().T)


def modrelu(z, b):
    return np.sign(z) * np.maximum(np.abs(z) + b, 0.0)


def exp_rnn_pre_activation(p, h, x):
    """Lezcano-Casado & Martínez-Rubio (2019): ``x W + h expm(A - Aᵀ)``, modReLU's input."""
    a = p["recurrent_skew"]
    return x @ p["kernel"] + h @ expm_skew(a - a.T)


def exp_rnn_step(p, h, x):
    """``h_t = modrelu(x W + h expm(A - Aᵀ))``."""
    h = modrelu(exp_rnn_pre_activation(p, h, x), p["bias"])
    return h, h


# --- Finite differences ------------------------------------------------------------------------


def assert_directional_derivatives(loss, primals, *, eps, rtol, atol, seeds=(10, 11)):
    """``∇loss · d`` against the central difference ``(loss(p + εd) − loss(p − εd)) / 2ε`` along
    random directions ``d`` (one per seed), float64; ``loss`` differentiated in every argument.
    Returns the gradients (a tuple over ``primals``)."""
    import jax
    import jax.numpy as jnp

    value_and_grad = jax.jit(jax.value_and_grad(loss, tuple(range(len(primals)))))
    _, grads = value_and_grad(*primals)
    for seed in seeds:
        rng = np.random.default_rng(seed)
        direction = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape)), primals)
        shifted = [
            value_and_grad(*jax.tree.map(lambda p, d, s=sign: p + s * eps * d, primals, direction))[
                0
            ]
            for sign in (1.0, -1.0)
        ]
        numeric = (shifted[0] - shifted[1]) / (2 * eps)
        analytic = sum(
            jnp.vdot(g, d)
            for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction), strict=True)
        )
        np.testing.assert_allclose(analytic, numeric, rtol=rtol, atol=atol)
    return grads
