"""The UNet's kernels routed through an injected layer: same model, exact structured features."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax import traverse_util

from jattr import models
from jattr.diffusion import draws as draws_lib
from jattr.diffusion import measurements
from jattr.diffusion import schedules
from jattr.features import structured as st
from jattr.grads import per_example as pe

T, K = 20, 3


def _config(conv_impl="xla"):
  # Two levels (a strided conv, 1×1 skip convs where channels change), attention at
  # the 2×2 level (qkv/proj Linears): every kind of layer the UNet has.
  return models.UNetConfig(image_shape=(4, 4, 1), base_channels=4, channel_mults=(1, 2),
                           num_res_blocks=1, attn_resolutions=(2,), num_groups=2,
                           time_embed_dim=8, conv_impl=conv_impl)


def _params(config):
  params = models.make_init_fn(config)(jax.random.key(0))
  # Non-zero biases and norm parameters, so that leaving them out of the layer matters.
  rng = np.random.default_rng(1)
  return jax.tree.map(
      lambda a: jnp.asarray(np.asarray(a, np.float64) + 0.1 * rng.standard_normal(a.shape)),
      params)


def _normal(seed, *shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


def _kernel_paths(params):
  return {"/".join(p[:-1]): v for p, v in traverse_util.flatten_dict(params).items()
          if p[-1] == "kernel"}


def _structured_fn(config):
  layered = models.make_layered_apply_fn(config)
  draws = draws_lib.Draws(t=jnp.asarray([0, 7, 19]), eps=_normal(5, K, 4, 4, 1))
  schedule = schedules.linear(T)

  def fn(params, x0, layer):
    apply_fn = functools.partial(layered, layer=layer)
    return measurements.measurement_fn("square_norm", apply_fn, schedule, draws)(params, x0)

  return fn


def test_plain_layer_is_the_same_model(x64):
  x, t = _normal(0, 3, 4, 4, 1), jnp.asarray([0, 5, 19])
  for impl in ("xla", "im2col"):
    config = _config(impl)
    params = _params(config)
    want = jax.jit(models.make_apply_fn(config))(params, x, t)
    layered = models.make_layered_apply_fn(config)
    got = jax.jit(lambda p, x, t: layered(p, x, t, st.plain_layer))(params, x, t)
    assert got.dtype == jnp.float64
    if impl == "xla":
      # Same operations in the same order: identical, not merely close.
      np.testing.assert_array_equal(got, want)
    else:
      np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)


def test_layer_names_are_the_kernel_paths_each_called_once(x64):
  config = _config()
  params = _params(config)
  kernels = _kernel_paths(params)
  seen = {}

  def layer(name, x, w, spec=st.Dense()):
    seen[name] = seen.get(name, 0) + 1
    assert w.shape == kernels[name].shape, name
    assert isinstance(spec, st.Conv if w.ndim == 4 else st.Dense), name
    return st.apply_layer(spec, x, w)

  # A measurement calls the model once on the batch of its K draws (traced, not run:
  # the calls happen while tracing).
  jax.eval_shape(lambda p, x0: _structured_fn(config)(p, x0, layer), params, _normal(0, 4, 4, 1))
  assert sorted(seen) == sorted(kernels)
  assert set(seen.values()) == {1}
  strided = [n for n in kernels if n.startswith("downsample")]
  assert strided == ["downsample/0/conv"]
  specs = st._record_layers(_structured_fn(config), params, _normal(0, 4, 4, 1))
  assert specs["downsample/0/conv"][0] == st.Conv(strides=(2, 2), padding="SAME")


@pytest.mark.slow  # 25 s; the fast cases: projection_test's structured dense and conv tests
def test_structured_features_equal_projected_kernel_gradients(x64):
  """φ_l = vec(∂f/∂W_l) @ (P_in ⊗ P_out) for every kernel W_l of the UNet, exactly.

  The reference forms the per-example gradients of all parameters and keeps the
  kernels; the structured features never form them.
  """
  config = _config()
  params = _params(config)
  fn = _structured_fn(config)
  x = _normal(3, 4, 4, 4, 1)
  proj = st.StructuredConfig(dim_in=3, dim_out=2, kind="gaussian", seed=4)

  grad_fn = jax.jit(lambda p, x: pe.per_example_grads(lambda p, e: fn(p, e, st.plain_layer), p, x))
  grads = _kernel_paths(grad_fn(params, x))
  want = []
  for name in sorted(grads):
    g = np.asarray(grads[name])  # [N, *kernel shape]
    d_in, d_out = int(np.prod(g.shape[1:-1])), g.shape[-1]
    p_in, p_out = st.layer_projections(proj, name, d_in, d_out, jnp.float64)
    want.append(g.reshape(g.shape[0], -1) @ np.kron(p_in, p_out))
  want = np.concatenate(want, axis=1)
  got = st.structured_featurize(fn, params, x, proj)
  num_layers = len(_kernel_paths(params))
  assert got.shape == want.shape == (4, num_layers * 3 * 2)
  # Entry by entry, so a layer missing, misnamed, out of order or given the wrong
  # input/cotangent fails; biases and norms are non-zero but rightly absent.
  np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * float(np.max(np.abs(want))))


def test_unsupported_layers_raise():
  class Grouped(nnx.Module):

    def __init__(self):
      self.conv = nnx.Conv(4, 4, (3, 3), feature_group_count=2, rngs=nnx.Rngs(0))

    def __call__(self, x):
      return self.conv(x)

  module = models.route_layers(Grouped(), st.plain_layer)
  with pytest.raises(NotImplementedError, match="layer 'conv'.*feature_group_count=2"):
    module(jnp.ones((1, 4, 4, 4)))

  class NoLayers(nnx.Module):

    def __init__(self):
      self.norm = nnx.GroupNorm(4, num_groups=2, rngs=nnx.Rngs(0))

  with pytest.raises(ValueError, match="no nnx.Conv or nnx.Linear"):
    models.route_layers(NoLayers(), st.plain_layer)
