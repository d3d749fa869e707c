"""Random projections: exact blockwise regeneration, JL inner products, structured = Kronecker."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattr.diffusion import draws as draws_lib
from jattr.diffusion import measurements
from jattr.diffusion import schedules
from jattr.features import projection as proj
from jattr.features import structured as st
from jattr.grads import per_example as pe

KINDS = ("gaussian", "rademacher", "sparse")


def _normal(seed, *shape):
  """Test data from numpy (no jax.random: each new shape would cost an XLA compile)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


@pytest.mark.parametrize("kind,num_params,block_size",
                         [("gaussian", 523, 100), ("rademacher", 300, 100), ("rademacher", 37, 64),
                          ("sparse", 37, 64), ("sparse", 300, 100),
                          # whole scatter groups (8 blocks of 1000 rows) and a ragged rest
                          ("sparse", 2 * proj._SCATTER_ROWS + 523, 1000)])
def test_blockwise_equals_materialised(x64, kind, num_params, block_size):
  config = proj.ProjectionConfig(dim=48, kind=kind, seed=3, block_size=block_size, nonzeros=4)
  g = _normal(0, 5, num_params)
  matrix = proj.projection_matrix(config, num_params, jnp.float64)
  assert matrix.shape == (num_params, 48)
  np.testing.assert_allclose(proj.project(config, g), g @ matrix, rtol=1e-12, atol=1e-12)
  if kind == "rademacher":
    np.testing.assert_allclose(np.abs(matrix), 1 / np.sqrt(48), rtol=1e-15)
  if kind == "sparse":  # s = 4 non-zeros ±1/2 per row, one in each block of 12 columns
    m = np.asarray(matrix)
    np.testing.assert_array_equal((m != 0).sum(axis=1), 4)
    np.testing.assert_allclose(np.abs(m[m != 0]), 0.5, rtol=1e-15)
    for block in range(4):
      np.testing.assert_array_equal((m[:, 12 * block:12 * (block + 1)] != 0).sum(axis=1), 1)


def _independent_matrices(config, rows, copies):
  """``copies`` independent [rows, k] draws of P: blocks b = 0, 1, … of one P (each
  block of ``block_size = rows`` rows comes from its own ``fold_in(key, b)``)."""
  m = proj.projection_matrix(config, rows * copies, jnp.float64)
  return np.asarray(m).reshape(copies, rows, config.dim)


@pytest.mark.parametrize("kind,nonzeros", [("rademacher", 4), ("sparse", 1), ("sparse", 4),
                                           ("gaussian", 4)])
def test_inner_product_unbiased_with_the_stated_variance(x64, kind, nonzeros):
  """E[φ_gᵀφ_h] = gᵀh, and Var = (‖g‖²‖h‖² + (gᵀh)² − 2Σ_p g_p²h_p²)/k for the
  Rademacher and sparse P (without the last term for the Gaussian one).

  g and h share a heavy coordinate, so the Σ_p g_p²h_p² term is a third of the
  variance and a wrong variance formula (the Gaussian one for the sparse P, or a
  count-sketch of width k/s without averaging over the s blocks) fails.
  """
  p, k, copies = 16, 32, 8000
  rng = np.random.default_rng(0)
  g, h = rng.standard_normal(p), rng.standard_normal(p)
  g[0], h[0] = 4.0, 3.0
  config = proj.ProjectionConfig(k, kind, seed=5, block_size=p, nonzeros=nonzeros)
  mats = _independent_matrices(config, p, copies)
  est = np.einsum("p,cpk,q,cqk->c", g, mats, h, mats)
  exact = g @ h
  var = ((g @ g) * (h @ h) + exact ** 2 - (0 if kind == "gaussian" else 2) * np.sum(g**2 * h**2)) / k
  # the mean within 4 standard errors; the sample variance within 12 % (its relative
  # standard error is ≈ √((κ − 1)/copies) ≈ 3 % for these estimates' kurtosis κ)
  assert abs(est.mean() - exact) < 4 * np.sqrt(var / copies), (est.mean(), exact)
  assert abs(est.var() / var - 1) < 0.12, est.var() / var


def test_sparse_projection_depends_on_the_seed_only(x64):
  """The same seed gives the same P for any N and chunking; another seed another P."""
  g = _normal(0, 6, 1500)
  config = proj.ProjectionConfig(64, "sparse", seed=2, block_size=256, nonzeros=2)
  a = proj.project(config, g)
  np.testing.assert_array_equal(a[2:4], proj.project(config, g[2:4]))
  other = proj.project(proj.ProjectionConfig(64, "sparse", seed=3, block_size=256, nonzeros=2), g)
  assert not np.allclose(a, other)


def test_same_seed_same_features():
  g = _normal(0, 4, 250)
  a = proj.project(proj.ProjectionConfig(32, seed=7, block_size=64), g)
  b = proj.project(proj.ProjectionConfig(32, seed=7, block_size=64), g)
  c = proj.project(proj.ProjectionConfig(32, seed=8, block_size=64), g)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


