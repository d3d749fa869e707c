"""Measurement (model-output) functions f(θ; x₀) for attribution.

An attribution method explains a scalar *measurement* of the model on one example.
Each measurement here is a function of ONE clean image x₀ [H, W, C], averaged over a
fixed set of K (t, ε) draws (``jattr.diffusion.Draws``), so that every model and
every example sees the same noise ("noise-consistent"). With

    x_t^k = √ᾱ_{t_k} x₀ + √(1−ᾱ_{t_k}) ε_k,     o_k = apply_fn(θ, x_t^k, t_k)  ∈ R^D,

(D = H·W·C; ``o_k`` is the raw network output, read as ε̂, x̂₀ or v̂ according to
``parameterization``) the measurements are

    loss          = 1/K Σ_k 1/D ‖y_k − o_k‖²             (y_k = the parameterization's target)
    square_norm   = 1/K Σ_k 1/D ‖o_k‖²                    (D-TRAK's "mean-squared-l2-norm")
    mean          = 1/K Σ_k 1/D Σ_d o_{k,d}
    l1_norm       = 1/K Σ_k ‖o_k‖₁                        (true norms, not pixel means)
    l2_norm       = 1/K Σ_k ‖o_k‖₂
    linf_norm     = 1/K Σ_k ‖o_k‖_∞
    weighted_loss = 1/K Σ_k w[t_k] · 1/D ‖y_k − o_k‖²     (w = ``weights`` [T])
    loss_at_time  = 1/K Σ_k 1/D ‖y_k − o_k‖²  with every t_k replaced by ``time``
    elbo          = T/K Σ_k λ_{t_k} ‖ε_k − ε̂_k‖²           (sum over pixels; see ``elbo_weights``)

The normalisations follow D-TRAK's released code (Zheng et al., ICLR 2024):
``loss``, ``square_norm`` and ``mean`` are pixel means (``F.mse_loss`` / ``.mean()``),
while the three norms are the vector norms of the whole output of one draw
(``torch.norm(out.reshape(1, -1), p)``). A constant factor in f only rescales the
features; TRAK's scale-free damping (``jattr.methods.trak``) absorbs it.

The output-based measurements (``square_norm``, ``mean``, the norms) act on the raw
network output ``o``, i.e. on ε̂ only for an ε-parameterised model, as in D-TRAK.
``elbo`` always converts the output to ε̂ (``losses.to_eps_x0``), so it is the same
bound whatever the parameterization.

Every function is for ONE example; batch it with ``vmap`` (or with
``jattr.grads.per_example_grads`` for its gradients). The model sees the K draws of
one example as one batch of K, so a measurement costs one network call.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jattr.diffusion import conditioning
from jattr.diffusion.draws import Draws
from jattr.diffusion.losses import check_parameterization, target, to_eps_x0
from jattr.diffusion.schedules import Schedule, q_sample
from jattr.types import ApplyFn, Parameterization, Params

MEASUREMENTS = ("loss", "square_norm", "mean", "l1_norm", "l2_norm", "linf_norm",
                "weighted_loss", "loss_at_time", "elbo")

MeasurementFn = Callable[[Params, jax.Array], jax.Array]
"""``f(params, x0 [H, W, C]) -> scalar``, or ``f(params, (x0, cond))`` for one
conditional example (``cond`` without a batch axis)."""


def elbo_weights(schedule: Schedule) -> np.ndarray:
  """Per-timestep weights λ_t of the ε-MSE terms of the DDPM variational bound.

  For the reverse process p_θ(x_{t−1} | x_t) = N(μ_θ(x_t, t), σ_t² I) with the
  ε-parameterised mean μ_θ = (x_t − β_t/√(1−ᾱ_t) · ε̂) / √α_t and σ_t² = β_t
  (Ho et al. 2020, Eq. 12), the bound on −log p_θ(x₀) is

      L_vlb(θ; x₀) = Σ_{t=0}^{T−1} λ_t E_ε ‖ε − ε̂_θ(x_t, t)‖² + C,
      λ_t = β_t² / (2 σ_t² α_t (1 − ᾱ_t)) = β_t / (2 α_t (1 − ᾱ_t)),

  with ‖·‖² summed over pixels. jattr's t = 0 is Ho's t = 1, where the term is the
  Gaussian decoder −log N(x₀; μ_θ(x₁, 1), β₁ I), which gives the same formula
  (λ₀ = 1/(2α₀)). C collects the prior term KL(q(x_T|x₀) ‖ N(0, I)) and the Gaussian
  normalisers; it does not depend on θ and is dropped.

  Args:
    schedule: the noise schedule.

  Returns:
    λ, float64 array of shape [T].
  """
  return schedule.betas / (2.0 * schedule.alphas * (1.0 - schedule.alphas_bar))


def _to_eps_mse_factor(schedule: Schedule, parameterization: str) -> np.ndarray:
  """c_t with ‖ε − ε̂‖² = c_t ‖y − o‖² for the parameterization's target y.

  ε̂ − ε = −√(ᾱ/(1−ᾱ)) (x̂₀ − x₀) for x₀-prediction and √ᾱ (v̂ − v) for v-prediction.
  """
  if parameterization == "eps":
    return np.ones(schedule.num_timesteps)
  if parameterization == "x0":
    return schedule.snr()
  return schedule.alphas_bar


def default_loss_weights(schedule: Schedule, parameterization: Parameterization = "eps"
                         ) -> np.ndarray:
  """Default ``weights`` of ``weighted_loss``: the ELBO weights, normalised.

      w_t = λ_t c_t / mean_s(λ_s c_s),

  λ = ``elbo_weights(schedule)`` and c_t converts the parameterization's squared
  error to the ε squared error (1 for ε, ᾱ_t/(1−ᾱ_t) for x₀, ᾱ_t for v). The
  weights average 1 over t, so ``weighted_loss`` stays on the scale of ``loss``,
  and ``weighted_loss = elbo / (T · D · mean_t(λ_t c_t))`` for every parameterization.

  Returns:
    w, float64 array of shape [T].
  """
  check_parameterization(parameterization)
  w = elbo_weights(schedule) * _to_eps_mse_factor(schedule, parameterization)
  return w / np.mean(w)


def _pixel_axes(x):
  return tuple(range(1, x.ndim))


def _noised_outputs(apply_fn, params, schedule, x0, t, eps, cond=None):
  """(x_t, o) for K draws of one example: x0 [H,W,C], t [K], eps [K,H,W,C]; the
  example's condition (no batch axis) is repeated for the K draws."""
  xs = jnp.broadcast_to(x0, eps.shape)
  x_t = q_sample(schedule, xs, t, eps)
  cond = conditioning.repeat_cond(cond, eps.shape[0])
  return xs, x_t, conditioning.apply_model(apply_fn, params, x_t, t, cond)


