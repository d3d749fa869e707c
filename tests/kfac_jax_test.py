"""jattr's native K-FAC against kfac-jax's, factor by factor (the pinned stack only).

kfac-jax 0.0.8 runs on jax 0.9.1 (``pip install -e '.[kfac]'``); .ci/run's pinned-stack
stage runs this file. On other stacks it is skipped (tests/conftest.py).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kfac_test import EXACT, conv_apply, mlp_apply, mlp_params, pixel_apply, problem, time_feature

from jattr import models
from jattr.curvature import kfac

pytestmark = pytest.mark.kfac_jax
kfac_jax = pytest.importorskip("kfac_jax")
kfac_blocks = pytest.importorskip("jattr.curvature.kfac_blocks")


def strided_conv_apply(p, x, t, stride=2, padding="SAME"):
  """A 3x3 conv over 3 input channels with stride 2, upsampled back to x's shape."""
  a = jnp.concatenate([x, x ** 2, time_feature(x, t)], axis=-1)
  s = jax.lax.conv_general_dilated(a, p["w"], (stride, stride), padding,
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  if "b" in p:
    s = s + p["b"]
  reps = (x.shape[1] // s.shape[1], x.shape[2] // s.shape[2])
  return jnp.repeat(jnp.repeat(s, reps[0], axis=1), reps[1], axis=2)


def assert_same_factors(native, theirs):
  kron = lambda s: {lay.name: blk for lay, blk in zip(s.layout, s.blocks)  # noqa: E731
                    if lay.kind == "kronecker"}
  mine, ref = kron(native), kron(theirs)
  assert mine.keys() == ref.keys() and mine
  for name in mine:  # A ⊗ G: the split of a scalar between A and G is a convention
    np.testing.assert_allclose(np.kron(mine[name].a, mine[name].g),
                               np.kron(ref[name].a, ref[name].g), rtol=1e-9, atol=1e-12,
                               err_msg=name)


@pytest.mark.parametrize("apply_fn,shape,sharing", [
    (mlp_apply, (2, 2, 1), "expand"),
    (pixel_apply, (2, 2, 2), "expand"),
    (pixel_apply, (2, 2, 2), "reduce"),
    (conv_apply, (3, 3, 2), "expand"),
    (conv_apply, (3, 3, 2), "reduce"),
    (functools.partial(strided_conv_apply, padding="VALID"), (6, 6, 2), "expand"),
])
def test_native_factors_equal_kfac_jax(x64, apply_fn, shape, sharing):
  schedule, x0, draws, key = problem(3, 2, shape)
  base = getattr(apply_fn, "func", apply_fn)
  c = shape[-1]
  if base is mlp_apply:
    params = mlp_params(key)
  elif base is pixel_apply:
    params = {"w": jax.random.normal(key, (c + 1, c)), "b": jnp.array([0.3, -0.1])}
  elif base is conv_apply:
    params = {"w": jax.random.normal(key, (2, 2, c + 1, c)), "b": jnp.array([0.3, -0.1])}
  else:
    params = {"w": jax.random.normal(key, (3, 3, 2 * c + 1, 2)), "b": jnp.array([0.3, -0.2])}
  fit = functools.partial(kfac.fit_kfac, apply_fn, params, schedule, x0, draws,
                          weight_sharing=sharing, batch_size=2, **EXACT)
  assert_same_factors(fit(), fit(backend="kfac_jax"))


def test_native_factors_equal_kfac_jax_on_the_unet(x64):
  # The digits UNet with XLA convolutions (kfac-jax does not match im2col ones):
  # every conv, dense and attention weight, sampled cotangents from the same key
  # are not comparable, so the exact mode on two example-draws.
  config = models.digits_config()
  params = jax.tree.map(lambda x: x.astype(jnp.float64),
                        models.make_init_fn(config)(jax.random.PRNGKey(0)))
  schedule, x0, draws, _ = problem(1, 2, (8, 8, 1))
  apply_fn = models.kfac_apply_fn(config)
  fit = functools.partial(kfac.fit_kfac, apply_fn, params, schedule, x0, draws,
                          estimation_mode="ggn_curvature_prop", num_samples=1,
                          key=jax.random.PRNGKey(3))
  native, theirs = fit(), fit(backend="kfac_jax")
  # Sampled cotangents differ between the two, so compare A (cotangent-free) exactly
  # and check that every layer got a Kronecker block in both.
  kron = lambda s: {lay.name: blk for lay, blk in zip(s.layout, s.blocks)  # noqa: E731
                    if lay.kind == "kronecker"}
  assert kron(native).keys() == kron(theirs).keys()
  for name, blk in kron(native).items():  # A up to the scalar kfac-jax moves into G
    ref = kron(theirs)[name].a
    np.testing.assert_allclose(blk.a * (np.trace(ref) / np.trace(blk.a)), ref, rtol=1e-8,
                               atol=1e-10, err_msg=name)


# The default run keeps one case per padding, with and without bias and chunking
# (SAME-False-False, SAME-True-True, VALID-False-True); the other two are slow.
@pytest.mark.parametrize("padding,bias,chunked", [
    pytest.param("SAME", True, False, marks=pytest.mark.slow),
    pytest.param("VALID", True, False, marks=pytest.mark.slow),
    ("SAME", False, False), ("SAME", True, True), ("VALID", False, True)])
def test_conv_expand_block_equals_kfac_jax_block(x64, monkeypatch, padding, bias, chunked):
  # backend="kfac_jax" registers Conv2DExpand, which computes A from explicit patches;
  # kfac-jax's own block (patches_moments) must give the same factors, for strides,
  # padding, bias or none, and when the patches are summed over chunks of examples.
  schedule, x0, draws, key = problem(3, 2, (4, 4, 2) if padding == "SAME" else (6, 6, 2))
  params = {"w": jax.random.normal(key, (3, 3, 5, 2))}
  if bias:
    params["b"] = jnp.array([0.3, -0.2])
  apply_fn = functools.partial(strided_conv_apply, padding=padding)
  if chunked:
    monkeypatch.setattr(kfac_blocks, "PATCH_CHUNK_BYTES", 3 * 8 * 4 * 3 * 3 * 5)
  fit = functools.partial(kfac.fit_kfac, apply_fn, params, schedule, x0, draws, batch_size=2,
                          backend="kfac_jax", **EXACT)
  ours = fit()
  import jattr.curvature.kfac_jax_backend as kfac_jax_backend  # optional: the kfac extra
  monkeypatch.setattr(kfac_jax_backend, "Conv2DExpand", kfac_jax.Conv2DTwoKroneckerFactored)
  theirs = fit()
  [mine], [ref] = ours.blocks, theirs.blocks
  assert mine.a.shape == (3 * 3 * 5 + bias,) * 2
  np.testing.assert_allclose(mine.a, ref.a, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(mine.g, ref.g, rtol=1e-10, atol=1e-12)


def test_kfac_jax_generic_diagonal_modes(x64):
  # kfac-jax's NaiveDiagonal squares batch sums; backend="kfac_jax" refits it per
  # example by default, which is the native diagonal.
  def scaled_apply(p, x, t):
    return mlp_apply(p["m"], x, t) * jnp.exp(p["s"]).reshape(2, 2, 1)

  schedule, x0, draws, key = problem(4, 2, (2, 2, 1))
  params = {"m": mlp_params(key), "s": jnp.array([0.1, -0.2, 0.3, 0.0])}
  native = kfac.fit_kfac(scaled_apply, params, schedule, x0, draws, batch_size=2, **EXACT)
  diag = {}
  for mode in ("per_example", "kfac_jax"):
    state = kfac.fit_kfac(scaled_apply, params, schedule, x0, draws, batch_size=2,
                          backend="kfac_jax", generic_diagonal=mode, **EXACT)
    diag[mode] = state.blocks[-1].diag[0]
  np.testing.assert_allclose(diag["per_example"], native.blocks[-1].diag[0], rtol=1e-10)
  g = native.blocks[-1].diag[0]
  assert np.abs(diag["kfac_jax"] - g).max() > 1e-2 * g.max()
  with pytest.raises(ValueError, match="'fisher_empirical' is not supported by backend"):
    kfac.fit_kfac(mlp_apply, params["m"], schedule, x0, draws, backend="kfac_jax",
                  estimation_mode="fisher_empirical")
