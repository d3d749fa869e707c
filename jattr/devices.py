"""Many devices and many hosts, through ``jax.sharding`` and ``jax.distributed``.

jattr has no scheduler of its own. Every stage whose cost grows with the number of
examples runs through one of three chunk loops: ``jattr.grads.loop_chunks``,
``sum_chunks`` and ``apply_chunks``. Featurization, per-example gradients, every
curvature fit, dense-GGN accumulation, influence scoring, MUCS and the LDS
measurement all use them. Given a ``jax.sharding.Mesh`` with a ``"data"`` axis of
D devices, those loops run data-parallel:

- **Examples split.** The N examples are padded to D·B rows (B = ⌈N/D⌉), repeating
  the last example, and device d holds the contiguous block [d·B, (d + 1)·B). The
  chunk program runs on every device at once (``jax.shard_map``). Each device slices
  its own chunk out of its own block.
- **Parameters replicated** over ``"data"``. A leaf the caller has already sharded
  over another mesh axis (``"model"``) keeps that sharding: inside the chunk program
  only ``"data"`` is manual, and XLA partitions the rest.
- **Rows gathered, sums reduced.** A map (``loop_chunks``) writes each device's rows
  into that device's block of the output. The padded rows are dropped, and the N rows
  are returned on one device. A reduction (``sum_chunks``) keeps one partial total per
  device, with the padded rows masked. The totals are added across devices (an
  all-reduce) once, at the end, and then returned on one device.

So a per-example result equals the single-device one row for row, and a sum equals
it up to the order of floating-point additions. ``tests/devices_test.py`` checks
this on 1, 2, 4 and 8 forced CPU devices.

A mesh reaches the loops in one of three ways. In order of precedence:

1. the ``mesh=`` argument of the public functions that take one (``featurize``,
   ``per_example_grads``, ``train_many``, …);
2. ``with jattr.devices.use_mesh(mesh):`` around any jattr code;
3. JAX's ambient mesh, ``with jax.set_mesh(mesh):``.

Without a mesh, or outside them, everything runs on one device, exactly as before.
``docs/devices.md`` describes each stage's split and how to run on many GPUs and
many hosts.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA = "data"
"""The mesh axis examples (and ``train_many``'s members) are split over."""

MODEL = "model"
"""The optional mesh axis for parameters too large for one device."""

_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("jattr_mesh", default=None)


def data_mesh(num_devices: int | None = None, *, model: int = 1, devices=None) -> Mesh:
  """A mesh over ``num_devices`` devices: axes ``("data",)``, or ``("data", "model")``.

  Args:
    num_devices: how many devices; ``None`` takes all of ``devices``.
    model: the size of the ``"model"`` axis (1: no model axis). ``num_devices``
      must be a multiple of it; the data axis gets ``num_devices // model``.
    devices: the devices to use; ``None``: ``jax.devices()`` (every process's,
      under ``jax.distributed``).

  Returns:
    A ``jax.sharding.Mesh``.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices) if num_devices is None else int(num_devices)
  if not 1 <= n <= len(devices):
    raise ValueError(f"num_devices must be in [1, {len(devices)}] (the devices available), "
                     f"got {num_devices}")
  model = int(model)
  if model < 1 or n % model:
    raise ValueError(f"model must be a positive divisor of num_devices={n}, got {model}")
  grid = np.array(devices[:n], dtype=object)
  if model == 1:
    return Mesh(grid, (DATA,))
  return Mesh(grid.reshape(n // model, model), (DATA, MODEL))


def mesh_of(count: int | str | None) -> Mesh | None:
  """The mesh of a ``--devices`` / config ``"devices"`` value: D devices, ``"all"``, or
  ``None`` (one device: no mesh)."""
  if count is None:
    return None
  return data_mesh(None if count == "all" else int(count))


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None):
  """Runs jattr's chunk loops on ``mesh`` inside the ``with`` block.

  ``None`` is a no-op, so ``with use_mesh(mesh):`` serves functions whose ``mesh``
  argument is optional. Unlike ``jax.set_mesh``, code outside the chunk loops (an
  eigendecomposition of a curvature factor, say) still runs on one device.
  """
  if mesh is None:
    yield None
    return
  check_mesh(mesh)
  token = _MESH.set(mesh)
  try:
    yield mesh
  finally:
    _MESH.reset(token)


def check_mesh(mesh: Mesh) -> Mesh:
  """Raises unless ``mesh`` is a ``jax.sharding.Mesh`` with a ``"data"`` axis."""
  if not isinstance(mesh, Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
  if DATA not in mesh.axis_names:
    raise ValueError(f"jattr splits examples over a mesh axis named {DATA!r}; this mesh has "
                     f"axes {mesh.axis_names} (build one with jattr.devices.data_mesh)")
  return mesh


def current_mesh(mesh: Mesh | None = None) -> Mesh | None:
  """The mesh the chunk loops run on: ``mesh``, else ``use_mesh``'s, else JAX's ambient.

  Returns ``None`` (one device) when none is set. JAX's ambient mesh
  (``jax.set_mesh``) counts only if it has a ``"data"`` axis.
  """
  if mesh is not None:
    return check_mesh(mesh)
  mesh = _MESH.get()
  if mesh is not None:
    return mesh
  ambient = jax.sharding.get_mesh()
  if not ambient.empty and DATA in ambient.axis_names:
    return ambient
  return None


def data_size(mesh: Mesh) -> int:
  """D, the size of the ``"data"`` axis."""
  return int(mesh.shape[DATA])


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def split_rows(mesh: Mesh) -> NamedSharding:
  """Leading axis split over ``"data"``, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(DATA))


def _multi_process(mesh: Mesh) -> bool:
  return any(d.process_index != jax.process_index() for d in mesh.devices.flat)


def put(tree, sharding: NamedSharding):
  """``jax.device_put`` onto a sharding that may span processes.

  Every process must pass the same values (as it does for jattr's replicated
  parameters and for examples every process has loaded); a process only
  materializes the shards on its own devices.
  """
  if not _multi_process(sharding.mesh):
    return jax.device_put(tree, sharding)

  def one(x):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
  return jax.tree_util.tree_map(one, tree)


def put_args(args, mesh: Mesh):
  """Replicates ``args`` over the mesh; a leaf already sharded on ``mesh`` is kept."""
  def one(x):
    s = getattr(x, "sharding", None)
    if isinstance(s, NamedSharding) and s.mesh == mesh:
      return x
    return put(x, replicated(mesh))
  return jax.tree_util.tree_map(one, args)


def pad_rows(examples, n: int, d: int):
  """Examples padded to D·⌈N/D⌉ rows by repeating the last one (a real input)."""
  b = -(-n // d)
  if b * d == n:
    return examples, b
  idx = np.minimum(np.arange(b * d), n - 1)
  return jax.tree_util.tree_map(lambda x: x[idx], examples), b


def to_host_device(tree, mesh: Mesh):
  """A loop's output moved off the mesh. It lands on one device (the first of this
  process), or on every process's devices when the mesh spans several processes.

  Under JAX's own ambient mesh (``jax.set_mesh``) the output is left replicated on
  it instead, the placement every other array created there has.
  """
  ambient = jax.sharding.get_mesh()
  if not ambient.empty and ambient == mesh:
    return jax.device_put(tree, replicated(mesh))
  if _multi_process(mesh):
    tree = jax.jit(lambda t: t, out_shardings=replicated(mesh))(tree)  # all-gather
    tree = jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)), tree)
  return jax.device_put(tree, jax.local_devices()[0])
