"""Per-example gradients, chunked so that memory is bounded by the chunk size.

For a scalar kernel f(θ; z) written for ONE example z,

    g_i = ∇_θ f(θ; z_i),     i = 1..N,

computed as ``vmap(grad(f))`` over chunks of ``chunk_size`` examples: peak memory
holds one chunk's gradients (chunk_size × P) plus the outputs, never N × (activations
of the model).

Two ways to run the chunks, one result:

- **Host loop** (``loop_chunks``; what the public functions run when called eagerly
  with chunk_size < N): one compiled program for one chunk, called once per chunk
  from Python. It slices its chunk out of the examples and writes its rows into the
  donated output buffer in place, so every chunk runs at the speed of one unchunked
  call of that size. The last chunk is shifted back to end at N (rows recomputed,
  never padded), so one compiled shape serves every chunk; at most two chunks are in
  flight (chunk i + 1 is queued while the host waits for chunk i).
- **Traced** (``map_chunks``, ``jax.lax.map``): what the same functions do inside a
  caller's ``jit``/``vmap``. It composes with any transformation, but XLA:CPU runs a
  loop body far slower than the same program outside a loop when the model has
  native convolutions (``lax.conv_general_dilated``): about 11× for per-example
  gradients of a 4-conv net (docs/benchmarks.md, "chunking"). Call the public
  functions eagerly to get the host loop.

In ``map_chunks`` the last chunk is padded by repeating the last example (a real
input, so the kernel never sees an all-zero example that could make a norm's
gradient NaN) and the padded rows are dropped.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

try:  # jax >= 0.10 (jax.core's copy, and jax.core.trace_ctx, are deprecated there)
  from jax.extend.core import find_top_trace as _current_trace
except ImportError:  # jax 0.9
  from jax.core import find_top_trace as _current_trace

from jax.sharding import PartitionSpec

from jattr import devices
from jattr.diffusion.checks import count_nonfinite  # noqa: F401  (re-exported)
from jattr.progress import Progress
from jattr.progress import resolve as resolve_progress
from jattr.types import Params
from jattr.wrt import Selector, restrict

ExampleFn = Callable[[Params, Any], jax.Array]
"""``fn(params, example) -> scalar``, for ONE example."""


def num_examples(examples) -> int:
  leaves = jax.tree_util.tree_leaves(examples)
  if not leaves:
    raise ValueError("examples must contain at least one array, got an empty pytree")
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
  if len(sizes) != 1 or None in sizes:
    raise ValueError("every leaf of examples must have the same leading axis N, got "
                     f"leading sizes {sorted(str(s) for s in sizes)}")
  return sizes.pop()


def check_chunk_size(chunk_size) -> int:
  """``int(chunk_size)``; raises unless it is ≥ 1."""
  if chunk_size is None or int(chunk_size) < 1:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size}")
  return int(chunk_size)


def to_chunks(examples, chunk_size: int):
  """Splits ``examples`` into equal chunks, padding the last with its final example.

  The one pad-and-chunk helper of jattr's traced paths: ``map_chunks`` maps over
  its chunks, and traced reductions over examples (``ggn_matvec`` under ``jit``)
  scan over them with ``mask``. The host loops (``loop_chunks``, ``sum_chunks``)
  shift the last chunk back instead of padding.

  Args:
    examples: pytree of arrays with a shared leading axis N.
    chunk_size: C ≥ 1.

  Returns:
    ``(chunks, mask)``: every leaf reshaped to [⌈N/C⌉, C, ...] (rows past N repeat
    example N − 1), and ``mask`` [⌈N/C⌉, C] bool, False on the padding.
  """
  n = num_examples(examples)
  c = check_chunk_size(chunk_size)
  num_chunks = -(-n // c)
  pad = num_chunks * c - n

  def split(x):
    if pad:
      x = jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)], axis=0)
    return x.reshape((num_chunks, c) + x.shape[1:])

  mask = (jnp.arange(num_chunks * c) < n).reshape(num_chunks, c)
  return jax.tree_util.tree_map(split, examples), mask


def map_chunks(batch_fn: Callable[[Any], Any], examples, *, chunk_size: int | None = None):
  """Applies a batched function to ``examples`` chunk by chunk, inside one program.

  The traced path (``jax.lax.map`` over padded chunks): it composes with ``jit``,
  ``vmap`` and ``grad``, but see the module docstring for its cost on XLA:CPU;
  ``apply_chunks`` runs a host loop instead when called eagerly.

  Args:
    batch_fn: maps a chunk of examples (leading axis C) to a pytree of outputs with
      leading axis C, row c depending only on example c (e.g. a ``vmap``).
    examples: pytree of arrays with a shared leading axis N.
    chunk_size: C; ``None`` (or C ≥ N) runs ``batch_fn`` on all N at once.

  Returns:
    ``batch_fn``'s outputs for all N examples, leading axis N.
  """
  n = num_examples(examples)
  if chunk_size is None or chunk_size >= n:
    return batch_fn(examples)
  chunks, _ = to_chunks(examples, chunk_size)
  out = jax.lax.map(batch_fn, chunks)
  c = int(chunk_size)
  return jax.tree_util.tree_map(lambda y: y.reshape((y.shape[0] * c,) + y.shape[2:])[:n], out)


def in_trace(*trees) -> bool:
  """Whether the caller is inside a jax transformation, or passes tracers.

  True under ``jit``, ``vmap``, ``grad``, ``lax.map``, … (then a host loop cannot
  run: the chunked functions fall back to ``map_chunks``), False for an eager call
  with concrete arrays.
  """
  if any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(trees)):
    return True
  # The current trace: the top-level EvalTrace for an eager call, a jaxpr, batch,
  # JVP, … trace inside a transformation, even if no argument is a tracer.
  return type(_current_trace(())).__name__ != "EvalTrace"


def _call(kernel, args, examples):
  return kernel(args, examples)


_call_jit = jax.jit(_call, static_argnums=0)


def _call_masked(kernel, args, examples, mask):
  return kernel(args, examples, mask)


_call_masked_jit = jax.jit(_call_masked, static_argnums=0)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _zeros(treedef, specs):
  """One program for all the zero buffers of an output pytree."""
  return jax.tree_util.tree_unflatten(treedef, [jnp.zeros(shape, dtype) for shape, dtype in specs])


def _zeros_like(structs, n: int | None = None):
  """Zeros shaped like ``structs`` (ShapeDtypeStructs), leading axis replaced by n."""
  leaves, treedef = jax.tree_util.tree_flatten(structs)
  specs = tuple(((n,) + tuple(r.shape[1:]) if n is not None else tuple(r.shape),
                 jnp.dtype(r.dtype)) for r in leaves)
  return _zeros(treedef, specs)


def _token(rows):
  """A tiny output of a chunk's program, ready when the program is done."""
  return jax.tree_util.tree_leaves(rows)[0].reshape(-1)[:1]