def _gradients(n, p, seed):
  """Correlated 'gradients': a shared direction plus noise, so inner products vary."""
  return 0.7 * _normal(seed, 1, p) + _normal(seed + 100, n, p)


@pytest.mark.parametrize("kind", KINDS)
def test_inner_products_preserved(x64, kind):
  p, k = 500, 4096
  g = _gradients(8, p, 1)
  phi = proj.project(proj.ProjectionConfig(k, kind, seed=0, block_size=128), g)
  exact, approx = np.asarray(g @ g.T), np.asarray(phi @ phi.T)
  norms = np.sqrt(np.diag(exact))
  rel = np.abs(approx - exact) / np.outer(norms, norms)
  # Var(φ_iᵀφ_j) ≤ 2‖g_i‖²‖g_j‖²/k: a 5σ bound on the worst of 36 pairs.
  assert rel.max() < 5 * np.sqrt(2 / k), rel.max()


@pytest.mark.parametrize("kind", KINDS)
def test_seed_average_converges(x64, kind):
  p, k, seeds = 200, 64, 64
  g = _gradients(6, p, 2)
  exact = np.asarray(g @ g.T)
  norms = np.sqrt(np.diag(exact))
  grams = []
  for s in range(seeds):
    m = proj.projection_matrix(proj.ProjectionConfig(k, kind, seed=s, block_size=128), p,
                               jnp.float64)
    phi = np.asarray(g @ m)
    grams.append(phi @ phi.T)
  err = lambda gram: (np.abs(gram - exact) / np.outer(norms, norms)).max()
  single = np.mean([err(gr) for gr in grams])
  averaged = err(np.mean(grams, axis=0))
  assert averaged < 5 * np.sqrt(2 / (k * seeds)), averaged
  assert averaged < single / 3, (averaged, single)


def _mlp_fn(params, example):
  h = jnp.tanh(example @ params["w1"])
  return jnp.sum(jnp.sin(h @ params["w2"]))


@pytest.mark.parametrize("kind", ["gaussian", "sparse"])
def test_featurize_fuses_grads_and_projection(x64, kind):
  params = {"w1": _normal(0, 6, 5), "w2": _normal(1, 5, 3)}
  x = _normal(2, 7, 6)
  config = proj.ProjectionConfig(16, kind, seed=1, block_size=8)
  want = jax.jit(lambda p, x: pe.per_example_flat_grads(_mlp_fn, p, x)
                 @ proj.projection_matrix(config, 45, jnp.float64))(params, x)
  for chunk in (None, 3):
    got = proj.featurize(_mlp_fn, params, x, config, chunk_size=chunk)
    np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12)


def test_config_errors():
  with pytest.raises(ValueError, match="kind must be one of"):
    proj.ProjectionConfig(8, kind="count_sketch")
  with pytest.raises(ValueError, match="dim = 10 must be a multiple of nonzeros = 4"):
    proj.ProjectionConfig(10, kind="sparse", nonzeros=4)
  with pytest.raises(ValueError, match="nonzeros must be >= 1"):
    proj.ProjectionConfig(8, kind="sparse", nonzeros=0)
  with pytest.raises(ValueError, match="StructuredConfig.kind must be one of"):
    st.StructuredConfig(dim_in=2, dim_out=2, kind="sparse")
  with pytest.raises(ValueError, match="dim must be >= 1"):
    proj.ProjectionConfig(0)
  with pytest.raises(ValueError, match=r"flat_grads must have shape \[N, P\]"):
    proj.project(proj.ProjectionConfig(8), jnp.ones(5))


# --- structured (Kronecker) projection --------------------------------------------------


def _kron_reference(fn, params, examples, config, weights):
  """φ_l = vec(∂f/∂W_l) @ (P_in ⊗ P_out), from full per-example gradients."""

  @jax.jit  # one compilation instead of one per eager op
  def reference(params, examples):
    grads = pe.per_example_grads(lambda p, e: fn(p, e, st.plain_layer), params, examples)
    feats = []
    for name in sorted(weights):
      w = weights[name](params)
      g = weights[name](grads)  # [N, *w.shape]
      d_in, d_out = int(np.prod(w.shape[:-1])), w.shape[-1]
      p_in, p_out = st.layer_projections(config, name, d_in, d_out, jnp.float64)
      feats.append(g.reshape(g.shape[0], -1) @ jnp.kron(p_in, p_out))
    return jnp.concatenate(feats, axis=1)

  return reference(params, examples)


