"""The generalised Gauss-Newton (GGN) matrix of the diffusion training loss.

The training loss averages the per-example diffusion loss over the N training
examples and a fixed set of K (t, ε) draws (``jattr.diffusion.draws``):

    L(θ) = 1/(N K) Σ_{i,k} ℓ_ik(θ),    ℓ_ik(θ) = (1/D) ‖f_ik(θ) − y_ik‖²,

with f_ik(θ) = ε_θ(x_t, t_k) ∈ R^D the network output for example i under draw k
(x_t = √ᾱ x_i + √(1−ᾱ) ε_k), y_ik the regression target (ε_k, x_i or v, which never
depends on θ) and D = H·W·C. ℓ is a squared error of the network output, so its
Hessian with respect to the output is H_out = (2/D)·I (the factor 2 of the square
and the 1/D of the mean over pixels both live here), and

    G = 1/(N K) Σ_{i,k} J_ikᵀ H_out J_ik = 2/(D N K) Σ_{i,k} J_ikᵀ J_ik, J_ik = ∂f_ik/∂θ.

G is the Hessian ∇²L with the second-derivative-of-the-network term dropped: it is
positive semi-definite everywhere, equals ∇²L for a model linear in θ, and equals
the Fisher of the Gaussian likelihood p(y | x) = N(f(θ), (D/2)·I) that ℓ is (up to a
constant) the negative log of. ``dense_ggn`` and ``dense_hessian`` build both as
dense [P, P] matrices for small models (the float64 references of the tests), with
P the number of parameters and rows in ``jax.flatten_util.ravel_pytree`` order;
``ggn_matvec`` multiplies by G without forming any Jacobian.

Every curvature approximation in ``jattr.curvature`` (K-FAC, EK-FAC, diagonal) is
built from *square-root rows* of G, ``ggn_sqrt_grads``: vectors γ_r = J_ikᵀ u_r in
parameter space such that G = 1/(N K) Σ_r γ_r γ_rᵀ, exactly (u_r = √(2/D)·e_o, one
row per output coordinate o) or in expectation (u_r random, one row per sample).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jattr import host_memory
from jattr.diffusion import conditioning
from jattr.diffusion.draws import Draws
from jattr.diffusion.losses import per_example_loss, target
from jattr.diffusion.schedules import Schedule, q_sample
from jattr.grads.per_example import apply_chunks, in_trace, sum_chunks, to_chunks
from jattr.progress import Progress
from jattr.progress import resolve as resolve_progress
from jattr.types import ApplyFn, Parameterization, Params

EstimationMode = Literal["ggn_exact", "ggn_curvature_prop", "fisher_gradients",
                         "fisher_empirical"]
ESTIMATION_MODES = ("ggn_exact", "ggn_curvature_prop", "fisher_gradients", "fisher_empirical")
"""How the output-space curvature H_out = (2/D)·I is factored into rows u_r:

* ``"ggn_exact"``: u_o = √(2/D)·e_o for every output coordinate o (D rows per
  example-draw, exact; cost D backward passes per example-draw).
* ``"ggn_curvature_prop"``: S rows u_s = √(2/(D S))·r_s, r_s Rademacher (unbiased,
  the cheapest estimate for images).
* ``"fisher_gradients"``: S rows u_s = √(2/(D S))·z_s, z_s standard normal: the
  gradient of ℓ at a target sampled from the model's Gaussian (unbiased, the
  "true Fisher" estimate).
* ``"fisher_empirical"``: one row u = (2/D)(f − y), the real per-example gradient
  (the empirical Fisher; biased: it is not G, only shares its units).