def _slice(examples, start, size):
  return jax.tree_util.tree_map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, size), examples)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=2)
def _map_step(kernel, size, out, args, examples, start):
  # The kernel as a nested jit: its trace is the one ``loop_chunks`` already made
  # for the output's shape (jit's trace cache), not a second one.
  rows = _call_jit(kernel, args, _slice(examples, start, size))
  out = jax.tree_util.tree_map(
      lambda o, r: jax.lax.dynamic_update_slice_in_dim(o, r.astype(o.dtype), start, 0), out, rows)
  return out, _token(rows)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=2)
def _sum_step(kernel, size, total, args, examples, start, first):
  mask = start + jnp.arange(size) >= first
  part = _call_masked_jit(kernel, args, _slice(examples, start, size), mask)
  total = jax.tree_util.tree_map(lambda t, q: t + q.astype(t.dtype), total, part)
  return total, _token(part)


def _chunk_starts(n: int, c: int):
  """(start, first, done) per chunk: the last chunk starts at N − C (shifted back, not
  padded); rows before ``first`` belong to the previous chunk."""
  for first in range(0, n, c):
    yield min(first, n - c), first, min(first + c, n)


def _run_loop(step, state, statics, args, examples, n, c, report, desc, with_first):
  """Dispatches chunk i + 1 before waiting for chunk i: at most two chunks in flight."""
  pending = None
  for start, first, done in _chunk_starts(n, c):
    extra = (first,) if with_first else ()
    state, token = step(*statics, state, args, examples, start, *extra)
    if pending is not None:
      jax.block_until_ready(pending[0])
      report(desc, pending[1], n)
    pending = (token, done)
  jax.block_until_ready(pending[0])
  report(desc, pending[1], n)
  return state


