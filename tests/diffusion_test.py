"""Schedules, forward noising, losses, draws and samplers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattr import diffusion


@pytest.mark.parametrize("sched", [diffusion.linear(1000), diffusion.linear(20),
                                   diffusion.cosine(1000), diffusion.cosine(50)])
def test_schedule_identities(sched):
  ab = sched.alphas_bar
  assert ab.shape == (sched.num_timesteps,)
  assert np.all(np.diff(ab) < 0), "alpha_bar must decrease strictly"
  assert 0 < ab[-1] < ab[0] < 1
  np.testing.assert_allclose(ab, np.cumprod(1 - sched.betas))
  np.testing.assert_allclose(sched.alphas_bar_prev[1:], ab[:-1])
  assert sched.alphas_bar_prev[0] == 1.0
  assert ab[-1] < 1e-2, "the chain should end near pure noise"


def test_schedule_is_hashable_and_validated():
  assert hash(diffusion.linear(10)) == hash(diffusion.linear(10))
  with pytest.raises(ValueError, match="kind"):
    diffusion.Schedule(kind="quadratic")
  with pytest.raises(ValueError, match="num_timesteps"):
    diffusion.Schedule(num_timesteps=0)


def test_q_sample_statistics(x64):
  sched = diffusion.linear(100)
  x0 = jnp.full((4, 4, 1), 0.7)
  t = 40
  eps = jax.random.normal(jax.random.key(0), (20000, 4, 4, 1))
  xt = jax.vmap(lambda e: diffusion.q_sample(sched, x0, t, e))(eps)
  ab = sched.alphas_bar[t]
  np.testing.assert_allclose(xt.mean(), np.sqrt(ab) * 0.7, atol=5e-3)
  np.testing.assert_allclose(xt.var(), 1 - ab, rtol=1e-2)


def test_q_sample_batched_matches_single():
  sched = diffusion.cosine(50)
  x0 = jax.random.normal(jax.random.key(1), (3, 2, 2, 1))
  eps = jax.random.normal(jax.random.key(2), (3, 2, 2, 1))
  t = jnp.array([0, 10, 49])
  batched = diffusion.q_sample(sched, x0, t, eps)
  for i in range(3):
    np.testing.assert_allclose(batched[i], diffusion.q_sample(sched, x0[i], t[i], eps[i]),
                               rtol=1e-6)


def _lin_apply(params, x, t):
  """A per-pixel linear 'denoiser' with a timestep-dependent bias."""
  return params["w"] * x + params["b"][t][:, None, None, None]


def _params():
  """Built at call time, so the dtype follows the x64 fixture."""
  return {"w": jnp.array(0.3), "b": jnp.linspace(-0.1, 0.1, 50)}


@pytest.mark.parametrize("param", ["eps", "x0", "v"])
def test_per_example_loss_matches_formula(param, x64):
  sched = diffusion.linear(50)
  k1, k2 = jax.random.split(jax.random.key(0))
  x0 = jax.random.normal(k1, (5, 3, 3, 2))
  eps = jax.random.normal(k2, (5, 3, 3, 2))
  t = jnp.array([0, 7, 20, 33, 49])
  losses = diffusion.per_example_loss(_lin_apply, _params(), sched, x0, t, eps, param)
  assert losses.shape == (5,)
  ab = sched.alphas_bar[np.asarray(t)][:, None, None, None]
  xt = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps
  out = 0.3 * xt + np.asarray(_params()["b"])[np.asarray(t)][:, None, None, None]
  tgt = {"eps": eps, "x0": x0, "v": np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0}[param]
  np.testing.assert_allclose(losses, ((out - tgt) ** 2).mean((1, 2, 3)), rtol=1e-12)
  single = diffusion.example_loss(_lin_apply, _params(), sched, x0[2], t[2], eps[2], param)
  np.testing.assert_allclose(single, losses[2], rtol=1e-12)
  np.testing.assert_allclose(diffusion.batch_loss(_lin_apply, _params(), sched, x0, t, eps, param),
                             losses.mean(), rtol=1e-12)


def test_per_example_loss_is_independent_across_examples():
  sched = diffusion.linear(50)
  x0 = jax.random.normal(jax.random.key(0), (4, 3, 3, 1))
  eps = jax.random.normal(jax.random.key(1), (4, 3, 3, 1))
  t = jnp.array([1, 2, 3, 4])
  a = diffusion.per_example_loss(_lin_apply, _params(), sched, x0, t, eps)
  b = diffusion.per_example_loss(_lin_apply, _params(), sched, x0.at[2].set(5.0), t, eps)
  np.testing.assert_array_equal(np.delete(a, 2), np.delete(b, 2))
  assert a[2] != b[2]


def test_loss_shape_errors():
  sched = diffusion.linear(50)
  x0 = jnp.zeros((2, 3, 3, 1))
  with pytest.raises(ValueError, match="same shape"):
    diffusion.per_example_loss(_lin_apply, _params(), sched, x0, jnp.zeros(2, int), x0[:1])
  with pytest.raises(ValueError, match="t must have shape"):
    diffusion.per_example_loss(_lin_apply, _params(), sched, x0, jnp.zeros(3, int), x0)
  with pytest.raises(ValueError, match="parameterization"):
    diffusion.per_example_loss(_lin_apply, _params(), sched, x0, jnp.zeros(2, int), x0, "score")


@pytest.mark.parametrize("param", ["eps", "x0", "v"])
def test_to_eps_x0_inverts_the_target(param, x64):
  sched = diffusion.cosine(50)
  x0 = jax.random.normal(jax.random.key(0), (3, 2, 2, 1))
  eps = jax.random.normal(jax.random.key(1), (3, 2, 2, 1))
  t = jnp.array([3, 25, 48])
  xt = diffusion.q_sample(sched, x0, t, eps)
  e, x = diffusion.to_eps_x0(sched, diffusion.target(sched, x0, t, eps, param), xt, t, param)
  np.testing.assert_allclose(e, eps, rtol=1e-9, atol=1e-9)
  np.testing.assert_allclose(x, x0, rtol=1e-9, atol=1e-9)


def test_fixed_draws():
  d = diffusion.fixed_draws(jax.random.key(0), 10, (4, 4, 1), 1000)
  np.testing.assert_array_equal(d.t, np.arange(0, 1000, 100))
  assert d.eps.shape == (10, 4, 4, 1) and d.num_draws == 10
  again = diffusion.fixed_draws(jax.random.key(0), 10, (4, 4, 1), 1000)
  np.testing.assert_array_equal(d.eps, again.eps)
  # Draw k's noise does not depend on K: a longer set extends a shorter one.
  longer = diffusion.fixed_draws(jax.random.key(0), 20, (4, 4, 1), 1000)
  np.testing.assert_array_equal(longer.eps[:10], d.eps)
  r = diffusion.fixed_draws(jax.random.key(0), 100, (2, 2, 1), 1000, timesteps="random")
  assert r.t.min() >= 0 and r.t.max() < 1000 and len(np.unique(r.t)) > 50
  with pytest.raises(ValueError, match="num_draws"):
    diffusion.fixed_draws(jax.random.key(0), 0, (2, 2, 1), 10)
  with pytest.raises(ValueError, match="timesteps"):
    diffusion.fixed_draws(jax.random.key(0), 2, (2, 2, 1), 10, timesteps="linear")


def _oracle(mu, sched):
  """The exact ε-predictor for data x0 = mu (a point mass)."""
  ab = jnp.asarray(sched.alphas_bar, jnp.float32)

  def apply_fn(params, x, t):
    a = ab[t][:, None, None, None]
    return (x - jnp.sqrt(a) * mu) / jnp.sqrt(1 - a)
  return apply_fn


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_are_deterministic_and_recover_a_point_mass(sampler):
  sched = diffusion.linear(100)
  mu = jnp.full((4, 4, 1), 0.5)
  apply_fn = _oracle(mu, sched)
  run = (lambda k, **kw: diffusion.ddpm_sample(apply_fn, None, sched, k, (3, 4, 4, 1), **kw)) \
      if sampler == "ddpm" else \
      (lambda k, **kw: diffusion.ddim_sample(apply_fn, None, sched, k, (3, 4, 4, 1), 20, **kw))
  a = run(jax.random.key(0))
  np.testing.assert_array_equal(a, run(jax.random.key(0)))
  np.testing.assert_allclose(a, 0.5, atol=1e-3)
  traj = run(jax.random.key(0), return_trajectory=True)
  steps = 100 if sampler == "ddpm" else 20
  assert traj.x_t.shape == (steps, 3, 4, 4, 1) and traj.x0_pred.shape == (steps, 3, 4, 4, 1)
  assert np.all(np.diff(np.asarray(traj.t)) < 0) and int(traj.t[-1]) == 0
  np.testing.assert_array_equal(traj.x0, a)


def _gaussian_case(sched, m, s2):
  """Exact ε-predictor for x0 ~ N(m, s²) and, per step, the linear maps it implies:
  E[ε | x_t] = √(1−ᾱ)(x_t − √ᾱ m)/(ᾱs² + 1 − ᾱ), x̂₀ = (x_t − √(1−ᾱ) ε̂)/√ᾱ."""
  ab = np.asarray(sched.alphas_bar)

  def apply_fn(params, x, t):
    a = jnp.asarray(ab)[t][:, None, None, None]
    return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * m) / (a * s2 + 1 - a)

  def eps_x0_coefs(t):  # ε̂ = e1·x + e0,  x̂₀ = c1·x + c0
    a = ab[t]
    v = a * s2 + 1 - a
    e1, e0 = np.sqrt(1 - a) / v, -np.sqrt(1 - a) * np.sqrt(a) * m / v
    return e1, e0, (1 - np.sqrt(1 - a) * e1) / np.sqrt(a), -np.sqrt(1 - a) * e0 / np.sqrt(a)
  return apply_fn, eps_x0_coefs


def test_ddpm_sampler_matches_exact_gaussian_recursion(x64):
  """x0 ~ N(m, s²): each DDPM step is x ← A x + b + σ z, so the output law is
  N(μ, v) with μ, v from the exact recursion; the sampler must match it."""
  sched = diffusion.linear(200)
  m, s2 = 0.3, 0.25
  apply_fn, coefs = _gaussian_case(sched, m, s2)
  ab, abp, beta = sched.alphas_bar, sched.alphas_bar_prev, sched.betas
  mu, var = 0.0, 1.0
  for t in range(199, -1, -1):
    _, _, c1, c0 = coefs(t)
    k_x0 = np.sqrt(abp[t]) * beta[t] / (1 - ab[t])
    k_xt = np.sqrt(1 - beta[t]) * (1 - abp[t]) / (1 - ab[t])
    sig2 = beta[t] * (1 - abp[t]) / (1 - ab[t]) if t > 0 else 0.0
    a_, b_ = k_x0 * c1 + k_xt, k_x0 * c0
    mu, var = a_ * mu + b_, a_**2 * var + sig2
  x = diffusion.ddpm_sample(apply_fn, None, sched, jax.random.key(0), (4000, 1, 1, 1),
                            clip_x0=False, dtype=jnp.float64)
  np.testing.assert_allclose(x.mean(), mu, atol=0.03)
  np.testing.assert_allclose(x.var(), var, rtol=0.08)
  # The discretised chain is close to, not equal to, the data law at T = 200.
  np.testing.assert_allclose(var, s2, rtol=0.15)


def test_ddim_eta0_matches_exact_gaussian_recursion(x64):
  sched = diffusion.linear(200)
  m, s2 = 0.3, 0.25
  apply_fn, coefs = _gaussian_case(sched, m, s2)
  ts = diffusion.ddim_timesteps(200, 50)
  mu, var = 0.0, 1.0
  for i, t in enumerate(ts):
    ap = sched.alphas_bar[ts[i + 1]] if i + 1 < len(ts) else 1.0
    e1, e0, c1, c0 = coefs(t)
    a_ = np.sqrt(ap) * c1 + np.sqrt(1 - ap) * e1
    b_ = np.sqrt(ap) * c0 + np.sqrt(1 - ap) * e0
    mu, var = a_ * mu + b_, a_**2 * var
  y = diffusion.ddim_sample(apply_fn, None, sched, jax.random.key(1), (4000, 1, 1, 1), 50,
                            eta=0.0, clip_x0=False, dtype=jnp.float64)
  np.testing.assert_allclose(y.mean(), mu, atol=0.03)
  np.testing.assert_allclose(y.var(), var, rtol=0.08)
  np.testing.assert_allclose(var, s2, rtol=0.15)


def test_different_keys_give_different_samples():
  sched = diffusion.linear(20)
  apply_fn = lambda p, x, t: 0.5 * x  # noqa: E731
  a = diffusion.ddpm_sample(apply_fn, None, sched, jax.random.key(0), (2, 2, 2, 1))
  b = diffusion.ddpm_sample(apply_fn, None, sched, jax.random.key(1), (2, 2, 2, 1))
  assert not np.allclose(a, b)


def test_first_draws_of_a_larger_set():
  # What the draws module docstring promises: noise always nests, random timesteps
  # nest, uniform ones do not (their spacing is T/K).
  key = jax.random.key(0)
  for mode in ("uniform", "random"):
    small = diffusion.fixed_draws(key, 10, (2, 2, 1), 1000, mode)
    large = diffusion.fixed_draws(key, 20, (2, 2, 1), 1000, mode)
    np.testing.assert_array_equal(small.eps, large.eps[:10])
    assert np.array_equal(small.t, large.t[:10]) == (mode == "random")
  np.testing.assert_array_equal(diffusion.fixed_draws(key, 10, (2, 2, 1), 1000).t[:3],
                                [0, 100, 200])
