"""Measurements against direct numpy formulas (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattr.diffusion import draws as draws_lib
from jattr.diffusion import measurements as m
from jattr.diffusion import schedules

T = 20
SHAPE = (4, 4, 1)
D = 16
K = 5


def apply_fn(params, x_t, t):
  """A tiny MLP denoiser: [B, H, W, C], [B] -> [B, H, W, C]."""
  b = x_t.shape[0]
  h = jnp.concatenate([x_t.reshape(b, -1), (t.astype(x_t.dtype) / T)[:, None]], axis=1)
  h = jnp.tanh(h @ params["w1"] + params["b1"])
  return (h @ params["w2"]).reshape(x_t.shape)


def _normal(seed, *shape):
  """Test data from numpy (no jax.random: each new shape would cost an XLA compile)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


@pytest.fixture
def setup(x64):
  schedule = schedules.linear(T)
  params = {"w1": _normal(0, D + 1, 8) / 4, "b1": jnp.zeros(8), "w2": _normal(1, 8, D) / 3}
  t = np.random.default_rng(2).integers(0, T, K)
  draws = draws_lib.Draws(t=jnp.asarray(t, jnp.int32), eps=_normal(3, K, *SHAPE))
  x0 = _normal(4, *SHAPE)
  return schedule, params, draws, x0


def _direct(schedule, params, draws, x0, t=None):
  """Per draw: (target-free) eps, x_t, raw output o, all numpy, via the textbook formula."""
  ab = schedule.alphas_bar
  ts = np.asarray(draws.t) if t is None else np.full(K, t)
  eps = np.asarray(draws.eps)
  x_t = np.stack([np.sqrt(ab[s]) * np.asarray(x0) + np.sqrt(1 - ab[s]) * e
                  for s, e in zip(ts, eps)])
  out = np.asarray(apply_fn(params, jnp.asarray(x_t), jnp.asarray(ts)))
  return ts, eps, x_t, out


def test_measurements_match_formulas(setup):
  schedule, params, draws, x0 = setup
  ts, eps, x_t, o = _direct(schedule, params, draws, x0)
  flat = o.reshape(K, -1)
  expected = {
      "loss": np.mean([np.mean((e - oo) ** 2) for e, oo in zip(eps, o)]),
      "square_norm": np.mean(flat**2),
      "mean": np.mean(flat),
      "l1_norm": np.mean(np.abs(flat).sum(1)),
      "l2_norm": np.mean(np.sqrt((flat**2).sum(1))),
      "linf_norm": np.mean(np.abs(flat).max(1)),
  }
  for name, want in expected.items():
    got = m.measurement_fn(name, apply_fn, schedule, draws)(params, x0)
    np.testing.assert_allclose(got, want, rtol=1e-12, err_msg=name)


def test_elbo_and_weighted_loss(setup):
  schedule, params, draws, x0 = setup
  ts, eps, x_t, o = _direct(schedule, params, draws, x0)
  beta, alpha, ab = schedule.betas, 1 - schedule.betas, np.cumprod(1 - schedule.betas)
  lam = beta**2 / (2 * beta * alpha * (1 - ab))  # β²/(2σ²α(1−ᾱ)) with σ² = β
  sq = ((eps - o) ** 2).reshape(K, -1).sum(1)
  want = T * np.mean(lam[ts] * sq)
  got = m.measurement_fn("elbo", apply_fn, schedule, draws)(params, x0)
  np.testing.assert_allclose(got, want, rtol=1e-12)

  w = np.linspace(0.5, 2.0, T)
  want_w = np.mean(w[ts] * ((eps - o) ** 2).reshape(K, -1).mean(1))
  got_w = m.measurement_fn("weighted_loss", apply_fn, schedule, draws, weights=w)(params, x0)
  np.testing.assert_allclose(got_w, want_w, rtol=1e-12)

  # Default weights are the normalised ELBO weights, for every parameterization.
  for p in ("eps", "x0", "v"):
    elbo = m.measurement_fn("elbo", apply_fn, schedule, draws, parameterization=p)(params, x0)
    wl = m.measurement_fn("weighted_loss", apply_fn, schedule, draws, parameterization=p)(
        params, x0)
    c = {"eps": 1.0, "x0": ab / (1 - ab), "v": ab}[p]
    np.testing.assert_allclose(elbo, wl * T * D * np.mean(lam * c), rtol=1e-10, err_msg=p)


