"""Data parallelism with ``jax.sharding``: batches split on a 'data' mesh axis, all else whole."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(num_devices: int = 0, devices=None) -> Mesh:
    """A one-axis ``('data',)`` mesh over the first ``num_devices`` devices.

    Args:
      num_devices: how many devices to use; 0 takes all of them (every host's, after
        ``jax.distributed.initialize``). On a CPU-only machine, virtual devices come from
        ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` set before jax is imported (or
        ``jax.config.update("jax_num_cpu_devices", N)`` before JAX starts its CPU backend).
      devices: the devices to choose from (default ``jax.devices()``, the global list).

    Raises:
      ValueError: ``num_devices`` is negative, larger than the devices available, or a part of
        the devices of a multi-process run; the message names ``num_devices``.
    """
    available = list(jax.devices() if devices is None else devices)
    if num_devices < 0:
        raise ValueError(f"num_devices={num_devices} must be >= 0 (0: all devices)")
    if num_devices > len(available):
        raise ValueError(
            f"num_devices={num_devices}, but only {len(available)} "
            f"{available[0].platform.upper()} device(s) are available; lower num_devices "
            "(0 uses all), or on a CPU-only machine set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={num_devices} before starting"
        )
    count = num_devices or len(available)
    if jax.process_count() > 1 and count != len(available):
        raise ValueError(
            f"num_devices={num_devices} in a run of {jax.process_count()} processes: use "
            f"num_devices=0 (all {len(available)} devices of every host)"
        )
    # Mesh's default "auto" axes (unlike jax.make_mesh's explicit ones): the compiler propagates
    # shardings from the few constraints train.py places.
    return Mesh(np.asarray(available[:count]), (DATA_AXIS,))


def data_size(mesh: Mesh | None) -> int:
    """Devices along the 'data' axis (1 without a mesh)."""
    return 1 if mesh is None else mesh.shape[DATA_AXIS]


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (params, optimiser state, the corpus)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split evenly over the 'data' axis, other axes whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """``tree`` (a TrainState, a Windows, any pytree of arrays) placed whole on every device.

    A no-op for arrays already replicated on ``mesh``; host arrays are copied once.
    """
    return jax.device_put(tree, replicated(mesh))


def padded_size(batch_size: int, mesh: Mesh | None) -> int:
    """``batch_size`` rounded up to a multiple of the devices along 'data'."""
    n = data_size(mesh)
    return -(-batch_size // n) * n


def pad_batch(batch: Any, weights: jax.Array, size: int) -> tuple[Any, jax.Array]:
    """Pads every leaf's leading axis to ``size`` with copies of example 0, weighted 0.

    The weighted loss ignores the padding exactly (its terms are multiplied by 0), so a batch
    whose size is not a multiple of the device count gives the same update as on one device.
    Works on device inside ``jit`` (static shapes) and on host arrays alike.
    """
    extra = size - weights.shape[0]
    if extra < 0:
        raise ValueError(f"cannot pad a batch of {weights.shape[0]} examples down to {size}")
    if extra == 0:
        return batch, weights

    def pad(x):
        x = jnp.asarray(x)
        return jnp.concatenate([x, jnp.broadcast_to(x[:1], (extra, *x.shape[1:]))])

    return jax.tree.map(pad, batch), jnp.concatenate([weights, jnp.zeros((extra,), weights.dtype)])


def constrain_batch(batch: Any, weights: jax.Array, mesh: Mesh) -> tuple[Any, jax.Array]:
    """Inside ``jit``: pad to a multiple of the device count, then split along 'data'."""
    batch, weights = pad_batch(batch, weights, padded_size(weights.shape[0], mesh))
    sharding = batch_sharding(mesh)
    return jax.lax.with_sharding_constraint((batch, weights), sharding)


def shard_batch(batch: Any, mesh: Mesh, weights=None) -> tuple[Any, jax.Array]:
    """Host-side: ``(batch, weights)`` padded as :func:`pad_batch` and split over the devices.

    ``weights`` defaults to ones; pass the result to a train step made with ``mesh``.
    """
    if weights is None:
        weights = np.ones(jax.tree.leaves(batch)[0].shape[0], np.float32)
    batch, weights = pad_batch(batch, jnp.asarray(weights), padded_size(len(weights), mesh))
    return jax.device_put((batch, weights), batch_sharding(mesh))