def measurement_fn(name: str, apply_fn: ApplyFn, schedule: Schedule, draws: Draws, *,
                   parameterization: Parameterization = "eps", time: int | None = None,
                   weights=None) -> MeasurementFn:
  """Builds the measurement ``f(params, x0) -> scalar`` named ``name``.

  See the module docstring for the formulas. For one image x₀ and the K draws
  (t_k, ε_k) of ``draws`` the model is called once, on the batch of the K noised
  images x_t^k.

  Args:
    name: one of ``MEASUREMENTS``.
    apply_fn: ``apply_fn(params, x_t [K,H,W,C], t [K]) -> [K,H,W,C]``, or
      ``apply_fn(params, x_t, t, cond)`` for a conditional model; ``f`` is then
      called on one example ``(x0, cond)`` and the model sees ``cond`` repeated
      over the K draws.
    schedule: the noise schedule the model was trained with.
    draws: the fixed draws, ``t`` [K] and ``eps`` [K, H, W, C].
    parameterization: how the network output is read (``"eps"``, ``"x0"``, ``"v"``);
      sets the target of the loss-type measurements.
    time: for ``loss_at_time`` only (required there): the single timestep in
      [0, T) at which all K noises ε_k are used; ``draws.t`` is ignored.
    weights: for ``weighted_loss`` only: per-timestep weights [T]; defaults to
      ``default_loss_weights(schedule, parameterization)`` (the normalised ELBO
      weights).

  Returns:
    ``f(params, x0 [H, W, C]) -> scalar`` (``f(params, (x0, cond))`` for conditional
    examples), pure and jit/vmap/grad-compatible.
  """
  if name not in MEASUREMENTS:
    raise ValueError(f"name must be one of {MEASUREMENTS}, got {name!r}")
  check_parameterization(parameterization)
  T = schedule.num_timesteps
  if not isinstance(draws, Draws):
    raise TypeError(f"draws must be a jattr.diffusion.Draws, got {type(draws).__name__}")
  if draws.t.ndim != 1 or draws.eps.shape[:1] != draws.t.shape:
    raise ValueError(f"draws must have t [K] and eps [K, H, W, C], got t {draws.t.shape} "
                     f"and eps {draws.eps.shape}")
  if time is not None and name != "loss_at_time":
    raise ValueError(f"time is only used by 'loss_at_time', got time={time!r} for {name!r}")
  if weights is not None and name != "weighted_loss":
    raise ValueError(f"weights are only used by 'weighted_loss', got weights for {name!r}")
  if name == "loss_at_time":
    if time is None:
      raise ValueError("loss_at_time needs time=<int timestep in [0, T)>, got time=None")
    if isinstance(time, (int, np.integer)) and not 0 <= int(time) < T:
      raise ValueError(f"time must be in [0, T={T}), got {time}")
  w = None
  if name == "weighted_loss":
    w = default_loss_weights(schedule, parameterization) if weights is None else weights
    if jnp.shape(w) != (T,):
      raise ValueError(f"weights must have shape [T]=({T},), got {jnp.shape(w)}")
  return _Measurement(name, apply_fn, schedule, parameterization, time, draws, w)


