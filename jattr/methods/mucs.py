"""MUCS: attribution by bounded mirrored unlearning and a noise-consistent loss skew.

To attribute a query x_q (a generated sample or a held-out image), copy the trained
parameters θ* and fine-tune the copy so that it *forgets* x_q while it keeps fitting
the training data, then ask which training examples the forgetting hurt. With the
query's forget loss on K fixed draws (t_k, ε_k) (``jattr.diffusion.Draws``),

    L_forget(θ) = 1/K Σ_k ℓ(θ; x_q, t_k, ε_k),

a retain batch B_n of training examples drawn at step n from ``fold_in(key, n)``,

    L_retain(θ) = 1/|B_n| Σ_{(x, t, ε) ∈ B_n} ℓ(θ; x, t, ε),

and L_null the forget loss of freshly initialised models (``null_loss``; a model that
never saw anything), each step descends the *bounded mirrored* objective

    J(θ) = w_r · L_retain(θ) − λ · min(L_forget(θ), L_null) + (γ/2) Σ_j F_j (θ_j − θ*_j)².

The min is the bound: once the query is as badly fit as by a model that never saw
it, pushing further has zero gradient, since there is nothing left to unlearn and
only damage to do. MUCS (bounded) additionally

* stops a query once L_forget ≥ ρ · L_null (ρ = ``stop_ratio`` = 0.95) or after the
  step budget, whichever comes first;
* rejects a step whose result would have L_forget > L_null: the step is undone
  (parameters *and* optimizer state) and the step size halved. So the bound holds
  exactly, on the same draws it is measured with, not only in expectation.

The unlearned model θ_u then scores every training example x_i by the *skew* of its
loss, on one set of draws shared by θ_u and the original θ_o = θ*:

    τ_i = 1/K Σ_k (ℓ_u,ik − ℓ_o,ik) / (ℓ_u,ik + ℓ_o,ik + c),
    ℓ_·,ik = ℓ(θ_·; x_i, t_k, ε_k).

Sign convention (the same as TRAK and influence in jattr): τ_i > 0 means x_i's loss
went *up* when x_q was unlearned, i.e. x_i and x_q were fit by the same parameters:
x_i is a proponent of x_q. The skew is zero for identical models, antisymmetric
under u ↔ o, and bounded in (−1, 1); dividing by ℓ_u + ℓ_o compares a change in a
low-noise draw (small ℓ) on the same footing as one in a high-noise draw.

The same code path gives the ablations and the plain unlearning baseline:

* ``bounded=False``: plain min-free objective, no stop, no rejection (MUCS without
  the bound);
* independent noise: pass ``original_draws`` built from another key, so ℓ_u and ℓ_o
  are computed on different (t, ε) and the skew carries the draw-to-draw noise;
* the unlearning baseline of Wang et al. (2024): gradient *ascent* on L_forget with
  an EWC penalty, F = the diagonal empirical Fisher of the training loss at θ*
  (``ewc_fisher``), no retain term and no bound (``unlearning_baseline_config``).

Which parameters move is a static boolean pytree (``trainable_mask``): frozen
leaves get zero gradient and zero update.

Many queries are unlearned at once: the single-query kernel is ``vmap``ped over a
chunk of queries (``lax.while_loop`` under ``vmap`` runs until every query of the
chunk is done and freezes the finished ones), and chunks run one after the other,
from a host loop over one compiled chunk program (``jattr.grads.loop_chunks``).

References:
  "Mirrored unlearning and noise-consistent skew" (MUCS), 2025.
  Wang, Hertzmann, Efros, Zhu, Zhang: "Data Attribution for Text-to-Image Models by
  Unlearning Synthesized Images", NeurIPS 2024.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jattr.curvature.diagonal import fit_diagonal
from jattr.diffusion import conditioning
from jattr.diffusion.draws import Draws, fixed_draws
from jattr.diffusion.losses import per_example_loss
from jattr.diffusion.measurements import measurement_fn
from jattr.diffusion.schedules import Schedule
from jattr.grads.per_example import apply_chunks
from jattr.progress import Progress
from jattr.train.loop import draw_batch
from jattr.types import ApplyFn, Parameterization, Params
from jattr.wrt import Selector, chosen_mask, describe
from jattr.wrt import select as select_leaves

OPTIMIZERS = ("adam", "sgd")
DEFAULT_SKEW_CONSTANT = 1e-6


@dataclasses.dataclass(frozen=True)
class UnlearnConfig:
  """How a copy of the model unlearns one query (see the module docstring).

  Attributes:
    num_steps: the step budget (rejected steps count).
    learning_rate: optimizer step size.
    optimizer: ``"adam"`` or ``"sgd"``.
    forget_weight: λ, the weight of the (bounded) forget loss.
    retain_weight: w_r, the weight of the retain loss (0: no retain batches).
    retain_batch_size: training examples per retain batch.
    bounded: use min(L_forget, L_null), stop at ``stop_ratio`` · L_null and reject
      steps that would cross L_null (MUCS); False: plain objective, budget only.
    stop_ratio: ρ; a query is done once L_forget ≥ ρ · L_null.
    ewc_weight: γ of the EWC penalty (needs ``fisher``); 0 for MUCS.
  """

  num_steps: int = 100
  learning_rate: float = 1e-4
  optimizer: str = "adam"
  forget_weight: float = 0.2
  retain_weight: float = 1.0
  retain_batch_size: int = 32
  bounded: bool = True
  stop_ratio: float = 0.95
  ewc_weight: float = 0.0

  def __post_init__(self):
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"UnlearnConfig.optimizer must be one of {OPTIMIZERS}, "
                       f"got {self.optimizer!r}")
    for name in ("num_steps", "retain_batch_size"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"UnlearnConfig.{name} must be >= 1, got {getattr(self, name)}")
    if not 0.0 < self.stop_ratio <= 1.0:
      raise ValueError(f"UnlearnConfig.stop_ratio must be in (0, 1], got {self.stop_ratio}")
    for name in ("learning_rate", "forget_weight", "retain_weight", "ewc_weight"):
      if getattr(self, name) < 0:
        raise ValueError(f"UnlearnConfig.{name} must be >= 0, got {getattr(self, name)}")


def mucs_config(**overrides) -> UnlearnConfig:
  """MUCS: retain + bounded mirrored forget, λ = 0.2, stop at 0.95 · L_null."""
  return dataclasses.replace(UnlearnConfig(), **overrides)


def unlearning_baseline_config(**overrides) -> UnlearnConfig:
  """Wang et al. (2024): gradient ascent on L_forget with an EWC penalty, no bound.

  J(θ) = −L_forget(θ) + (γ/2) Σ_j F_j (θ_j − θ*_j)², for the full step budget.
  """
  base = UnlearnConfig(forget_weight=1.0, retain_weight=0.0, bounded=False, ewc_weight=1e3)
  return dataclasses.replace(base, **overrides)


class UnlearnResult(NamedTuple):
  """What unlearning Q queries returns; every field has a leading query axis Q.

  Attributes:
    params: the unlearned parameters (leaves [Q, ...]); ``None`` from ``mucs_scores``.
    forget_loss: L_forget at θ* and at the end, [Q, 2].
    null_loss: L_null used for each query, [Q].
    retain_loss: L_retain of the last step taken, [Q] (0 with no retain term).
    steps: steps taken (accepted or rejected), int32 [Q].
    rejected: steps rejected for crossing L_null, int32 [Q].
  """

  params: Params | None
  forget_loss: jax.Array
  null_loss: jax.Array
  retain_loss: jax.Array
  steps: jax.Array
  rejected: jax.Array


class MucsResult(NamedTuple):
  """What ``mucs_scores`` returns.

  Attributes:
    scores: τ, [Q, N].
    unlearn: the diagnostics of unlearning (``params`` is None).
    losses: ℓ(θ_u^q; x_i, t_k, ε_k), [Q, N, K], with ``return_losses=True``; else
      None. With them, the skew against any other original losses costs one pass
      of θ* over the training set, not another unlearning.
  """

  scores: jax.Array
  unlearn: UnlearnResult
  losses: jax.Array | None = None


# ----------------------------------------------------------------------------- masks


def trainable_mask(params: Params, select: Selector = None) -> Params:
  """Which parameters unlearning may move: a pytree of Python bools like ``params``.

  The one selector of the library (``jattr.wrt``): the parameters MUCS moves are
  the parameters it attributes with respect to.

  Args:
    params: the parameter pytree (arrays or ``ShapeDtypeStruct``s).
    select: a ``jattr.wrt`` selector: ``None`` (all), a regular expression searched
      in each leaf's path (keys joined by ``/``, e.g. ``"up/1|conv_out"``,
      ``"kernel$"``), a predicate ``select(path) -> bool``, or a bool mask pytree.

  Returns:
    A pytree of bools with ``params``' structure (``jattr.wrt.chosen_mask``).

  Raises:
    ValueError: if ``select`` matches no parameter.
    TypeError: a selector of another type.
  """
  return chosen_mask(params, select_leaves(params, select))


def _apply_mask(mask, tree):
  if mask is None:
    return tree
  return jax.tree.map(lambda m, x: x if m else jnp.zeros_like(x), mask, tree)


# ----------------------------------------------------------------------------- losses


def per_draw_losses(apply_fn: ApplyFn, params: Params, schedule: Schedule, images, draws: Draws,
                    *, parameterization: Parameterization = "eps",
                    chunk_size: int | None = None) -> jax.Array:
  """ℓ(θ; x_i, t_k, ε_k) for every example and every draw.

  Args:
    apply_fn, params, schedule: the model.
    images: [N, H, W, C], or conditional examples ``(images, cond)``.
    draws: K draws, ``eps`` [K, H, W, C].
    parameterization: how the network output is read.
    chunk_size: examples per ``vmap`` chunk (the network sees chunk_size · K images);
      called eagerly, the chunks run from a host loop over one compiled program.

  Returns:
    Losses [N, K].
  """
  x = conditioning.images(images)
  if x.ndim != 4 or x.shape[1:] != draws.eps.shape[1:]:
    raise ValueError(f"images must be [N, *{tuple(draws.eps.shape[1:])}] (the draws' image "
                     f"shape), got {x.shape}")
  return apply_chunks(_DrawLosses(apply_fn, schedule, parameterization), (params, draws),
                      images, chunk_size=chunk_size)


@dataclasses.dataclass(frozen=True)
class _DrawLosses:
  """The chunk kernel of ``per_draw_losses`` (hashable)."""

  apply_fn: ApplyFn
  schedule: Schedule
  parameterization: str

  def __call__(self, args, images):
    params, draws = args

    def one(example):
      xs = _under_draws(example, draws)
      return per_example_loss(self.apply_fn, params, self.schedule, xs, draws.t,
                              draws.eps.astype(conditioning.images(example).dtype),
                              self.parameterization)

    return jax.vmap(one)(images)


def _under_draws(example, draws: Draws):
  """ONE example repeated for the K draws: the image broadcast to [K, H, W, C] and any
  condition repeated K times."""
  x0, cond = conditioning.split(example)
  return conditioning.join(jnp.broadcast_to(x0, draws.eps.shape),
                           conditioning.repeat_cond(cond, draws.num_draws))


def null_loss(apply_fn: ApplyFn, init_fn: Callable[[jax.Array], Params], keys: jax.Array,
              schedule: Schedule, queries, draws: Draws, *,
              parameterization: Parameterization = "eps") -> jax.Array:
  """L_null of each query: its forget loss averaged over freshly initialised models.

      L_null(x_q) = 1/R Σ_r 1/K Σ_k ℓ(θ_r; x_q, t_k, ε_k),   θ_r = init_fn(keys[r]).

  Args:
    apply_fn: the model.
    init_fn: ``init_fn(key) -> params``.
    keys: R PRNG keys, [R].
    schedule: the noise schedule.
    queries: [Q, H, W, C].
    draws: the forget draws (the same ones unlearning measures L_forget with).
    parameterization: how the network output is read.

  Returns:
    L_null, [Q].
  """
  if keys.ndim != 1 or keys.shape[0] < 1:
    raise ValueError(f"keys must be a 1-d array of R >= 1 PRNG keys, got shape {keys.shape}")
  f = measurement_fn("loss", apply_fn, schedule, draws, parameterization=parameterization)

  def one_model(key):
    p = init_fn(key)
    return jax.vmap(lambda q: f(p, q))(queries)

  return jnp.mean(jax.lax.map(one_model, keys), axis=0)


def ewc_fisher(apply_fn: ApplyFn, params: Params, schedule: Schedule, images, draws: Draws, *,
               parameterization: Parameterization = "eps", batch_size: int | None = None,
               chunk_size: int | None = None) -> Params:
  """The diagonal empirical Fisher F of the training loss at θ*, for the EWC penalty.

      F_j = 1/(N K) Σ_{i,k} (∂ℓ(θ*; x_i, t_k, ε_k)/∂θ_j)²

  (``jattr.curvature.fit_diagonal`` with ``estimation_mode="fisher_empirical"``).

  Returns:
    F, a pytree like ``params``.
  """

  return fit_diagonal(apply_fn, params, schedule, images, draws,
                      estimation_mode="fisher_empirical", batch_size=batch_size,
                      chunk_size=chunk_size, parameterization=parameterization).diag


# ----------------------------------------------------------------------------- skew


def skew(loss_u, loss_o, c: float = DEFAULT_SKEW_CONSTANT):
  """The normalised skew (ℓ_u − ℓ_o) / (ℓ_u + ℓ_o + c), elementwise.

  Zero where ℓ_u = ℓ_o, and skew(a, b) = −skew(b, a).
  """
  return (loss_u - loss_o) / (loss_u + loss_o + c)


def skew_scores(losses_u, losses_o, c: float = DEFAULT_SKEW_CONSTANT):
  """τ_i = 1/K Σ_k skew(ℓ_u,ik, ℓ_o,ik).

  Args:
    losses_u: unlearned-model losses [..., N, K].
    losses_o: original-model losses [N, K] (broadcast against ``losses_u``).
    c: the constant c > 0 keeping the ratio finite.

  Returns:
    τ, [..., N].
  """
  if losses_u.shape[-2:] != losses_o.shape[-2:]:
    raise ValueError(f"losses_u [..., N, K] and losses_o [N, K] must end in the same (N, K), "
                     f"got {losses_u.shape} and {losses_o.shape}")
  return jnp.mean(skew(losses_u, losses_o, c), axis=-1)


# ----------------------------------------------------------------------------- unlearning


def _optimizer(config: UnlearnConfig) -> optax.GradientTransformation:
  if config.optimizer == "adam":
    return optax.adam(config.learning_rate)
  return optax.sgd(config.learning_rate)


def _check_inputs(params, train_images, queries, null, draws, config, fisher, mask):
  if (conditioning.split(train_images)[1] is None) != (conditioning.split(queries)[1] is None):
    raise ValueError("a conditional model needs the condition of the training images and of "
                     "the queries ((images, cond) for both); got it for only one of them")
  for name, x in (("train_images", train_images), ("queries", queries)):
    x, cond = conditioning.split(x)
    conditioning.check_cond(cond, x.shape[0], f"{name}' cond")
  train_images, queries = conditioning.images(train_images), conditioning.images(queries)
  if queries.ndim != 4 or queries.shape[1:] != draws.eps.shape[1:]:
    raise ValueError(f"queries must be [Q, *{tuple(draws.eps.shape[1:])}] (the draws' image "
                     f"shape), got {queries.shape}")
  if train_images.ndim != 4 or train_images.shape[1:] != queries.shape[1:]:
    raise ValueError(f"train_images must be [N, *{tuple(queries.shape[1:])}], got "
                     f"{train_images.shape}")
  if jnp.shape(null) != (queries.shape[0],):
    raise ValueError(f"null_loss must have shape [Q]=({queries.shape[0]},), got "
                     f"{jnp.shape(null)}")
  if config.ewc_weight > 0 and fisher is None:
    raise ValueError(f"config.ewc_weight={config.ewc_weight} needs fisher= (see ewc_fisher)")
  if mask is not None and jax.tree.structure(mask) != jax.tree.structure(params):
    raise ValueError("mask must have the structure of params (see trainable_mask)")


def make_unlearn_fn(apply_fn: ApplyFn, schedule: Schedule, draws: Draws, config: UnlearnConfig, *,
                    mask: Params | None = None, parameterization: Parameterization = "eps"):
  """Builds the single-query kernel ``unlearn(params, fisher, data, query, l_null, key)``.

  The kernel runs a ``lax.while_loop`` until L_forget ≥ ρ·L_null (if bounded) or the
  step budget, and returns ``(params_u, (forget_loss [2], retain_loss, steps,
  rejected))``: L_forget at θ* and at θ_u, L_retain of the last accepted
  evaluation, the number of steps tried and how many were rejected. It is pure;
  ``vmap`` it over (query, l_null) to unlearn many queries.

  Each iteration makes ONE forward/backward pass, on the retain batch and the K
  forget draws concatenated, at a *proposed* θ. Its L_forget decides whether the
  proposal is accepted (bounded: L_forget ≤ L_null; iteration 0, at θ*, always);
  an accepted θ takes an optimizer step from its own gradient to give the next
  proposal, a rejected one is replaced by the last accepted θ plus half the
  previous step. So the model is compiled once per program, and the step test
  costs nothing extra.

  Args:
    apply_fn, schedule: the model and its noise schedule.
    draws: the forget draws L_forget and L_null are measured on.
    config: the ``UnlearnConfig``.
    mask: static trainable mask (``trainable_mask``); ``None``: all parameters.
    parameterization: how the network output is read.

  Returns:
    The kernel described above. ``fisher`` may be None unless ``config.ewc_weight > 0``;
    ``data`` is [N, H, W, C]; ``key`` draws the retain batches (iteration n uses
    ``fold_in(key, n)``, so equal keys give every query the same retain stream).
  """
  optimizer = _optimizer(config)
  T = schedule.num_timesteps
  use_retain = config.retain_weight > 0
  k = draws.num_draws

  def unlearn(params0, fisher, data, query, l_null, key):
    n = conditioning.count(data)
    indices = jnp.arange(n, dtype=jnp.int32)
    eps_f = draws.eps.astype(conditioning.images(query).dtype)
    x_f = _under_draws(query, draws)  # the query (and its condition) under the K draws

    def objective(p, it):
      """J(p) and (L_retain, L_forget), from one pass over [retain batch; K draws]."""
      x0, t, eps = x_f, draws.t, eps_f
      if use_retain:
        xr, tr, er = draw_batch(jax.random.fold_in(key, it), data, indices, n,
                                config.retain_batch_size, T)
        x0, t, eps = (jax.tree.map(lambda a, b: jnp.concatenate([a, b]), xr, x0),
                      jnp.concatenate([tr, t]), jnp.concatenate([er, eps]))
      losses = per_example_loss(apply_fn, p, schedule, x0, t, eps, parameterization)
      l_f = jnp.mean(losses[-k:])
      l_r = jnp.mean(losses[:-k]) if use_retain else jnp.zeros((), l_f.dtype)
      bounded_f = jnp.minimum(l_f, l_null) if config.bounded else l_f
      total = config.retain_weight * l_r - config.forget_weight * bounded_f
      if config.ewc_weight > 0:
        sq = jax.tree.map(lambda f, a, b: jnp.sum(f * jnp.square(a - b)), fisher, p, params0)
        total = total + 0.5 * config.ewc_weight * sum(jax.tree.leaves(sq))
      return total, (l_r, l_f)

    def cond(c):
      return (c["it"] <= config.num_steps) & ~c["done"]

    def body(c):
      (_, (l_r, l_f)), g = jax.value_and_grad(objective, has_aux=True)(c["proposal"], c["it"])
      accept = (c["it"] == 0) | (l_f <= l_null) if config.bounded else jnp.ones((), bool)
      pick = lambda a, b: jax.tree.map(lambda x, y: jnp.where(accept, x, y), a, b)  # noqa: E731
      upd, opt = optimizer.update(_apply_mask(mask, g), c["opt"], c["proposal"])
      upd = _apply_mask(mask, upd)
      new = dict(
          it=c["it"] + 1,
          accepted=pick(c["proposal"], c["accepted"]),
          opt=pick(opt, c["opt"]),
          update=pick(upd, c["update"]),
          scale=jnp.where(accept, c["scale"], 0.5 * c["scale"]),
          forget=jnp.where(c["it"] == 0, jnp.stack([l_f, l_f]),
                           c["forget"].at[1].set(jnp.where(accept, l_f, c["forget"][1]))),
          retain=jnp.where(accept, l_r, c["retain"]),
          rejected=c["rejected"] + (~accept).astype(jnp.int32),
          done=accept & (l_f >= config.stop_ratio * l_null) if config.bounded
          else jnp.zeros((), bool))
      new["proposal"] = optax.apply_updates(
          new["accepted"], jax.tree.map(lambda u: new["scale"] * u, new["update"]))
      return new

    dtype = conditioning.images(query).dtype
    zero = jnp.zeros((), dtype)
    init = dict(it=jnp.zeros((), jnp.int32), proposal=params0, accepted=params0,
                opt=optimizer.init(params0), update=jax.tree.map(jnp.zeros_like, params0),
                scale=jnp.ones((), dtype), forget=jnp.zeros((2,), dtype),
                retain=zero, rejected=jnp.zeros((), jnp.int32), done=jnp.zeros((), bool))
    c = jax.lax.while_loop(cond, body, init)
    return c["accepted"], (c["forget"], c["retain"], c["it"] - 1, c["rejected"])

  return unlearn


def unlearn(apply_fn: ApplyFn, params: Params, schedule: Schedule, train_images, queries,
            null: jax.Array, key: jax.Array, draws: Draws, config: UnlearnConfig, *,
            mask: Params | None = None, fisher: Params | None = None,
            query_chunk_size: int | None = None,
            parameterization: Parameterization = "eps",
            progress: Progress | None = None) -> UnlearnResult:
  """Unlearns each query from its own copy of θ*, all queries vmapped.

  Args:
    apply_fn, params, schedule: the trained model θ*.
    train_images: the retain set (the training data), [N, H, W, C], or the
      conditional examples ``(images, cond)``.
    queries: [Q, H, W, C], or ``(images, cond)`` (a sample with its condition).
    null: L_null per query, [Q] (``null_loss``).
    key: PRNG key of the retain batches (shared by all queries).
    draws: the forget draws (K of them).
    config: the ``UnlearnConfig``.
    mask: trainable mask (``trainable_mask``); ``None``: all parameters.
    fisher: EWC Fisher (``ewc_fisher``), needed iff ``config.ewc_weight > 0``.
    query_chunk_size: queries unlearned at once (vmapped); chunks run in sequence,
      from a host loop over one compiled chunk program.
    parameterization: how the network output is read.
    progress: called after each query chunk with queries done, stage ``"unlearn"``
      (``jattr.progress``).

  Returns:
    An ``UnlearnResult`` holding the Q unlearned parameter sets.
  """
  train_images, queries = conditioning.asarray(train_images), conditioning.asarray(queries)
  null = jnp.asarray(null, conditioning.images(queries).dtype)
  _check_inputs(params, train_images, queries, null, draws, config, fisher, mask)
  kernel = make_unlearn_fn(apply_fn, schedule, draws, config, mask=mask,
                           parameterization=parameterization)

  def chunk_rows(args, chunk):
    params, fisher, data, key = args
    return jax.vmap(lambda q, ln: kernel(params, fisher, data, q, ln, key))(*chunk)

  p, (l_f, l_r, steps, rejected) = apply_chunks(
      chunk_rows, (params, fisher, train_images, key), (queries, null),
      chunk_size=query_chunk_size, progress=progress, desc="unlearn")
  return UnlearnResult(params=p, forget_loss=l_f, null_loss=null, retain_loss=l_r,
                       steps=steps, rejected=rejected)


def mucs_scores(apply_fn: ApplyFn, params: Params, schedule: Schedule, train_images, queries,
                null: jax.Array, key: jax.Array, draws: Draws, config: UnlearnConfig, *,
                mask: Params | None = None, fisher: Params | None = None,
                original_draws: Draws | None = None,
                skew_constant: float = DEFAULT_SKEW_CONSTANT,
                query_chunk_size: int | None = None, train_chunk_size: int | None = None,
                return_losses: bool = False,
                parameterization: Parameterization = "eps",
                progress: Progress | None = None) -> MucsResult:
  """τ[q, i]: unlearn each query (``unlearn``), then the skew of every training loss.

      τ[q, i] = 1/K Σ_k skew(ℓ(θ_u^q; x_i, t_k, ε_k), ℓ(θ*; x_i, t'_k, ε'_k))

  with (t', ε') = (t, ε) (noise-consistent, the default) or ``original_draws``
  (the independent-noise ablation). Unlearning and scoring are fused per chunk of
  queries, so only ``query_chunk_size`` unlearned models exist at a time; the
  chunks run from a host loop over one compiled chunk program
  (``jattr.grads.loop_chunks``), one ``progress`` call per chunk.

  Args:
    apply_fn, params, schedule, train_images, queries, null, key, draws, config,
      mask, fisher, query_chunk_size, parameterization: as in ``unlearn``. The
      scoring uses the same ``draws`` as the forget loss.
    original_draws: draws for the original model's losses; ``None``: ``draws``.
    skew_constant: c of the skew.
    train_chunk_size: training examples per ``vmap`` chunk when scoring.
    return_losses: also return the unlearned models' per-draw training losses
      [Q, N, K] (``MucsResult.losses``).
    progress: called after each query chunk with queries done, stage ``"mucs"``
      (``jattr.progress``).

  Returns:
    A ``MucsResult``: scores [Q, N] (τ > 0: proponent) and the diagnostics.
  """
  train_images, queries = conditioning.asarray(train_images), conditioning.asarray(queries)
  null = jnp.asarray(null, conditioning.images(queries).dtype)
  _check_inputs(params, train_images, queries, null, draws, config, fisher, mask)
  o_draws = draws if original_draws is None else original_draws
  if o_draws.eps.shape != draws.eps.shape:
    raise ValueError(f"original_draws must match draws' shape {draws.eps.shape}, got "
                     f"{o_draws.eps.shape}")
  kernel = make_unlearn_fn(apply_fn, schedule, draws, config, mask=mask,
                           parameterization=parameterization)

  losses_o = per_draw_losses(apply_fn, params, schedule, train_images, o_draws,
                             parameterization=parameterization, chunk_size=train_chunk_size)

  def chunk_rows(args, chunk):
    params, fisher, data, key, losses_o = args

    def one(q, ln):
      p_u, diag = kernel(params, fisher, data, q, ln, key)
      losses_u = per_draw_losses(apply_fn, p_u, schedule, data, draws,
                                 parameterization=parameterization, chunk_size=train_chunk_size)
      tau = skew_scores(losses_u, losses_o, skew_constant)
      return (tau, diag, losses_u) if return_losses else (tau, diag)

    return jax.vmap(one)(*chunk)

  out = apply_chunks(chunk_rows, (params, fisher, train_images, key, losses_o), (queries, null),
                     chunk_size=query_chunk_size, progress=progress, desc="mucs")
  scores, (l_f, l_r, steps, rejected) = out[:2]
  return MucsResult(scores=scores, unlearn=UnlearnResult(
      params=None, forget_loss=l_f, null_loss=null, retain_loss=l_r, steps=steps,
      rejected=rejected), losses=out[2] if return_losses else None)


# ---------------------------------------------------------------------------------
# One call: a variant's scores for an in-memory model (jattr mucs, the LDS harness)
# ---------------------------------------------------------------------------------

MUCS_VARIANTS = ("mucs", "no_bound", "independent_noise", "baseline")
"""The unlearning variants, one code path:

    mucs               retain + bounded mirrored forget (λ = 0.2, stop at 0.95·L_null)
    no_bound           the same objective without the min, the stop and the rejection
    independent_noise  MUCS, but the original model's losses use other draws
    baseline           gradient ascent + EWC (Wang et al. 2024), no bound, no retain