def _chunk_struct(examples, c: int):
  """The abstract chunk, as the step program's slice of ``examples`` will be (weak type
  included, so that the kernel's trace is shared)."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct((c,) + jnp.shape(x)[1:], jnp.result_type(x),
                                     weak_type=bool(getattr(x, "weak_type", False))), examples)



# -- Data-parallel chunk loops (``jattr.devices``) ----------------------------------
#
# The same host loops on a mesh: device d owns the example block [d·B, (d + 1)·B)
# and runs the single-device step on it, inside one ``shard_map`` program (only the
# "data" axis manual, so parameters sharded over "model" stay XLA's to partition).


def _shard_map(body, mesh, in_specs, out_specs):
  return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                       axis_names=frozenset({devices.DATA}), check_vma=False)


_ROWS = PartitionSpec(devices.DATA)
_ALL = PartitionSpec()


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=3)
def _map_step_sharded(kernel, size, mesh, out, args, examples, start):
  def body(out, args, examples, start):
    rows = kernel(args, _slice(examples, start, size))
    out = jax.tree_util.tree_map(
        lambda o, r: jax.lax.dynamic_update_slice_in_dim(o, r.astype(o.dtype), start, 0),
        out, rows)
    return out, _token(rows)
  return _shard_map(body, mesh, (_ROWS, _ALL, _ROWS, _ALL), (_ROWS, _ROWS))(
      out, args, examples, start)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4), donate_argnums=5)
def _sum_step_sharded(kernel, size, mesh, block, n, total, args, examples, start, first):
  def body(total, args, examples, start, first):
    local = start + jnp.arange(size)
    row = jax.lax.axis_index(devices.DATA) * block + local
    part = kernel(args, _slice(examples, start, size), (local >= first) & (row < n))
    total = jax.tree_util.tree_map(lambda t, q: t + q.astype(t.dtype)[None], total, part)
    return total, _token(part)
  return _shard_map(body, mesh, (_ROWS, _ALL, _ROWS, _ALL, _ALL), (_ROWS, _ROWS))(
      total, args, examples, start, first)


@jax.jit
def _reduce_partials(total, init):
  """Σ over devices of the per-device partial totals (an all-reduce), plus init."""
  return jax.tree_util.tree_map(lambda t, i: i + jnp.sum(t, axis=0).astype(i.dtype), total, init)


def _sharded_zeros(structs, lead: int, mesh):
  """Zeros shaped like ``structs`` with leading axis ``lead``, split over "data"."""
  split = devices.split_rows(mesh)
  return jax.tree_util.tree_map(
      lambda r: jnp.zeros((lead,) + tuple(r.shape[1:]), r.dtype, device=split), structs)


def _place(args, examples, n, c, mesh):
  """Parameters replicated, examples padded to D·B rows and split into D blocks.

  Returns ``(args, examples, B, C', chunk)``: C' = min(C, B) examples per device per
  chunk, ``chunk`` the abstract chunk one device's step slices out of its block.
  """
  examples, block = devices.pad_rows(examples, n, devices.data_size(mesh))
  examples = devices.put(examples, devices.split_rows(mesh))
  c = min(c, block)
  return devices.put_args(args, mesh), examples, block, c, _chunk_struct(examples, c)


def _loop_sharded(kernel, args, examples, n, c, mesh, report, desc):
  d = devices.data_size(mesh)
  args, examples, block, c, chunk = _place(args, examples, n, c, mesh)
  rows = _call_jit.eval_shape(kernel, args, chunk)
  _check_rows(rows, c)
  out = _sharded_zeros(rows, d * block, mesh)
  out = _run_loop(_map_step_sharded, out, (kernel, c, mesh), args, examples, block, c,
                  _per_device(report, n, d), desc, with_first=False)
  out = jax.tree_util.tree_map(lambda x: x[:n], out) if d * block != n else out
  return devices.to_host_device(out, mesh)


def _sum_sharded(kernel, args, examples, n, c, init, mesh, report, desc):
  d = devices.data_size(mesh)
  args, examples, block, c, chunk = _place(args, examples, n, c, mesh)
  part = _call_masked_jit.eval_shape(kernel, args, chunk, jax.ShapeDtypeStruct((c,), jnp.bool_))
  partials = _sharded_zeros(jax.tree_util.tree_map(
      lambda r: jax.ShapeDtypeStruct((1,) + tuple(r.shape), r.dtype), part), d, mesh)
  partials = _run_loop(_sum_step_sharded, partials, (kernel, c, mesh, block, n), args, examples,
                       block, c, _per_device(report, n, d), desc, with_first=True)
  init = _zeros_like(part) if init is None else init
  return devices.to_host_device(_reduce_partials(partials, devices.put_args(init, mesh)), mesh)


def _check_rows(rows, c: int) -> None:
  """Raises unless every leaf of the kernel's output has leading axis C."""
  for r in jax.tree_util.tree_leaves(rows):
    if not r.shape or r.shape[0] != c:
      raise ValueError(f"kernel must return rows with leading axis chunk_size={c}, got shape "
                       f"{r.shape}")


def _per_device(report, n, d):
  """Progress in examples of all devices: each device has done ``done`` of its block."""
  return lambda desc, done, block: report(desc, n if done >= block else min(n, done * d), n)


def loop_chunks(kernel: Callable[[Any, Any], Any], args, examples, *, chunk_size: int,
                progress: Progress | None = None, desc: str = "chunks", mesh=None):
  """``kernel(args, chunk)`` for every chunk of ``examples``, from a host loop.

  One compiled program computes one chunk: it slices rows [s, s + C) out of
  ``examples`` (on the device, s a traced argument) and writes the kernel's rows into
  the output buffer in place (the buffer is donated from call to call). So every
  chunk costs what one unchunked call of C examples costs, whatever the model (see
  the module docstring for why ``lax.map`` does not), and there is one compile,
  for one chunk's shape. The last chunk is shifted back to start at N − C (its first
  rows are recomputed and rewritten), so no padding is needed. Chunk i + 1 is
  dispatched before the host waits for chunk i, never more: peak memory is the
  output plus at most two chunks' working memory.

  ``kernel`` is a static argument of ``jax.jit``: it must be hashable, and equal
  kernels share one compiled program across calls (a module-level function or a
  frozen dataclass; a fresh closure compiles once per call, and is then reused for
  every chunk of that call).

  Args:
    kernel: ``kernel(args, chunk) -> rows``, a pytree whose leaves have leading axis
      C, row c depending only on example c of the chunk (e.g. a ``vmap``).
    args: pytree of arrays passed to every chunk (e.g. the parameters).
    examples: pytree of arrays with a shared leading axis N (numpy arrays are
      moved to the device once).
    chunk_size: C ≥ 1 (C ≥ N runs one chunk of N).
    progress: called after each chunk with examples done (``jattr.progress``).
    desc: the stage name passed to ``progress``.
    mesh: a ``jax.sharding.Mesh`` with a ``"data"`` axis of D devices; ``None``:
      ``jattr.devices.current_mesh()`` (none set: one device). On a mesh, device d
      runs the loop over its block of ⌈N/D⌉ examples, C at a time, all devices at
      once (``jattr.devices``); the rows come back on one device.

  Returns:
    The kernel's rows for all N examples, leading axis N.
  """
  n = num_examples(examples)
  c = min(check_chunk_size(chunk_size), n)
  mesh = devices.current_mesh(mesh)
  if mesh is not None:
    return _loop_sharded(kernel, args, examples, n, c, mesh, resolve_progress(progress), desc)
  args, examples = jax.device_put((args, examples))
  rows = _call_jit.eval_shape(kernel, args, _chunk_struct(examples, c))
  _check_rows(rows, c)
  out = _zeros_like(rows, n)
  return _run_loop(_map_step, out, (kernel, c), args, examples, n, c,
                   resolve_progress(progress), desc, with_first=False)


def sum_chunks(kernel: Callable[[Any, Any, jax.Array], Any], args, examples, *,
               chunk_size: int, init=None, progress: Progress | None = None,
               desc: str = "chunks", mesh=None):
  """Σ over chunks of ``kernel(args, chunk, mask)``, from a host loop.

  The reduction counterpart of ``loop_chunks`` (same program structure, one compile,
  at most two chunks in flight): the running total is the donated buffer. The last
  chunk is shifted back to start at N − C; ``mask`` [C] bool is False on the rows
  the previous chunk already counted, and the kernel must leave them out of its sum
  (e.g. multiply their contribution by 0).

  Args:
    kernel: ``kernel(args, chunk, mask) -> pytree``, the chunk's masked sum.
    args, examples, chunk_size, progress, desc: as in ``loop_chunks``.
    init: a total to add to (donated: not usable after the call), shaped like the
      kernel's output; ``None`` starts from zeros.
    mesh: as in ``loop_chunks``. On a mesh each device sums its own block into a
      partial total; the D partials are added (an all-reduce) once, at the end.

  Returns:
    The total, shaped like the kernel's output.
  """
  n = num_examples(examples)
  c = min(check_chunk_size(chunk_size), n)
  mesh = devices.current_mesh(mesh)
  if mesh is not None:
    return _sum_sharded(kernel, args, examples, n, c, init, mesh, resolve_progress(progress),
                        desc)
  args, examples = jax.device_put((args, examples))
  if init is None:
    part = _call_masked_jit.eval_shape(kernel, args, _chunk_struct(examples, c),
                                       jax.ShapeDtypeStruct((c,), jnp.bool_))
    init = _zeros_like(part)
  return _run_loop(_sum_step, init, (kernel, c), args, examples, n, c,
                   resolve_progress(progress), desc, with_first=True)


def apply_chunks(kernel: Callable[[Any, Any], Any], args, examples, *,
                 chunk_size: int | None = None, progress: Progress | None = None,
                 desc: str = "chunks", mesh=None):
  """``kernel(args, chunk)`` over all examples, chunk by chunk: the dispatcher.

  - called eagerly with chunk_size < N: ``loop_chunks`` (host loop, one compiled
    chunk program, progress after each chunk);
  - called eagerly with ``chunk_size=None`` or ≥ N: one jitted call on all N
    (progress called once, when it is done);
  - called under a transformation (``in_trace``): ``map_chunks`` (``lax.map``
    inside the caller's program; no progress);
  - called eagerly on a mesh (``mesh``, or ``jattr.devices.current_mesh()``):
    ``loop_chunks`` on it, chunk_size=None meaning one chunk per device.

  Args and Returns: as in ``loop_chunks``.
  """
  n = num_examples(examples)
  if chunk_size is not None:
    check_chunk_size(chunk_size)
  if in_trace(args, examples):
    return map_chunks(functools.partial(kernel, args), examples, chunk_size=chunk_size)
  mesh = devices.current_mesh(mesh)
  if mesh is not None:
    return loop_chunks(kernel, args, examples, chunk_size=chunk_size or n, progress=progress,
                       desc=desc, mesh=mesh)
  if chunk_size is None or int(chunk_size) >= n:
    out = _call_jit(kernel, args, examples)
    if progress is not None:
      jax.block_until_ready(out)
      resolve_progress(progress)(desc, n, n)
    return out
  return loop_chunks(kernel, args, examples, chunk_size=chunk_size, progress=progress,
                     desc=desc)


@dataclasses.dataclass(frozen=True)
class _GradRows:
  """The chunk kernel of ``per_example_grads`` (hashable: equal fns share a compile)."""

  fn: ExampleFn
  flat: bool = False

  def __call__(self, params, chunk):
    grads = jax.vmap(jax.grad(self.fn), in_axes=(None, 0))(params, chunk)
    return flatten_per_example(grads) if self.flat else grads


def per_example_grads(fn: ExampleFn, params: Params, examples, *,
                      chunk_size: int | None = None,
                      progress: Progress | None = None, wrt: Selector = None,
                      mesh=None) -> Params:
  """Gradient of ``fn`` for every example, g_i = ∇_θ fn(θ; z_i).

  With ``wrt`` (a ``jattr.wrt`` selector) only the selected leaves θ_S are
  differentiated, the others held fixed: g_i = ∇_{θ_S} fn(θ_S, θ_F; z_i), which is
  the selected leaves of the full gradient (``jattr.wrt.restrict``).

  Called eagerly with chunk_size < N, the chunks run from a host loop over one
  compiled chunk program (``loop_chunks``); inside a caller's ``jit`` they run with
  ``lax.map`` (``map_chunks``). Both give the same gradients.

  Args:
    fn: ``fn(params, example) -> scalar``, written for ONE example; hashable (a
      ``jax.jit`` static argument: the same fn reuses its compiled program).
    params: the parameters θ (any pytree).
    examples: pytree with leading axis N (usually an array [N, ...]).
    chunk_size: examples per ``vmap`` chunk; ``None`` vmaps over all N at once.
    progress: called after each chunk of an eager call (``jattr.progress``).
    wrt: the leaves to differentiate (``None``: all; see ``jattr.wrt``).
    mesh: a ``jax.sharding.Mesh`` to split the examples over (its ``"data"``
      axis; ``jattr.devices``); ``None``: ``jattr.devices.current_mesh()``.

  Returns:
    A pytree like ``params`` whose leaves have a leading axis N; with ``wrt``, like
    ``jattr.wrt.split(params, wrt)`` (the unselected leaves are ``None``).
  """
  fn, params = restrict(fn, params, wrt)
  return apply_chunks(_GradRows(fn), params, examples, chunk_size=chunk_size,
                      progress=progress, desc="per-example gradients", mesh=mesh)


def flatten_per_example(grads: Params) -> jax.Array:
  """Stacks per-example gradient pytrees into a matrix G [N, P].

  Row i is ``jax.flatten_util.ravel_pytree(g_i)[0]``: the leaves in
  ``jax.tree_util.tree_leaves`` order, each raveled row-major (C order), then
  concatenated; leaves are promoted to their common dtype.

  Args:
    grads: pytree whose leaves have a leading axis N.

  Returns:
    G, shape [N, P] with P = total number of parameters.
  """
  leaves = jax.tree_util.tree_leaves(grads)
  if not leaves:
    raise ValueError("grads must contain at least one array, got an empty pytree")
  n = leaves[0].shape[0]
  dtype = jnp.result_type(*leaves)
  return jnp.concatenate([jnp.reshape(x, (n, -1)).astype(dtype) for x in leaves], axis=1)


def per_example_flat_grads(fn: ExampleFn, params: Params, examples, *,
                           chunk_size: int | None = None,
                           progress: Progress | None = None,
                           wrt: Selector = None) -> jax.Array:
  """``flatten_per_example(per_example_grads(...))``, flattened chunk by chunk.

  Args, order and chunking as in ``per_example_grads`` and ``flatten_per_example``.

  Returns:
    G, shape [N, P] (with ``wrt``: P = the number of selected parameters, columns
    in the leaf order of the selected leaves).
  """
  fn, params = restrict(fn, params, wrt)
  return apply_chunks(_GradRows(fn, flat=True), params, examples, chunk_size=chunk_size,
                      progress=progress, desc="per-example gradients")