class _Measurement:
  """``f(params, x0) -> scalar`` of ``measurement_fn``, equal to another when every
  input is (the model function by identity, the draws and weights by value).

  So two calls of ``measurement_fn`` with the same inputs give functions that share
  their compiled programs: ``jax.jit`` caches a static argument by hash and
  equality, and every chunk kernel of jattr holds its function as one. The draws'
  digest is taken once, on the host; draws that are tracers (a ``measurement_fn``
  built inside a caller's ``jit``) make the function equal only to itself.
  """

  __slots__ = ("name", "apply_fn", "schedule", "parameterization", "time", "draws",
               "weights", "_key", "__weakref__")  # weakref: jax.jit(f) works

  def __init__(self, name, apply_fn, schedule, parameterization, time, draws, weights):
    self.name, self.apply_fn, self.schedule = name, apply_fn, schedule
    self.parameterization, self.time, self.draws, self.weights = (parameterization, time,
                                                                  draws, weights)
    arrays = [draws.t, draws.eps] + ([] if weights is None else [weights])
    self._key = ("object", id(self))  # equal only to itself, unless:
    if not any(isinstance(a, jax.core.Tracer) for a in arrays + [time]):
      h = hashlib.sha256()
      for a in arrays:
        a = np.asarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
      key = (name, schedule, parameterization, None if time is None else int(time),
             h.hexdigest())
      try:
        hash(key)
        self._key = key
      except TypeError:  # an unhashable schedule-like object: identity it is
        pass

  def __hash__(self):
    return hash(self._key)

  def __eq__(self, other):
    return (isinstance(other, _Measurement) and self._key == other._key
            and self.apply_fn == other.apply_fn)

  def __repr__(self):
    return f"measurement_fn({self.name!r}, K={self.draws.t.shape[0]})"

  def __call__(self, params: Params, x0: jax.Array) -> jax.Array:
    name, apply_fn, schedule, draws = self.name, self.apply_fn, self.schedule, self.draws
    x0, cond = conditioning.split(x0)
    image_shape = tuple(draws.eps.shape[1:])
    if x0.shape != image_shape:
      raise ValueError(f"x0 must be ONE image of shape {image_shape} (the draws' image "
                       f"shape), got {x0.shape}; batch examples with vmap")
    t, eps = draws.t, draws.eps.astype(x0.dtype)
    if name == "loss_at_time":
      t = jnp.full_like(t, self.time)
    xs, x_t, out = _noised_outputs(apply_fn, params, schedule, x0, t, eps, cond)
    axes = _pixel_axes(out)
    if name in ("loss", "loss_at_time", "weighted_loss"):
      mse = jnp.mean(jnp.square(target(schedule, xs, t, eps, self.parameterization) - out), axes)
      if name == "weighted_loss":
        mse = jnp.asarray(self.weights, out.dtype)[t] * mse
      return jnp.mean(mse)
    if name == "elbo":
      eps_hat, _ = to_eps_x0(schedule, out, x_t, t, self.parameterization)
      sq = jnp.sum(jnp.square(eps - eps_hat), axes)
      lam = jnp.asarray(elbo_weights(schedule), out.dtype)[t]
      return schedule.num_timesteps * jnp.mean(lam * sq)
    if name == "square_norm":
      per_draw = jnp.mean(jnp.square(out), axes)
    elif name == "mean":
      per_draw = jnp.mean(out, axes)
    elif name == "l1_norm":
      per_draw = jnp.sum(jnp.abs(out), axes)
    elif name == "l2_norm":
      per_draw = jnp.sqrt(jnp.sum(jnp.square(out), axes))
    else:  # linf_norm
      per_draw = jnp.max(jnp.abs(out), axes)
    return jnp.mean(per_draw)


