"""K-FAC (native layer registry) and EK-FAC against the dense GGN, block by block, in float64.

The comparison with kfac-jax's factors is tests/kfac_jax_test.py (the pinned stack)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jattr.curvature import dense, ekfac, ggn, kfac
from jattr.diffusion import draws as draws_lib
from jattr.diffusion import schedules

T = 50
EXACT = dict(estimation_mode="ggn_exact")


def time_feature(x, t):
  return jnp.broadcast_to(t.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1)) / T,
                          x.shape[:-1] + (1,))


def mlp_apply(p, x, t):
  b = x.shape[0]
  h = jnp.concatenate([x.reshape(b, -1), t[:, None].astype(x.dtype) / T], axis=1)
  h = jnp.tanh(h @ p["l1"]["w"] + p["l1"]["b"])
  return (h @ p["l2"]["w"] + p["l2"]["b"]).reshape(x.shape)


def mlp_params(key, d=4, hidden=3):
  k = jax.random.split(key, 4)
  return {"l1": {"w": jax.random.normal(k[0], (d + 1, hidden)),
                 "b": 0.1 * jax.random.normal(k[1], (hidden,))},
          "l2": {"w": jax.random.normal(k[2], (hidden, d)) / np.sqrt(hidden),
                 "b": 0.1 * jax.random.normal(k[3], (d,))}}


def pixel_apply(p, x, t, pooled=False):
  """One dense layer shared over the pixels (kfac-jax tags it "repeated_dense")."""
  b, h, w, c = x.shape
  a = jnp.concatenate([x, time_feature(x, t)], axis=-1).reshape(b, h * w, c + 1)
  s = a @ p["w"] + p["b"]
  if pooled:  # one output per image, shown at every pixel
    s = jnp.broadcast_to(jnp.mean(s, axis=1, keepdims=True), s.shape)
  return s.reshape(x.shape)


def conv_apply(p, x, t, pooled=False):
  """A 2x2 SAME convolution (HWIO kernel, as in flax)."""
  a = jnp.concatenate([x, time_feature(x, t)], axis=-1)
  s = jax.lax.conv_general_dilated(a, p["w"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["b"]
  if pooled:
    s = jnp.broadcast_to(jnp.mean(s, axis=(1, 2), keepdims=True), s.shape)
  return s


def problem(n, k, shape, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  x0 = jax.random.normal(keys[0], (n,) + shape)
  draws = draws_lib.fixed_draws(keys[1], k, shape, T, timesteps="random", dtype=x0.dtype)
  return schedules.linear(T), x0, draws, keys[2]


def flat_indices(params, lay):
  sizes = [x.size for x in jax.tree.leaves(params)]
  offsets = np.cumsum([0] + sizes)
  return np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in lay.leaf_indices])


def block_errors(dense, approx, params, layout):
  """Frobenius error of each block of ``approx`` (dense [P, P]) to ``dense``."""
  out = []
  for lay in layout:
    idx = flat_indices(params, lay)
    out.append(np.linalg.norm(dense[np.ix_(idx, idx)] - approx[np.ix_(idx, idx)])
               / np.linalg.norm(dense[np.ix_(idx, idx)]))
  return out


def dense_kfac(state, params):
  return dense.dense_operator(functools.partial(kfac.kfac_matvec, state), params)


def test_kfac_exact_for_one_example_draw(x64):
  schedule, x0, draws, key = problem(1, 1, (2, 2, 1))
  params = mlp_params(key)
  g = dense.dense_ggn(mlp_apply, params, schedule, x0, draws)
  state = kfac.fit_kfac(mlp_apply, params, schedule, x0, draws, **EXACT)
  assert [lay.kind for lay in state.layout] == ["kronecker", "kronecker"]
  np.testing.assert_allclose(block_errors(g, dense_kfac(state, params), params, state.layout),
                             0.0, atol=1e-12)


def test_kfac_is_kronecker_of_expectations(x64):
  # With several example-draws E[aaᵀ ⊗ ggᵀ] ≠ E[aaᵀ] ⊗ E[ggᵀ] for the hidden layer;
  # the last layer stays exact because its g = √(2/D) e_o is the same for every pair.
  schedule, x0, draws, key = problem(4, 2, (2, 2, 1))
  params = mlp_params(key)
  g = dense.dense_ggn(mlp_apply, params, schedule, x0, draws)
  state = kfac.fit_kfac(mlp_apply, params, schedule, x0, draws, batch_size=2, **EXACT)
  hidden, last = block_errors(g, dense_kfac(state, params), params, state.layout)
  assert hidden > 1e-2
  assert last < 1e-12
  # Off-diagonal (cross-layer) blocks are zero: K-FAC is block diagonal.
  v = jax.tree.map(jnp.zeros_like, params)
  v["l1"]["w"] = jnp.ones_like(v["l1"]["w"])
  assert float(jnp.abs(kfac.kfac_matvec(state, v)["l2"]["w"]).max()) == 0.0


@pytest.mark.parametrize("apply_fn,shape,exact,inexact", [
    (pixel_apply, (2, 2, 1), "expand", "reduce"),
    (functools.partial(pixel_apply, pooled=True), (2, 2, 1), "reduce", "expand"),
    (conv_apply, (2, 2, 1), "expand", None),
    (functools.partial(conv_apply, pooled=True), (2, 2, 1), "reduce", None),
])
def test_weight_sharing_expand_and_reduce(x64, apply_fn, shape, exact, inexact):
  # A linear weight-shared layer: "expand" is exact when every position is its own
  # output, "reduce" when the positions are pooled before the loss (Eschenhagen et
  # al. 2023), for any number of example-draws.
  schedule, x0, draws, key = problem(3, 2, shape)
  c = shape[-1]
  base = getattr(apply_fn, "func", apply_fn)
  wshape = (c + 1, c) if base is pixel_apply else (2, 2, c + 1, c)
  params = {"w": jax.random.normal(key, wshape), "b": jnp.full((c,), 0.3)}
  g = dense.dense_ggn(apply_fn, params, schedule, x0, draws)
  state = kfac.fit_kfac(apply_fn, params, schedule, x0, draws, weight_sharing=exact, **EXACT)
  assert len(state.layout) == 1 and state.layout[0].kind == "kronecker"
  [err] = block_errors(g, dense_kfac(state, params), params, state.layout)
  assert err < 1e-12
  if inexact is not None:
    other = kfac.fit_kfac(apply_fn, params, schedule, x0, draws, weight_sharing=inexact,
                          **EXACT)
    [err] = block_errors(g, dense_kfac(other, params), params, other.layout)
    assert err > 1e-2


def test_grouped_conv_falls_back_to_a_diagonal_block_with_a_warning(x64):
  # The registry covers ungrouped convolutions only: fit_kfac says so, naming the path.
  def grouped_apply(p, x, t):
    a = jnp.concatenate([x, time_feature(x, t)], axis=-1)  # 2 channels, 2 groups
    return jax.lax.conv_general_dilated(a, p["w"], (1, 1), "SAME", feature_group_count=2,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))[..., :1]

  schedule, x0, draws, key = problem(2, 1, (2, 2, 1))
  params = {"w": jax.random.normal(key, (2, 2, 1, 2))}
  with pytest.warns(UserWarning, match=r"w \[2, 2, 1, 2\]: the kernel of a grouped conv"):
    state = kfac.fit_kfac(grouped_apply, params, schedule, x0, draws, **EXACT)
  assert [lay.kind for lay in state.layout] == ["diagonal"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ekfac_never_worse_than_kfac(x64, seed):
  schedule, x0, draws, key = problem(4, 2, (2, 2, 1), seed=seed)
  params = mlp_params(key)
  g = dense.dense_ggn(mlp_apply, params, schedule, x0, draws)
  k_state = kfac.fit_kfac(mlp_apply, params, schedule, x0, draws, **EXACT)
  e_state = ekfac.fit_ekfac(mlp_apply, params, schedule, x0, draws, k_state, batch_size=2,
                            **EXACT)
  dense_e = dense.dense_operator(functools.partial(ekfac.ekfac_matvec, e_state), params)
  k_err = block_errors(g, dense_kfac(k_state, params), params, k_state.layout)
  e_err = block_errors(g, dense_e, params, e_state.layout)
  assert all(e <= k + 1e-12 for e, k in zip(e_err, k_err)), (e_err, k_err)
  assert e_err[0] < k_err[0]  # strictly better on the hidden layer
  # Λ is the diagonal of each true block in K-FAC's eigenbasis.
  lay, blk = e_state.layout[0], e_state.blocks[0]
  idx = flat_indices(params, lay)
  basis = jnp.kron(blk.a_eigvecs, blk.g_eigvecs)  # row-major vec of M [d_in+1, d_out]
  # The dense block is in leaf order (kernel rows, then the bias row): the same as
  # the block matrix M flattened row-major.
  order = np.concatenate([flat_indices(params, lay._replace(leaf_indices=(i,)))
                          for i in lay.leaf_indices])
  block = g[np.ix_(order, order)]
  np.testing.assert_allclose(jnp.diag(basis.T @ block @ basis), blk.eigvals.ravel(),
                             rtol=1e-9, atol=1e-12)
  del idx


def test_inverse_vp_matches_dense_solve(x64):
  schedule, x0, draws, key = problem(3, 2, (2, 2, 1))
  params = mlp_params(key)
  k_state = kfac.fit_kfac(mlp_apply, params, schedule, x0, draws, **EXACT)
  e_state = ekfac.fit_ekfac(mlp_apply, params, schedule, x0, draws, k_state, **EXACT)
  flat, unravel = ravel_pytree(params)
  v = jax.random.normal(jax.random.PRNGKey(3), flat.shape)
  for state, matvec, inverse_vp in ((k_state, kfac.kfac_matvec, kfac.kfac_inverse_vp),
                                    (e_state, ekfac.ekfac_matvec, ekfac.ekfac_inverse_vp)):
    matrix = dense.dense_operator(functools.partial(matvec, state), params)
    expected = np.linalg.solve(matrix + 0.3 * np.eye(flat.size), v)
    got = jax.jit(inverse_vp)(state, unravel(v), 0.3)  # the state is a pytree
    np.testing.assert_allclose(ravel_pytree(got)[0], expected, rtol=1e-9, atol=1e-12)
    default = inverse_vp(state, unravel(v))  # per-block 0.1 × mean eigenvalue
    assert np.all(np.isfinite(ravel_pytree(default)[0]))
  # The default damping of one block is 0.1 × its mean eigenvalue.
  lam = 0.1 * jnp.mean(kfac.kfac_eigenvalues(k_state)[1])
  v2 = jax.tree.map(jnp.zeros_like, params)
  v2["l2"]["b"] = jnp.ones_like(v2["l2"]["b"])
  np.testing.assert_allclose(
      kfac.kfac_inverse_vp(k_state, v2)["l2"]["b"],
      kfac.kfac_inverse_vp(k_state, v2, float(lam))["l2"]["b"], rtol=1e-12)


def test_sampled_modes_converge_to_exact_kfac(x64):
  schedule, x0, draws, key = problem(3, 2, (2, 2, 1))
  params = mlp_params(key)
  exact = dense_kfac(kfac.fit_kfac(mlp_apply, params, schedule, x0, draws, **EXACT), params)
  for mode in ("ggn_curvature_prop", "fisher_gradients"):
    state = kfac.fit_kfac(mlp_apply, params, schedule, x0, draws, estimation_mode=mode,
                          num_samples=200, key=jax.random.PRNGKey(5))
    assert max(block_errors(exact, dense_kfac(state, params), params, state.layout)) < 0.15


def test_parameters_outside_layers_get_the_exact_ggn_diagonal(x64):
  # A parameter in no dense/conv layer gets the exact GGN diagonal Σ_r γ_r² / (N K),
  # from the same pass as the factors.
  def scaled_apply(p, x, t):
    return mlp_apply(p["m"], x, t) * jnp.exp(p["s"]).reshape(2, 2, 1)

  schedule, x0, draws, key = problem(4, 2, (2, 2, 1))
  params = {"m": mlp_params(key), "s": jnp.array([0.1, -0.2, 0.3, 0.0])}
  g = np.diag(dense.dense_ggn(scaled_apply, params, schedule, x0, draws))[-4:]
  state = kfac.fit_kfac(scaled_apply, params, schedule, x0, draws, batch_size=2,
                        chunk_size=3, **EXACT)
  assert [lay.kind for lay in state.layout] == ["kronecker", "kronecker", "diagonal"]
  assert [lay.name for lay in state.layout] == ["m/l1/w", "m/l2/w", "s"]
  np.testing.assert_allclose(state.blocks[2].diag[0], g, rtol=1e-10)


def test_batches_and_chunks_give_the_same_factors(x64):
  schedule, x0, draws, key = problem(5, 2, (2, 2, 1))
  params = mlp_params(key)
  one = kfac.fit_kfac(mlp_apply, params, schedule, x0, draws, **EXACT)
  split = kfac.fit_kfac(mlp_apply, params, schedule, x0, draws, batch_size=2, chunk_size=3,
                        **EXACT)
  for a, b in zip(one.blocks, split.blocks):
    np.testing.assert_allclose(a.a, b.a, rtol=1e-12)
    np.testing.assert_allclose(a.g, b.g, rtol=1e-12)


def test_bad_inputs_raise(x64):
  schedule, x0, draws, key = problem(2, 1, (2, 2, 1))
  params = mlp_params(key)
  with pytest.raises(ValueError, match="weight_sharing must be one of"):
    kfac.fit_kfac(mlp_apply, params, schedule, x0, draws, weight_sharing="both")
  with pytest.raises(ValueError, match="estimation_mode must be one of"):
    kfac.fit_kfac(mlp_apply, params, schedule, x0, draws, estimation_mode="exact")
  with pytest.raises(ValueError, match="backend must be one of"):
    kfac.fit_kfac(mlp_apply, params, schedule, x0, draws, backend="torch")
  with pytest.raises(ValueError, match="chunk_size must be"):
    kfac.fit_kfac(mlp_apply, params, schedule, x0, draws, chunk_size=0)
  with pytest.raises(ValueError, match="generic_diagonal must be"):
    kfac.fit_kfac(mlp_apply, params, schedule, x0, draws, generic_diagonal="exact")
  with pytest.raises(ValueError, match="batch_size must be"):
    kfac.fit_kfac(mlp_apply, params, schedule, x0, draws, batch_size=0, **EXACT)
  with pytest.raises(TypeError, match="kfac_state must be a KfacState"):
    ekfac.fit_ekfac(mlp_apply, params, schedule, x0, draws, None)
  state = kfac.KfacState(
      (kfac.kron_block(jnp.eye(6), jnp.eye(4)),),
      (kfac.BlockLayout("l2", "kronecker", (1, 0), ((5, 4), (4,)), ("ab -> (a)b", "a -> 1a"),
                        (6, 4)),))
  good = {"b": jnp.ones(4), "w": jnp.ones((5, 4))}
  np.testing.assert_allclose(kfac.kfac_inverse_vp(state, good, 1.0)["w"], 0.5)
  with pytest.raises(ValueError, match=r"leaf 1 \(block l2\) should have shape \(5, 4\)"):
    kfac.kfac_inverse_vp(state, {"b": jnp.ones(4), "w": jnp.ones((4, 4))})
  with pytest.raises(ValueError, match="must have the 2 parameter leaves"):
    kfac.kfac_inverse_vp(state, params)
  with pytest.raises(ValueError, match="damping must be"):
    kfac.kfac_inverse_vp(state, good, damping=-1.0)