"""


DEFAULT_ESTIMATION_MODE = "ggn_curvature_prop"
"""One Rademacher row per example-draw: exact in expectation, the cost of one
backward pass per example-draw; the factors average it over all N·K pairs, which
makes the noise small. ``"ggn_exact"`` costs D (the pixel count) backward passes per
pair: the choice for small outputs and for tests."""


def check_estimation_mode(estimation_mode: str) -> None:
  if estimation_mode not in ESTIMATION_MODES:
    raise ValueError(
        f"estimation_mode must be one of {ESTIMATION_MODES}, got {estimation_mode!r}")


def check_examples(x0, draws: Draws, name: str = "x0") -> None:
  """Raises unless x0 is [N, *image] (or conditional examples ``(x0, cond)`` with a
  condition per example) and draws.eps is [K, *image]."""
  x0, cond = conditioning.split(x0)
  if jnp.ndim(x0) < 2:
    raise ValueError(f"{name} must have shape [N, H, W, C], got {jnp.shape(x0)}")
  if tuple(draws.eps.shape[1:]) != tuple(x0.shape[1:]):
    image = ", ".join(map(str, x0.shape[1:]))
    raise ValueError(f"draws.eps must have shape [K, *{name}.shape[1:]] = [K, {image}], got "
                     f"{tuple(draws.eps.shape)}")
  if draws.t.shape != draws.eps.shape[:1]:
    raise ValueError(f"draws.t must have shape [K]={draws.eps.shape[:1]}, got {draws.t.shape}")
  conditioning.check_cond(cond, x0.shape[0])


def check_damping(damping) -> None:
  """Raises for a negative or NaN damping given as a number (traced values pass)."""
  if isinstance(damping, (int, float, np.number)) and not damping >= 0.0:
    raise ValueError(f"damping must be None (the default) or >= 0, got {damping}")


def example_draw_pairs(x0, draws: Draws):
  """All N·K (example, draw) pairs, example-major.

  Args:
    x0: clean images [N, H, W, C], or conditional examples ``(x0, cond)``.
    draws: K fixed draws (``t`` [K], ``eps`` [K, H, W, C]).

  Returns:
    ``(x0 [N K, H, W, C], t [N K], eps [N K, H, W, C])``; row ``i K + k`` is
    example i under draw k (for conditional examples the first entry is the pair
    ``(x0, cond)`` with each condition repeated K times).
  """
  check_examples(x0, draws)
  n, k = conditioning.images(x0).shape[0], draws.num_draws
  return (jax.tree.map(lambda a: jnp.repeat(a, k, axis=0), x0), jnp.tile(draws.t, n),
          jnp.tile(draws.eps, (n,) + (1,) * (draws.eps.ndim - 1)))


def _outputs(apply_fn: ApplyFn, params: Params, schedule: Schedule, x0, t, eps):
  x0, cond = conditioning.split(x0)
  return conditioning.apply_model(apply_fn, params, q_sample(schedule, x0, t, eps), t, cond)


def training_loss(apply_fn: ApplyFn, params: Params, schedule: Schedule, x0, draws: Draws,
                  parameterization: Parameterization = "eps"):
  """L(θ) = 1/(N K) Σ_{i,k} ℓ(θ; x_i, t_k, ε_k), the loss whose curvature G is.

  Args:
    apply_fn: ``apply_fn(params, x_t [B,H,W,C], t [B]) -> [B,H,W,C]``.
    params: the parameters θ.
    schedule: the noise schedule.
    x0: training images [N, H, W, C].
    draws: the K fixed (t, ε) draws.
    parameterization: how the network output is read (``"eps"``, ``"x0"``, ``"v"``).

  Returns:
    A scalar.
  """
  xb, tb, eb = example_draw_pairs(x0, draws)
  return jnp.mean(per_example_loss(apply_fn, params, schedule, xb, tb, eb, parameterization))


def ggn_matvec(apply_fn: ApplyFn, params: Params, schedule: Schedule, x0, draws: Draws, v: Params,
               *, chunk_size: int | None = None) -> Params:
  """G v = 2/(D N K) Σ_{i,k} J_ikᵀ (J_ik v), by one jvp and one vjp per chunk.

  Never forms a Jacobian: memory is that of a forward-and-backward pass over
  ``chunk_size`` examples (times K draws). G does not depend on the
  parameterization, since the target never depends on θ.

  Args:
    apply_fn: ``apply_fn(params, x_t [B,H,W,C], t [B]) -> [B,H,W,C]``.
    params: the parameters θ at which G is evaluated.
    schedule: the noise schedule.
    x0: training images [N, H, W, C].
    draws: the K fixed (t, ε) draws.
    v: a vector, a pytree shaped like ``params``.
    chunk_size: examples per jvp/vjp (each with all K draws); ``None`` takes all N
      at once. Called eagerly, the chunks run from a host loop over one compiled
      chunk program that adds into a donated running sum (``jattr.grads.sum_chunks``;
      the last chunk shifted back and masked), reused by later calls with the same
      apply_fn and shapes; under ``jit`` they run in a ``lax.scan`` (the last chunk
      padded and masked, ``jattr.grads.to_chunks``).

  Returns:
    G v, shaped like ``params``.
  """
  check_examples(x0, draws)
  if jax.tree.structure(v) != jax.tree.structure(params):
    raise ValueError("v must have the tree structure of params, got "
                     f"{jax.tree.structure(v)} and {jax.tree.structure(params)}")
  images = conditioning.images(x0)
  n, k = images.shape[0], draws.num_draws
  dim = math.prod(images.shape[1:])
  chunk = n if chunk_size is None else int(chunk_size)
  if chunk < 1:
    raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
  if not in_trace(params, x0, v, draws):
    scale = jnp.asarray(2.0 / (dim * n * k), images.dtype)
    return sum_chunks(_GgnChunk(apply_fn, schedule), (params, v, draws, scale), x0,
                      chunk_size=chunk)
  xs, mask = to_chunks(x0, chunk)
  mask = mask.astype(images.dtype)

  def one_chunk(total, chunk_data):
    xc, mc = chunk_data
    xb, tb, eb = example_draw_pairs(xc, draws)
    f = lambda p: _outputs(apply_fn, p, schedule, xb, tb, eb)
    out, jv = jax.jvp(f, (params,), (v,))
    weight = jnp.repeat(mc, k).reshape((-1,) + (1,) * (out.ndim - 1))
    _, vjp = jax.vjp(f, params)
    (gv,) = vjp(jv * weight * (2.0 / (dim * n * k)))
    return jax.tree.map(jnp.add, total, gv), None

  scan = jax.jit(lambda zeros, xs, mask: jax.lax.scan(one_chunk, zeros, (xs, mask))[0])
  return scan(jax.tree.map(jnp.zeros_like, params), xs, mask)


@dataclasses.dataclass(frozen=True)
class _GgnChunk:
  """The chunk kernel of ``ggn_matvec``: scale · Σ_{i in chunk, k} J_ikᵀ J_ik v, the rows
  outside ``mask`` left out."""

  apply_fn: ApplyFn
  schedule: Schedule

  def __call__(self, args, xc, mask):
    params, v, draws, scale = args
    xb, tb, eb = example_draw_pairs(xc, draws)
    f = lambda p: _outputs(self.apply_fn, p, self.schedule, xb, tb, eb)  # noqa: E731
    out, jv = jax.jvp(f, (params,), (v,))
    weight = jnp.repeat(mask.astype(out.dtype), draws.num_draws)
    _, vjp = jax.vjp(f, params)
    (gv,) = vjp(jv * (scale * weight).reshape((-1,) + (1,) * (out.ndim - 1)))
    return gv


def ggn_sqrt_grads(apply_fn: ApplyFn, params: Params, schedule: Schedule, x0, draws: Draws, *,
                   estimation_mode: EstimationMode = DEFAULT_ESTIMATION_MODE,
                   key: jax.Array | None = None, num_samples: int = 1,
                   parameterization: Parameterization = "eps", chunk_size: int | None = None,
                   leaf_indices: tuple[int, ...] | None = None):
  """Square-root rows γ_r = J_ikᵀ u_r of G for the examples ``x0``.

  Over the whole training set, G = 1/(N K) Σ_r γ_r γ_rᵀ, exactly for
  ``"ggn_exact"`` and in expectation over ``key`` for the sampled modes (see
  ``ESTIMATION_MODES``; ``"fisher_empirical"`` gives the empirical Fisher
  instead). Call it on chunks of the training set and sum: this is the
  per-example-gradient input of EK-FAC and the diagonal approximations.

  Each row is a per-example gradient of the scalar uᵀ f(θ), ``chunk_size`` rows per
  ``vmap``: from a host loop over one compiled chunk program when called eagerly
  (``jattr.grads.loop_chunks``), with ``lax.map`` under ``jit``.

  Args:
    apply_fn, params, schedule: as in ``ggn_matvec``.
    x0: n training images [n, H, W, C] (a chunk of the training set).
    draws: the K fixed (t, ε) draws.
    estimation_mode: see ``ESTIMATION_MODES``.
    key: PRNG key, required by ``"ggn_curvature_prop"`` and ``"fisher_gradients"``.
    num_samples: S, rows per example-draw for the sampled modes.
    parameterization: needed by ``"fisher_empirical"`` (the target y).
    chunk_size: rows per ``vmap``; ``None``: all rows at once.
    leaf_indices: optional indices into ``jax.tree.leaves(params)``: rows of those
      leaves only (the gradient is taken with respect to them alone).

  Returns:
    A params-like pytree (a tuple of the ``leaf_indices`` leaves if given) with a leading
    axis of n·K·R rows, R = D (``"ggn_exact"``), S (sampled) or 1
    (``"fisher_empirical"``); rows are example-major, then draw, then r.
  """
  check_estimation_mode(estimation_mode)
  check_sampling(estimation_mode, key, num_samples)
  rows = _sqrt_rows(params, x0, draws, key, apply_fn=apply_fn, schedule=schedule,
                    estimation_mode=estimation_mode, num_samples=int(num_samples),
                    parameterization=parameterization)
  return apply_chunks(_SqrtGradRows(apply_fn, schedule, leaf_indices), params, rows,
                      chunk_size=chunk_size, desc="GGN rows")


def check_sampling(estimation_mode, key, num_samples) -> None:
  if estimation_mode in ("ggn_curvature_prop", "fisher_gradients"):
    if key is None:
      raise ValueError(f"estimation_mode={estimation_mode!r} samples and needs a key, got None")
    if int(num_samples) < 1:
      raise ValueError(f"num_samples must be >= 1, got {num_samples}")


@functools.partial(jax.jit, static_argnames=("apply_fn", "schedule", "estimation_mode",
                                             "num_samples", "parameterization"))
def pair_cotangents(params, x0, draws, key, *, apply_fn, schedule, estimation_mode,
                    num_samples, parameterization):
  """Every (example, draw) pair with its output cotangents u_r (``ESTIMATION_MODES``).

  Returns:
    ``(x0 [P, ...], t [P], eps [P, ...], u [P, R, D])`` for the P = n·K pairs
    (example-major), R = D, S or 1 rows per pair: G = 1/(N K) Σ_pairs Σ_r J ᵀu_r u_rᵀ J.
  """
  xb, tb, eb = example_draw_pairs(x0, draws)
  pairs = eb.shape[0]
  dim = math.prod(eb.shape[1:])
  dtype = conditioning.images(xb).dtype
  if estimation_mode == "ggn_exact":
    u = jnp.broadcast_to(jnp.sqrt(2.0 / dim) * jnp.eye(dim, dtype=dtype), (pairs, dim, dim))
  elif estimation_mode == "fisher_empirical":
    out = _outputs(apply_fn, params, schedule, xb, tb, eb)
    err = out - target(schedule, conditioning.images(xb), tb, eb, parameterization)
    u = (2.0 / dim) * err.reshape(pairs, 1, dim)
  else:
    shape = (pairs, int(num_samples), dim)
    if estimation_mode == "ggn_curvature_prop":
      r = jax.random.rademacher(key, shape, dtype=dtype)
    else:
      r = jax.random.normal(key, shape, dtype=dtype)
    u = jnp.sqrt(2.0 / (dim * num_samples)) * r
  return xb, tb, eb, u


@functools.partial(jax.jit, static_argnames=("apply_fn", "schedule", "estimation_mode",
                                             "num_samples", "parameterization"))
def _sqrt_rows(params, x0, draws, key, *, apply_fn, schedule, estimation_mode, num_samples,
               parameterization):
  """The inputs of the rows γ_r = J_ikᵀ u_r: (x0, t, eps, u) per row, example-major."""
  xb, tb, eb, u = pair_cotangents(params, x0, draws, key, apply_fn=apply_fn, schedule=schedule,
                                  estimation_mode=estimation_mode, num_samples=num_samples,
                                  parameterization=parameterization)
  pairs, per_pair, dim = u.shape
  return (jax.tree.map(lambda a: jnp.repeat(a, per_pair, axis=0), xb), jnp.repeat(tb, per_pair),
          jnp.repeat(eb, per_pair, axis=0), u.reshape(pairs * per_pair, dim))


@dataclasses.dataclass(frozen=True)
class _SqrtGradRows:
  """The chunk kernel of ``ggn_sqrt_grads``: γ_r = ∇_θ u_rᵀ f(θ; row r) for a chunk of rows
  (with respect to the ``leaf_indices`` leaves only, if given)."""

  apply_fn: ApplyFn
  schedule: Schedule
  leaf_indices: tuple[int, ...] | None = None

  def projected_output(self, p, row):
    x0_r, t_r, eps_r, u_r = row
    one = jax.tree.map(lambda a: a[None], x0_r)
    out = _outputs(self.apply_fn, p, self.schedule, one, t_r[None], eps_r[None])
    return jnp.vdot(u_r, out.reshape(-1))

  def __call__(self, p, rows):
    if self.leaf_indices is None:
      return jax.vmap(jax.grad(self.projected_output), in_axes=(None, 0))(p, rows)
    leaves, treedef = jax.tree.flatten(p)

    def sub_output(sub, row):
      full = list(leaves)
      for i, x in zip(self.leaf_indices, sub):
        full[i] = x
      return self.projected_output(jax.tree.unflatten(treedef, full), row)

    return jax.vmap(jax.grad(sub_output), in_axes=(None, 0))(
        tuple(leaves[i] for i in self.leaf_indices), rows)


@dataclasses.dataclass(frozen=True)
class _ReducedSqrtGrads:
  """The chunk kernel of ``accumulate_sqrt_grads``: reduce_fn of a chunk's rows, the
  rows the previous chunk counted zeroed (u_r = 0 gives γ_r = 0)."""

  rows_fn: _SqrtGradRows
  reduce_fn: Callable

  def __call__(self, args, rows, mask):
    p, aux = args
    x0_r, t_r, eps_r, u_r = rows
    rows = (x0_r, t_r, eps_r, u_r * mask[:, None].astype(u_r.dtype))
    return self.reduce_fn(self.rows_fn(p, rows), aux)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _reduce_batch(kernel, options, params, aux, xb, draws, rng):
  """One unchunked batch of ``accumulate_sqrt_grads`` (module-level and keyed by the
  hashable kernel and options, so that a second fit reuses the compiled program)."""
  rows = _sqrt_rows(params, xb, draws, rng, **dict(options))
  return kernel.reduce_fn(kernel.rows_fn(params, rows), aux)


def accumulate_sqrt_grads(reduce_fn: Callable, aux, apply_fn: ApplyFn, params: Params,
                          schedule: Schedule, x0, draws: Draws, *,
                          estimation_mode: EstimationMode = DEFAULT_ESTIMATION_MODE,
                          key: jax.Array | None = None, num_samples: int = 1,
                          batch_size: int | None = None, chunk_size: int | None = None,
                          parameterization: Parameterization = "eps",
                          leaf_indices: tuple[int, ...] | None = None,
                          progress: Progress | None = None, desc: str = "GGN statistics"):
  """1/(N K) Σ_r reduce_fn(rows, aux) over the ``ggn_sqrt_grads`` rows of all of x0.

  The statistic-gathering pass of EK-FAC and of the diagonal approximations:
  ``batch_size`` examples at a time (each with all K draws) are turned into
  rows γ_r and reduced by ``reduce_fn(rows, aux) -> pytree`` (a sum over rows,
  e.g. Σ_r γ_r² for the GGN diagonal), then summed over batches. ``aux`` (e.g.
  eigenbases) is passed to the jitted reduction as an argument, not baked in as a
  constant.

  With ``chunk_size`` the rows of a batch are made and reduced ``chunk_size`` at a
  time by ``jattr.grads.sum_chunks`` (a host loop over one compiled chunk program,
  the running sum donated from chunk to chunk): memory is one chunk's rows
  (chunk_size × P), not the batch's. ``reduce_fn`` must then give 0 for an all-zero
  row (the rows of a shifted last chunk that were already counted are zeroed),
  as any sum of squares does. Without ``chunk_size``, one program per batch.

  Args:
    reduce_fn: ``reduce_fn(rows, aux)`` summing over the leading (row) axis.
    aux: any pytree of arrays ``reduce_fn`` needs.
    apply_fn, params, schedule, draws, estimation_mode, num_samples,
      parameterization, leaf_indices: as in ``ggn_sqrt_grads``.
    x0: training images [N, H, W, C].
    key: PRNG key of the sampled modes (``None``: a fixed key 0); batch b uses
      ``fold_in(key, b)``.
    batch_size: examples per pass; ``None`` takes all N at once.
    chunk_size: rows per ``vmap`` inside a pass (see above); ``None``: all of them.
    progress: called after each batch with examples done (``jattr.progress``).
    desc: the stage name passed to ``progress``.

  Returns:
    The pytree 1/(N K) Σ_r reduce_fn(γ_r), summed over all rows of all batches.
  """
  check_examples(x0, draws)
  check_estimation_mode(estimation_mode)
  n = conditioning.images(x0).shape[0]
  batch = n if batch_size is None else int(batch_size)
  if batch < 1:
    raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
  if chunk_size is not None and int(chunk_size) < 1:
    raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
  key = jax.random.PRNGKey(0) if key is None else key
  check_sampling(estimation_mode, key, num_samples)
  report = resolve_progress(progress)
  options = dict(apply_fn=apply_fn, schedule=schedule, estimation_mode=estimation_mode,
                 num_samples=int(num_samples), parameterization=parameterization)
  kernel = _ReducedSqrtGrads(_SqrtGradRows(apply_fn, schedule, leaf_indices), reduce_fn)
  static_options = tuple(sorted(options.items()))

  total = None
  for b, start in enumerate(range(0, n, batch)):
    xb = jax.tree.map(lambda a: a[start:start + batch], x0)
    rng = jax.random.fold_in(key, b)
    if chunk_size is None:
      part = _reduce_batch(kernel, static_options, params, aux, xb, draws, rng)
      total = part if total is None else jax.tree.map(jnp.add, total, part)
    else:
      rows = _sqrt_rows(params, xb, draws, rng, **options)
      total = sum_chunks(kernel, (params, aux), rows, chunk_size=int(chunk_size), init=total)
      del rows
    jax.block_until_ready(total)  # bounded memory: no queue of in-flight batches
    host_memory.release_free_memory()  # and no freed batches kept by the allocator
    report(desc, min(start + batch, n), n)
  return jax.tree.map(lambda s: s / (n * draws.num_draws), total)