def test_structured_dense_matches_kronecker(x64):
  T, shape, K = 10, (3, 3, 2), 4
  d = int(np.prod(shape))
  params = {"d1": {"w": _normal(0, d + 1, 7) / 3, "b": jnp.full((7,), 0.1)},
            "d2": {"w": _normal(1, 7, d) / 3}}

  def model(params, x_t, t, layer):
    b = x_t.shape[0]
    h = jnp.concatenate([x_t.reshape(b, -1), (t.astype(x_t.dtype) / T)[:, None]], 1)
    h = jnp.tanh(layer("d1", h, params["d1"]["w"]) + params["d1"]["b"])
    return layer("d2", h, params["d2"]["w"]).reshape(x_t.shape)

  schedule = schedules.linear(T)
  draws = draws_lib.Draws(t=jnp.asarray(draws_lib.uniform_timesteps(T, K)),
                          eps=_normal(2, K, *shape))

  def fn(params, x0, layer):
    apply_fn = functools.partial(model, layer=layer)
    return measurements.measurement_fn("square_norm", apply_fn, schedule, draws)(params, x0)

  x = _normal(3, 5, *shape)
  config = st.StructuredConfig(dim_in=4, dim_out=3, kind="gaussian", seed=2)
  want = _kron_reference(fn, params, x, config, {"d1": lambda p: p["d1"]["w"],
                                                 "d2": lambda p: p["d2"]["w"]})
  got = st.structured_featurize(fn, params, x, config, chunk_size=2)
  assert got.shape == (5, 2 * 4 * 3)
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
  layout = st.structured_layout(fn, params, x[0], config)
  assert list(layout) == ["d1", "d2"] and layout["d2"] == slice(12, 24)


def test_structured_conv_matches_kronecker(x64):
  params = {"c1": _normal(0, 3, 3, 2, 4) / 3, "c2": _normal(1, 2, 2, 4, 3) / 3,
            "head": _normal(2, 3 * 3 * 3)}
  c1 = st.Conv(strides=(1, 1), padding="SAME", dilation=(2, 2))
  c2 = st.Conv(strides=(2, 2), padding=((0, 1), (1, 0)))

  def fn(params, x, layer):
    # One example x [6, 6, 2], seen by the convs as a batch of two views (as the K
    # draws of a measurement are), so positions s run over views and pixels.
    xs = jnp.stack([x, jnp.flip(x, 0)])
    h = jnp.tanh(layer("c1", xs, params["c1"], c1))
    h = layer("c2", h, params["c2"], c2)  # [2, 3, 3, 3]
    return jnp.sum(jnp.sin(h.reshape(2, -1) @ params["head"]))

  x = _normal(3, 3, 6, 6, 2)
  config = st.StructuredConfig(dim_in=5, dim_out=2, kind="rademacher", seed=0)
  want = _kron_reference(fn, params, x, config, {"c1": lambda p: p["c1"],
                                                 "c2": lambda p: p["c2"]})
  got = st.structured_featurize(fn, params, x, config)
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_structured_errors():
  params = {"w": jnp.ones((3, 3))}

  def shared(params, x, layer):
    return jnp.sum(layer("w", layer("w", x, params["w"]), params["w"]))

  with pytest.raises(ValueError, match="called twice"):
    st.structured_featurize(shared, params, jnp.ones((2, 3)), st.StructuredConfig(2, 2))
  with pytest.raises(ValueError, match="Dense needs x"):
    st.apply_layer(st.Dense(), jnp.ones((2, 4)), params["w"])


def test_packed_rademacher_entries_are_fair_independent_signs():
  """The packed-bit generator must give ±1/√k entries, balanced and uncorrelated."""
  from jattr.features.projection import block_matrix
  cfg = proj.ProjectionConfig(dim=100, kind="rademacher", seed=3, block_size=4000)
  m = np.asarray(block_matrix(cfg, 0)) * np.sqrt(100)
  np.testing.assert_allclose(np.abs(m), 1.0, rtol=1e-6)
  assert abs(m.mean()) < 0.01                      # 400k entries: sd of the mean 0.0016
  cols = m.T @ m / m.shape[0]                      # ≈ I; off-diagonal sd 1/√4000 ≈ 0.016
  np.testing.assert_allclose(np.diag(cols), 1.0)
  assert np.abs(cols - np.eye(100)).max() < 0.1
  assert not np.array_equal(m, np.asarray(block_matrix(cfg, 1)) * np.sqrt(100))


def test_run_config_takes_the_sparse_projection_and_keeps_old_configs():
  from jattr.runs import AttributionConfig, RunConfig
  assert "proj_nonzeros" not in RunConfig().to_json()["attribution"]  # dense: as before
  doc = RunConfig(attribution=AttributionConfig(proj_kind="sparse", proj_nonzeros=4)).to_json()
  assert doc["attribution"]["proj_nonzeros"] == 4
  assert RunConfig.from_json(doc).attribution.proj_nonzeros == 4
  with pytest.raises(ValueError, match="proj_dim = 2048: expected a multiple of proj_nonzeros = 3"):
    AttributionConfig(proj_kind="sparse", proj_nonzeros=3)