def test_loss_parameterizations_and_loss_at_time(setup):
  schedule, params, draws, x0 = setup
  ts, eps, x_t, o = _direct(schedule, params, draws, x0)
  ab = schedule.alphas_bar[ts][:, None, None, None]
  targets = {"eps": eps, "x0": np.broadcast_to(np.asarray(x0), eps.shape),
             "v": np.sqrt(ab) * eps - np.sqrt(1 - ab) * np.asarray(x0)}
  for p, y in targets.items():
    got = m.measurement_fn("loss", apply_fn, schedule, draws, parameterization=p)(params, x0)
    np.testing.assert_allclose(got, np.mean((y - o) ** 2), rtol=1e-12, err_msg=p)

  _, eps, _, o7 = _direct(schedule, params, draws, x0, t=7)
  got = m.measurement_fn("loss_at_time", apply_fn, schedule, draws, time=7)(params, x0)
  np.testing.assert_allclose(got, np.mean((eps - o7) ** 2), rtol=1e-12)


def test_trajectory_step_measurement(setup):
  schedule, params, draws, x0 = setup
  f = m.trajectory_step_measurement(apply_fn, schedule)
  _, eps, _, o = _direct(schedule, params, draws, x0, t=11)
  np.testing.assert_allclose(f(params, x0, 11, draws.eps), np.mean((eps - o) ** 2), rtol=1e-12)
  np.testing.assert_allclose(f(params, x0, jnp.int32(11), draws.eps[0]),
                             np.mean((eps[0] - o[0]) ** 2), rtol=1e-12)


def test_all_measurements_differentiable_and_vmappable(setup):
  schedule, params, draws, x0 = setup
  xs = jnp.stack([x0, -x0, 0.5 * x0])
  fs = {name: m.measurement_fn(name, apply_fn, schedule, draws,
                               time=3 if name == "loss_at_time" else None)
        for name in m.MEASUREMENTS}

  @jax.jit  # one compilation for all nine
  def run(params, xs):
    return {name: (jax.vmap(f, in_axes=(None, 0))(params, xs), f(params, xs[0]),
                   jax.grad(f)(params, xs[0])) for name, f in fs.items()}

  for name, (vals, single, g) in run(params, xs).items():
    np.testing.assert_allclose(vals[0], single, rtol=1e-12, err_msg=name)
    assert all(np.all(np.isfinite(l)) for l in jax.tree_util.tree_leaves(g)), name


def test_errors(setup):
  schedule, params, draws, x0 = setup
  with pytest.raises(ValueError, match="name must be one of"):
    m.measurement_fn("bogus", apply_fn, schedule, draws)
  with pytest.raises(ValueError, match="time=None"):
    m.measurement_fn("loss_at_time", apply_fn, schedule, draws)
  with pytest.raises(ValueError, match=r"time must be in \[0, T=20\)"):
    m.measurement_fn("loss_at_time", apply_fn, schedule, draws, time=20)
  with pytest.raises(ValueError, match="only used by 'loss_at_time'"):
    m.measurement_fn("loss", apply_fn, schedule, draws, time=3)
  with pytest.raises(ValueError, match=r"weights must have shape \[T\]"):
    m.measurement_fn("weighted_loss", apply_fn, schedule, draws, weights=np.ones(3))
  with pytest.raises(ValueError, match="x0 must be ONE image"):
    m.measurement_fn("loss", apply_fn, schedule, draws)(params, x0[None])