"""


def variant_config(variant: str, **overrides):
  """The ``UnlearnConfig`` of a variant, with explicit overrides (None ignored)."""
  if variant not in MUCS_VARIANTS:
    raise ValueError(f"variant must be one of {MUCS_VARIANTS}, got {variant!r}")
  overrides = {k: v for k, v in overrides.items() if v is not None}
  if variant == "baseline":
    return unlearning_baseline_config(**overrides)
  if variant == "no_bound":
    overrides.setdefault("bounded", False)
  return mucs_config(**overrides)


def mucs_attribute(apply_fn, params, init_fn, schedule, train_images, queries, *,
                   variant: str = "mucs", config=None, trainable: Selector = None,
                   num_draws: int = 10, timesteps: str = "uniform", draw_seed: int = 0,
                   null_models: int = 4, seed: int = 0, skew_constant: float = 1e-6,
                   query_chunk: int | None = 8, train_chunk: int | None = 64,
                   fisher=None, return_losses: bool = False,
                   parameterization: str = "eps",
                   progress: Progress | None = None,
                   wrt: Selector = None) -> tuple[np.ndarray, dict]:
  """τ [Q, N] of one variant for an in-memory model (what ``jattr mucs`` runs).

  Usable as the body of an LDS harness ``score_fn``. Keys: draws from
  ``key(draw_seed)`` (independent-noise draws from ``key(draw_seed + 1)``), L_null
  models from ``fold_in(key(seed), 0)``, retain batches from ``fold_in(key(seed), 1)``.
  ``fisher``: a precomputed EWC Fisher (``ewc_fisher`` on the same draws) to reuse
  across calls; None computes it when the config needs it. ``return_losses`` adds
  the unlearned models' per-draw losses [Q, N, K] to ``info["losses_u"]``.
  ``progress`` is passed to ``mucs_scores`` (one call per query chunk).
  ``trainable`` (or its synonym ``wrt``, the name every other method uses; give at
  most one) is a ``jattr.wrt`` selector of the parameters unlearning moves.

  Returns:
    ``(tau float32 [Q, N], info)``, ``info`` holding the diagnostics and timings.
  """
  if wrt is not None:
    if trainable is not None:
      raise ValueError("give trainable or wrt (the same selector), not both: got "
                       f"trainable={describe(trainable)!r}, wrt={describe(wrt)!r}")
    trainable = wrt

  config = config or variant_config(variant)
  image_shape = tuple(conditioning.images(train_images).shape[1:])
  draws = fixed_draws(jax.random.key(draw_seed), num_draws, image_shape,
                      schedule.num_timesteps, timesteps)
  original = None
  if variant == "independent_noise":
    original = fixed_draws(jax.random.key(draw_seed + 1), num_draws, image_shape,
                           schedule.num_timesteps, timesteps)
  key = jax.random.key(seed)
  mask = trainable_mask(params, trainable) if trainable else None
  t0 = time.perf_counter()
  null = null_loss(apply_fn, init_fn, jax.random.split(jax.random.fold_in(key, 0),
                                                            null_models),
                        schedule, queries, draws, parameterization=parameterization)
  if config.ewc_weight > 0 and fisher is None:
    fisher = ewc_fisher(apply_fn, params, schedule, train_images, draws,
                             parameterization=parameterization, chunk_size=train_chunk)
  t1 = time.perf_counter()
  res = mucs_scores(apply_fn, params, schedule, train_images, queries, null,
                         jax.random.fold_in(key, 1), draws, config, mask=mask, fisher=fisher,
                         original_draws=original, skew_constant=skew_constant,
                         query_chunk_size=query_chunk, train_chunk_size=train_chunk,
                         return_losses=return_losses, parameterization=parameterization,
                         progress=progress)
  tau = np.asarray(jax.block_until_ready(res.scores), np.float32)
  t2 = time.perf_counter()
  u = res.unlearn
  info = {"variant": variant, "config": dataclasses.asdict(config),
          "trainable": describe(trainable),
          "num_draws": num_draws, "timesteps": timesteps, "draw_seed": draw_seed,
          "null_models": null_models, "seed": seed, "skew_constant": skew_constant,
          "forget_loss": np.asarray(u.forget_loss), "null_loss": np.asarray(u.null_loss),
          "steps": np.asarray(u.steps), "rejected": np.asarray(u.rejected),
          "seconds_setup": t1 - t0, "seconds": t2 - t0,
          "seconds_per_query": (t2 - t0) / max(1, conditioning.count(queries))}
  if return_losses:
    info["losses_u"] = np.asarray(res.losses)
  return tau, info