def trajectory_step_measurement(apply_fn: ApplyFn, schedule: Schedule, *,
                                parameterization: Parameterization = "eps"):
  """The per-step loss of Journey-TRAK (Georgiev et al. 2023).

  At sampler step t the sampler predicts x̂₀^(t). Journey-TRAK attributes the step
  through the diffusion loss of that prediction re-noised at the same t:

      f_t(θ; x̂₀) = 1/K Σ_k 1/D ‖y_k − o_θ(x_t^k, t)‖²,
      x_t^k = √ᾱ_t x̂₀ + √(1−ᾱ_t) ε_k,

  with y_k the parameterization's target. Used on a training image x_i in place of
  x̂₀ it gives the train-side features of the same step.

  Args:
    apply_fn: ``apply_fn(params, x_t [K,H,W,C], t [K]) -> [K,H,W,C]``.
    schedule: the noise schedule.
    parameterization: how the network output is read.

  Returns:
    ``f(params, x0_pred [H,W,C], t, eps) -> scalar`` where ``t`` is a scalar int
    timestep and ``eps`` is one noise [H,W,C] or K noises [K,H,W,C] (averaged);
    ``x0_pred`` may be a conditional example ``(x0_pred, cond)``.
  """
  check_parameterization(parameterization)

  def f(params: Params, x0_pred: jax.Array, t, eps: jax.Array) -> jax.Array:
    x0_pred, cond = conditioning.split(x0_pred)
    if eps.shape == x0_pred.shape:
      eps = eps[None]
    if eps.shape[1:] != x0_pred.shape:
      raise ValueError(f"eps must have shape {x0_pred.shape} or [K, *{x0_pred.shape}] "
                       f"(x0_pred's shape), got {eps.shape}")
    if jnp.ndim(t) != 0:
      raise ValueError(f"t must be a scalar timestep, got shape {jnp.shape(t)}")
    eps = eps.astype(x0_pred.dtype)
    tk = jnp.full((eps.shape[0],), t, jnp.int32)
    xs, _, out = _noised_outputs(apply_fn, params, schedule, x0_pred, tk, eps, cond)
    err = target(schedule, xs, tk, eps, parameterization) - out
    return jnp.mean(jnp.square(err))

  return f
